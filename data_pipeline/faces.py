"""Photo bytes -> the best face as a square crop.

decode (EXIF orientation, any mode -> RGB, bounded size) -> MTCNN detection, one batched call per
group of equal-size images (on a CPU, only as many as CPU_BATCH_PIXELS allows) -> most confident
face -> square crop with margin -> resize -> encode.
`FaceDetector` wraps it as a Ray Data actor; bench/mtcnn.py times the same `detect_in_size_groups`.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipeline.levels import encoded_levels
from data_pipeline.manifest import BELOW_THRESHOLD, KEPT, NO_FACE, NOT_AN_IMAGE, UNREADABLE
from data_pipeline.runtime import HeapTrimmer
from data_pipeline.sources import Source, content_key, read_bytes
from monitoring.metrics import PipelineMetrics

# Photos per work unit, and so the largest batch one detect() call sees. On one CPU thread 12-16
# small photos per call ran fastest (the candidate boxes' tensors stay in cache; 32 was 25%
# slower); larger photos share a call only as far as CPU_BATCH_PIXELS allows.
DETECT_BATCH = 16
# Cap on the pixels of one detect() call: MTCNN's first stage holds the whole image pyramid of
# the batch in memory at once.
MAX_BATCH_PIXELS = 16_000_000
# The lower cap of a detector on the CPU (batch_pixels). There batching equal-size photos pays
# only while a call's pixels are few: past about this many, more photos per call ran slower per
# photo, and photos of half a megapixel or more fastest one at a time. A GPU detector wants large
# batches and keeps MAX_BATCH_PIXELS alone. bench/mtcnn.py --batch-pixels measures the choice.
CPU_BATCH_PIXELS = 500_000
# How far a detector actor's resident memory may grow past its size after the last trim of its C
# heap before it trims again (FaceDetector). Untrimmed, the freed memory glibc keeps after units
# of large photos is about this much within a few units, and then grows slowly for the whole run.
TRIM_SLACK_BYTES = 512 * 2**20
TIE = 0.001  # face probabilities closer than this count as equal
LANCZOS = Image.Resampling.LANCZOS
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class FaceSettings:
    resolution: int = 128
    image_format: str = "png"  # "png" or "jpg" (quality 95)
    min_prob: float = 0.95
    margin: float = 0.4  # the square's side is the face box's longer side times (1 + margin)
    min_face_size: int = 20  # pixels, in the downscaled image the detector sees
    # Step between the detector's image pyramid scales (MTCNN's default: 0.709). See build_detector.
    pyramid_factor: float = 0.6

    @property
    def max_side(self) -> int:
        """Longer side of the image the detector sees and the crop is cut from (bounds memory)."""
        return max(1024, 2 * self.resolution)

    def detector_options(self) -> dict:
        # The last stage's threshold must not hide faces the user asked to keep with --min-prob.
        return {
            "min_face_size": self.min_face_size,
            "thresholds": [0.6, 0.7, min(0.7, self.min_prob)],
            "factor": self.pyramid_factor,
        }


class Rejected(Exception):
    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Photo:
    image: Image.Image  # RGB, upright, longer side <= max_side
    original_size: tuple[int, int]  # width, height after EXIF orientation

    @property
    def scale(self) -> float:
        """Downscaled pixels per original pixel."""
        return self.image.width / self.original_size[0]


@dataclass
class Detection:
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # x1, y1, x2, y2
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2)))
    error: str = ""


@dataclass
class Face:
    box: np.ndarray
    prob: float
    landmarks: np.ndarray


@dataclass
class PhotoResult:
    source: str
    key: str
    status: str
    detail: str = ""
    image: bytes = b""  # the encoded crop when status is KEPT
    meta: str = ""  # its JSON record
    levels: list[bytes] = field(default_factory=list)  # its pyramid, ascending (levels.py)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_photo(data: bytes, max_side: int) -> Photo:
    """Upright RGB photo no larger than max_side; raises Rejected for anything unusable."""
    if not data:
        raise Rejected(UNREADABLE, "empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected(NOT_AN_IMAGE, "not in any known image format") from None
    except Exception as error:  # PIL raises many types for broken headers
        raise Rejected(UNREADABLE, describe(error)) from None
    try:
        with image:
            original_size = upright_size(image)
            decode_reduced(image, original_size, max_side)
            rgb = to_rgb(exif_upright(image))
    except Exception as error:  # truncated or corrupt data, decompression bombs, ...
        raise Rejected(UNREADABLE, describe(error)) from None
    rgb.thumbnail((max_side, max_side), LANCZOS)
    return Photo(rgb, original_size)


def describe(error: Exception) -> str:
    """The error in one line for rejects.jsonl. An OSError is told by its reason alone: its full
    text names the file by its absolute path, which the outputs never hold."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def decode_reduced(image: Image.Image, original_size: tuple[int, int], max_side: int) -> None:
    """Let JPEG decode straight at 1/2, 1/4 or 1/8 scale when that is still >= the target size,
    so a 6000x4000 photo never costs 72 MB of pixels."""
    scale = max_side / max(original_size)
    if scale < 1:
        width, height = image.size
        image.draft(None, (int(width * scale) + 1, int(height * scale) + 1))
    image.load()


def exif_upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the photo
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels hold arbitrary colours; show them on white as viewers do.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


# ---------------------------------------------------------------------------------------------
# Detection


def build_detector(settings: FaceSettings, device: str = "cpu") -> MTCNN:
    """MTCNN set up for throughput on CPU. Besides batching equal-size photos (detect_in_size_groups;
    it helps only where photos share a size, and MTCNN's second and third networks run once per
    candidate box however the photos are batched), two changes:
    - channels-last weights: NHWC convolutions and max-pooling run faster than NCHW for these
      small networks, with the same boxes;
    - a coarser image pyramid (factor 0.6 instead of 0.709): fewer scales, so fewer candidate
      boxes, and keep/reject decisions that differ from the default detector's on very few photos.
    bench/mtcnn.py measures what each gives and the agreement with the default detector; the
    figures are in the README's Benchmarks section.
    """
    mtcnn = MTCNN(keep_all=True, device=torch.device(device), **settings.detector_options())
    for network in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet):
        network.to(memory_format=torch.channels_last)
    return mtcnn.eval()


def batch_pixels(device: torch.device | str) -> int:
    """The most pixels one detect() call gets on a detector on `device` (one image always goes)."""
    return MAX_BATCH_PIXELS if torch.device(device).type == "cuda" else CPU_BATCH_PIXELS


def detect_in_size_groups(mtcnn: MTCNN, images: list[Image.Image], max_pixels: int | None = None) -> list[Detection]:
    """Detections for each image, from one batched detect() per group of equal-size images
    (MTCNN batches only images of one size), each group cut to `max_pixels` (default: what the
    detector's device wants, batch_pixels). The groups depend only on the images, their order and
    the device, so a work unit's floating-point results are the same on every run."""
    detections = [Detection() for _ in images]
    max_pixels = max_pixels or batch_pixels(mtcnn.device)
    for indices in size_groups(images, mtcnn.min_face_size, max_pixels):
        batch = [images[index] for index in indices]
        for index, detection in zip(indices, detect_batch(mtcnn, batch)):
            detections[index] = detection
    return detections


def size_groups(images: list[Image.Image], min_side: int, max_pixels: int = MAX_BATCH_PIXELS) -> list[list[int]]:
    """Indices grouped by image size in order of first appearance, each group cut into runs of at
    most `max_pixels` pixels (at least one image each). Images smaller than the smallest face the
    detector looks for are left out (MTCNN fails on them; they have no face)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        if min(image.size) >= min_side:
            by_size.setdefault(image.size, []).append(index)
    groups = []
    for (width, height), indices in by_size.items():
        step = max(1, max_pixels // (width * height))
        groups.extend(indices[start:start + step] for start in range(0, len(indices), step))
    return groups


def detect_batch(mtcnn: MTCNN, images: list[Image.Image]) -> list[Detection]:
    try:
        boxes, probs, landmarks = mtcnn.detect(images, landmarks=True)
    except Exception as error:  # facenet-pytorch trips over some rare candidate-box layouts
        if len(images) > 1:  # retry one by one so only the culprit loses its face
            return [detection for image in images for detection in detect_batch(mtcnn, [image])]
        return [Detection(error=f"face detector failed: {describe(error)}")]
    return [as_detection(*found) for found in zip(boxes, probs, landmarks)]


def as_detection(boxes, probs, landmarks) -> Detection:
    """MTCNN returns None or ragged object arrays per image; make them plain float arrays."""
    if boxes is None:
        return Detection()
    return Detection(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        probs=np.asarray(probs, dtype=np.float64).reshape(-1),
        landmarks=np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2),
    )


def pick_face(detection: Detection, min_prob: float) -> Face:
    """The most confident face; raises Rejected when there is none above min_prob."""
    if len(detection.probs) == 0:
        raise Rejected(NO_FACE, detection.error or "no face found")
    sides = np.maximum(detection.boxes[:, 2] - detection.boxes[:, 0], detection.boxes[:, 3] - detection.boxes[:, 1])
    # Several faces often all score 0.999+: among those within TIE of the best, take the
    # largest (the sharpest crop) rather than whichever the last digits favour.
    tied = detection.probs >= detection.probs.max() - TIE
    best = int(np.argmax(np.where(tied, sides, -1)))
    prob = float(detection.probs[best])
    if prob < min_prob:
        raise Rejected(BELOW_THRESHOLD, f"best face probability {prob:.3f} < {min_prob}")
    return Face(detection.boxes[best], prob, detection.landmarks[best])


# ---------------------------------------------------------------------------------------------
# Cropping


def square_around(box: np.ndarray, margin: float) -> tuple[int, int, int]:
    """left, top, side of the square centred on the box, its side the longer box side * (1 + margin)."""
    x1, y1, x2, y2 = (float(value) for value in box)
    side = max(x2 - x1, y2 - y1) * (1 + margin)
    return round((x1 + x2 - side) / 2), round((y1 + y2 - side) / 2), max(1, round(side))


def crop_square(pixels: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """The square, with edge pixels repeated where it runs off the image (no black bars)."""
    height, width = pixels.shape[:2]
    # The part inside the image (at least one pixel, even for a square beside it), then padding.
    x0, y0 = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    x1, y1 = max(min(left + side, width), x0 + 1), max(min(top + side, height), y0 + 1)
    region = pixels[y0:y1, x0:x1]
    padding = ((y0 - top, top + side - y1), (x0 - left, left + side - x1), (0, 0))
    return np.pad(region, [(max(0, a), max(0, b)) for a, b in padding], mode="edge")[:side, :side]


def face_crop(photo: Photo, face: Face, settings: FaceSettings) -> tuple[Image.Image, tuple[int, int, int]]:
    left, top, side = square_around(face.box, settings.margin)
    square = crop_square(np.asarray(photo.image), left, top, side)
    resized = Image.fromarray(square).resize((settings.resolution, settings.resolution), LANCZOS)
    return resized, (left, top, side)


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def face_record(source: str, photo: Photo, face: Face, square: tuple[int, int, int]) -> dict:
    """JSON record in original-image pixels (the detector saw a downscaled copy)."""
    to_original = 1 / photo.scale
    left, top, side = square

    def original(values) -> list:
        return np.round(np.asarray(values, dtype=np.float64) * to_original, 1).tolist()

    return {
        "source": source,
        "box": original(face.box),
        "probability": round(face.prob, 4),
        "landmarks": original(face.landmarks),
        "crop_box": original([left, top, left + side, top + side]),
        "original_size": list(photo.original_size),
    }


# ---------------------------------------------------------------------------------------------
# A work unit end to end


def process_sources(mtcnn: MTCNN, sources: list[Source], settings: FaceSettings) -> list[PhotoResult]:
    """Read, decode, detect (batched by size), crop: one PhotoResult per source, in order."""
    results: list[PhotoResult | None] = [None] * len(sources)
    photos: dict[int, tuple[str, Photo]] = {}
    for index, source in enumerate(sources):
        key = ""
        try:
            data = read_bytes(source)
            key = content_key(data)
            photos[index] = key, decode_photo(data, settings.max_side)
        except OSError as error:
            results[index] = PhotoResult(source.name, key, UNREADABLE, describe(error))
        except Rejected as rejected:
            results[index] = PhotoResult(source.name, key, rejected.status, rejected.detail)
    detections = detect_in_size_groups(mtcnn, [photo.image for _, photo in photos.values()])
    for (index, (key, photo)), detection in zip(photos.items(), detections):
        results[index] = crop_result(sources[index].name, key, photo, detection, settings)
    return results


def crop_result(source: str, key: str, photo: Photo, detection: Detection, settings: FaceSettings) -> PhotoResult:
    try:
        face = pick_face(detection, settings.min_prob)
    except Rejected as rejected:
        return PhotoResult(source, key, rejected.status, rejected.detail)
    crop, square = face_crop(photo, face, settings)
    meta = json.dumps(face_record(source, photo, face, square), sort_keys=True)
    image = encode(crop, settings.image_format)
    return PhotoResult(source, key, KEPT, image=image, meta=meta,
                       levels=encoded_levels(stored_pixels(crop, image, settings.image_format)))


def stored_pixels(crop: Image.Image, encoded: bytes, image_format: str) -> np.ndarray:
    """The crop's pixels as a reader of the shards decodes them (JPEG is lossy): the pyramid is
    made from these, so a level equals the stored image averaged down."""
    if image_format == "png":
        return np.asarray(crop)
    with Image.open(io.BytesIO(encoded)) as decoded:
        return np.asarray(decoded.convert("RGB"))


RESULT_COLUMNS = ("shard", "source", "key", "status", "detail", "image", "meta", "levels")


class FaceDetector:
    """Ray Data actor (map_batches with a callable class): one MTCNN per actor, loaded once.

    Each input row is one work unit {"shard": int, "sources": [Source, ...]}; each output row is
    one photo's result. Units are fixed by the driver, so the images that share a detect() call,
    and with them the floating-point results, are the same on every run.

    After a unit that leaves the actor more than TRIM_SLACK_BYTES above its size after the last
    trim, it hands the memory its C heap keeps from freed tensors back to the system
    (data_pipeline.runtime.HeapTrimmer): without it a detector grows through a long run. Not after
    every unit: each trim costs the next unit its page faults (the README's Benchmarks).
    """

    def __init__(self, settings: FaceSettings, run: str):
        self.settings = settings
        self.metrics = PipelineMetrics.shared(run)  # results by outcome, for Prometheus
        # Ray sets OMP_NUM_THREADS to the actor's CPUs, which torch follows for its threads.
        self.mtcnn = build_detector(settings, "cuda" if torch.cuda.is_available() else "cpu")
        self.trimmer = HeapTrimmer(TRIM_SLACK_BYTES)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = []
        for shard, sources in zip(batch["shard"], batch["sources"]):
            for result in process_sources(self.mtcnn, list(sources), self.settings):
                rows.append({"shard": int(shard), **asdict(result)})
                self.metrics.count(result.status)
            self.trimmer.check()
        return {column: [row[column] for row in rows] for column in RESULT_COLUMNS}
