"""What publishing metrics costs per training step, in microseconds and as a share of a step.
Prints one JSON line.

    python -m bench.metrics_overhead [--resolution 8] [--batch 32] [--steps 5] [--updates 2000]
                                     [--max-resolution R --latent-size L --fmap-base B --fmap-max M]

Inside one Ray worker process (a task on a single-node local Ray, so `ray.util.metrics` records
through the real core-worker path, exported by a real metrics agent), it times:

- `step_s`: median wall time of one training step at --resolution/--batch as
  bench/common.StepSetup builds it (the paper's networks unless the width flags say otherwise),
  on this machine's CPU with every core this task may use;
- `observe_step_us` and `observe_stats_us`: the median cost of one call of
  monitoring.metrics.TrainingMetrics.observe_step (images, step, data-wait and backward seconds)
  and of observe_stats with every stat it knows and the phase, each timed over --updates calls in
  blocks between the training steps, so load from other jobs hits both alike;
- `metrics_us`: both together, the worst case a loop pays per step (it calls observe_stats only
  every monitoring.log_every_steps steps);
- `overhead` = metrics_us / step_s, against the CPU step measured here, and
  `overhead_of_gpu_step` = metrics_us against GPU_STEP_MS_REFERENCE (bench/common.py): the order
  of a 128x128 step on a GPU, a reference and not measured here (`gpu_step_ms_reference`).

Both metric calls swallow their own errors (training must not stop for a metric); the bench
stops if one did, since it would otherwise time a failure path.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import GPU_STEP_MS_REFERENCE, add_width_args, cores, emit, widths

REPO = Path(__file__).resolve().parents[1]


def _time_calls(fn, calls: int) -> float:
    """Seconds per call of fn over `calls` calls."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def _measure(resolution: int, batch: int, steps: int, updates: int, nets: dict, repo: str) -> dict:
    sys.path.insert(0, repo)
    import torch

    from bench.common import StepSetup
    from monitoring.metrics import STAT_GAUGES, TrainingMetrics

    torch.set_num_threads(cores())
    setup = StepSetup(resolution, batch, widths=nets)
    metrics = TrainingMetrics(run="bench", rank=0, node="")
    stats = {**dict.fromkeys(STAT_GAUGES, 1.0), "resolution": resolution, "phase": "stabilise"}
    parts = {"observe_step": lambda: metrics.observe_step(batch, 0.1, 0.002, backward_seconds=0.05),
             "observe_stats": lambda: metrics.observe_stats(stats)}
    setup.step()
    for fn in parts.values():
        fn()
    if getattr(metrics, "_failed", None):
        raise RuntimeError(f"TrainingMetrics failed in {sorted(metrics._failed)}; see the warning above")
    block = max(updates // steps, 1)
    step_times, part_times = [], {name: [] for name in parts}
    for _ in range(steps):
        step_times.append(_time_calls(setup.step, 1))
        for name, fn in parts.items():
            part_times[name].append(_time_calls(fn, block))
    return {"threads": torch.get_num_threads(), "updates": block * steps,
            "step_s": round(statistics.median(step_times), 4),
            "step_s_spread": [round(min(step_times), 4), round(max(step_times), 4)],
            **{f"{name}_us": round(statistics.median(times) * 1e6, 1) for name, times in part_times.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--updates", type=int, default=2000)
    add_width_args(p)
    p.add_argument("--json", action="store_true", help="print only the JSON line (the default)")
    args = p.parse_args(argv)
    from cluster.local import keep_ray_on_loopback

    keep_ray_on_loopback()  # before Ray is first imported, just below
    import ray

    from data_pipeline.runtime import ray_session

    with ray_session():  # one local node with this machine's CPUs, on 127.0.0.1
        task = ray.remote(num_cpus=cores())(_measure)
        measured = ray.get(task.remote(args.resolution, args.batch, args.steps, args.updates, widths(args), str(REPO)))
    metrics_us = round(measured["observe_step_us"] + measured["observe_stats_us"], 1)
    result = {"bench": "metrics_overhead", "resolution": args.resolution, "batch": args.batch, **widths(args),
              "steps": args.steps, **measured, "metrics_us": metrics_us,
              "overhead": round(metrics_us / 1e6 / measured["step_s"], 6),
              "gpu_step_ms_reference": GPU_STEP_MS_REFERENCE,
              "overhead_of_gpu_step": round(metrics_us / 1e3 / GPU_STEP_MS_REFERENCE, 5),
              "inside_ray_worker": True, "loadavg_1min": round(os.getloadavg()[0], 2)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
