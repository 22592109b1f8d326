"""Does the loader keep a training worker fed? One JSON line.

    python -m bench.loader --shards DIR --resolution 64 --batch 16 --json [--seconds 20] [--steps 2]
                           [--loader-workers N] [--max-resolution R --latent-size L --fmap-base B --fmap-max M]

loader_images_per_s: images per second that data_pipeline.loader delivers to one training worker
(rank 0 of 1): FaceStream(DIR) -> BatchReader.next_batch (webdataset read, shuffle buffer,
PNG/JPEG decode, average-pool to --resolution, mirroring), as the training loop draws them, for
--seconds, pass after pass; --loader-workers decodes in that many DataLoader processes. The first
batch (the shuffle buffer's first fill) is not counted. `loader_ms_per_batch`: the same rate as
the time one batch of --batch takes, to set beside a training step's time.

train_step_images_per_s, train_step_ms: one training step at that resolution and batch, as
bench/common.StepSetup builds it (progan.training.training_step.train_step, WGAN-GP, Adam; the paper's
networks unless the width flags say otherwise, the layers above --resolution frozen as in
training), median of --steps timed steps after one warm-up, with torch using every core, on this
machine's CPU. Measured after the loader, so the two do not compete.

ratio = loader / train step: how many such workers one loader stream could feed. The loader
runs in the training process (or its DataLoader workers) on the CPU whatever device trains, so
`gpu_steps_fed` sets loader_ms_per_batch beside GPU_STEP_MS_REFERENCE (bench/common.py, the
order of a GPU step, `gpu_step_ms_reference`; a reference, not measured here): below 1, one
loader stream at this batch would keep such a GPU waiting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.common import GPU_STEP_MS_REFERENCE, StepSetup, add_width_args, emit, widths
from data_pipeline.loader import BatchReader, FaceStream, count_images
from data_pipeline.manifest import stored_resolution

SHUFFLE_BUFFER = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="a folder written by python -m data_pipeline")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to pull batches")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (data.loader_workers)")
    add_width_args(parser)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    return parser.parse_args(argv)


def loader_rate(shards: str, resolution: int, batch: int, seconds: float, workers: int) -> tuple[float, int, float]:
    """images per second, images counted, passes over the shards."""
    reader = BatchReader(FaceStream(shards, rank=0, world_size=1, seed=0, shuffle_buffer=SHUFFLE_BUFFER),
                         mirror=True, seed=0, loader_workers=workers)
    reader.next_batch(batch, resolution)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        images += reader.next_batch(batch, resolution).shape[0]
    return images / (time.perf_counter() - started), images, images / count_images(shards)


def train_step_seconds(setup: StepSetup, steps: int) -> float:
    """Median seconds of `steps` timed steps after one warm-up."""
    def step() -> float:
        started = time.perf_counter()
        setup.step()
        return time.perf_counter() - started

    step()
    return statistics.median(step() for _ in range(steps))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    loader_per_s, images, passes = loader_rate(args.shards, args.resolution, args.batch, args.seconds,
                                               args.loader_workers)
    step_s = train_step_seconds(StepSetup(args.resolution, args.batch, widths=widths(args)), args.steps)
    result = {
        "bench": "loader",
        "stored_resolution": stored_resolution(args.shards),
        "resolution": args.resolution,
        "batch": args.batch,
        **widths(args),
        "loader_images_per_s": round(loader_per_s, 1),
        "loader_ms_per_batch": round(args.batch / loader_per_s * 1e3, 2),
        "loader_images": images,
        "loader_passes": round(passes, 1),
        "loader_workers": args.loader_workers,
        "train_step_images_per_s": round(args.batch / step_s, 2),
        "train_step_ms": round(step_s * 1e3, 1),
        "torch_threads": torch.get_num_threads(),
        "ratio": round(loader_per_s * step_s / args.batch, 1),
        "gpu_step_ms_reference": GPU_STEP_MS_REFERENCE,
        "gpu_steps_fed": round(GPU_STEP_MS_REFERENCE / (args.batch / loader_per_s * 1e3), 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
