"""What publishing metrics costs, as a share of a training step. Prints one JSON line.

    python -m bench.metrics_overhead [--resolution 8] [--batch 32] [--steps 10] [--updates 2000]

Inside one Ray worker process (a task on a single-node local Ray, so `ray.util.metrics` records
through the real core-worker path, exported by a real metrics agent), it times:

- `step_s`: median wall time of `progan.training_step.train_step` at --resolution/--batch with the
  paper's networks (as bench/train_step.py builds them), on the CPU with this task's one thread
  budget (torch threads = the cores this process may use);
- `metrics_s`: median cost of one step's worth of metric updates, the worst case a training loop
  makes every step: `observe_step` with backward and all-reduce times, plus `observe_stats` with
  all ten stats and the phase (a loop logs stats only every few steps), plus one gauge refresh
  (the refresh thread runs every 5 s, not every step). Timed over --updates repetitions in blocks
  between the training steps, so load from other jobs hits both alike;
- `overhead` = metrics_s / step_s (the spec asks for < 1%); `observe_step_s`, `observe_stats_s`
  and `refresh_s` are the parts (a loop that logs stats every N steps pays observe_stats / N).

Not timed here: `AllReduceTimer`'s DDP hook, which adds two perf_counter calls, a list append and a
Python callback per gradient bucket to the default all-reduce.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _measure(resolution: int, batch: int, steps: int, updates: int, repo: str) -> dict:
    sys.path.insert(0, repo)
    import torch

    from monitoring.metrics import TrainingMetrics
    from progan.losses import WGANGP
    from progan.networks import Discriminator, Generator, set_trainable
    from progan.training_step import make_optimizer, train_step

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    set_trainable(G, resolution, False)
    set_trainable(D, resolution, False)
    opt_g = make_optimizer(G, 0.001, 0.0, 0.99, 1e-8)
    opt_d = make_optimizer(D, 0.001, 0.0, 0.99, 1e-8)
    loss = WGANGP()
    reals = torch.randn(batch, 3, resolution, resolution)

    def step(g=G, d=D):
        train_step(g, d, D, opt_g, opt_d, loss, reals, resolution, 1.0, G.latent_size)

    metrics = TrainingMetrics("bench", 0, "")
    stats = {"resolution": resolution, "phase": "stabilise", "alpha": 1.0, "world_size": 1, "lr": 1e-3,
             "loss_d": -0.3, "loss_g": 0.8, "grad_penalty": 0.05, "score_real": 1.2, "score_fake": -0.4,
             "img_per_s": 250.0}

    parts = {
        "observe_step": lambda: metrics.observe_step(batch, 0.1, 0.002, backward_seconds=0.05, allreduce_seconds=0.01),
        "observe_stats": lambda: metrics.observe_stats(stats),
        "refresh": metrics._refresh,
    }
    for _ in range(2):
        step()
        for fn in parts.values():
            fn()
    step_times, part_times = [], {name: [] for name in parts}
    block = max(updates // steps, 1)
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
        for name, fn in parts.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            part_times[name].append((time.perf_counter() - t0) / block)
    out = {"resolution": resolution, "batch": batch, "threads": threads, "steps": steps,
           "updates": block * steps, "step_s": statistics.median(step_times),
           "step_s_spread": [min(step_times), max(step_times)],
           **{f"{name}_s": statistics.median(times) for name, times in part_times.items()}}
    out["metrics_s"] = sum(out[f"{name}_s"] for name in parts)
    out["overhead"] = out["metrics_s"] / out["step_s"]

    metrics.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--updates", type=int, default=2000)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(num_cpus=cpus)(_measure)
        out = ray.get(task.remote(args.resolution, args.batch, args.steps, args.updates, str(REPO)))
    finally:
        ray.shutdown()
    out["inside_ray_worker"] = True
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
