"""BatchReader's batches, batch for batch, against the reader as it was before the device path
prefetched (issue 24): on the CPU (the same code path as before) and through the staged path the
reader takes on CUDA, with its CUDA copies replaced by a fake that runs on the CPU (no GPU here).
No Ray is started."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data_pipeline.loader as loader
from base.errors import UserError
from data_pipeline.loader import BatchReader, FaceStream

from test_loader import IMAGES, shard_dir  # noqa: F401  (the module's shard fixture)


class ReferenceReader:
    """BatchReader.next_batch as it was before issue 24 (the CPU path, blocking copies), with
    the averaged-down pixels rounded as the resolution pyramid defines them."""

    def __init__(self, stream, mirror: bool, seed: int):
        self.images, self.mirror = iter(stream), mirror
        self.flips = torch.Generator().manual_seed(seed)

    def next_batch(self, batch_size: int, resolution: int) -> torch.Tensor:
        images = torch.stack([next(self.images) for _ in range(batch_size)])
        stored = images.shape[1]
        factor = stored // resolution
        if factor > 1:  # the mean of each block rounded, as the pyramid's levels (test_loader.official_lod)
            images = F.avg_pool2d(images.permute(0, 3, 1, 2).float(), factor).round() / 127.5 - 1
        else:
            images = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        if not self.mirror:
            return images
        flip = (torch.rand(images.shape[0], generator=self.flips) < 0.5).to(images.device)
        return torch.where(flip[:, None, None, None], images.flip(3), images)


class FakeStaging:
    """CudaStaging's interface with CPU tensors: what the reader hands it and when, recorded."""
    instances: list["FakeStaging"] = []

    def __init__(self, device: torch.device):
        self.device, self.sent, self.handed_over, self.pending = device, [], [], 0
        FakeStaging.instances.append(self)

    def send(self, images: list[torch.Tensor], flip: torch.Tensor | None) -> loader.Staged:
        assert flip is None or (flip.dtype == torch.bool and flip.shape == (len(images),))
        self.sent.append(len(images))
        self.pending += 1
        return loader.Staged(len(images), images, torch.stack(images), flip, done=None)

    def hand_over(self, staged: loader.Staged) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.handed_over.append(staged.size)
        return staged.device_images, staged.device_flip

    def wait_seconds(self) -> float:
        return 0.0


# (batch size, resolution) as a schedule asks: sizes and resolutions change between phases
SCHEDULE = [(8, 8)] * 3 + [(8, 16), (5, 16), (5, 32), (16, 4), (16, 4), (3, 32), (8, 8)]


def digests(batches: list[torch.Tensor]) -> list[str]:
    return [hashlib.sha256(batch.contiguous().numpy().tobytes()).hexdigest() for batch in batches]


def read(reader, schedule=SCHEDULE) -> list[torch.Tensor]:
    return [reader.next_batch(size, resolution) for size, resolution in schedule]


def stream(shard_dir: Path, seed: int = 7) -> FaceStream:
    return FaceStream(str(shard_dir), 0, 1, seed=seed, shuffle_buffer=8)


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeStaging.instances.clear()
    monkeypatch.setattr(loader, "CudaStaging", FakeStaging)
    return FakeStaging.instances


@pytest.mark.parametrize("mirror", [True, False])
def test_cpu_batches_are_the_same_as_before(shard_dir, mirror):
    assert sum(size for size, _ in SCHEDULE) > IMAGES  # past a pass of the shards
    expected = read(ReferenceReader(stream(shard_dir), mirror, seed=11))
    reader = BatchReader(stream(shard_dir), mirror, seed=11)
    assert reader.staging is None  # the CPU: no pinned memory, no streams, no prefetch
    assert digests(read(reader)) == digests(expected)


@pytest.mark.parametrize("mirror", [True, False])
def test_the_device_path_gives_the_same_batches_with_the_next_one_already_sent(shard_dir, fake_cuda, mirror):
    """On CUDA the reader sends batch i+1 while handing over batch i; a batch sent at the old
    batch size goes back (its images and flip draws) and is sent again, so every batch equals
    the one read before, whatever the schedule."""
    expected = read(ReferenceReader(stream(shard_dir), mirror, seed=11))
    reader = BatchReader(stream(shard_dir), mirror, seed=11, device=torch.device("cuda"))
    (staging,) = fake_cuda
    assert digests(read(reader)) == digests(expected)
    assert staging.handed_over == [size for size, _ in SCHEDULE]
    # after each hand-over the next batch is on its way, at the size just asked for
    assert staging.sent[-1] == SCHEDULE[-1][0] and reader.staged is not None
    # resent when the size changed: (8 -> 5), (5 -> 16), (16 -> 3), (3 -> 8), plus the first
    assert len(staging.sent) == len(SCHEDULE) + 1 + 4
    assert reader.stream_wait_seconds() == 0.0


def test_a_batch_size_change_gives_back_the_prefetched_images(fake_cuda):
    images = [torch.full((4, 4, 3), index, dtype=torch.uint8) for index in range(40)]
    reader = BatchReader(images, mirror=False, seed=0, device="cuda")
    firsts = [int(reader.next_batch(size, 4)[:, 0, 0, 0].add(1).mul(127.5).round()[0]) for size in (4, 4, 7, 2, 2)]
    assert firsts == [0, 4, 8, 15, 17]


def test_an_error_while_prefetching_comes_with_the_batch_it_belongs_to(fake_cuda):
    """The next batch's images are taken early: a stream that fails there fails the next call,
    not the one whose batch is already complete (as before)."""
    def failing():
        yield from [torch.zeros((4, 4, 3), dtype=torch.uint8)] * 6
        raise UserError("no usable image in a full pass")

    reader = BatchReader(failing(), mirror=True, seed=0, device="cuda")
    assert reader.next_batch(3, 4).shape == (3, 3, 4, 4)
    assert reader.next_batch(3, 4).shape == (3, 3, 4, 4)
    with pytest.raises(UserError, match="no usable image"):
        reader.next_batch(3, 4)


def test_only_a_cuda_device_takes_the_staged_path(fake_cuda):
    assert BatchReader([], mirror=False, seed=0).staging is None
    assert BatchReader([], mirror=False, seed=0, device="cpu").staging is None
    assert isinstance(BatchReader([], mirror=False, seed=0, device="cuda:0").staging, FakeStaging)


def test_the_flip_mask_is_drawn_as_before():
    generator, before = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for size in (3, 16, 1):
        assert torch.equal(loader.flip_mask(size, generator), torch.rand(size, generator=before) < 0.5)
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    mixed = loader.mirror_with(images, torch.tensor([True, False]))
    assert torch.equal(mixed[0], images[0].flip(2)) and torch.equal(mixed[1], images[1])
    assert np.array_equal(loader.mirror_randomly(images, torch.Generator().manual_seed(5)),
                          loader.mirror_with(images, torch.rand(2, generator=torch.Generator().manual_seed(5)) < 0.5))
