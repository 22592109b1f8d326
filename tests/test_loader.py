"""data_pipeline.loader: shards -> equal, disjoint per-rank streams of [-1, 1] NCHW batches.

The shards are written with data_pipeline.shards from real aligned photos (centre-cropped and
resized, no detector), so these tests do not depend on face detection.
"""
from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from data_pipeline.loader import count_images, iterate_batches, read_shards, stored_resolution, to_training_range
from data_pipeline.manifest import FORMAT_VERSION, MANIFEST_NAME, write_json
from data_pipeline.shards import Sample, shard_name, write_shard

STORED = 32
SHARD_SIZES = [10, 10, 10, 7]  # 37 images: no world size below divides it evenly
IMAGES = sum(SHARD_SIZES)


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def square_photo(path: Path, size: int) -> bytes:
    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    buffer = io.BytesIO()
    image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


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


def test_jpeg_shards_read_the_same_way(ray_instance, faces_dir, tmp_path):
    photos = sorted((faces_dir / "aligned").glob("*.jpg"))[:3]
    jpegs = [Image.open(io.BytesIO(square_photo(path, STORED))) for path in photos]
    samples = []
    for index, image in enumerate(jpegs):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        samples.append(Sample(f"{index:040d}", buffer.getvalue(), "{}"))
    shard = write_shard(tmp_path / shard_name(0), samples, "jpg")
    write_json(tmp_path / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "resolution": STORED,
                                          "image_format": "jpg", "shards": [asdict(shard)]})
    rows = read_shards(str(tmp_path)).take_all()
    assert len(rows) == 3 and all(row["image"].shape == (STORED, STORED, 3) for row in rows)


def fingerprints(batch: torch.Tensor) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch]


def test_a_folder_without_a_complete_manifest_is_refused(ray_instance, shard_dir, tmp_path):
    with pytest.raises(ValueError, match="no complete face shards"):
        read_shards(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text((shard_dir / MANIFEST_NAME).read_text())  # shards missing
    with pytest.raises(ValueError) as refused:
        read_shards(str(tmp_path))
    assert "\n" not in str(refused.value)


def test_the_dataset_has_one_uint8_image_column_at_the_stored_resolution(ray_instance, shard_dir):
    dataset = read_shards(str(shard_dir))
    assert dataset.columns() == ["image"]
    row = dataset.take(1)[0]
    assert row["image"].shape == (STORED, STORED, 3) and row["image"].dtype == np.uint8
    assert dataset.count() == count_images(str(shard_dir)) == IMAGES
    assert stored_resolution(str(shard_dir)) == STORED


def test_batches_are_full_float_nchw_in_range_at_the_requested_resolution(ray_instance, shard_dir):
    batches = list(iterate_batches(read_shards(str(shard_dir)).iterator(), batch_size=8, resolution=8,
                                   mirror=True, shuffle_buffer=16, seed=0))
    assert len(batches) == IMAGES // 8  # the partial last batch is dropped
    for batch in batches:
        assert batch.shape == (8, 3, 8, 8) and batch.dtype == torch.float32
        assert -1 <= batch.min() and batch.max() <= 1 and batch.std() > 0.1


def test_pooling_averages_blocks_of_the_stored_pixels():
    images = torch.randint(0, 256, (2, STORED, STORED, 3), dtype=torch.uint8)
    pooled = to_training_range(images, 8)
    expected = images.permute(0, 3, 1, 2).float().reshape(2, 3, 8, 4, 8, 4).mean(dim=(3, 5)) / 127.5 - 1
    assert torch.allclose(pooled, expected, atol=1e-5)
    assert torch.equal(to_training_range(images, STORED), images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="cannot make 64px batches"):
        to_training_range(images, 64)


def test_mirroring_flips_about_half_of_the_images(ray_instance, faces_dir):
    image = np.array(Image.open(io.BytesIO(square_photo(faces_dir / "aligned" / "000001.jpg", STORED))))
    dataset = ray.data.from_items([{"image": image}] * 64)
    batches = torch.cat(list(iterate_batches(dataset.iterator(), 16, STORED, mirror=True, shuffle_buffer=0, seed=3)))
    plain = to_training_range(torch.from_numpy(image)[None], STORED)
    flipped = batches.eq(plain.flip(3)).flatten(1).all(1)
    unchanged = batches.eq(plain).flatten(1).all(1)
    assert bool((flipped ^ unchanged).all())
    assert 16 <= int(flipped.sum()) <= 48


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_get_disjoint_equal_shares(ray_instance, shard_dir, world_size):
    """As TorchTrainer(datasets={"train": read_shards(...)}) splits it: consumed concurrently."""
    iterators = read_shards(str(shard_dir)).streaming_split(world_size, equal=True)
    seen: list[list[str]] = [[] for _ in iterators]

    def consume(rank: int) -> None:
        for batch in iterate_batches(iterators[rank], batch_size=1, resolution=STORED, mirror=False,
                                     shuffle_buffer=8, seed=rank):
            seen[rank] += fingerprints(batch)

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [len(images) for images in seen] == [IMAGES // world_size] * world_size
    everything = [image for images in seen for image in images]
    assert len(set(everything)) == len(everything)  # no image on two ranks, none twice
