"""Face detection speed: the pipeline's batched stage against a plain MTCNN loop. One JSON line.

    python -m bench.mtcnn --input DIR --json [--limit N] [--rounds 3] [--threads 1]

Both sides see the same photos, decoded as the pipeline decodes them (EXIF, RGB, longer side
<= 1024), in this one process, with the same torch thread count (default 1: the pipeline runs
one single-threaded detector actor per CPU).
- plain: facenet-pytorch's MTCNN(keep_all=True) at its defaults, detect() one photo at a time.
- pipeline: data_pipeline.faces.build_detector + detect_in_size_groups, exactly what the
  FaceDetector actor runs: photos in work units of DETECT_BATCH, one batched detect() per group
  of equal-size photos, channels-last networks, pyramid factor 0.6 (see FaceSettings).
Both are warmed up first (oneDNN builds its kernels per input shape), then timed alternately,
one work unit of photos at a time, so that load from other jobs hits both alike; a round covers
all photos and each side's median round counts. images_per_s = photos / seconds; faces_per_s counts photos whose best face reaches
--min-prob. Quality: `decision_agreement` is the share of photos that both sides keep or both
reject at --min-prob, `median_box_iou` compares the chosen faces where both keep one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from facenet_pytorch import MTCNN

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


def plain_detect(mtcnn: MTCNN, images: list) -> list[Detection]:
    return [as_detection(*mtcnn.detect(image, landmarks=True)) for image in images]


def pipeline_detect(mtcnn: MTCNN, images: list) -> list[Detection]:
    return detect_in_size_groups(mtcnn, images)


def timed(run, *args) -> tuple[float, list]:
    started = time.perf_counter()
    result = run(*args)
    return time.perf_counter() - started, result


def time_interleaved(plain: MTCNN, pipeline: MTCNN, images: list, rounds: int):
    """Seconds per round for each side, alternating unit by unit; the last round's detections."""
    plain_times, pipeline_times = [], []
    for _ in range(rounds):
        plain_found, pipeline_found, plain_s, pipeline_s = [], [], 0.0, 0.0
        for start in range(0, len(images), DETECT_BATCH):
            unit = images[start:start + DETECT_BATCH]
            seconds, found = timed(plain_detect, plain, unit)
            plain_s, plain_found = plain_s + seconds, plain_found + found
            seconds, found = timed(pipeline_detect, pipeline, unit)
            pipeline_s, pipeline_found = pipeline_s + seconds, pipeline_found + found
        plain_times.append(plain_s)
        pipeline_times.append(pipeline_s)
    return plain_times, pipeline_times, plain_found, pipeline_found


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = FaceSettings(min_prob=args.min_prob)
    images = load_photos(args.input, args.limit, settings.max_side)
    if not images:
        sys.exit(f"no readable photos in {args.input}")
    plain, pipeline = MTCNN(keep_all=True), build_detector(settings)
    time_interleaved(plain, pipeline, images[:WARMUP_PHOTOS], rounds=1)
    plain_times, pipeline_times, plain_found, pipeline_found = time_interleaved(plain, pipeline, images, args.rounds)
    plain_boxes, pipeline_boxes = chosen_boxes(plain_found, args.min_prob), chosen_boxes(pipeline_found, args.min_prob)
    both = [iou(a, b) for a, b in zip(plain_boxes, pipeline_boxes) if a is not None and b is not None]
    plain_s, pipeline_s = statistics.median(plain_times), statistics.median(pipeline_times)
    result = {
        "bench": "mtcnn",
        "photos": len(images),
        "sizes": len({image.size for image in images}),
        "threads": args.threads,
        "batch": DETECT_BATCH,
        "plain_images_per_s": round(len(images) / plain_s, 2),
        "pipeline_images_per_s": round(len(images) / pipeline_s, 2),
        "plain_faces_per_s": round(sum(b is not None for b in plain_boxes) / plain_s, 2),
        "pipeline_faces_per_s": round(sum(b is not None for b in pipeline_boxes) / pipeline_s, 2),
        "speedup": round(plain_s / pipeline_s, 2),
        "speedup_per_round": [round(p / q, 2) for p, q in zip(plain_times, pipeline_times)],
        "decision_agreement": round(np.mean([(a is None) == (b is None) for a, b in zip(plain_boxes, pipeline_boxes)]), 4),
        "median_box_iou": round(statistics.median(both), 3) if both else None,
        "loadavg_1min": round(os.getloadavg()[0], 2),  # other jobs on a shared machine slow both
    }
    if not args.json:
        print(f"{result['photos']} photos: plain {result['plain_images_per_s']}/s, pipeline "
              f"{result['pipeline_images_per_s']}/s ({result['speedup']}x)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
