"""Scores a checkpoint's generator against real faces: python -m progan.evaluate

    python -m progan.evaluate --checkpoint runs/demo --data data/demo_faces [--metric swd] [--metric fid]
        [--num-images N] [--seed S] [--json] [--inception-weights PATH] [--device auto|cpu|cuda]

--checkpoint is a run folder (its newest checkpoint), a checkpoint_* folder or a checkpoint.pt.
The EMA generator is evaluated at the checkpoint's resolution and fade-in alpha, against images from
the shards brought to that resolution as training sees them: 2x2 averaging; during a fade-in blended
with their half-resolution version by the same alpha, the distribution the generator was trained to
match (the official code only evaluates finished networks, so it has no rule for this); mirrored at
random when the run trained with mirroring, as the official evaluation does. Both sets go through
the official conversion to uint8 before any metric sees them.

Metrics (default: swd):
  swd  multi-scale sliced Wasserstein distance x 1e3 per pyramid level and its average, over
       16384 images per set by default (the paper's); see progan/metrics/swd.py.
  fid  Frechet Inception distance over 50000 images per set by default (the paper's); needs
       torch-fidelity's InceptionV3 weights file (--inception-weights), nothing is downloaded.
--num-images sets the count for every metric asked for. The shards may hold fewer images: the
reals then repeat pass after pass, as the official code's looping dataset does.

Each result is written as JSON beside the checkpoint file (metrics-swd.json, metrics-fid.json)
and printed as a table, or with --json as one JSON line per metric. The same command gives the same
numbers (all randomness comes from --seed). Mistakes give one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from base.errors import OneLineParser, UserError, run_cli
from progan.metrics.evaluation import (FIDEvaluation, SWDEvaluation, eval_batch_size, fake_batches, feed,
                                       real_batches)
from progan.model.trained import add_generator_args, load_trained_generator, pick_device

PROG = "python -m progan.evaluate"
METRICS = ("swd", "fid")
# images per set in the paper (and the official configs 'metric-swd-16k', 'metric-fid-50k');
# progan.metrics.swd / .fid hold the same numbers, not imported here to keep torch-fidelity's
# import off the SWD-only path
PAPER_NUM_IMAGES = {"swd": 16384, "fid": 50000}
MAX_NUM_IMAGES = 1_000_000  # 20x the paper's FID set: hours of generator and Inception time, still finite
MAX_SEED = 2 ** 63 - 1      # what the random generators take (as progan.generate's --seed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="SWD / FID of a checkpoint's EMA generator against real face shards.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p, "--checkpoint")
    p.add_argument("--data", required=True, help="face shards folder (with manifest.json) made by python -m data_pipeline")
    p.add_argument("--metric", action="append", choices=METRICS, help="swd (default) and/or fid; repeat for both")
    p.add_argument("--num-images", type=int, help="images per set (default: 16384 for swd, 50000 for fid, the paper's; "
                                                  f"2..{MAX_NUM_IMAGES})")
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed for latents, real image order and the metrics' sampling (0..{MAX_SEED})")
    p.add_argument("--json", action="store_true", help="print each result as one JSON line instead of a table")
    p.add_argument("--inception-weights", help="torch-fidelity's InceptionV3 weights file (needed for fid)")
    add_generator_args(p, "--device")
    args = p.parse_args(argv)
    args.metric = list(dict.fromkeys(args.metric or ["swd"]))  # in the order given, each once
    return args


# ---------------------------------------------------------------- checks before the work

def images_per_metric(metrics: list[str], num_images: int | None) -> dict[str, int]:
    if num_images is not None and num_images < 2:
        raise UserError(f"--num-images must be at least 2 (a distribution needs more than one image), not {num_images}")
    if num_images is not None and num_images > MAX_NUM_IMAGES:
        raise UserError(f"--num-images {num_images}: at most {MAX_NUM_IMAGES} (the paper's FID uses 50000)")
    return {metric: num_images or PAPER_NUM_IMAGES[metric] for metric in metrics}


def check_shards(shard_dir: str, resolution: int) -> int:
    """The number of faces in the shards; UserError unless they can be brought to `resolution`."""
    from data_pipeline.loader import count_images
    from data_pipeline.manifest import stored_resolution

    try:
        stored = stored_resolution(shard_dir)
        images = count_images(shard_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if stored < resolution:
        raise UserError(f"the shards in {shard_dir} are stored at {stored}x{stored}, below the checkpoint's "
                        f"{resolution}x{resolution}; make shards at {resolution} px or more")
    if stored % resolution:
        raise UserError(f"the shards in {shard_dir} are stored at {stored}x{stored}, which does not halve down "
                        f"to the checkpoint's {resolution}x{resolution}")
    return images


def output_path(checkpoint_file: Path, metric: str) -> Path:
    return checkpoint_file.parent / f"metrics-{metric}.json"


def check_writable(path: Path) -> None:
    """Proves that `path` can be written before minutes go into computing what goes there."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: a folder of that name is in the way")
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- output

def format_table(result: dict) -> str:
    where = (f"{result['checkpoint']} (EMA generator, {result['resolution']}x{result['resolution']}, "
             f"alpha {result['alpha']:.2f}, {result['images_seen'] / 1000:.1f} kimg)")
    sets = (f"{result['num_images']} generated vs {result['num_images']} real images from {result['data']} "
            f"({result['real_images_in_shards']} there), seed {result['seed']}")
    if result["metric"] == "fid":
        return f"FID of {where}\n{sets}\n  FID  {result['fid']:.3f}"
    lines = [f"SWD x 1e3 of {where}", sets, "  level      SWD x 1e3"]
    lines += [f"  {res + 'x' + res:<9} {value:10.3f}" for res, value in result["levels"].items()]
    lines.append(f"  {'average':<9} {result['avg']:10.3f}")
    if result["resolution"] < 16:
        lines.append(f"  (below 16x16: a single level, the {result['resolution']}x{result['resolution']} image itself)")
    return "\n".join(lines)


def write_result(path: Path, result: dict) -> None:
    from data_pipeline.manifest import write_json

    try:
        write_json(path, result)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- main

def evaluate(args: argparse.Namespace) -> list[tuple[dict, Path]]:
    counts = images_per_metric(args.metric, args.num_images)
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed}: must be in 0..{MAX_SEED}")
    device = pick_device(args.device)
    extractor = None
    if "fid" in args.metric:  # the weights are checked before the checkpoint: the cheaper mistake first
        from progan.metrics.fid import load_inception

        extractor = load_inception(args.inception_weights, device)
    trained = load_trained_generator(args.checkpoint, raw=False, device=device)
    resolution = trained.resolution
    if "swd" in args.metric and resolution < 8:
        raise UserError(f"SWD needs images of at least 8x8 for its 7x7 neighbourhoods; this checkpoint is at "
                        f"{resolution}x{resolution}")
    real_count = check_shards(args.data, resolution)
    outputs = {metric: output_path(trained.path, metric) for metric in args.metric}
    for path in outputs.values():
        check_writable(path)
    if real_count < max(counts.values()):
        print(f"note: the shards hold {real_count} images, so the {max(counts.values())} real images repeat them",
              file=sys.stderr)

    started = time.time()
    evaluations = {}
    for metric in args.metric:
        evaluations[metric] = (SWDEvaluation(resolution, counts[metric], args.seed, device) if metric == "swd"
                               else FIDEvaluation(extractor, counts[metric]))
    batch = eval_batch_size(resolution)
    with torch.inference_mode():
        feed(evaluations, "reals", real_batches(args.data, resolution, trained.config.data.mirror, args.seed,
                                                batch, device, trained.alpha))
        feed(evaluations, "fakes", fake_batches(trained, args.seed, batch))
    results = []
    for metric, evaluation in evaluations.items():
        result = {"metric": metric, "resolution": resolution, **evaluation.result(),
                  "num_images": counts[metric], "alpha": trained.alpha, "images_seen": trained.images_seen,
                  "checkpoint": str(trained.path), "data": str(args.data), "real_images_in_shards": real_count,
                  "seed": args.seed, "device": str(device), "seconds": round(time.time() - started, 1)}
        if metric == "fid":
            result["inception_weights"] = str(args.inception_weights)
        results.append((result, outputs[metric]))
    return results


def evaluate_and_report(args: argparse.Namespace) -> int:
    results = evaluate(args)
    for result, path in results:
        write_result(path, result)
    for result, path in results:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(format_table(result))
            print(f"wrote {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: evaluate_and_report(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
