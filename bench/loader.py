"""Does the loader keep a training worker fed? JSON lines.

    python -m bench.loader --shards DIR --resolution 64 --batch 16 --json [--seconds 20] [--steps 2]
                           [--loader-workers N] [--max-resolution R --latent-size L --fmap-base B --fmap-max M]
    python -m bench.loader --levels --json [--photos data/demo_faces] [--stored 1024]
                           [--resolutions 8 32 128 512] [--batch 32] [--seconds 10] [--shards DIR]

loader_images_per_s: images per second that data_pipeline.loader delivers to one training worker
(rank 0 of 1): FaceStream(DIR, resolution=--resolution) -> BatchReader.next_batch (webdataset
read, shuffle buffer, decode, average-pool to --resolution where the stream reads a larger size,
mirroring), as the training loop draws them, pass after pass, for at least --seconds;
--loader-workers decodes in that many DataLoader processes. The stream reads the resolution's
level of the shards' pyramid where the manifest has one, as a training phase does, else the
stored size. The first batch (the shuffle buffer's first fill, the shards' sha256 check) is not
counted, and the count ends on a whole number of passes (a multiple of the batch and of the
shards' images): with a shuffle buffer larger than the shards, a pass is read whole before its
first image comes out, so a count that ended inside a pass would take in reading it did not
pay for, or leave out reading it did. `loader_ms_per_batch`: the same rate as the time one
batch of --batch takes, to set beside a training step's time.

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

--levels: the resolution pyramid against the full size, at real sizes (issue 24). Shards of
--stored px (1024) are made once from --photos with the real pipeline (python -m data_pipeline;
a local Ray cluster while it runs) into --shards (default runs/.shards/bench-<stored>), and
reused while that folder holds a complete output with a pyramid. The demo photos are 178x218,
so their face crops are upscaled to 1024 px by the pipeline itself: the pixel counts, and so
the decoding and averaging work, are those of real 1024 px faces, but an upscaled crop is
smooth and its 1024 px PNG small (0.5 MB here; data_pipeline/loader.py puts a real face's
at about 3 MB), so the full-size shards are smaller, and today's path reads fewer bytes and
inflates less, than with real 1024 px photos; the pyramid's raw levels (up to 128 px) have
the same size either way.
For each of --resolutions, one line ("bench": "loader_levels") for each path: "full_size",
what a phase read before the pyramid (FaceStream(resolution=None): the stored-size images,
averaged down by BatchReader to the resolution), and "pyramid" (FaceStream(resolution=r): that
level's shard, raw RGB up to 128 px, PNG above), both as above, one loader process unless
--loader-workers; no training step. Each line also gives `loader_images_per_cpu_s`, images per
CPU second of the loader process (without DataLoader workers): its own cost, which moves much
less than the wall-clock rate when other jobs take a share of the cores (torch's threads count
the time they wait for each other). Then one summary line ("bench": "loader_levels_summary"):
each resolution's speed-up and whether the pyramid meets its goal (GOALS), whether both paths
gave the same first batch (they should, to the bit: the same faces, order and flips), and the
disk cost: bytes of the full-size shards, of the pyramid's level shards (each level's), and
their ratio (pyramid_share).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import GPU_STEP_MS_REFERENCE, StepSetup, add_width_args, emit, widths
from data_pipeline.loader import BatchReader, FaceStream, count_images
from data_pipeline.manifest import has_pyramid, read_manifest, require_manifest, shards_at, stored_resolution

SHUFFLE_BUFFER = 256
# --levels' goals for the pyramid, per loader process (issue 24): (up to this resolution, images/s)
GOALS = ((32, 3000.0), (128, 1000.0))
PATHS = ("full_size", "pyramid")  # in this order: the pyramid's first batch is compared with the full size's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="a folder written by python -m data_pipeline "
                                         "(with --levels: where to make them; default runs/.shards/bench-<stored>)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 16; 32 with --levels)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="least time to pull batches, per measurement (default 20; 10 with --levels)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (data.loader_workers)")
    add_width_args(parser)
    parser.add_argument("--levels", action="store_true", help="the pyramid against the full size (see above)")
    parser.add_argument("--photos", default="data/demo_faces", help="with --levels: the photos to make shards of")
    parser.add_argument("--stored", type=int, default=1024, help="with --levels: the shards' resolution")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[8, 32, 128, 512],
                        help="with --levels: the resolutions to read at")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines")
    args = parser.parse_args(argv)
    if not args.levels and not args.shards:
        parser.error("--shards is required (or --levels)")
    args.batch = args.batch or (32 if args.levels else 16)
    args.seconds = args.seconds if args.seconds is not None else (10.0 if args.levels else 20.0)
    return args


@dataclass
class Rate:
    """What loader_rate measured."""
    per_s: float  # images per second
    images: int  # images counted
    passes: float  # passes over the shards
    per_cpu_s: float | None  # images per CPU second of this process (None with DataLoader workers)
    first: torch.Tensor  # the first batch (not counted)


def loader_rate(shards: str, resolution: int, batch: int, seconds: float, workers: int,
                read: int | None = None) -> Rate:
    """The rate of a stream that reads the shards at `read` (FaceStream's resolution: a pyramid
    level, None for the stored size), in batches of `batch` at `resolution`, for at least
    `seconds` and whole passes (see the module's docstring)."""
    stream = FaceStream(shards, rank=0, world_size=1, seed=0, shuffle_buffer=SHUFFLE_BUFFER, resolution=read)
    reader = BatchReader(stream, mirror=True, seed=0, loader_workers=workers)
    try:
        first = reader.next_batch(batch, resolution)
        whole = math.lcm(batch, stream.images)  # images in a whole number of both batches and passes
        images, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while images == 0 or images % whole or time.perf_counter() - started < seconds:
            images += reader.next_batch(batch, resolution).shape[0]
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        reader.close()
    return Rate(images / elapsed, images, images / stream.images, None if workers else images / cpu, first)


def train_step_seconds(setup: StepSetup, steps: int) -> float:
    """Median seconds of `steps` timed steps after one warm-up."""
    def step() -> float:
        started = time.perf_counter()
        setup.step()
        return time.perf_counter() - started

    step()
    return statistics.median(step() for _ in range(steps))


def loader_and_step(args: argparse.Namespace) -> dict:
    """The one line for a shards folder and a resolution (the first usage above)."""
    rate = loader_rate(args.shards, args.resolution, args.batch, args.seconds, args.loader_workers,
                       read=args.resolution)
    loader_per_s = rate.per_s
    step_s = train_step_seconds(StepSetup(args.resolution, args.batch, widths=widths(args)), args.steps)
    return {
        "bench": "loader",
        "stored_resolution": stored_resolution(args.shards),
        "read_resolution": shards_at(require_manifest(args.shards), args.resolution)[2],
        "resolution": args.resolution,
        "batch": args.batch,
        **widths(args),
        "loader_images_per_s": round(loader_per_s, 1),
        "loader_ms_per_batch": round(args.batch / loader_per_s * 1e3, 2),
        "loader_images": rate.images,
        "loader_passes": round(rate.passes, 1),
        "loader_workers": args.loader_workers,
        "train_step_images_per_s": round(args.batch / step_s, 2),
        "train_step_ms": round(step_s * 1e3, 1),
        "torch_threads": torch.get_num_threads(),
        "ratio": round(loader_per_s * step_s / args.batch, 1),
        "gpu_step_ms_reference": GPU_STEP_MS_REFERENCE,
        "gpu_steps_fed": round(GPU_STEP_MS_REFERENCE / (args.batch / loader_per_s * 1e3), 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def level_shards(photos: str, folder: str, stored: int) -> dict:
    """The manifest of shards with a pyramid at `stored` px in `folder`, made from `photos` with
    python -m data_pipeline unless the folder already holds them (a complete output of that
    resolution with every level). The pipeline's output goes to stderr, so that stdout stays
    JSON lines."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest["resolution"] == stored and has_pyramid(manifest):
        return manifest
    command = [sys.executable, "-m", "data_pipeline", "--input", photos, "--output", folder,
               "--resolution", str(stored)]
    # a complete output without the pyramid (made before it) or at another resolution is redone
    subprocess.run(command + (["--overwrite"] if manifest is not None else []), check=True, stdout=sys.stderr)
    manifest = read_manifest(folder)
    if manifest is None or not has_pyramid(manifest):
        raise SystemExit(f"{folder}: python -m data_pipeline left no complete shards with a pyramid")
    return manifest


def goal(resolution: int) -> float | None:
    """The pyramid's goal in images/s at `resolution` (GOALS), None above them."""
    return next((rate for limit, rate in GOALS if resolution <= limit), None)


def disk_cost(manifest: dict) -> dict:
    """Bytes of the full-size shards and of the pyramid's level shards (all of them, and each
    level's), and the pyramid's share of the full size."""
    full = sum(shard["bytes"] for shard in manifest["shards"])
    levels = {str(level["resolution"]): sum(shard["bytes"] for shard in shards_at(manifest, level["resolution"])[0])
              for level in manifest["levels"]}
    pyramid = sum(levels.values())
    return {"full_size_bytes": full, "pyramid_bytes": pyramid, "pyramid_share": round(pyramid / full, 3),
            "level_bytes": levels}


def compare_levels(args: argparse.Namespace) -> list[dict]:
    """--levels: one line per (resolution, path), then the summary line."""
    folder = args.shards or f"runs/.shards/bench-{args.stored}"
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    manifest = level_shards(args.photos, folder, args.stored)
    lines, same, first_full_size = [], [], None
    runs = [(resolution, path) for resolution in args.resolutions for path in PATHS]
    with tqdm(runs, desc="loader", unit="run", file=sys.stderr) as bar:
        for resolution, path in bar:
            bar.set_postfix_str(f"{resolution} px {path}")
            read = resolution if path == "pyramid" else None
            rate = loader_rate(folder, resolution, args.batch, args.seconds, args.loader_workers, read=read)
            if path == "full_size":
                first_full_size = rate.first
            else:  # the same faces, order and flips: the same batch, to the bit
                same.append(torch.equal(rate.first, first_full_size))
            line = {"bench": "loader_levels", "stored_resolution": args.stored, "resolution": resolution,
                    "path": path, "read_resolution": shards_at(manifest, read)[2],
                    "read_format": shards_at(manifest, read)[1], "batch": args.batch,
                    "loader_images_per_s": round(rate.per_s, 1),
                    "loader_ms_per_batch": round(args.batch / rate.per_s * 1e3, 2),
                    "loader_images_per_cpu_s": rate.per_cpu_s and round(rate.per_cpu_s, 1),
                    "loader_images": rate.images, "loader_passes": round(rate.passes, 1),
                    "loader_workers": args.loader_workers, "loadavg_1min": round(os.getloadavg()[0], 2)}
            emit(line, args.json)
            lines.append(line)
    per_s = {(line["resolution"], line["path"]): line["loader_images_per_s"] for line in lines}
    summary = {
        "bench": "loader_levels_summary",
        "shards": folder,
        "photos": manifest.get("config", {}).get("inputs"),
        "faces": count_images(folder),
        "stored_resolution": args.stored,
        "batch": args.batch,
        "loader_workers": args.loader_workers,
        "images_per_s": {str(r): {path: per_s[r, path] for path in PATHS} for r in args.resolutions},
        "speedup": {str(r): round(per_s[r, "pyramid"] / per_s[r, "full_size"], 1) for r in args.resolutions},
        "goals_met": {str(r): per_s[r, "pyramid"] >= goal(r) for r in args.resolutions if goal(r) is not None},
        "same_first_batch": all(same),
        **disk_cost(manifest),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    emit(summary, args.json)
    return [*lines, summary]


def main(argv: list[str] | None = None) -> dict | list[dict]:
    args = parse_args(argv)
    if args.levels:
        return compare_levels(args)
    result = loader_and_step(args)
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
