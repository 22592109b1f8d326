"""The demo's quality goal, measured: the paper's SWD of a run's EMA generator against the run's own
real crops, as a multiple of the real-vs-real SWD at the same sample size.

With a hundred crops the SWD is dominated by its sample-size floor, so both distances use sets of
the same size: per split, the crops are shuffled into two disjoint halves A and B (randomly
mirrored, as training sees them), real-vs-real is SWD(A, B) and generated-vs-real is
SWD(|A| generated images, A). Both are averaged over `--splits` splits (a new shuffle, new latents
and new SWD directions each). The ratio of the two averages is the goal's measure (<= 1.5).

    python -m bench.demo_quality --run runs/<run> [--splits 32] [--raw] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from base.errors import OneLineParser, UserError, run_cli
from data_pipeline.loader import FaceStream, count_images, mirror_randomly, to_training_range
from progan.metrics.swd import sliced_wasserstein_distance, to_uint8
from progan.model.trained import load_trained_generator


def real_crops(shard_dir: str, resolution: int) -> torch.Tensor:
    """Every crop of the shards once, float NCHW in [-1, 1] at `resolution`."""
    count = count_images(shard_dir)
    stream = iter(FaceStream(shard_dir, rank=0, world_size=1, seed=0, shuffle_buffer=1, resolution=resolution))
    return to_training_range(torch.stack([next(stream) for _ in range(count)]), resolution)


def measure(run: str, splits: int, raw: bool) -> dict:
    if splits < 1:
        raise UserError(f"--splits must be at least 1, not {splits}")
    trained = load_trained_generator(run, raw=raw)
    reals = real_crops(f"{run}/data", trained.resolution)
    half = reals.shape[0] // 2
    if half < 2:
        raise UserError(f"{run}/data: {reals.shape[0]} crops, too few for two halves of at least 2")
    rvr, gvr = [], []
    for split in range(splits):
        rng = torch.Generator().manual_seed(split)
        shuffled = mirror_randomly(reals[torch.randperm(reals.shape[0], generator=rng)], rng)
        a, b = to_uint8(shuffled[:half]), to_uint8(shuffled[half:2 * half])
        fakes = to_uint8(trained.generate(torch.randn(half, trained.latent_size, generator=rng)))
        rvr.append(sliced_wasserstein_distance(a, b, seed=1000 + split))
        gvr.append(sliced_wasserstein_distance(a, fakes, seed=1000 + split))

    def mean(results) -> dict:
        levels = {str(res): round(sum(r.levels[res] for r in results) / len(results), 2) for res in results[0].levels}
        return {"avg": round(sum(r.avg for r in results) / len(results), 2), "levels": levels}

    real, generated = mean(rvr), mean(gvr)
    return {"bench": "demo_quality", "run": run, "weights": "raw" if raw else "ema",
            "resolution": trained.resolution, "kimg": round(trained.images_seen / 1000, 2),
            "images_per_set": half, "splits": splits, "real_vs_real": real, "generated_vs_real": generated,
            "ratio": round(generated["avg"] / real["avg"], 3)}


def report(args: argparse.Namespace) -> int:
    result = measure(args.run, args.splits, args.raw)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['run']} ({result['weights']}, {result['resolution']}x{result['resolution']}, "
              f"kimg {result['kimg']}): generated vs real {result['generated_vs_real']['avg']:.1f} "
              f"{result['generated_vs_real']['levels']}, real vs real {result['real_vs_real']['avg']:.1f} "
              f"{result['real_vs_real']['levels']}, ratio {result['ratio']:.2f} "
              f"({result['images_per_set']} images per set, {result['splits']} splits)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder with data/ and a checkpoint")
    parser.add_argument("--splits", type=int, default=32)
    parser.add_argument("--raw", action="store_true", help="the trained G instead of the EMA")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return run_cli("demo_quality", lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
