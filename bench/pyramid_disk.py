"""What the shards' resolution pyramid costs in disk on real detail: one JSON line.

    python -m bench.pyramid_disk [--input ../shared/faces/wild] [--size 1024]

For every photo in --input with both sides >= --size: its centred --size x --size crop, the bytes
of that crop as the pipeline stores it (PNG) and of its pyramid's levels as the pipeline stores
them (data_pipeline/levels.py: raw RGB up to 128 px, PNG above), and the levels' share of the
full size. A crop of a photo, not a face the pipeline upscaled: an upscaled crop is smooth, its
full-size PNG small, and the levels' share larger (bench.loader --levels reports that case).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.levels import encoded_levels


def crop_costs(path: Path, size: int) -> dict | None:
    """{photo, full_bytes, level_bytes, share} for the photo's centred crop; None if it is smaller."""
    with Image.open(path) as photo:
        image = photo.convert("RGB")
    width, height = image.size
    if min(width, height) < size:
        return None
    left, top = (width - size) // 2, (height - size) // 2
    crop = image.crop((left, top, left + size, top + size))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    levels = sum(len(level) for level in encoded_levels(np.asarray(crop)))
    full = len(buffer.getvalue())
    return {"photo": path.name, "full_bytes": full, "level_bytes": levels, "share": round(levels / full, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyramid_disk", description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(Path(__file__).resolve().parents[2] / "shared" / "faces" / "wild"))
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    photos = sorted(path for path in Path(args.input).iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    costs = [cost for path in photos if (cost := crop_costs(path, args.size))]
    if not costs:
        raise SystemExit(f"error: no photo in {args.input} has both sides >= {args.size} px")
    print(json.dumps({"bench": "pyramid_disk", "size": args.size, "photos": len(costs),
                      "median_share": statistics.median(cost["share"] for cost in costs),
                      "total_share": round(sum(c["level_bytes"] for c in costs) / sum(c["full_bytes"] for c in costs), 3),
                      "crops": costs}))


if __name__ == "__main__":
    main()
