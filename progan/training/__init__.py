"""The training job on Ray Train: the run's plan, each worker's loop and its step, DDP per
phase, the run's state, checkpoints and logs. The only part of progan/ that knows ranks and Ray."""
