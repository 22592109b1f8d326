"""One place that turns a folder path or an object-store URL into files to read and write.

A local path stays a local path (plain files, nothing changes for local runs). A URL with a
scheme (s3://bucket/prefix, gs://..., anything fsspec knows) goes through fsspec; for s3:// that
is s3fs, which takes its credentials, region and endpoint from the standard AWS variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL) or the machine's role,
so no secret is ever passed on a command line or written into a file by this project.

Object stores have no folders, no rename and no append: `write_bytes` puts a whole object
(atomic by nature: a reader sees the old object or the new one), and `append_text` reads the
object and puts it back longer, then checks its lines are there (for small, rarely written logs:
each append costs the whole object twice).
"""
from __future__ import annotations

import json
import os
import posixpath
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from base.errors import UserError

LOCAL_SCHEMES = ("", "file")
TEMP_SUFFIX = ".tmp"  # what a file is called while `atomic_path` writes it (left behind only by a kill)


def scheme(location: str | os.PathLike) -> str:
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(location: str | os.PathLike) -> bool:
    """True for an object-store URL (s3://, gs://, ...); False for a local path or file:// URL."""
    return scheme(location) not in LOCAL_SCHEMES


def local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(location: str | os.PathLike, *parts: str) -> str:
    """location/part/...: a URL stays a URL (pathlib would turn s3://b into s3:/b)."""
    if is_remote(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return str(local_path(location).joinpath(*parts))


def base_name(location: str | os.PathLike) -> str:
    """The last part of a path or URL: the run or output folder's name."""
    if is_remote(location):
        return posixpath.basename(str(location).rstrip("/"))
    return local_path(location).resolve().name


def absolute(location: str | os.PathLike) -> str:
    """A URL as it is; a local path made absolute (other processes run in other folders)."""
    return str(location) if is_remote(location) else str(local_path(location).resolve())


def filesystem(location: str | os.PathLike):
    """(fsspec filesystem, path inside it) for a URL. Directory listings are not cached: other
    processes (workers, a rerun) write to the same prefix while this one reads it."""
    import fsspec.core

    return fsspec.core.url_to_fs(str(location), use_listings_cache=False)


def exists(location: str | os.PathLike) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    fs, path = filesystem(location)
    return fs.exists(path)


def read_bytes(location: str | os.PathLike) -> bytes:
    """The file's content; FileNotFoundError (an OSError) when there is none."""
    if not is_remote(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location)
    return fs.cat_file(path)


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def read_text_or_empty(location: str | os.PathLike) -> str:
    try:
        return read_text(location)
    except FileNotFoundError:
        return ""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name in `path`'s folder to write the file under; once the block ends without
    error the file is flushed to disk and renamed to `path`. A process killed half-way leaves the
    old file (or none) under `path`, never part of a new one; a failed block leaves nothing."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        yield temporary
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """A whole object; a local file is written atomically (`atomic_path`)."""
    if not is_remote(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_bytes(data)
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, data)


APPEND_TRIES = 8


def append_text(location: str | os.PathLike, text: str, fresh_line: bool = False) -> None:
    """Adds `text` at the end: a plain append locally; on object storage a read and a longer put,
    read back to check: two writers at once (every rank logging its error) can each put a copy
    without the other's lines, so a writer whose lines are gone puts them again. `fresh_line`
    (JSON-lines files): `text` starts a line of its own, never glued onto a line a kill tore."""
    if not is_remote(location):
        path = local_path(location)
        with open(path, "ab+") as file:  # "a": every write goes to the end, tell() is the size
            if fresh_line:
                text = _mend_local_tail(file, str(location)) + text
            file.write(text.encode())
        return
    for attempt in range(APPEND_TRIES):
        old = read_bytes_or_empty(location)
        cut, prefix = _mend_tail(old, str(location)) if fresh_line else (0, "")
        write_bytes(location, old[:len(old) - cut] + (prefix + text).encode())
        time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))  # lets a racing writer's put land first
        if text in read_text_or_empty(location):
            return
    raise OSError(f"{location}: lines written {APPEND_TRIES} times were overwritten each time")


TAIL_BYTES = 1 << 20  # how much of a file's end is read to find its last line (records are far shorter)


def read_bytes_or_empty(location: str | os.PathLike) -> bytes:
    try:
        return read_bytes(location)
    except FileNotFoundError:
        return b""


def _mend_local_tail(file, location: str) -> str:
    """Readies an open local file ("ab+") for a fresh line: what to write before it ("\n" after a
    whole last record without one), having cut off a torn last line. Reads 1 byte when all is well."""
    size = file.tell()
    if size == 0:
        return ""
    file.seek(size - 1)
    if file.read(1) == b"\n":
        return ""
    file.seek(max(size - TAIL_BYTES, 0))
    cut, prefix = _mend_tail(file.read(), location)
    if cut:
        file.truncate(size - cut)
    return prefix


def _mend_tail(data: bytes, location: str) -> tuple[int, str]:
    """(bytes to cut off the end of `data`, text to write before the next line). A last line that is
    a whole record but lacks its newline gets one; one that is not JSON is what a kill or a full disk
    left mid-write, no record: it is cut off (and said once), so the file stays whole JSON lines
    and `read_jsonl` keeps its rule that only a last line may be torn."""
    if not data or data.endswith(b"\n"):
        return 0, ""
    last = data[data.rfind(b"\n") + 1:]
    try:
        json.loads(last)
        return 0, "\n"
    except ValueError:
        _report_torn(location, "cut off its torn last line before appending")
        return len(last), ""


_reported_torn: set[str] = set()  # JSON-lines files whose torn last line was already reported


def read_jsonl(location: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file ([] when there is none). A last line that is not JSON and
    has no newline after it is what a kill or a full disk leaves mid-write: it is skipped, said
    once per file on stderr. Any other line that is not JSON is a UserError naming the file and
    line: that is damage, not an interrupted write."""
    try:
        text = read_bytes(str(location)).decode(errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")  # the last part is "" when the file ends in a newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise UserError(f"{location}: line {number} is not JSON ({exc.msg})") from None
            _report_torn(str(location), f"skipped its torn last line {number}")
    return records


def _report_torn(location: str, what: str) -> None:
    """One stderr line per file and process: a reader polling a file says it once, not each time."""
    if location not in _reported_torn:
        _reported_torn.add(location)
        print(f"warning: {location}: {what} (an interrupted write)", file=sys.stderr)


def upload(local_file: str | os.PathLike, location: str | os.PathLike) -> None:
    fs, path = filesystem(location)
    fs.put_file(str(local_file), path)


def remove(location: str | os.PathLike) -> None:
    """Deletes one file or object if it is there."""
    if not is_remote(location):
        local_path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def file_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """{name: bytes} of the files directly in `folder` (one listing); {} when there is none."""
    if not is_remote(folder):
        path = local_path(folder)
        return {entry.name: entry.stat().st_size for entry in path.iterdir() if entry.is_file()} if path.is_dir() else {}
    fs, path = filesystem(folder)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    # A key ending in "/" is a folder marker (consoles and some servers create them), not a file.
    return {posixpath.basename(entry["name"]): int(entry["size"]) for entry in entries
            if entry["type"] == "file" and not entry["name"].endswith("/")}


def subfolders(folder: str | os.PathLike) -> list[str]:
    """Names of the folders (on object storage: the common prefixes) directly in `folder`."""
    if not is_remote(folder):
        path = local_path(folder)
        return [entry.name for entry in path.iterdir() if entry.is_dir()] if path.is_dir() else []
    fs, path = filesystem(folder)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [posixpath.basename(entry["name"].rstrip("/")) for entry in entries if entry["type"] == "directory"]


def open_binary(location: str | os.PathLike) -> BinaryIO:
    """A file object to read from the start, streamed (an object is fetched in blocks as it is
    read, never copied to local disk first)."""
    if not is_remote(location):
        return open(local_path(location), "rb")
    fs, path = filesystem(location)
    return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why no file can be written in `folder` (a local one is made if missing), in one line, or
    None when one can: a probe file (an object, on object storage) is written and removed, so no
    bucket, no credentials or no right to write show up here, before any work."""
    try:
        if not is_remote(folder):
            local_path(folder).mkdir(parents=True, exist_ok=True)
        probe = join(folder, f".write-test-{os.getpid()}{TEMP_SUFFIX}")
        write_bytes(probe, b"")
        remove(probe)
    except Exception as error:  # s3fs/botocore raise many types, not all of them OSError
        local_reason = isinstance(error, OSError) and not is_remote(folder) and error.strerror
        return local_reason or describe_error(error)
    return None


def describe_error(error: BaseException) -> str:
    """An object-store failure in one line (type and first line; no credentials are in these)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class RemotePath:
    """The few pathlib.Path operations a run folder needs, on an object-store URL, so code that
    handles a run folder works on both (`location()` gives a Path for a local folder)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(join(self.url, str(part)))

    def joinpath(self, *parts: str) -> RemotePath:
        return RemotePath(join(self.url, *map(str, parts)))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(posixpath.dirname(self.url))

    def resolve(self) -> RemotePath:
        return self

    def relative_to(self, other: RemotePath) -> str:
        prefix = str(other).rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not under {other}")
        return self.url[len(prefix):]

    def exists(self) -> bool:
        return exists(self.url)

    def is_file(self) -> bool:
        fs, path = filesystem(self.url)
        return fs.isfile(path)

    def read_bytes(self) -> bytes:
        return read_bytes(self.url)

    def read_text(self) -> str:
        return read_text(self.url)

    def write_bytes(self, data: bytes) -> None:
        write_bytes(self.url, data)

    def write_text(self, text: str) -> None:
        write_bytes(self.url, text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.exists():
            raise FileNotFoundError(self.url)
        remove(self.url)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: an object store has no folders, only names with slashes."""


def location(text: str | os.PathLike) -> Path | RemotePath:
    """A local folder as a Path, an object-store URL as a RemotePath."""
    return RemotePath(str(text)) if is_remote(text) else local_path(text)


@contextmanager
def written_at(target: str | os.PathLike) -> Iterator[Path]:
    """A local file name to write `target` under: the target itself when it is local, else a
    temporary file uploaded to the target when the block ends without error."""
    if not is_remote(target):
        yield local_path(target)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / posixpath.basename(str(target))
        yield local
        upload(local, str(target))
