"""The resolution pyramid: every face also stored at each power of two from 4 px up to below the
shards' resolution, so that a training phase reads and decodes only its own resolution's bytes
(from 1024-px shards, decoding the full size costs 1000x more than a 32 px image per face).

One definition of a level, used both where the pipeline writes it and where the loader makes
a batch from full-size images (old shards, or a resolution without a level): the mean of each
factor x factor block of the stored uint8 image, rounded to the nearest integer (ties to even).
That is the official code's levels of detail (dataset_tool.py: 2x2 means carried in float,
each level quantised with np.rint), so a level stored as uint8 is exact, and a phase sees the
same pixels from either kind of shards.

How a level is stored (manifest.level_format): up to 128 px as raw RGB bytes (format "rgb": H*W*3 bytes, row by
row), whose decode is a copy; above it as PNG (lossless). The PNG levels cost about a third of the full size's
bytes, the raw ones a fixed 65 KB a face (README, Benchmarks: bench.pyramid_disk).
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.manifest import RAW_FORMAT, level_format, level_resolutions



def average_down(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Float NCHW images of uint8 values (0..255) -> each factor x factor block's mean, rounded
    to the nearest integer (ties to even, as numpy's rint). Exact in float32: the block sums are
    integers below 2**24 and the factor is a power of two."""
    return F.avg_pool2d(pixels, factor).round_() if factor > 1 else pixels


def pyramid(image: np.ndarray) -> list[np.ndarray]:
    """The levels (uint8 HxWx3, ascending) of one stored HxWx3 uint8 image: 2x2 means carried in
    float from level to level, as the official code does, each level rounded as it is stored.
    The same as average_down from the full size: every carried mean is a multiple of 4**-k below
    256, exact in float32's 24 bits for the 8 halvings from 1024 to 4 px."""
    means = torch.tensor(image).permute(2, 0, 1)[None].float()
    levels = []
    for _ in level_resolutions(image.shape[0]):
        means = F.avg_pool2d(means, 2)
        levels.append(means.round()[0].permute(1, 2, 0).to(torch.uint8).numpy())
    return levels[::-1]


def encode_level(pixels: np.ndarray) -> bytes:
    if level_format(pixels.shape[0]) == RAW_FORMAT:
        return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_levels(image: np.ndarray) -> list[bytes]:
    """One stored face's pyramid, each level encoded as it is stored (level_format)."""
    return [encode_level(level) for level in pyramid(image)]


def decode_raw(data: bytes, resolution: int) -> np.ndarray | None:
    """A raw level's pixels as a writable HxWx3 uint8 array; None when the size is not that of a
    resolution x resolution RGB image."""
    if len(data) != resolution * resolution * 3:
        return None
    return np.frombuffer(data, dtype=np.uint8).reshape(resolution, resolution, 3).copy()
