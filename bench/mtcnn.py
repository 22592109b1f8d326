"""Face detection speed: what each of the pipeline's changes to a plain MTCNN loop gives. One JSON line.

    python -m bench.mtcnn --input DIR --json [--limit N] [--rounds 3] [--threads 1]

Every variant sees the same photos, decoded as the pipeline decodes them (EXIF, RGB, longer side
<= 1024), in this one process, with the same torch thread count (default 1: the pipeline runs
one single-threaded detector actor per CPU). The variants, each one change from the one before:
- plain: facenet-pytorch's MTCNN(keep_all=True) at its defaults, detect() one photo at a time;
- batched: the same detector, one batched detect() per group of equal-size photos in work units
  of DETECT_BATCH (data_pipeline.faces.detect_in_size_groups);
- batched_channels_last: its three networks' weights (and so their activations) channels-last;
- pipeline: also the coarser image pyramid (factor 0.6 instead of 0.709) and the pipeline's
  thresholds and minimum face size: data_pipeline.faces.build_detector, what the FaceDetector
  actor runs;
- pipeline_unbatched: the pipeline's detector, one photo at a time (what batching adds to it).
All are warmed up first (oneDNN builds its kernels per input shape), then timed one work unit of
photos at a time, variant after variant, each going first in turn, so that load from other jobs
and the cost of first touching a unit's photos hit all alike; a round
covers all photos and each variant's median round counts. `<variant>_images_per_s` = photos /
seconds, `<variant>_speedup` = plain's seconds / the variant's. Quality against plain, per variant:
`<variant>_agreement` is the share of photos that both keep or both reject at --min-prob (the
pipeline's keep rule), `<variant>_median_iou` compares the chosen faces where both keep one.
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

from bench.common import emit
from data_pipeline.faces import (
    DETECT_BATCH, Detection, FaceSettings, Rejected, as_detection, build_detector, decode_photo, detect_in_size_groups,
    pick_face,
)
from data_pipeline.sources import list_sources, read_bytes

WARMUP_PHOTOS = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.mtcnn", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder, glob or archive of photos")
    parser.add_argument("--limit", type=int, default=0, help="use the first N photos (0: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-prob", type=float, default=0.95)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    return parser.parse_args(argv)


def load_photos(spec: str, limit: int, max_side: int) -> list:
    sources = list_sources([spec])[: limit or None]
    photos = []
    for source in sources:
        try:
            photos.append(decode_photo(read_bytes(source), max_side).image)
        except (OSError, Rejected):
            continue
    return photos


def one_at_a_time(mtcnn: MTCNN, images: list) -> list[Detection]:
    return [as_detection(*mtcnn.detect(image, landmarks=True)) for image in images]


def channels_last(mtcnn: MTCNN) -> MTCNN:
    for network in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet):
        network.to(memory_format=torch.channels_last)
    return mtcnn


def variants(settings: FaceSettings) -> dict:
    """name -> (detector, how it is called on one work unit of photos)."""
    return {
        "plain": (MTCNN(keep_all=True), one_at_a_time),
        "batched": (MTCNN(keep_all=True), detect_in_size_groups),
        "batched_channels_last": (channels_last(MTCNN(keep_all=True)), detect_in_size_groups),
        "pipeline": (build_detector(settings), detect_in_size_groups),
        "pipeline_unbatched": (build_detector(settings), one_at_a_time),
    }


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
    images = load_photos(args.input, args.limit, settings.max_side)
    if not images:
        sys.exit(f"no readable photos in {args.input}")
    detectors = variants(settings)
    time_interleaved(detectors, images[:WARMUP_PHOTOS], rounds=1)
    times, found = time_interleaved(detectors, images, args.rounds)
    boxes = {name: chosen_boxes(detections, args.min_prob) for name, detections in found.items()}
    seconds = {name: statistics.median(runs) for name, runs in times.items()}
    result = {"bench": "mtcnn", "input": args.input, "photos": len(images),
              "sizes": len({image.size for image in images}), "threads": args.threads, "batch": DETECT_BATCH,
              "pyramid_factor": settings.pyramid_factor, "rounds": args.rounds}
    for name in detectors:
        result[f"{name}_images_per_s"] = round(len(images) / seconds[name], 2)
        result[f"{name}_faces_kept"] = sum(box is not None for box in boxes[name])
        if name != "plain":
            result[f"{name}_speedup"] = round(seconds["plain"] / seconds[name], 2)
            result.update({f"{name}_{k}": v for k, v in agreement(boxes["plain"], boxes[name]).items()})
    result["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other jobs on a shared machine slow all alike
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
