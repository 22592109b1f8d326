"""The output folder's record: outcome reasons, manifest.json, rejects.jsonl.

Imports nothing heavy, so the CLI can check a finished output before it loads torch or Ray.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from base import storage
from base.errors import UserError
from base.storage import atomic_path

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT_VERSION = 1

# What happened to one input file. Every file seen ends under exactly one of these.
KEPT = "kept"
NO_FACE = "no_face"
BELOW_THRESHOLD = "below_threshold"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
DUPLICATE = "duplicate"
COUNT_NAMES = {
    KEPT: "faces_kept",
    NO_FACE: "no_face",
    BELOW_THRESHOLD: "below_threshold",
    UNREADABLE: "unreadable",
    NOT_AN_IMAGE: "not_an_image",
    DUPLICATE: "duplicate_content",
}


@dataclass(frozen=True)
class Outcome:
    source: str
    key: str  # sha1 of the content; "" when the file could not be read
    status: str
    detail: str = ""


def count_outcomes(outcomes: Iterable[Outcome]) -> dict[str, int]:
    by_status = Counter(outcome.status for outcome in outcomes)
    counts = {"files_seen": sum(by_status.values())}
    counts.update({name: by_status.get(status, 0) for status, name in COUNT_NAMES.items()})
    return counts


def write_json(path: Path, value: object) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_rejects(folder: Path, outcomes: Iterable[Outcome]) -> None:
    rejects = sorted((outcome for outcome in outcomes if outcome.status != KEPT), key=lambda o: o.source)
    lines = [json.dumps({"path": o.source, "reason": o.status, "detail": o.detail}) + "\n" for o in rejects]
    with atomic_path(folder / REJECTS_NAME) as temporary:
        temporary.write_text("".join(lines))


def read_manifest(folder: Path | str) -> dict | None:
    """The manifest if the folder (a path, or an object-store URL such as s3://bucket/prefix)
    holds a complete output (every listed shard present at its size), else None. A manifest of
    this format whose fields have the wrong type or value is a UserError naming the field
    (`check_manifest_fields`): it is never trusted as far as a traceback."""
    location = storage.join(folder, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_text(location))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    check_manifest_fields(manifest, location)
    try:
        sizes = storage.file_sizes(folder)
    except OSError:
        return None
    if not all(sizes.get(shard["file"]) == shard["bytes"] for shard in all_shards(manifest)):
        return None
    return manifest


def all_shards(manifest: dict) -> list[dict]:
    """Every shard a manifest lists: at its resolution, then its pyramid's levels'."""
    return [*manifest["shards"], *(shard for level in manifest.get("levels", []) for shard in level["shards"])]


def shard_files(manifest: dict) -> list[str]:
    return [shard["file"] for shard in all_shards(manifest)]


def shards_at(manifest: dict, resolution: int | None) -> tuple[list[dict], str, int]:
    """(shards, image format, their resolution) a reader at `resolution` uses: the pyramid's level
    of that resolution when the manifest lists one, else the shards at the stored resolution
    (averaged down by the reader: levels.average_down, so the pixels are the same either way)."""
    for level in manifest.get("levels", []):
        if level["resolution"] == resolution:
            return level["shards"], level["image_format"], resolution
    return manifest["shards"], manifest["image_format"], int(manifest["resolution"])


def has_pyramid(manifest: dict) -> bool:
    """Whether the manifest lists a level for every resolution below its own (written since the
    pyramid; older shards hold the stored resolution only)."""
    return [level["resolution"] for level in manifest.get("levels", [])] == level_resolutions(int(manifest["resolution"]))


SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The pyramid's levels (levels.py): 4 px up to below the shards' resolution; up to RAW_MAX px
# stored as raw RGB bytes (decoding is a copy), above that as PNG.
LOWEST_LEVEL = 4
RAW_MAX = 128
RAW_FORMAT = "rgb"
LEVEL_FORMATS = (RAW_FORMAT, "png")


def level_resolutions(resolution: int) -> list[int]:
    """The pyramid's resolutions below `resolution`, ascending: 4, 8, ..., resolution / 2."""
    return [2 ** k for k in range(LOWEST_LEVEL.bit_length() - 1, resolution.bit_length() - 1)]


def level_format(resolution: int) -> str:
    return RAW_FORMAT if resolution <= RAW_MAX else "png"


def check_manifest_fields(manifest: dict, location: str) -> None:
    """UserError (one line naming the field) unless every field a reader uses is of the right
    type and range: resolution a power of two from 4 to 1024, image_format one the pipeline
    writes, counts non-negative integers, each shard a plain file name (no '/', no '..') with a
    non-negative sample count, a byte size and a sha256 of 64 hex digits."""
    from data_pipeline.config import IMAGE_FORMATS

    def bad(field: str, want: str, value: object) -> UserError:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return UserError(f"{location}: field {field} must be {want}, not {shown}; the manifest is damaged "
                         f"(make the shards again with python -m data_pipeline)")

    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    resolution = manifest.get("resolution")
    if not count(resolution) or not 4 <= resolution <= 1024 or resolution & (resolution - 1):
        raise bad("resolution", "a power of two from 4 to 1024", resolution)
    if manifest.get("image_format") not in IMAGE_FORMATS:
        raise bad("image_format", f"one of {', '.join(IMAGE_FORMATS)}", manifest.get("image_format"))
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not all(isinstance(name, str) for name in counts):
        raise bad("counts", "an object of counts", counts)
    for name in ("faces_kept", *(n for n in counts if n != "faces_kept")):
        if not count(counts.get(name)):
            raise bad(f"counts.{name}", "a non-negative integer", counts.get(name))
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", "a list", shards)
    check_shard_fields(shards, "shards", bad)
    check_level_fields(manifest, bad)


def check_shard_fields(shards: list, name: str, bad) -> None:
    """Each shard a plain file name (no '/', no '..') with a non-negative sample count, a byte size
    and a sha256 of 64 hex digits; `bad(field, want, value)` makes the UserError."""
    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for index, shard in enumerate(shards):
        field = f"{name}[{index}]"
        if not isinstance(shard, dict):
            raise bad(field, "an object", shard)
        file = shard.get("file")
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or ".." in file:
            raise bad(f"{field}.file", "a file name in the shards folder (no '/', no '..')", file)
        for key in ("samples", "bytes"):
            if not count(shard.get(key)):
                raise bad(f"{field}.{key}", "a non-negative integer", shard.get(key))
        if not isinstance(shard.get("sha256"), str) or not SHA256_HEX.fullmatch(shard["sha256"]):
            raise bad(f"{field}.sha256", "64 hex digits", shard.get("sha256"))


def check_level_fields(manifest: dict, bad) -> None:
    """The pyramid's fields (optional: older manifests have none): a list of levels, each a
    power of two from 4 below the stored resolution, ascending, in a level format, with one
    shard per stored shard of the same sample count (the same blocks: the ranks' shares and
    the stream's order are the same at every level); the shards' own fields as checked above."""
    if "levels" not in manifest:
        return
    levels = manifest["levels"]
    if not isinstance(levels, list):
        raise bad("levels", "a list", levels)
    counts = [shard["samples"] for shard in manifest["shards"]]
    below = 0
    for index, level in enumerate(levels):
        field = f"levels[{index}]"
        if not isinstance(level, dict):
            raise bad(field, "an object", level)
        resolution = level.get("resolution")
        if not (isinstance(resolution, int) and not isinstance(resolution, bool) and below < resolution
                < manifest["resolution"] and resolution >= 4 and not resolution & (resolution - 1)):
            raise bad(f"{field}.resolution", "a power of two from 4, ascending, below the shards' resolution", resolution)
        below = resolution
        if level.get("image_format") not in LEVEL_FORMATS:
            raise bad(f"{field}.image_format", f"one of {', '.join(LEVEL_FORMATS)}", level.get("image_format"))
        shards = level.get("shards")
        if not isinstance(shards, list) or len(shards) != len(counts):
            raise bad(f"{field}.shards", f"a list of {len(counts)} shards, one per stored shard", shards)
        check_shard_fields(shards, f"{field}.shards", bad)
        if [shard["samples"] for shard in shards] != counts:
            raise bad(f"{field}.shards", "shards of the stored shards' sample counts", [s["samples"] for s in shards])


# The settings that shape the shards, as PrepareConfig and the manifest's "config" name them,
# and the command-line flag of each (for messages).
SHARD_SETTINGS = {
    "resolution": "--resolution",
    "image_format": "--format",
    "shard_size": "--shard-size",
    "min_prob": "--min-prob",
    "margin": "--margin",
}


def changed_settings(manifest: dict, config: object) -> list[str]:
    """"--flag old -> new" for each shard-shaping setting of `config` (a PrepareConfig) that
    differs from the one the manifest records, and "--input (...)" when the inputs' fingerprint
    (names, sizes, times: sources.inputs_fingerprint) differs; a setting the manifest lacks (an
    older manifest has no fingerprint) is not compared."""
    recorded = manifest.get("config") or {}
    if not isinstance(recorded, dict):
        return []
    changes = [f"{flag} {recorded[name]} -> {getattr(config, name)}" for name, flag in SHARD_SETTINGS.items()
               if name in recorded and recorded[name] != getattr(config, name)]
    old, new = recorded.get("inputs_fingerprint"), getattr(config, "inputs_fingerprint", None)
    if isinstance(old, dict) and isinstance(new, dict) and old.get("sha256") != new["sha256"]:
        if old.get("files") != new["files"]:
            changes.append(f"--input ({old.get('files')} -> {new['files']} files)")
        else:
            changes.append(f"--input ({new['files']} files, some with other names, sizes or times)")
    return changes


def check_same_settings(manifest: dict, config: object, folder: Path | str) -> None:
    """UserError when the complete output in `folder` was made with other settings: reporting
    it as done would leave shards that are not the ones asked for."""
    changes = changed_settings(manifest, config)
    if changes:
        raise UserError(f"{folder} is already complete with other settings ({', '.join(changes)}): "
                        f"--overwrite rebuilds it, or give another --output")


def require_manifest(folder: Path | str) -> dict:
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder} holds no complete face shards (no valid {MANIFEST_NAME}); run python -m data_pipeline first")
    return manifest


def stored_resolution(shard_dir: str) -> int:
    return int(require_manifest(shard_dir)["resolution"])


def ensure_writable_folder(folder: str) -> None:
    """Create the output folder if needed and prove we can write there, before any photo is read
    (UserError otherwise)."""
    reason = storage.unwritable(folder)
    if reason:
        kind = "output" if storage.is_remote(folder) else "output folder"
        raise UserError(f"cannot write to {kind} {folder}: {reason}")


# ---------------------------------------------------------------- shards a training run can use

def check_face_count(shards: Path | str, workers: int, label: str) -> None:
    """Every training worker needs faces: too few stop here, in one line, not in restarting workers.
    `label`: how the user named the data (--data's value), for the message."""
    check_faces(require_manifest(shards), shards, workers, label)


def check_faces(manifest: dict, shards: Path | str, workers: int, label: str) -> None:
    """check_face_count on a manifest already read from `shards`."""
    faces = sum(shard["samples"] for shard in manifest["shards"])
    if faces >= workers:
        return
    counts = manifest["counts"]
    rejected = ", ".join(f"{name} {n}" for name, n in counts.items() if name not in ("files_seen", "faces_kept") and n)
    found = f"{faces} faces in {counts.get('files_seen', '?')} files ({rejected or 'no rejects'})"
    if faces == 0:
        raise UserError(f"--data {label}: no usable face: {found}; give photos that each show a face "
                         f"(why each file was left out: {storage.join(shards, REJECTS_NAME)})")
    raise UserError(f"--data {label}: {found}, fewer than the {workers} training workers; "
                     f"add photos or pass --workers {faces}")


def check_shards(path: Path | str, max_resolution: int, workers: int) -> dict:
    """Complete shards, at the model's resolution or above, with a face for every worker; their
    manifest (read once)."""
    manifest = require_manifest(path)
    stored = int(manifest["resolution"])
    if stored < max_resolution:
        raise UserError(f"--data {path}: shards hold {stored}x{stored} images but model.max_resolution is "
                         f"{max_resolution}; make shards at >= {max_resolution} or lower it")
    check_faces(manifest, path, workers, str(path))
    return manifest


def old_shards_note(path: Path | str, manifest: dict | None = None) -> str | None:
    """One warning line for complete shards written before the resolution pyramid (they still
    train, at the stored resolution's decoding cost in every phase); None for shards with it.
    `manifest`: theirs, when already read."""
    manifest = require_manifest(path) if manifest is None else manifest
    if has_pyramid(manifest):
        return None
    stored = manifest["resolution"]
    inputs = manifest.get("config", {}).get("inputs") if isinstance(manifest.get("config"), dict) else None
    photos = " ".join(f"--input {spec}" for spec in inputs) if isinstance(inputs, list) and inputs else "--input PHOTOS"
    return (f"warning: {path} was made before shards held every resolution: each phase reads and decodes the "
            f"{stored}x{stored} images and averages them down (the same pixels, at the full size's cost); "
            f"rebuild it for one level per resolution: python -m data_pipeline {photos} --output {path} "
            f"--resolution {stored} --overwrite")


def check_remote_shards(url: str, max_resolution: int, workers: int) -> dict:
    """Shards on object storage (raw photos there are not supported: prepare them first); their
    manifest."""
    try:
        found = storage.exists(storage.join(url, MANIFEST_NAME))
    except Exception as exc:  # no credentials, no such endpoint: one line, not a traceback
        raise UserError(f"--data {url}: cannot read it ({storage.describe_error(exc)})")
    if not found:
        raise UserError(f"--data {url}: no {MANIFEST_NAME} there; on object storage --data must be face shards: "
                         f"python -m data_pipeline --input PHOTOS --output {url}")
    return check_shards(url, max_resolution, workers)


def check_training_data(data: str, max_resolution: int, workers: int) -> tuple[Path | str, dict | None]:
    """(path, manifest) for a training run's --data: a shards folder or URL is used as is (after
    the checks above, their manifest read once); a folder of photos (manifest None) goes through
    the pipeline first."""
    from data_pipeline.sources import IMAGE_SUFFIXES

    if storage.is_remote(data):
        return data, check_remote_shards(data, max_resolution, workers)
    path = Path(data)
    if not path.is_dir():
        raise UserError(f"--data {path}: no such folder")
    if (path / MANIFEST_NAME).is_file():
        return path, check_shards(path, max_resolution, workers)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise UserError(f"--data {path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return path, None
