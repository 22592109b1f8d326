"""Inputs (folders, globs, .zip/.tar archives) -> a sorted list of photo sources, and their bytes.

Listing runs in the driver before Ray starts and touches only names and archive indexes, so a
missing or empty input fails in a second. Reading bytes happens later, inside Ray Data tasks, so
every node must see the inputs at the same path (a shared file system on a real cluster).

A photo's name, which the shards, rejects.jsonl and the manifest record, is its path relative to
the folder that holds its input: `--input /data/celeba` names its photos "celeba/000001.jpg", the
glob /data/wild/*.jpg "wild/a.jpg" (the glob's fixed part is /data/wild), /data/photos.zip
"photos.zip!/img/1.jpg". So the outputs say where each face came from without carrying this
machine's folder layout, and the names stay the same when the photos move.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from base.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ARCHIVE_SUFFIXES = (".zip", ".tar")
GLOB_CHARACTERS = "*?["
# A photo file above this size is rejected unread: it bounds the memory of one read (and of a
# zip member that claims a huge uncompressed size).
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, order=True)
class Source:
    """One photo: a plain file, or a member of an archive."""

    name: str  # unique and stable, shown to the user and stored: "input/sub/file.jpg", "archive.zip!/member"
    path: str  # the file to open (absolute; never stored in the outputs)
    member: str = ""  # archive member name; "" for a plain file
    offset: int = -1  # tar members: where the data starts, for a read without scanning the tar
    length: int = -1  # tar members: the data size


class FileTooLarge(OSError):
    pass


def has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    return name.lower().endswith(suffixes)


def check_inputs_exist(inputs: list[str]) -> None:
    """Raise UserError for an input that names nothing (cheap: no folder is walked)."""
    for spec in inputs:
        expand_input(spec)


def list_sources(inputs: list[str]) -> list[Source]:
    """All photos under the inputs, each once, sorted by name (the order is part of the output).
    A file reached through two inputs keeps the name the first one gives it."""
    by_location: dict[tuple[str, str], Source] = {}
    for spec in inputs:
        found = [source for path in expand_input(spec) for source in sources_in(path, name_root(spec))]
        if not found:
            raise UserError(f"no photos ({' '.join(IMAGE_SUFFIXES)}) found in {spec}")
        for source in found:
            by_location.setdefault((source.path, source.member), source)
    check_names_unique(by_location.values())
    return sorted(by_location.values())


def check_names_unique(sources: Iterable[Source]) -> None:
    """UserError when two different photos get one name (inputs of the same name, say
    /a/photos and /b/photos, both holding x.jpg): names must tell the photos apart."""
    by_name: dict[str, Source] = {}
    for source in sources:
        other = by_name.setdefault(source.name, source)
        if other is not source:
            raise UserError(f"two photos would both be named {source.name} ({location(other)} and {location(source)}): "
                            f"their inputs have the same name; rename one of them")


def inputs_fingerprint(sources: Iterable[Source]) -> dict:
    """What a rerun compares to tell whether the inputs are the ones an output was made from:
    {"files": count, "sha256": digest of every photo's name (relative, as stored), size and
    modification time}. An archive member counts with the archive's size and time and its own
    length. Only names and file status are read (no photo), so it is cheap before Ray starts."""
    digest, count, stats = hashlib.sha256(), 0, {}
    for source in sorted(sources):
        if source.path not in stats:
            status = os.stat(source.path)
            stats[source.path] = (status.st_size, status.st_mtime_ns)
        size, mtime = stats[source.path]
        digest.update(f"{source.name}\0{size}\0{mtime}\0{source.length}\n".encode())
        count += 1
    return {"files": count, "sha256": digest.hexdigest()}


def location(source: Source) -> str:
    return f"{source.path}!/{source.member}" if source.member else source.path


def is_glob(spec: str) -> bool:
    return any(character in spec for character in GLOB_CHARACTERS)


def expand_input(spec: str) -> list[str]:
    if is_glob(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise UserError(f"no files match {spec}")
        return [os.path.abspath(match) for match in matches]
    if not os.path.exists(spec):
        raise UserError(f"input {spec} does not exist")
    return [os.path.abspath(spec)]


def fixed_base(spec: str) -> str:
    """The input as an absolute path, cut before its first part with a glob character."""
    parts = Path(os.path.abspath(spec)).parts
    fixed = list(itertools.takewhile(lambda part: not is_glob(part), parts))
    return str(Path(*fixed)) if fixed else os.sep


def name_root(spec: str) -> str:
    """The folder the input's photo names are relative to: the one holding the input (a glob's
    fixed base), so that every name starts with the input's own name."""
    return os.path.dirname(fixed_base(spec))


def recorded_input(spec: str) -> str:
    """The input as the manifest records it: relative to its name root, like the photo names
    (so "celeba", "wild/*.jpg", "photos.zip"), never an absolute path of this machine."""
    return relative_name(os.path.abspath(spec), name_root(spec))


def relative_name(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def sources_in(path: str, root: str) -> list[Source]:
    """The photos at `path` (a folder, archive or photo), named relative to `root`."""
    if os.path.isdir(path):
        return [Source(name=relative_name(file, root), path=file) for file in image_files_under(path)]
    if has_suffix(path, ARCHIVE_SUFFIXES):
        return archive_members(path, relative_name(path, root))
    if has_suffix(path, IMAGE_SUFFIXES):
        return [Source(name=relative_name(path, root), path=path)]
    return []


def image_files_under(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(os.path.join(root, name) for name in sorted(names) if has_suffix(name, IMAGE_SUFFIXES))
    return files


def archive_members(path: str, name: str) -> list[Source]:
    """The archive's photos, named "<name>!/<member>"."""
    try:
        if has_suffix(path, (".zip",)):
            return zip_members(path, name)
        return tar_members(path, name)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as error:
        raise UserError(f"cannot read archive {path}: {error}") from None


def zip_members(path: str, name: str) -> list[Source]:
    with zipfile.ZipFile(path) as archive:
        return [
            Source(name=f"{name}!/{info.filename}", path=path, member=info.filename)
            for info in archive.infolist()
            if not info.is_dir() and has_suffix(info.filename, IMAGE_SUFFIXES)
        ]


def tar_members(path: str, name: str) -> list[Source]:
    # Mode "r:" (no compression) on purpose: only a plain tar lets a task seek to one member.
    with tarfile.open(path, "r:") as archive:
        return [
            Source(name=f"{name}!/{info.name}", path=path, member=info.name, offset=info.offset_data, length=info.size)
            for info in archive.getmembers()
            if info.isfile() and has_suffix(info.name, IMAGE_SUFFIXES)
        ]


def content_key(data: bytes) -> str:
    """A sample's key: stable across runs, renames and folders, and equal for equal files."""
    return hashlib.sha1(data).hexdigest()


def read_bytes(source: Source) -> bytes:
    """The source's content; OSError (FileTooLarge included) when it cannot be read."""
    if not source.member:
        return read_file(source.path)
    if source.offset >= 0:
        return read_range(source.path, source.offset, source.length)
    return read_zip_member(source.path, source.member)


def read_file(path: str) -> bytes:
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise FileTooLarge(f"file is larger than {MAX_FILE_BYTES} bytes ({size})")
    with open(path, "rb") as file:
        return file.read()


def read_range(path: str, offset: int, length: int) -> bytes:
    if length > MAX_FILE_BYTES:
        raise FileTooLarge(f"archive member is larger than {MAX_FILE_BYTES} bytes ({length})")
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(length)
    if len(data) != length:
        raise OSError(f"archive member is cut short ({len(data)} of {length} bytes)")
    return data


def read_zip_member(path: str, member: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
            if info.file_size > MAX_FILE_BYTES:
                raise FileTooLarge(f"archive member is larger than {MAX_FILE_BYTES} bytes ({info.file_size})")
            return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError, ValueError, NotImplementedError) as error:
        raise OSError(f"cannot read zip member: {error}") from error
