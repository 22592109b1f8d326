"""data_pipeline.loader: shards -> equal, disjoint per-rank streams of [-1, 1] NCHW batches.

The shards are written with data_pipeline.shards from real aligned photos (centre-cropped and
resized, no detector), so these tests do not depend on face detection.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from base.errors import UserError
from data_pipeline.levels import pyramid
from data_pipeline.loader import (LOADER_CHUNK, BatchReader, FaceStream, count_images, rank_slices, shard_list,
                                  to_training_range)
from data_pipeline.manifest import FORMAT_VERSION, MANIFEST_NAME, stored_resolution, write_json
from data_pipeline.shards import Sample, shard_name, write_shard

from conftest import square_photo

STORED = 32
SHARD_SIZES = [10, 10, 10, 7]  # 37 images: no world size below divides it evenly
IMAGES = sum(SHARD_SIZES)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, faces_dir) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    photos = iter(sorted((faces_dir / "aligned").glob("*.jpg")))
    shards = []
    for index, size in enumerate(SHARD_SIZES):
        samples = []
        for _ in range(size):
            data = square_photo(next(photos), STORED)
            samples.append(Sample(hashlib.sha1(data).hexdigest(), data, "{}"))
        shards.append(asdict(write_shard(folder / shard_name(index), samples, "png")))
    manifest = {"format_version": FORMAT_VERSION, "resolution": STORED, "image_format": "png",
                "counts": {"faces_kept": IMAGES}, "shards": shards}
    write_json(folder / MANIFEST_NAME, manifest)
    return folder


def first_images(stream: FaceStream, count: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(stream), count))


def test_jpeg_shards_read_the_same_way(faces_dir, tmp_path):
    photos = sorted((faces_dir / "aligned").glob("*.jpg"))[:3]
    jpegs = [Image.open(io.BytesIO(square_photo(path, STORED))) for path in photos]
    samples = []
    for index, image in enumerate(jpegs):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        samples.append(Sample(f"{index:040d}", buffer.getvalue(), "{}"))
    shard = write_shard(tmp_path / shard_name(0), samples, "jpg")
    write_json(tmp_path / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "resolution": STORED, "image_format": "jpg",
                                          "counts": {"faces_kept": 3}, "shards": [asdict(shard)]})
    images = first_images(FaceStream(str(tmp_path), 0, 1, seed=0, shuffle_buffer=4), 3)
    assert all(image.shape == (STORED, STORED, 3) and image.dtype == torch.uint8 for image in images)


class CreatesAFileWhenUnpickled:
    """A pickle that, once loaded, has created `path`: what a hostile shard member would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def write_raw_shard(folder: Path, members: list[dict], image_format: str = "png") -> None:
    """One shard of exactly these tar members (any extensions) and a manifest listing it."""
    folder.mkdir()
    with wds.TarWriter(str(folder / shard_name(0)), encoder=False) as writer:
        for member in members:
            writer.write(member)
    shard = {"file": shard_name(0), "samples": len(members), "bytes": (folder / shard_name(0)).stat().st_size,
             "sha256": hashlib.sha256((folder / shard_name(0)).read_bytes()).hexdigest()}
    write_json(folder / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "resolution": STORED, "image_format": image_format,
                                        "counts": {"faces_kept": len(members)}, "shards": [shard]})


def real_images(faces_dir: Path, count: int) -> list[bytes]:
    return [square_photo(path, STORED) for path in sorted((faces_dir / "aligned").glob("*.jpg"))[:count]]


def decoded_fingerprints(images: list[bytes]) -> list[str]:
    return sorted(fingerprints(torch.from_numpy(np.array(Image.open(io.BytesIO(data)))) for data in images))


def test_pickle_members_in_a_shard_are_never_unpickled(faces_dir, tmp_path):
    """A shard with pickle members, one beside a real image and one sample of its own: the stream
    yields the real images and loads no pickle (loading one would create `marker`)."""
    marker = tmp_path / "unpickled"
    hostile = pickle.dumps(CreatesAFileWhenUnpickled(marker))
    images = real_images(faces_dir, 3)
    members = [{"__key__": f"{index:040d}", "png": data} for index, data in enumerate(images)]
    members[0]["pyd"] = hostile
    members.append({"__key__": "evil", "pyd": hostile, "pkl": hostile, "pickle": hostile})
    write_raw_shard(tmp_path / "shards", members)
    try:
        seen = first_images(FaceStream(str(tmp_path / "shards"), 0, 1, seed=0, shuffle_buffer=4), 3 * len(images))
    finally:
        assert not marker.exists(), "a shard member was unpickled"
    assert sorted(set(fingerprints(seen))) == decoded_fingerprints(images)


def test_samples_without_a_decodable_image_are_skipped_with_one_warning(faces_dir, tmp_path, caplog):
    """No image member, bytes that are no PNG, a JPEG named .png, a PNG of another size."""
    images = real_images(faces_dir, 3)
    members = [{"__key__": f"{index:040d}", "png": data} for index, data in enumerate(images)]
    members += [{"__key__": "no-image", "json": b"{}"}, {"__key__": "broken", "png": b"not a png"},
                {"__key__": "jpeg-not-png", "png": as_jpeg(images[0])},
                {"__key__": "too-small", "png": square_photo(sorted((faces_dir / "aligned").glob("*.jpg"))[0], 8)}]
    write_raw_shard(tmp_path / "shards", members)
    stream = FaceStream(str(tmp_path / "shards"), 0, 1, seed=0, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        seen = first_images(stream, 3 * len(images))  # three passes
    assert sorted(set(fingerprints(seen))) == decoded_fingerprints(images)
    assert stream.skipped >= 8  # four in each of the first two passes
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings


def as_jpeg(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, "JPEG")
    return buffer.getvalue()


def fingerprints(images) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


def test_a_folder_without_a_complete_manifest_is_refused(shard_dir, tmp_path):
    with pytest.raises(UserError, match="no complete face shards"):
        FaceStream(str(tmp_path), 0, 1, seed=0, shuffle_buffer=8)
    (tmp_path / MANIFEST_NAME).write_text((shard_dir / MANIFEST_NAME).read_text())  # shards missing
    with pytest.raises(UserError) as refused:
        FaceStream(str(tmp_path), 0, 1, seed=0, shuffle_buffer=8)
    assert "\n" not in str(refused.value)


def test_more_workers_than_images_is_refused_in_one_line(shard_dir):
    with pytest.raises(ValueError, match=f"hold {IMAGES} images, fewer than the 38 training workers"):
        FaceStream(str(shard_dir), 0, 38, seed=0, shuffle_buffer=8)


def test_the_stream_gives_uint8_images_at_the_stored_resolution(shard_dir):
    images = first_images(FaceStream(str(shard_dir), 0, 1, seed=0, shuffle_buffer=8), 2 * IMAGES + 5)
    assert all(image.shape == (STORED, STORED, 3) and image.dtype == torch.uint8 for image in images)
    assert count_images(str(shard_dir)) == IMAGES and stored_resolution(str(shard_dir)) == STORED
    passes = [images[:IMAGES], images[IMAGES:2 * IMAGES]]
    assert [len(set(fingerprints(p))) for p in passes] == [IMAGES, IMAGES]  # each pass: every image once
    assert fingerprints(passes[0]) != fingerprints(passes[1])  # in a new order


def test_batches_are_full_float_nchw_in_range_at_any_size_and_resolution(shard_dir):
    reader = BatchReader(FaceStream(str(shard_dir), 0, 1, seed=0, shuffle_buffer=16), mirror=True, seed=0)
    for batch_size, resolution in [(8, 8)] * 6 + [(5, 32), (16, 4)]:  # 109 images: three passes
        batch = reader.next_batch(batch_size, resolution)
        assert batch.shape == (batch_size, 3, resolution, resolution) and batch.dtype == torch.float32
        assert -1 <= batch.min() and batch.max() <= 1 and batch.std() > 0.1
def official_lod(images: np.ndarray, steps: int) -> np.ndarray:
    """The official dataset_tool.py's level of detail: 2x2 means carried in float, `steps` times,
    then np.rint to uint8 (TFRecordExporter.add_image), for NHWC uint8 images."""
    pixels = images.astype(np.float64)
    for _ in range(steps):
        pixels = (pixels[:, 0::2, 0::2] + pixels[:, 0::2, 1::2] + pixels[:, 1::2, 0::2] + pixels[:, 1::2, 1::2]) * 0.25
    return np.rint(pixels).clip(0, 255).astype(np.uint8)


def test_pooling_gives_the_official_levels_of_detail_exactly():
    """Full-size images averaged down in the loader are the official code's quantised levels of
    detail, to the bit: the pixels a phase sees are the same from a pyramid level (stored as
    uint8) as from the full size. Mean ties (x.5) round to even, as np.rint."""
    images = torch.randint(0, 256, (2, STORED, STORED, 3), dtype=torch.uint8)
    images[0, :2, :2, 0] = torch.tensor([[1, 2], [2, 1]], dtype=torch.uint8)  # a tie: 1.5 -> 2
    for resolution, steps in [(16, 1), (8, 2), (4, 3)]:
        pooled = to_training_range(images, resolution)
        expected = torch.from_numpy(official_lod(images.numpy(), steps)).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert torch.equal(pooled, expected)
    assert to_training_range(images, 16)[0, 0, 0, 0] == 2 / 127.5 - 1
    assert torch.equal(to_training_range(images, STORED), images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="cannot make 64px batches"):
        to_training_range(images, 64)


def test_the_pipelines_pyramid_is_the_official_levels_of_detail_from_1024_px():
    """levels.pyramid (the pipeline's, carrying float means from level to level) gives the
    official quantised levels down to 4 px from 1024 px, where float32 needs all its 24 bits."""
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    image[:4, :4] = 255  # the largest sums
    levels = pyramid(image)
    assert [level.shape[0] for level in levels] == [4, 8, 16, 32, 64, 128, 256, 512]
    for steps, level in enumerate(reversed(levels), start=1):
        assert np.array_equal(level, official_lod(image[None], steps)[0]), level.shape


def test_mirroring_flips_about_half_of_the_images(faces_dir):
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(square_photo(faces_dir / "aligned" / "000001.jpg", STORED)))))
    reader = BatchReader([image] * 64, mirror=True, seed=3)
    batches = torch.cat([reader.next_batch(16, STORED) for _ in range(4)])
    plain = to_training_range(image[None], STORED)
    flipped = batches.eq(plain.flip(3)).flatten(1).all(1)
    unchanged = batches.eq(plain).flatten(1).all(1)
    assert bool((flipped ^ unchanged).all())
    assert 16 <= int(flipped.sum()) <= 48


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_equal_shares_in_every_pass(shard_dir, world_size):
    share = IMAGES // world_size
    for pass_index in (0, 1):  # the ranks' slices change from pass to pass
        seen = [fingerprints(first_images(FaceStream(str(shard_dir), rank, world_size, seed=5, shuffle_buffer=8,
                                                     images_seen=pass_index * IMAGES), share))
                for rank in range(world_size)]
        everything = [image for images in seen for image in images]
        assert len(set(everything)) == len(everything) == share * world_size  # none on two ranks, none twice
    slices = [rank_slices(shard_list(str(shard_dir)), rank, world_size, 0, seed=5) for rank in range(world_size)]
    assert [sum(part.take for part in parts) for parts in slices] == [share] * world_size


def test_even_one_shard_is_dealt_out_differently_in_every_pass():
    shards = [("only.tar", 100)]
    deals = [[rank_slices(shards, rank, 4, pass_index, seed=0) for rank in range(4)] for pass_index in range(3)]
    for deal in deals:
        positions = [part.skip + i for parts in deal for part in parts for i in range(part.take)]
        assert sorted(positions) == list(range(100))  # every image once: disjoint, equal shares of 25
        assert [sum(part.take for part in parts) for parts in deal] == [25] * 4
    assert len({str(deal[0]) for deal in deals}) == 3  # rank 0 gets other images each pass


def test_loader_workers_deliver_the_same_shares(shard_dir):
    """Two DataLoader processes decode alternate images of rank 1's share (of 2) and hand them over
    in chunks of LOADER_CHUNK: over whole chunks that end on pass boundaries (16 passes of 9
    images each: 144 = 9 chunks per worker), the same images as read in the training process."""
    share, per_worker = IMAGES // 2, IMAGES // 2 // 2
    count = 16 * share
    assert (count // 2) % LOADER_CHUNK == 0 and (count // 2) % per_worker == 0
    inline = first_images(FaceStream(str(shard_dir), 1, 2, seed=0, shuffle_buffer=4), count)
    reader = BatchReader(FaceStream(str(shard_dir), 1, 2, seed=0, shuffle_buffer=4), mirror=False, seed=0,
                         loader_workers=2)
    try:
        parallel = reader.next_batch(count, STORED)
    finally:
        reader.close()
    as_uint8 = [image.add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous() for image in parallel]
    assert sorted(fingerprints(as_uint8)) == sorted(fingerprints(inline))
