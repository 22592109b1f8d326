"""Training a planned run on the cluster this process is connected to: Ray Train's fit in a thread
of its own, so that Ctrl-C reaches the launcher as a KeyboardInterrupt (in the main thread Ray
Train installs its own SIGINT handler, which aborted the run amid Ray's tracebacks and told
nothing of how to go on); a fixed size the cluster did not give, in one line; and the one line
Ctrl-C prints."""
from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

from base import storage
from base.errors import UserError
from progan.training.run_plan import RunPlan


def fit_run(plan: RunPlan, shards: Path | str, train_slot: str | None) -> dict:
    """Ray Train on the cluster (`train_slot`: the resource each worker takes on our own local
    nodes); the final metrics. UserError, one line, when a fixed size never started."""
    from ray.train import ControllerError

    from progan.training.train_loop import build_trainer

    trainer = build_trainer(plan.cfg, plan.run_dir, shards, plan.workers, train_slot=train_slot)
    print(f"[launch] training: up to {plan.workers} workers", flush=True)
    try:
        return dict(fit_in_thread(trainer).metrics or {})
    except ControllerError as exc:  # a fixed size the cluster did not give (build_trainer: not retried)
        c = plan.cfg.cluster
        reason = (str(exc.controller_failure).strip().splitlines() or [type(exc.controller_failure).__name__])[0]
        raise UserError(f"the cluster did not start {c.min_workers} training workers within "
                        f"cluster.worker_start_timeout_s={c.worker_start_timeout_s:g} s ({reason[:200]}); "
                        f"add nodes, or pass fewer --min-nodes/--workers") from None


def fit_in_thread(trainer):
    """trainer.fit() in a thread of its own; this thread waits for it, so Ctrl-C lands here."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def interrupted_line(run_dir: Path | storage.RemotePath) -> str:
    """What Ctrl-C prints, in one line: where the run stopped (its latest checkpoint, the one
    --resume continues from) and the command that continues it."""
    from progan.model.checkpoint import CheckpointError, latest_checkpoint

    program = sys.argv[0] if Path(sys.argv[0]).name == "launch.py" else "launch.py"
    command = f"python {shlex.quote(program)} --resume {shlex.quote(str(run_dir))}"
    if isinstance(run_dir, Path):
        try:
            state, folder, _ = latest_checkpoint(run_dir)
        except CheckpointError:
            return f"interrupted before the run's first checkpoint; start it again with: {command}"
        return (f"interrupted: the run stopped at its checkpoint at kimg {state['images_seen'] / 1000:.3f} "
                f"({folder.name}); continue it with: {command}")
    return f"interrupted: continue the run from its latest checkpoint with: {command}"
