"""Does the loader keep a training worker fed? One JSON line.

    python -m bench.loader --shards DIR --resolution 64 --batch 16 --json [--seconds 20] [--steps 2]

loader_images_per_s: images per second that data_pipeline.loader delivers to one training worker
(rank 0 of 1): FaceStream(DIR) -> BatchReader.next_batch (webdataset read, shuffle buffer,
PNG/JPEG decode, average-pool to --resolution, mirroring), as the training loop draws them, for
--seconds, pass after pass; --loader-workers decodes in that many DataLoader processes. The first
batch (the shuffle buffer's first fill) is not counted.

train_step_images_per_s: images per second one training step consumes at that resolution and
batch: progan.training_step.train_step (WGAN-GP, Adam) on the paper's networks (Generator() and
Discriminator() at their defaults, the layers above --resolution frozen as in training), median
of --steps timed steps after one warm-up, with torch using every core. Measured after the loader, so
the two do not compete.

ratio = loader / train step: how many such workers one loader stream could feed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

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


def train_step_rate(resolution: int, batch: int, steps: int) -> tuple[float, float]:
    """images per second, median step seconds."""
    from progan.losses import WGANGP
    from progan.networks import Discriminator, Generator, set_trainable
    from progan.training_step import make_optimizer, train_step

    generator, critic = Generator(), Discriminator()
    set_trainable(generator, resolution, False)
    set_trainable(critic, resolution, False)
    opt_g, opt_d = (make_optimizer(net, 0.001, 0.0, 0.99, 1e-8) for net in (generator, critic))
    loss, reals = WGANGP(), torch.rand(batch, 3, resolution, resolution) * 2 - 1

    def step() -> float:
        started = time.perf_counter()
        train_step(generator, critic, critic, opt_g, opt_d, loss, reals, resolution, 1.0, generator.latent_size)
        return time.perf_counter() - started

    step()
    step_s = statistics.median(step() for _ in range(steps))
    return batch / step_s, step_s


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    loader_per_s, images, passes = loader_rate(args.shards, args.resolution, args.batch, args.seconds,
                                               args.loader_workers)
    step_per_s, step_s = train_step_rate(args.resolution, args.batch, args.steps)
    result = {
        "bench": "loader",
        "stored_resolution": stored_resolution(args.shards),
        "resolution": args.resolution,
        "batch": args.batch,
        "loader_images_per_s": round(loader_per_s, 1),
        "loader_images": images,
        "loader_passes": round(passes, 1),
        "loader_workers": args.loader_workers,
        "train_step_images_per_s": round(step_per_s, 2),
        "train_step_s": round(step_s, 3),
        "torch_threads": torch.get_num_threads(),
        "ratio": round(loader_per_s / step_per_s, 1),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if not args.json:
        print(f"loader {result['loader_images_per_s']} img/s vs training step {result['train_step_images_per_s']} "
              f"img/s: {result['ratio']}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
