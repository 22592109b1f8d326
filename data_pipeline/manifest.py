"""The output folder's record: outcome reasons, manifest.json, rejects.jsonl.

Imports nothing heavy, so the CLI can check a finished output before it loads torch or Ray.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data_pipeline import storage
from data_pipeline.errors import UserError
from data_pipeline.storage import atomic_path

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
    holds a complete output (every listed shard present at its size), else None."""
    try:
        manifest = json.loads(storage.read_text(storage.join(folder, MANIFEST_NAME)))
        sizes = storage.file_sizes(folder)
        shards_present = all(sizes.get(shard["file"]) == shard["bytes"] for shard in manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION or not shards_present:
        return None
    return manifest


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
    differs from the one the manifest records; a setting the manifest lacks is not compared."""
    recorded = manifest.get("config") or {}
    return [f"{flag} {recorded[name]} -> {getattr(config, name)}" for name, flag in SHARD_SETTINGS.items()
            if name in recorded and recorded[name] != getattr(config, name)]


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
