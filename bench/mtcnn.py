"""Face detection speed: what each of the pipeline's changes to a plain MTCNN loop gives. One JSON line.

    python -m bench.mtcnn --input DIR --json [--limit N] [--rounds 3] [--threads 1] [--long-side 1024]
        [--variants plain,pipeline,...] [--batch-pixels N,...] [--devices cpu,cuda]

Every variant sees the same photos, decoded as the pipeline decodes them (EXIF, RGB, longer side
<= 1024), in this one process, with the same torch thread count (default 1: the pipeline runs
one single-threaded detector actor per CPU). --long-side L then scales every photo to a longer
side of L px (up or down; Lanczos): `--long-side 1024` is what the detector sees of a photo of
1024 px or more, the most it ever sees at resolutions up to 512. The variants, each one change
from the one before:
- plain: facenet-pytorch's MTCNN(keep_all=True) at its defaults, detect() one photo at a time;
- batched: the same detector, one batched detect() per group of equal-size photos in work units
  of DETECT_BATCH (data_pipeline.faces.detect_in_size_groups, groups cut only at
  MAX_BATCH_PIXELS, as on a GPU);
- batched_channels_last: its three networks' weights (and so their activations) channels-last;
- pipeline: also the coarser image pyramid (factor 0.6 instead of 0.709) and the pipeline's
  thresholds and minimum face size (data_pipeline.faces.build_detector), and its groups cut at
  CPU_BATCH_PIXELS: what the FaceDetector actor runs on a CPU;
- pipeline_unbatched: the pipeline's detector, one photo at a time (what batching adds to it);
- pipeline_cuda: the pipeline's detector on the GPU (build_detector(settings, "cuda"), what a
  FaceDetector actor runs where the cluster has GPUs: groups cut only at MAX_BATCH_PIXELS),
  timed in the same turns as the CPU ones;
- pipeline_px<N>: the pipeline's CPU detector with its groups cut at N pixels per detect() call
  instead of CPU_BATCH_PIXELS (--batch-pixels N,...: how the cap was chosen; 1 is one photo at a
  time, 16000000 the groups a GPU gets).
--variants picks some of them (default: all the CPU ones); --batch-pixels adds pipeline_px<N> for
each N; --devices cpu,cuda adds pipeline_cuda (default: cuda too where torch sees a GPU;
`--devices cpu` leaves it out).
All are warmed up first (oneDNN builds its kernels per input shape), then timed one work unit of
photos at a time, variant after variant, each going first in turn, so that load from other jobs
and the cost of first touching a unit's photos hit all alike; a round
covers all photos and each variant's median round counts. `<variant>_images_per_s` = photos /
seconds, `<variant>_faces_per_s` = faces kept at --min-prob / seconds, `<variant>_speedup` = the
reference's seconds / the variant's, `cuda_speedup` = pipeline's seconds / pipeline_cuda's (one
GPU against one CPU detector at --threads: the pipeline runs one per CPU, or one per GPU). The
reference is plain, or the first variant run when plain is not. Quality against the reference,
per variant: `<variant>_agreement` is the share of photos that both keep or both reject at
--min-prob (the pipeline's keep rule), `<variant>_median_iou` compares the chosen faces where
both keep one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image

from bench.common import emit
from data_pipeline.faces import (
    CPU_BATCH_PIXELS, DETECT_BATCH, MAX_BATCH_PIXELS, Detection, FaceSettings, Rejected, as_detection, build_detector,
    decode_photo, detect_in_size_groups, pick_face,
)
from data_pipeline.sources import list_sources, read_bytes

WARMUP_PHOTOS = 64
CPU_VARIANTS = ("plain", "batched", "batched_channels_last", "pipeline", "pipeline_unbatched")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.mtcnn", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder, glob or archive of photos")
    parser.add_argument("--limit", type=int, default=0, help="use the first N photos (0: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-prob", type=float, default=0.95)
    parser.add_argument("--long-side", type=int, default=0, metavar="L",
                        help="scale every photo to a longer side of L px (0: as decoded)")
    parser.add_argument("--variants", default=",".join(CPU_VARIANTS),
                        help=f"comma-separated, of {', '.join(CPU_VARIANTS)}")
    parser.add_argument("--batch-pixels", default="", metavar="N,...",
                        help="also the pipeline's CPU detector with groups cut at N pixels per detect() call")
    parser.add_argument("--devices", default="", help="cpu,cuda times pipeline_cuda too (default: where CUDA is)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(args.variants) - set(CPU_VARIANTS))
    try:
        args.batch_pixels = [int(n) for n in args.batch_pixels.split(",") if n]
    except ValueError:
        parser.error("--batch-pixels: comma-separated whole numbers of pixels")
    if any(n < 1 for n in args.batch_pixels):
        parser.error("--batch-pixels: each at least 1")
    devices = set(args.devices.split(",")) - {""} if args.devices else {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    if unknown or not args.variants or not devices <= {"cpu", "cuda"} or args.long_side < 0:
        parser.error(f"--variants: of {', '.join(CPU_VARIANTS)}; --devices: cpu and/or cuda; --long-side >= 0")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: torch sees no CUDA GPU here")
    args.cuda = "cuda" in devices
    return args


def load_photos(spec: str, limit: int, max_side: int, long_side: int = 0) -> list:
    """The photos decoded as the pipeline decodes them; with `long_side`, each then scaled to
    that longer side."""
    sources = list_sources([spec])[: limit or None]
    photos = []
    for source in sources:
        try:
            image = decode_photo(read_bytes(source), max_side).image
        except (OSError, Rejected):
            continue
        if long_side and max(image.size) != long_side:
            scale = long_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.LANCZOS)
        photos.append(image)
    return photos


def one_at_a_time(mtcnn: MTCNN, images: list) -> list[Detection]:
    return [as_detection(*mtcnn.detect(image, landmarks=True)) for image in images]


def channels_last(mtcnn: MTCNN) -> MTCNN:
    for network in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet):
        network.to(memory_format=torch.channels_last)
    return mtcnn


def groups_of(max_pixels: int):
    """detect_in_size_groups with its groups cut at `max_pixels` whatever the device."""
    return lambda mtcnn, images: detect_in_size_groups(mtcnn, images, max_pixels)


def variants(settings: FaceSettings, names: list[str] | tuple[str, ...] = CPU_VARIANTS, cuda: bool = False,
             batch_pixels: list[int] | tuple[int, ...] = ()) -> dict:
    """name -> (detector, how it is called on one work unit of photos), for `names`, then
    pipeline_px<N> for each N of `batch_pixels` and, with `cuda`, pipeline_cuda."""
    makers = {
        "plain": lambda: (MTCNN(keep_all=True), one_at_a_time),
        "batched": lambda: (MTCNN(keep_all=True), groups_of(MAX_BATCH_PIXELS)),
        "batched_channels_last": lambda: (channels_last(MTCNN(keep_all=True)), groups_of(MAX_BATCH_PIXELS)),
        "pipeline": lambda: (build_detector(settings), detect_in_size_groups),
        "pipeline_unbatched": lambda: (build_detector(settings), one_at_a_time),
        "pipeline_cuda": lambda: (build_detector(settings, "cuda"), detect_in_size_groups),
    }
    makers.update({f"pipeline_px{n}": lambda n=n: (build_detector(settings), groups_of(n)) for n in batch_pixels})
    chosen = [*names, *(f"pipeline_px{n}" for n in batch_pixels), *(["pipeline_cuda"] if cuda else [])]
    return {name: makers[name]() for name in dict.fromkeys(chosen)}


def time_interleaved(detectors: dict, images: list, rounds: int) -> tuple[dict, dict]:
    """Seconds per round for each variant, taking turns unit by unit; the last round's detections."""
    times = {name: [] for name in detectors}
    names, found, turn = list(detectors), {}, 0
    for _ in range(rounds):
        seconds, found = dict.fromkeys(detectors, 0.0), {name: [] for name in detectors}
        for start in range(0, len(images), DETECT_BATCH):
            unit, turn = images[start:start + DETECT_BATCH], turn + 1
            for name in names[turn % len(names):] + names[:turn % len(names)]:  # each goes first in turn
                mtcnn, detect = detectors[name]
                started = time.perf_counter()
                found[name] += detect(mtcnn, unit)
                seconds[name] += time.perf_counter() - started
        for name in detectors:
            times[name].append(seconds[name])
    return times, found


def chosen_boxes(detections: list[Detection], min_prob: float) -> list[np.ndarray | None]:
    boxes = []
    for detection in detections:
        try:
            boxes.append(pick_face(detection, min_prob).box)
        except Rejected:
            boxes.append(None)
    return boxes


def iou(a: np.ndarray, b: np.ndarray) -> float:
    overlap = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    return float(overlap / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - overlap))


def agreement(reference: list, boxes: list) -> dict:
    both = [iou(a, b) for a, b in zip(reference, boxes) if a is not None and b is not None]
    return {"agreement": round(float(np.mean([(a is None) == (b is None) for a, b in zip(reference, boxes)])), 4),
            "median_iou": round(statistics.median(both), 3) if both else None}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = FaceSettings(min_prob=args.min_prob)
    images = load_photos(args.input, args.limit, settings.max_side, args.long_side)
    if not images:
        sys.exit(f"no readable photos in {args.input}")
    detectors = variants(settings, args.variants, args.cuda, args.batch_pixels)
    time_interleaved(detectors, images[:WARMUP_PHOTOS], rounds=1)
    times, found = time_interleaved(detectors, images, args.rounds)
    boxes = {name: chosen_boxes(detections, args.min_prob) for name, detections in found.items()}
    seconds = {name: statistics.median(runs) for name, runs in times.items()}
    reference = "plain" if "plain" in detectors else next(iter(detectors))
    result = {"bench": "mtcnn", "input": args.input, "photos": len(images),
              "sizes": len({image.size for image in images}), "long_side": args.long_side or None,
              "threads": args.threads, "batch": DETECT_BATCH, "cpu_batch_pixels": CPU_BATCH_PIXELS,
              "pyramid_factor": settings.pyramid_factor,
              "rounds": args.rounds, "reference": reference}
    if args.cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    for name in detectors:
        kept = sum(box is not None for box in boxes[name])
        result[f"{name}_images_per_s"] = round(len(images) / seconds[name], 2)
        result[f"{name}_faces_per_s"] = round(kept / seconds[name], 2)
        result[f"{name}_faces_kept"] = kept
        if name != reference:
            result[f"{name}_speedup"] = round(seconds[reference] / seconds[name], 2)
            result.update({f"{name}_{k}": v for k, v in agreement(boxes[reference], boxes[name]).items()})
    if "pipeline" in detectors and "pipeline_cuda" in detectors:
        result["cuda_speedup"] = round(seconds["pipeline"] / seconds["pipeline_cuda"], 2)
    result["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other jobs on a shared machine slow all alike
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
