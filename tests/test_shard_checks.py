"""Shards are checked, not trusted (issue 25): every manifest field a reader uses, each shard's
sha256 when first read, plain tar only with a bound on a member's size, and a stop (not an endless
loop) when a full pass gives no usable image. No Ray here: FaceStream reads shards in-process."""
from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest

from base.errors import UserError
from data_pipeline import loader
from data_pipeline.loader import FaceStream
from data_pipeline.manifest import FORMAT_VERSION, MANIFEST_NAME, check_training_data, require_manifest, write_json
from data_pipeline.shards import Sample, shard_name, write_shard

from conftest import square_photo

STORED = 16


def write_shards(folder: Path, faces_dir: Path, sizes: list[int], resolution: int = STORED,
                 image_format: str = "png") -> dict:
    """PNG face shards as the pipeline writes them, and a manifest (which may claim another
    resolution or format than the members hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = iter(sorted((faces_dir / "aligned").glob("*.jpg")))
    shards = []
    for index, size in enumerate(sizes):
        samples = [Sample(f"{index:02d}{n:038d}", square_photo(next(photos), STORED), "{}") for n in range(size)]
        shards.append(asdict(write_shard(folder / shard_name(index), samples, "png")))
    manifest = {"format_version": FORMAT_VERSION, "resolution": resolution, "image_format": image_format,
                "counts": {"files_seen": sum(sizes), "faces_kept": sum(sizes)}, "shards": shards}
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def images_of(folder: Path, count: int) -> list:
    return list(itertools.islice(iter(FaceStream(str(folder), 0, 1, seed=0, shuffle_buffer=4)), count))


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# ---------------------------------------------------------------- (c) every manifest field is checked

BAD_FIELDS = {
    "resolution": ("resolution", "16"), "resolution ": ("resolution", 12), "resolution  ": ("resolution", True),
    "image_format": ("image_format", "gif"),
    "counts.faces_kept": ("counts", {"faces_kept": "8"}), "counts.files_seen": ("counts", {"faces_kept": 8, "files_seen": -1}),
    "shards": ("shards", {"file": "x"}), "shards[0]": ("shards", ["shard-000000.tar"]),
    "shards[0].file": ("shards.0.file", "../shard-000000.tar"), "shards[0].file ": ("shards.0.file", "a/b.tar"),
    "shards[0].samples": ("shards.0.samples", "8"), "shards[0].samples ": ("shards.0.samples", -3),
    "shards[0].bytes": ("shards.0.bytes", 1.5), "shards[0].sha256": ("shards.0.sha256", "abc"),
}


@pytest.mark.parametrize("field", BAD_FIELDS)
def test_a_manifest_field_of_the_wrong_type_is_one_line_naming_it(field, faces_dir, tmp_path):
    manifest = write_shards(tmp_path / "shards", faces_dir, [4])
    key, value = BAD_FIELDS[field]
    if key.startswith("shards."):
        manifest["shards"][0][key.split(".")[2]] = value
    else:
        manifest[key] = value
    write_json(tmp_path / "shards" / MANIFEST_NAME, manifest)
    for check in (lambda: require_manifest(tmp_path / "shards"),
                  lambda: check_training_data(str(tmp_path / "shards"), 16, 1)):  # what launch.py runs
        with pytest.raises(UserError) as raised:
            check()
        message = str(raised.value)
        assert f"field {field.strip()} must be" in message and "\n" not in message, message


def level(shards: list[dict], resolution: int = 4, image_format: str = "rgb", **changes) -> dict:
    """A pyramid level listing copies of `shards` (their files need not exist: fields are checked first)."""
    return {"resolution": resolution, "image_format": image_format,
            "shards": [{**shard, **changes} for shard in shards]}


BAD_LEVELS = {
    "levels": lambda shards: {"4": shards},
    "levels[0]": lambda shards: ["shard-000000-4px.tar"],
    "levels[0].resolution": lambda shards: [level(shards, resolution=STORED)],
    "levels[1].resolution": lambda shards: [level(shards, 8), level(shards, 4)],
    "levels[0].image_format": lambda shards: [level(shards, image_format="jpg")],
    "levels[0].shards": lambda shards: [level(shards[:1])],
    "levels[0].shards ": lambda shards: [level(shards, samples=1)],
    "levels[0].shards[0].file": lambda shards: [level(shards, file="../x.tar")],
    "levels[0].shards[0].sha256": lambda shards: [level(shards, sha256="")],
}


@pytest.mark.parametrize("field", BAD_LEVELS)
def test_a_damaged_pyramid_field_is_one_line_naming_it(field, faces_dir, tmp_path):
    manifest = write_shards(tmp_path / "shards", faces_dir, [4, 3])
    manifest["levels"] = BAD_LEVELS[field](manifest["shards"])
    write_json(tmp_path / "shards" / MANIFEST_NAME, manifest)
    with pytest.raises(UserError) as raised:
        require_manifest(tmp_path / "shards")
    message = str(raised.value)
    assert f"field {field.strip()} must be" in message and "\n" not in message, message


def test_a_good_manifest_passes_the_field_checks(faces_dir, tmp_path):
    write_shards(tmp_path / "shards", faces_dir, [4, 3])
    assert len(require_manifest(tmp_path / "shards")["shards"]) == 2
    assert len(images_of(tmp_path / "shards", 7)) == 7


# ---------------------------------------------------------------- (a) sha256, checked when a shard is first read

def damage_header(path: Path) -> None:
    """One member header overwritten in the middle, the file's size unchanged."""
    data = bytearray(path.read_bytes())
    data[512 * 5:512 * 5 + 100] = b"x" * 100
    path.write_bytes(bytes(data))


def test_a_shard_that_differs_from_its_sha256_is_left_out_with_one_warning(faces_dir, tmp_path, caplog):
    folder = tmp_path / "shards"
    write_shards(folder, faces_dir, [4, 4])
    damage_header(folder / shard_name(1))
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        seen = images_of(folder, 12)  # three passes of the 4 good images
    assert len({image.numpy().tobytes() for image in seen}) == 4
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and shard_name(1) in warnings[0] and "sha256" in warnings[0], warnings


def test_when_every_shard_differs_the_stream_stops_in_one_line(faces_dir, tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, faces_dir, [4])
    damage_header(folder / shard_name(0))
    with pytest.raises(UserError) as raised:
        images_of(folder, 1)
    message = str(raised.value)
    assert str(folder) in message and "sha256" in message and "\n" not in message, message


# ---------------------------------------------------------------- (b) plain tar only, members bounded

def manifest_for(folder: Path, data: bytes, samples: int) -> None:
    (folder / shard_name(0)).write_bytes(data)
    write_json(folder / MANIFEST_NAME, {
        "format_version": FORMAT_VERSION, "resolution": STORED, "image_format": "png",
        "counts": {"faces_kept": samples}, "shards": [{"file": shard_name(0), "samples": samples, "bytes": len(data),
                                                       "sha256": hashlib.sha256(data).hexdigest()}]})


def tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_compressed_shard_is_refused_even_under_a_matching_manifest(faces_dir, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    folder.mkdir()
    face = square_photo(sorted((faces_dir / "aligned").glob("*.jpg"))[0], STORED)
    manifest_for(folder, gzip.compress(tar_of({"a.png": face, "b.png": face})), 2)
    opened = []
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, member: opened.append(member) or None)
    with pytest.raises(UserError, match="gzip-compressed"):
        images_of(folder, 1)
    assert not opened  # no member was read


def test_a_member_above_the_bound_is_refused_unread(faces_dir, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    face = square_photo(sorted((faces_dir / "aligned").glob("*.jpg"))[0], STORED)
    manifest_for(folder, tar_of({"a.png": face, "b.png": face + b"\0" * 5000}), 2)
    monkeypatch.setattr(loader, "MAX_MEMBER_BYTES", len(face) + 100)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"), pytest.raises(UserError):
        images_of(folder, 3)
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "'b.png'" in warnings[0] and "above the" in warnings[0], warnings


def test_the_default_bound_is_64_mib():
    assert loader.MAX_MEMBER_BYTES == 64 * 1024 * 1024


def test_a_link_member_is_refused(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("a.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    manifest_for(folder, buffer.getvalue(), 1)
    with pytest.raises(UserError, match="not a regular file"):
        images_of(folder, 1)


# ---------------------------------------------------------------- (d) no usable image: a stop, not a loop

@pytest.mark.parametrize("claim", [{"resolution": 32}, {"image_format": "jpg"}])
def test_shards_where_no_sample_decodes_stop_after_one_pass(claim, faces_dir, tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, faces_dir, [3, 2], **claim)
    stream = FaceStream(str(folder), 0, 1, seed=0, shuffle_buffer=4)
    with pytest.raises(UserError) as raised:
        next(iter(stream))
    message = str(raised.value)
    assert str(folder) in message and "no usable image in a full pass" in message and "\n" not in message, message
    assert ("32x32" in message) if "resolution" in claim else ("jpg" in message)
    assert stream.skipped == 5  # one pass, not more


def test_with_loader_workers_the_stop_is_still_one_line(faces_dir, tmp_path):
    from data_pipeline.loader import BatchReader

    folder = tmp_path / "shards"
    write_shards(folder, faces_dir, [3, 2], resolution=32)
    reader = BatchReader(FaceStream(str(folder), 0, 1, seed=0, shuffle_buffer=4), mirror=False, seed=0, loader_workers=1)
    try:
        with pytest.raises(UserError) as raised:
            reader.next_batch(2, 16)
    finally:
        reader.close()
    message = str(raised.value)
    assert message.startswith(str(folder)) and "no usable image in a full pass" in message and "\n" not in message, message
