"""The data pipeline at scale: photos/s and peak memory of `python -m data_pipeline` on N photos. One JSON line.

    python -m bench.pipeline_scale --photos 20000 [--resolution 128] [--shard-size 1000] [--seed 0]
        [--long-side 1024] [--small-share 0.0 --small-side 256] [--workdir runs/pipeline-scale] [--nodes N]

The photos: N distinct variations of the shipped faces (data/demo_faces, ../shared/faces/aligned
and wild; a photo in two of them counts once), each a base photo mirrored or not, shifted (a strip of up to 8% of a side cropped off,
or up to 12% added as repeated edge pixels, on the left and on the top), and scaled to a long side
drawn from [--long-side / 2, --long-side]; with --small-share F, that share of them from
[--small-side / 2, --small-side] instead. No two get the same variation, so every photo's content
differs (the pipeline drops photos of equal content); their digests are checked. They are written
once as JPEG (quality 90) to WORKDIR/photos-N-... and reused by later runs with the same N, seed and
sizes.

The run: `python -m data_pipeline --input PHOTOS --output WORKDIR/shards-... --resolution R
--shard-size S` as a subprocess (its output folder removed first, so nothing is resumed), its
progress bars on this terminal (with --quiet it runs --quiet too), its wall time from start to
exit (Ray's start and shutdown included) -> seconds and photos_per_s.

Memory, sampled every --sample-s seconds while it runs (psutil):
- driver_peak_rss_mb: the resident set of the pipeline's own process (the driver: listing,
  hashing results, the plan, each block's results until its shard is written);
- driver_peak_private_mb: of it, the anonymous memory (resident less file-backed and shared
  pages): the Python heap, where anything the driver keeps lives. The resident set also holds
  the pages of Ray's object store (shared memory) that the driver has read results from,
  which grow with the run up to the store's size and stay mapped after the objects are freed;
- tree_peak_rss_mb: the largest sum, at one sample, of the resident sets of the driver and all
  its descendants: the local Ray nodes it starts (GCS, raylets and their agents), and the
  workers they start (hashing tasks, the detector actors), with Ray's object store pages as the
  raylets and workers have touched them. Pages shared between processes (torch's libraries, the
  object store) count once per process, so this is an upper bound on what the run holds;
- tree_peak_pss_mb: the same sum of proportional set sizes (each shared page split among the
  processes sharing it): closer to what the run takes from the machine;
- tree_processes_max: the most processes seen in the tree at one sample;
- tree_pss_mb_at_peak_by_process: the tree's PSS at its peak sample, by kind of process (the
  driver, GCS, raylet, Ray's agents, each kind of worker by its title);
- driver_private_mb_by_tenth, detectors_pss_mb_by_tenth, tree_pss_mb_by_tenth: the largest
  sample in each tenth of the run (by samples) of the driver's private memory, the detector
  actors' summed PSS and the tree's PSS: a rise from tenth to tenth is memory that grows with
  the photos done, a peak alone in one tenth a passing one (a batch of large photos).
Processes outside the tree (another Ray cluster, another job) are not counted. Each sample reads
every process's /proc smaps, which costs CPU time in this process beside the run it measures:
--sample-s trades that against how sharp the peaks are. Shards and counts
come from the output's manifest.json: `shards` (blocks with a kept face), `shard_files` (every
.tar the manifest lists, the pyramid's levels included), `counts` as the manifest has them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
from PIL import Image
from tqdm import tqdm

from base.process_memory import Reading, TreeMemory
from data_pipeline.manifest import shard_files

PROJECT = Path(__file__).resolve().parents[1]
BASE_FOLDERS = (PROJECT / "data" / "demo_faces", PROJECT.parent / "shared" / "faces" / "aligned",
                PROJECT.parent / "shared" / "faces" / "wild")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_CROP = 0.08  # of a side, cut off the left or top (the aligned faces fill most of their photo)
MAX_PAD = 0.12   # of a side, added on the left or top as repeated edge pixels
JPEG_QUALITY = 90
PER_FOLDER = 1000  # photos per subfolder of the photo folder
RECORD = "photos.json"  # written last: the folder holds the whole set
DETECTOR_TITLE = "FaceDetector"  # in the titles of the pipeline's detector actors


# ---------------------------------------------------------------------------------------------
# The photos


@dataclass(frozen=True, order=True)
class Variation:
    base: int        # index into base_photos()
    long_side: int   # px, after scaling
    shift_x: int     # base-photo pixels: < 0 cut off the left, > 0 added on the left
    shift_y: int     # the same on the top
    mirrored: bool


def base_photos(folders: tuple[Path, ...] = BASE_FOLDERS) -> list[Path]:
    """The photos in `folders`, each content once (the demo's faces are copies of aligned ones:
    one variation of both would be one photo twice)."""
    by_content: dict[str, Path] = {}
    for path in sorted(path for folder in folders for path in folder.iterdir() if path.suffix.lower() in PHOTO_SUFFIXES):
        by_content.setdefault(hashlib.sha1(path.read_bytes()).hexdigest(), path)
    if not by_content:
        raise SystemExit(f"no base photos in {', '.join(map(str, folders))}")
    return sorted(by_content.values())


def plan_variations(bases: list[tuple[int, int]], n: int, seed: int, long_side: int, small_share: float = 0.0,
                    small_side: int = 256) -> list[Variation]:
    """n distinct variations of the base photos (their sizes in `bases`); a share `small_share`
    of them (exactly rounded, chosen at random) at the small long side."""
    rng = random.Random(seed)
    small = set(rng.sample(range(n), round(n * small_share)))
    seen: set[Variation] = set()
    variations = []
    for index in range(n):
        top = small_side if index in small else long_side
        while True:
            base = rng.randrange(len(bases))
            width, height = bases[base]
            variation = Variation(base, rng.randint(top // 2, top),
                                  rng.randint(-int(MAX_CROP * width), int(MAX_PAD * width)),
                                  rng.randint(-int(MAX_CROP * height), int(MAX_PAD * height)), rng.random() < 0.5)
            if variation not in seen:
                break
        seen.add(variation)
        variations.append(variation)
    return variations


def render(image: Image.Image, variation: Variation) -> Image.Image:
    """The base photo mirrored, shifted and scaled as `variation` says."""
    import numpy as np

    if variation.mirrored:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image.convert("RGB"))
    pixels = pixels[max(0, -variation.shift_y):, max(0, -variation.shift_x):]
    pad = ((max(0, variation.shift_y), 0), (max(0, variation.shift_x), 0), (0, 0))
    shifted = Image.fromarray(np.pad(pixels, pad, mode="edge"))
    scale = variation.long_side / max(shifted.size)
    size = (max(1, round(shifted.width * scale)), max(1, round(shifted.height * scale)))
    return shifted.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def photo_path(folder: Path, index: int) -> Path:
    return folder / f"{index // PER_FOLDER:03d}" / f"{index:06d}.jpg"


_bases: dict[Path, Image.Image] = {}  # each writer process's decoded base photos


def write_photos(folder: Path, bases: list[Path], jobs: list[tuple[int, Variation]]) -> list[str]:
    """Renders and writes photos (a writer process's share); their sha1 digests, in order."""
    digests = []
    for index, variation in jobs:
        path = bases[variation.base]
        if path not in _bases:
            with Image.open(path) as image:
                _bases[path] = image.convert("RGB")
        target = photo_path(folder, index)
        target.parent.mkdir(parents=True, exist_ok=True)
        render(_bases[path], variation).save(target, quality=JPEG_QUALITY)
        digests.append(hashlib.sha1(target.read_bytes()).hexdigest())
    return digests


def photo_set_name(n: int, seed: int, long_side: int, small_share: float, small_side: int) -> str:
    small = f"-small{small_share:g}x{small_side}" if small_share else ""
    return f"photos-{n}-seed{seed}-side{long_side}{small}"


def make_photos(folder: Path, n: int, seed: int = 0, long_side: int = 1024, small_share: float = 0.0,
                small_side: int = 256, show_progress: bool = True, workers: int | None = None) -> dict:
    """The photo set in `folder` (made, or reused when its record says it is this set); its record:
    the settings, the base photos, and the number of photos at each size class."""
    settings = {"photos": n, "seed": seed, "long_side": long_side, "small_share": small_share, "small_side": small_side}
    record_path = folder / RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            return record
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bases = base_photos()
    sizes = []
    for path in bases:
        with Image.open(path) as image:
            sizes.append(image.size)
    variations = plan_variations(sizes, n, seed, long_side, small_share, small_side)
    workers = workers or len(os.sched_getaffinity(0))
    chunk = 50
    jobs = [list(enumerate(variations))[start:start + chunk] for start in range(0, n, chunk)]
    digests: list[str] = []
    with ProcessPoolExecutor(workers) as pool, \
            tqdm(total=n, desc="photos", unit="photo", disable=not show_progress) as bar:
        for found in pool.map(write_photos, [folder] * len(jobs), [bases] * len(jobs), jobs):
            digests += found
            bar.update(len(found))
    if len(set(digests)) != n:
        raise RuntimeError(f"{n - len(set(digests))} photos in {folder} have equal content")
    small = sum(v.long_side <= small_side for v in variations) if small_share else 0
    record = {"settings": settings, "bases": len(bases),
              "long_sides": {"min": min(v.long_side for v in variations), "max": max(v.long_side for v in variations)},
              "small_photos": small, "at_least_1000px": sum(v.long_side >= 1000 for v in variations),
              "bytes": sum(photo_path(folder, i).stat().st_size for i in range(n)),
              "digest": hashlib.sha1("".join(digests).encode()).hexdigest()}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------------
# The run


class DetailedTreeMemory(TreeMemory):
    """base.process_memory's sampler, plus what the bench reports beyond its peaks: the tree's PSS
    by kind of process at its peak, and per sample the driver's private memory, the detector
    actors' PSS and the tree's PSS (see the module docstring for what each figure counts)."""

    def __init__(self, pid: int, interval_s: float = 1.0):
        super().__init__(pid, interval_s)
        self.at_pss_peak: dict[str, float] = {}  # PSS (MB) by kind of process at the tree's PSS peak
        self.timeline: list[tuple[float, float, float]] = []  # per sample: driver private, detectors' PSS, tree PSS (MB)
        self._kinds: dict[int, str] = {}  # pid -> kind, read once per process

    def record(self, readings: list[Reading]) -> None:
        by_kind: dict[str, float] = {}
        for reading in readings:
            kind = self._kind(reading)
            by_kind[kind] = by_kind.get(kind, 0.0) + reading.pss_mb
        tree_pss = sum(reading.pss_mb for reading in readings)
        if tree_pss >= self.peaks["tree_pss_mb"]:
            self.at_pss_peak = {kind: round(mb, 1) for kind, mb in sorted(by_kind.items(), key=lambda item: -item[1])}
        private = next((reading.private_mb for reading in readings if reading.is_root), 0.0)
        detectors = sum(mb for kind, mb in by_kind.items() if DETECTOR_TITLE in kind)
        self.timeline.append((private, detectors, tree_pss))

    def _kind(self, reading: Reading) -> str:
        if reading.is_root:
            return "driver"
        try:  # an actor's title changes while it runs a method; process_kind maps both to one kind
            return process_kind(reading.process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return "?"

    def result(self) -> dict:
        names = {"root_rss_mb": "driver_peak_rss_mb", "root_private_mb": "driver_peak_private_mb",
                 "tree_rss_mb": "tree_peak_rss_mb", "tree_pss_mb": "tree_peak_pss_mb", "processes": "tree_processes_max"}
        peaks = {names[name]: round(value, 1) if isinstance(value, float) else value for name, value in self.peaks.items()}
        tenths = [self.timeline[len(self.timeline) * k // 10:len(self.timeline) * (k + 1) // 10] for k in range(10)]
        by_tenth = {name: [round(max(sample[column] for sample in tenth), 1) if tenth else None for tenth in tenths]
                    for column, name in enumerate(("driver_private_mb_by_tenth", "detectors_pss_mb_by_tenth",
                                                   "tree_pss_mb_by_tenth"))}
        return {**peaks, "tree_pss_mb_at_peak_by_process": self.at_pss_peak, **by_tenth}


def process_kind(command: list[str]) -> str:
    """A process of the tree by what it runs: a Ray worker by its title ("ray::IDLE",
    "ray::MapWorker(MapBatches(FaceDetector))", one kind whether it runs a method or waits), a
    Python process by its script's name
    (Ray's agents), else its program's name (gcs_server, raylet)."""
    if not command:
        return "?"
    if command[0].startswith("ray::"):  # an actor's title gains ".method" while it runs one
        return re.sub(r"\)\.\w+$", ")", command[0].split()[0])
    script = next((Path(arg).name for arg in command[1:4] if arg.endswith(".py")), None)
    return script or Path(command[0].split()[0]).name


def pipeline_command(photos: Path, output: Path, resolution: int, shard_size: int, nodes: int | None = None,
                     quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", str(output),
            "--resolution", str(resolution), "--shard-size", str(shard_size), *(["--quiet"] if quiet else []),
            *(["--nodes", str(nodes)] if nodes else [])]


def run_pipeline(photos: Path, output: Path, resolution: int, shard_size: int, nodes: int | None = None,
                 sample_s: float = 1.0, timeout_s: float | None = None, show_progress: bool = False) -> dict:
    """A fresh `python -m data_pipeline` run on `photos` into `output`, timed and sampled; the
    figures and the manifest's shard count and counts. RuntimeError (with its last output
    line) when it fails. `show_progress`: its progress bars (stderr) on this process's stderr."""
    shutil.rmtree(output, ignore_errors=True)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    process = subprocess.Popen(pipeline_command(photos, output, resolution, shard_size, nodes, quiet=not show_progress),
                               cwd=PROJECT, stdout=subprocess.PIPE, stderr=None if show_progress else subprocess.STDOUT,
                               text=True)
    with DetailedTreeMemory(process.pid, sample_s) as memory:
        try:
            log, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"python -m data_pipeline took more than {timeout_s:.0f} s")
    seconds = time.monotonic() - started
    if process.returncode != 0:
        lines = [line for line in log.splitlines() if line.strip()]
        raise RuntimeError(f"python -m data_pipeline exited with {process.returncode}: {(lines or [''])[-1]}")
    manifest = json.loads((output / "manifest.json").read_text())
    photos_seen = manifest["counts"]["files_seen"]
    return {"photos": photos_seen, "seconds": round(seconds, 1), "photos_per_s": round(photos_seen / seconds, 2),
            **memory.result(), "memory_samples": memory.samples, "shards": len(manifest["shards"]),
            "shard_files": len(shard_files(manifest)), "counts": manifest["counts"],
            "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000, help="how many photos")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-side", type=int, default=1024, help="photos' long sides from half this to this (px)")
    parser.add_argument("--small-share", type=float, default=0.0, help="share of the photos at --small-side instead")
    parser.add_argument("--small-side", type=int, default=256)
    parser.add_argument("--nodes", type=int, default=None, help="the pipeline's --nodes (default: its own, 1)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--workdir", default=str(PROJECT / "runs" / "pipeline-scale"),
                        help="where the photos (kept for later runs) and the shards go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (making the photos, the run)")
    args = parser.parse_args(argv)
    if args.photos < 1 or not 0 <= args.small_share <= 1 or min(args.long_side, args.small_side) < 2:
        parser.error("--photos must be at least 1, --small-share within 0..1, sides at least 2 px")
    return args


def main(argv: list[str] | None = None) -> dict:
    from bench.common import emit

    args = parse_args(argv)
    work = Path(args.workdir)
    name = photo_set_name(args.photos, args.seed, args.long_side, args.small_share, args.small_side)
    record = make_photos(work / name, args.photos, args.seed, args.long_side, args.small_share, args.small_side,
                         show_progress=not args.quiet)
    figures = run_pipeline(work / name, work / f"shards-{name[len('photos-'):]}-r{args.resolution}-s{args.shard_size}",
                           args.resolution, args.shard_size, args.nodes, args.sample_s, show_progress=not args.quiet)
    result = {"bench": "pipeline_scale", **figures, "resolution": args.resolution, "shard_size": args.shard_size,
              "photo_set": {key: value for key, value in record.items() if key not in ("digest", "settings")},
              **{key: value for key, value in record["settings"].items() if key != "photos"},
              "cpus": len(os.sched_getaffinity(0))}
    emit(result)
    return result


if __name__ == "__main__":
    main()
