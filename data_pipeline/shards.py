"""WebDataset shards, and the bookkeeping that lets a killed run resume shard by shard."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from data_pipeline.manifest import MANIFEST_NAME, REJECTS_NAME, Outcome, write_json
from base.storage import TEMP_SUFFIX, atomic_path

SHARD_GLOB = "shard-*.tar"
WORK_DIR_NAME = ".partial"
# Fixed member times (and TarWriter's fixed owner and mode): equal samples, byte-equal shards.
TAR_MTIME = 0


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    meta: str  # JSON


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


def write_shard(path: Path, samples: list[Sample], image_format: str) -> ShardInfo:
    """Samples sorted by key into a tar at `path`, written under a temporary name first."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in sorted(samples, key=lambda s: s.key):
                writer.write({"__key__": sample.key, image_format: sample.image, "json": sample.meta.encode()})
    return ShardInfo(path.name, len(samples), path.stat().st_size, file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_previous_output(folder: Path) -> None:
    """Delete what an earlier run wrote (only our own names), the manifest first so that no
    manifest ever points at missing shards."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for path in [folder / REJECTS_NAME, *folder.glob(SHARD_GLOB)]:
        path.unlink(missing_ok=True)
    shutil.rmtree(folder / WORK_DIR_NAME, ignore_errors=True)
    remove_temporary_files(folder)


def remove_temporary_files(folder: Path) -> None:
    for path in folder.glob("*" + TEMP_SUFFIX):
        path.unlink(missing_ok=True)


class ShardProgress:
    """`.partial/` in the output folder: the plan's fingerprint, and one record per finished
    shard (its file info and every outcome). A rerun of the same plan skips finished shards;
    any other plan starts from an empty folder."""

    def __init__(self, folder: Path, fingerprint: str, fresh: bool):
        self.folder = folder
        self.work = folder / WORK_DIR_NAME
        plan_file = self.work / "plan.json"
        if fresh or read_json(plan_file).get("fingerprint") != fingerprint:
            remove_previous_output(folder)
            self.work.mkdir(parents=True)
            write_json(plan_file, {"fingerprint": fingerprint})
        remove_temporary_files(folder)
        remove_temporary_files(self.work)

    def record_path(self, index: int) -> Path:
        return self.work / f"shard-{index:06d}.json"

    def is_done(self, index: int) -> bool:
        return self.load(index) is not None

    def finish_shard(self, index: int, samples: list[Sample], outcomes: list[Outcome], image_format: str) -> None:
        info = write_shard(self.folder / shard_name(index), samples, image_format) if samples else None
        record = {"shard": asdict(info) if info else None, "outcomes": [asdict(o) for o in sorted(outcomes, key=lambda o: o.source)]}
        write_json(self.record_path(index), record)

    def load(self, index: int) -> tuple[ShardInfo | None, list[Outcome]] | None:
        """A finished shard's info and outcomes; None if unfinished (or its tar went missing)."""
        record = read_json(self.record_path(index))
        if "outcomes" not in record:
            return None
        info = ShardInfo(**record["shard"]) if record["shard"] else None
        if info and not (self.folder / info.file).is_file():
            return None
        return info, [Outcome(**outcome) for outcome in record["outcomes"]]

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
