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
import zlib
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from data_pipeline.errors import OneLineParser, UserError, run_cli
from progan.trained import add_generator_args, load_trained_generator, pick_device

PROG = "python -m progan.evaluate"
METRICS = ("swd", "fid")
# images per set in the paper (and the official configs 'metric-swd-16k', 'metric-fid-50k');
# progan.metrics.swd / .fid hold the same numbers, not imported here to keep torch-fidelity's
# import off the SWD-only path
PAPER_NUM_IMAGES = {"swd": 16384, "fid": 50000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="SWD / FID of a checkpoint's EMA generator against real face shards.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_args(p, "--checkpoint")
    p.add_argument("--data", required=True, help="face shards folder (with manifest.json) made by python -m data_pipeline")
    p.add_argument("--metric", action="append", choices=METRICS, help="swd (default) and/or fid; repeat for both")
    p.add_argument("--num-images", type=int, help="images per set (default: 16384 for swd, 50000 for fid, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed for latents, real image order and the metrics' sampling")
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


# ---------------------------------------------------------------- the two image sets

def seed_for(seed: int, purpose: str) -> int:
    """A separate, reproducible stream of random numbers per use of the one --seed."""
    return zlib.crc32(f"{seed}/{purpose}".encode())


def eval_batch_size(resolution: int) -> int:
    """The official evaluation minibatch: 8192 // resolution, within 4..256."""
    return max(4, min(256, 8192 // resolution))


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale -> RGB by repeating the channel, as the official evaluation does."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def real_batches(shard_dir: str, resolution: int, mirror: bool, seed: int, batch: int,
                 device: torch.device, alpha: float = 1.0) -> Iterator[torch.Tensor]:
    """Endless uint8 NCHW batches of real faces at `resolution` (faded by `alpha`), on `device`."""
    from data_pipeline.loader import FaceStream, mirror_randomly, to_training_range
    from progan.metrics.swd import to_uint8
    from progan.training_step import fade_reals

    # the shards are written in content-hash order, already unrelated to the source photos' order;
    # a small buffer is enough mixing and keeps the memory small at large resolutions
    stream = iter(FaceStream(shard_dir, rank=0, world_size=1, seed=seed, shuffle_buffer=256))
    flips = torch.Generator().manual_seed(seed_for(seed, "mirror"))
    while True:
        images = torch.stack([next(stream) for _ in range(batch)]).to(device)
        images = to_training_range(images, resolution)
        if mirror:
            images = mirror_randomly(images, flips)
        yield as_rgb(to_uint8(fade_reals(images, alpha)))


def fake_batches(trained, seed: int, batch: int) -> Iterator[torch.Tensor]:
    """Endless uint8 NCHW batches from the generator, latents drawn on the CPU from `seed`."""
    from progan.metrics.swd import to_uint8

    latents = torch.Generator().manual_seed(seed_for(seed, "latents"))
    while True:
        z = torch.randn(batch, trained.latent_size, generator=latents)
        yield as_rgb(to_uint8(trained.generate(z)))


# ---------------------------------------------------------------- metrics fed batch by batch

class SWDEvaluation:
    def __init__(self, resolution: int, num_images: int, seed: int, device: torch.device):
        from progan.metrics.swd import DescriptorSet

        self.num_images, self.seed, self.device = num_images, seed, device
        self.sets = {kind: DescriptorSet(resolution, seed_for(seed, f"swd/{kind}")) for kind in ("reals", "fakes")}

    def add(self, kind: str, images: torch.Tensor) -> None:
        self.sets[kind].add(images)

    def result(self, progress: bool = True) -> dict:
        from progan.metrics.swd import NHOODS_PER_IMAGE, DIR_REPEATS, DIRS_PER_REPEAT, swd_of_descriptors

        real, fake = self.sets["reals"], self.sets["fakes"]
        swd = swd_of_descriptors(real.finalize(), fake.finalize(), real.resolutions,
                                 seed_for(self.seed, "swd/directions"), self.device, progress=progress)
        return {**swd.to_dict(), "unit": "SWD x 1e3", "nhoods_per_image": NHOODS_PER_IMAGE,
                "projections": DIR_REPEATS * DIRS_PER_REPEAT}


class FIDEvaluation:
    def __init__(self, extractor, num_images: int):
        self.extractor, self.num_images = extractor, num_images
        self.features: dict[str, list[torch.Tensor]] = {"reals": [], "fakes": []}

    def add(self, kind: str, images: torch.Tensor) -> None:
        from progan.metrics.fid import inception_features

        self.features[kind].append(inception_features(self.extractor, images))

    def result(self) -> dict:
        from progan.metrics.fid import frechet_distance

        return {"fid": frechet_distance(torch.cat(self.features["reals"]), torch.cat(self.features["fakes"]))}


def feed(evaluations: dict, kind: str, batches: Iterator[torch.Tensor], progress: bool = True) -> None:
    """Hands each evaluation the first `num_images` images of `batches` (one pass for all)."""
    total = max(e.num_images for e in evaluations.values())
    label = "real images" if kind == "reals" else "generated images"
    with tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=not progress) as bar:
        done = 0
        while done < total:
            images = next(batches)[: total - done]
            for evaluation in evaluations.values():
                wanted = evaluation.num_images - done
                if wanted > 0:
                    evaluation.add(kind, images[:wanted])
            done += images.shape[0]
            bar.update(images.shape[0])


@torch.inference_mode()
def swd_at_phase_end(run, phase, shard_dir: str, num_images: int, run_dir) -> dict | None:
    """The training loop's SWD of its EMA generator (`run`: a progan.run_state.RunState) at the
    end of `phase` against the shards, computed as this command computes it, without progress
    bars. `num_images` -1: 4096 on a GPU, 256 on a CPU; 0: off. None where it does not run
    (turned off, or below 8x8, the smallest image the descriptors fit)."""
    from progan.trained import TrainedGenerator

    if num_images == -1:
        num_images = 4096 if run.device.type == "cuda" else 256
    if num_images == 0 or phase.resolution < 8:
        return None
    started = time.perf_counter()
    trained = TrainedGenerator(run.G_ema, phase.resolution, 1.0, run.images_seen, run.cfg, run_dir)
    seed, batch = run.cfg.data.seed, eval_batch_size(phase.resolution)
    evaluation = SWDEvaluation(phase.resolution, num_images, seed, run.device)
    feed({"swd": evaluation}, "reals", real_batches(shard_dir, phase.resolution, run.cfg.data.mirror, seed,
                                                    batch, run.device, 1.0), progress=False)
    feed({"swd": evaluation}, "fakes", fake_batches(trained, seed, batch), progress=False)
    result = evaluation.result(progress=False)
    return {"avg": result["avg"], "levels": result["levels"], "num_images": num_images,
            "seconds": round(time.perf_counter() - started, 2)}


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
