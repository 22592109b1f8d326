"""WebDataset shards, and the bookkeeping that lets a killed run resume shard by shard."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset as wds

from base.errors import UserError
from base import storage
from base.storage import TEMP_SUFFIX, atomic_path
from data_pipeline.manifest import MANIFEST_NAME, REJECTS_NAME, Outcome, level_format, read_manifest, shard_files, write_json

SHARD_GLOB = "shard-*.tar"
WORK_DIR_NAME = ".partial"
# Fixed member times (and TarWriter's fixed owner and mode): equal samples, byte-equal shards.
TAR_MTIME = 0


def shard_name(index: int, level: int | None = None) -> str:
    """Block `index`'s shard at the shards' resolution, or of the pyramid level `level` (px)."""
    return f"shard-{index:06d}.tar" if level is None else f"shard-{index:06d}-{level}px.tar"


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    meta: str  # JSON
    levels: tuple[bytes, ...] = ()  # the pyramid's encoded images, ascending (levels.py)


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


def write_shard(path: Path, samples: list[Sample], image_format: str, level: int | None = None) -> ShardInfo:
    """Samples sorted by key into a tar at `path`, written under a temporary name first: each
    sample's image and JSON record, or with `level` (its index in the samples' pyramid) only
    that level's image, in `image_format` (the level's: levels.level_format)."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
            for sample in sorted(samples, key=lambda s: s.key):
                if level is None:
                    writer.write({"__key__": sample.key, image_format: sample.image, "json": sample.meta.encode()})
                else:
                    writer.write({"__key__": sample.key, image_format: sample.levels[level]})
    return ShardInfo(path.name, len(samples), path.stat().st_size, file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PLAN_NAME = "plan.json"
SHARD_FILE = re.compile(r"shard-\d{6}(?:-\d{1,4}px)?\.tar")  # the names shard_name gives
RECORD_FILE = re.compile(r"shard-\d{6}\.json")    # ShardProgress's records in .partial/
# What atomic_path writes under (".NAME.PID.tmp"; "NAME.tmp" from earlier versions), and the
# write probe of storage.unwritable.
OWN_NAME = re.compile(rf"{re.escape(MANIFEST_NAME)}|{re.escape(REJECTS_NAME)}|{SHARD_FILE.pattern}"
                      rf"|{re.escape(PLAN_NAME)}|{RECORD_FILE.pattern}")
OWN_TEMPORARY = re.compile(r"\.?(?P<name>.+?)(?:\.\d+)?" + re.escape(TEMP_SUFFIX))
WRITE_PROBE = re.compile(r"\.write-test-\d+" + re.escape(TEMP_SUFFIX))


def own_temporary(name: str, names: re.Pattern | set[str]) -> bool:
    """A temporary file the pipeline's own atomic writes leave behind when killed, for a file
    named in `names` (a set, or a pattern a name must match)."""
    if WRITE_PROBE.fullmatch(name):
        return True
    found = OWN_TEMPORARY.fullmatch(name)
    if not found:
        return False
    inner = found.group("name")
    return inner in names if isinstance(names, set) else bool(names.fullmatch(inner))


def owned_names(folder: Path) -> set[str]:
    """The files directly in `folder` that the pipeline's own manifest or plan (.partial/) names:
    the manifest, rejects.jsonl and the shards it lists; with a plan, rejects.jsonl, its planned
    shards and those its records name. Nothing else is the pipeline's to remove."""
    names: set[str] = set()
    manifest = read_json(folder / MANIFEST_NAME)
    if "format_version" in manifest and isinstance(manifest.get("shards"), list):
        names |= {MANIFEST_NAME, REJECTS_NAME}
        listed = [manifest["shards"]] + [level.get("shards") for level in manifest.get("levels") or []
                                         if isinstance(level, dict)]
        names |= {shard["file"] for shards in listed if isinstance(shards, list) for shard in shards
                  if isinstance(shard, dict) and isinstance(shard.get("file"), str) and SHARD_FILE.fullmatch(shard["file"])}
    work = folder / WORK_DIR_NAME
    plan = read_json(work / PLAN_NAME)
    if "fingerprint" in plan:
        names.add(REJECTS_NAME)
        count, levels = plan.get("shards"), plan.get("levels") or []
        if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < 10 ** 6:
            names |= {shard_name(index, level) for index in range(count)
                      for level in [None, *(level for level in levels if isinstance(level, int))]}
        for record_path in work.glob("shard-*.json"):
            record = read_json(record_path)
            levels = record.get("levels")
            infos = [record.get("shard"), *(levels.values() if isinstance(levels, dict) else ())]
            names |= {info["file"] for info in infos if isinstance(info, dict) and isinstance(info.get("file"), str)
                      and SHARD_FILE.fullmatch(info["file"])}
    return names


def foreign_entry(folder: Path) -> Path | None:
    """The first thing in the output folder that is not the pipeline's own (see `owned_names`;
    in .partial/: the plan, the shard records and their temporary files), or None."""
    if not folder.is_dir():
        return None
    owned = owned_names(folder)
    own_plan = "fingerprint" in read_json(folder / WORK_DIR_NAME / PLAN_NAME)
    for entry in sorted(folder.iterdir()):
        if entry.name == WORK_DIR_NAME and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                ours = (own_plan and inner.is_file() and (inner.name == PLAN_NAME or RECORD_FILE.fullmatch(inner.name))) \
                    or own_temporary(inner.name, OWN_NAME)
                if not ours:
                    return inner
        elif not ((entry.name in owned and (entry.is_file() or entry.is_symlink()))
                  or own_temporary(entry.name, OWN_NAME)):
            return entry
    return None


def check_own_output(folder: Path) -> None:
    """UserError naming the first file in `folder` that the pipeline did not write (a user's own
    shard-mydata.tar, a rejects.jsonl or .partial/ content without the pipeline's plan): the
    pipeline removes and replaces only its own output, and never writes among other files
    unless --overwrite says so."""
    entry = foreign_entry(folder)
    if entry is not None:
        raise UserError(f"--output {folder}: {entry} is not this pipeline's output, and the pipeline writes only "
                        f"into an empty folder or its own earlier output; move it away, give another --output, "
                        f"or pass --overwrite")


def build_folder(output: str) -> Path:
    """Where the shards are made: the output itself, or for a URL a local work folder named by
    it ($DATA_PIPELINE_WORK_DIR, default ~/.cache/progan-data-pipeline), so that a rerun on the
    same machine resumes there."""
    if not storage.is_remote(output):
        return Path(output)
    root = os.environ.get("DATA_PIPELINE_WORK_DIR") or Path.home() / ".cache" / "progan-data-pipeline"
    digest = hashlib.sha1(output.rstrip("/").encode()).hexdigest()[:16]
    return Path(root) / f"{storage.base_name(output)}-{digest}"


def listed_shards(output: str) -> set[str]:
    """The shards a complete output's manifest lists: the only ones there that are ours to drop."""
    try:
        previous = read_manifest(output)
    except UserError:  # a damaged manifest: its shards are not known, so none is dropped
        previous = None
    return set(shard_files(previous)) if previous else set()


def check_own_remote_output(output: str) -> None:
    """check_own_output for an object-store output that holds no complete manifest (a complete
    one is "already complete" or refused before this): UserError naming the first file directly
    under the prefix that the pipeline did not write. Its own are those its local build folder's
    manifest or plan names (an upload cut short leaves some of them there without a manifest).
    Uploads never write into the prefix's subfolders, so those are not looked at."""
    owned = owned_names(build_folder(output))
    for name in sorted(storage.file_sizes(output)):
        if name not in owned:
            raise UserError(f"--output {output}: {storage.join(output, name)} is not this pipeline's output, and the "
                            f"pipeline writes only under an empty prefix or its own earlier output; move it away, "
                            f"give another --output, or pass --overwrite")


def remove_previous_output(folder: Path, overwrite: bool = False) -> None:
    """Delete what an earlier run of the pipeline wrote, as its manifest and plan name it
    (`owned_names`), the manifest first so that no manifest ever points at missing shards.
    With `overwrite` (the user's --overwrite) also every file the pipeline's names would replace
    (manifest.json, rejects.jsonl, shard-NNNNNN.tar, .partial/); other files stay."""
    names = owned_names(folder)
    if overwrite:
        names |= {MANIFEST_NAME, REJECTS_NAME} | {path.name for path in folder.glob(SHARD_GLOB) if SHARD_FILE.fullmatch(path.name)}
    if MANIFEST_NAME in names:
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
    for name in sorted(names - {MANIFEST_NAME}):
        (folder / name).unlink(missing_ok=True)
    work = folder / WORK_DIR_NAME
    if work.is_dir() and (overwrite or "fingerprint" in read_json(work / PLAN_NAME)):
        shutil.rmtree(work, ignore_errors=True)
    elif work.is_dir() and not any(work.iterdir()):
        work.rmdir()
    remove_temporary_files(folder)


def remove_temporary_files(folder: Path) -> None:
    """The temporary files the pipeline's own atomic writes left when killed (no other *.tmp)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and own_temporary(path.name, OWN_NAME):
            path.unlink(missing_ok=True)


class ShardProgress:
    """`.partial/` in the output folder: the plan's fingerprint and shard count, and one record per finished
    shard (its file info and every outcome). A rerun of the same plan skips finished shards;
    any other plan starts from an empty folder."""

    def __init__(self, folder: Path, fingerprint: str, fresh: bool, shard_count: int | None = None,
                 levels: tuple[int, ...] = ()):
        """`fresh` (--overwrite): start over whatever the folder holds; otherwise anything in it
        that is not the pipeline's own output stops here (UserError, `check_own_output`).
        `levels`: the pyramid's resolutions, each block written as one shard per level too."""
        self.levels = tuple(levels)
        self.folder = folder
        self.work = folder / WORK_DIR_NAME
        plan_file = self.work / PLAN_NAME
        if not fresh:
            check_own_output(folder)
        if fresh or read_json(plan_file).get("fingerprint") != fingerprint:
            remove_previous_output(folder, overwrite=fresh)
            self.work.mkdir(parents=True)
            plan = {"fingerprint": fingerprint, "levels": list(self.levels)}
            write_json(plan_file, plan if shard_count is None else {**plan, "shards": shard_count})
        remove_temporary_files(folder)
        remove_temporary_files(self.work)

    def record_path(self, index: int) -> Path:
        return self.work / f"shard-{index:06d}.json"

    def is_done(self, index: int) -> bool:
        return self.load(index) is not None

    def finish_shard(self, index: int, samples: list[Sample], outcomes: list[Outcome], image_format: str) -> None:
        """Writes the block's shard and one per pyramid level, then its record (last: a record
        means every file of the block is there)."""
        info = write_shard(self.folder / shard_name(index), samples, image_format) if samples else None
        levels = {str(level): asdict(write_shard(self.folder / shard_name(index, level), samples, level_format(level), n))
                  for n, level in enumerate(self.levels)} if samples else {}
        record = {"shard": asdict(info) if info else None, "levels": levels,
                  "outcomes": [asdict(o) for o in sorted(outcomes, key=lambda o: o.source)]}
        write_json(self.record_path(index), record)

    def load(self, index: int) -> FinishedShard | None:
        """A finished block's shard infos and outcomes; None if unfinished (or a tar went missing)."""
        record = read_json(self.record_path(index))
        if "outcomes" not in record:
            return None
        info = ShardInfo(**record["shard"]) if record["shard"] else None
        levels = {int(level): ShardInfo(**value) for level, value in (record.get("levels") or {}).items()}
        if any(not (self.folder / shard.file).is_file() for shard in [info, *levels.values()] if shard):
            return None
        if info and set(levels) != set(self.levels):
            return None
        return FinishedShard(info, levels, [Outcome(**outcome) for outcome in record["outcomes"]])

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


@dataclass(frozen=True)
class FinishedShard:
    """One finished block: its shard (None when it kept no face), its pyramid's shards by
    resolution, and every photo's outcome."""
    info: ShardInfo | None
    levels: dict[int, ShardInfo]
    outcomes: list[Outcome]


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
