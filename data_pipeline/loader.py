"""Face shards -> training batches, through Ray Data.

How the data reaches the ranks: the trainer passes `read_shards(dir)` as
`TorchTrainer(datasets={"train": ds})`, and each rank iterates
`ray.train.get_dataset_shard("train")`. Ray Train splits the stream with
`streaming_split(world_size, equal=True)`: the ranks get disjoint shares of equal size (at most
world_size - 1 images are dropped), so every rank runs the same number of steps and DDP never
waits on a rank that ran dry; after an elastic restart the split simply follows the new world
size. webdataset's own node splitting (split_by_node) assigns whole shards to ranks instead: the
shares are unequal whenever the shard count does not divide evenly (or shards differ in size),
it needs at least one shard per rank, and the rank bookkeeping would be ours to redo on every
resize. Ray Data also decodes on its own CPU workers, away from the training step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ray
import torch
import torch.nn.functional as F

from data_pipeline.manifest import require_manifest

IMAGE_COLUMN = "image"


def read_shards(shard_dir: str, min_epoch_images: int = 0) -> ray.data.Dataset:
    """The faces as a dataset with one column, "image": uint8 HxWx3 at the stored resolution.

    With `min_epoch_images`, a small dataset lists its shards several times so that one pass
    holds at least that many images: every pass restarts Ray Data's streaming split (about half
    a second), which would dominate training on a few hundred photos. Training counts images
    seen, not epochs, so a longer pass changes nothing else.

    Raises ValueError when shard_dir holds no complete manifest.json.
    """
    manifest = require_manifest(shard_dir)
    image_format = manifest["image_format"]
    paths = [str(Path(shard_dir) / shard["file"]) for shard in manifest["shards"]]
    if not paths:
        raise ValueError(f"{shard_dir} holds no faces (its manifest lists no shards)")
    images = sum(shard["samples"] for shard in manifest["shards"])
    paths *= max(1, -(-min_epoch_images // max(images, 1)))
    dataset = ray.data.read_webdataset(paths, suffixes=[image_format])
    # Only the image: the string columns (__key__, __url__) break iter_torch_batches.
    return dataset.select_columns([image_format]).rename_columns({image_format: IMAGE_COLUMN})


def stored_resolution(shard_dir: str) -> int:
    return int(require_manifest(shard_dir)["resolution"])


def count_images(shard_dir: str) -> int:
    return sum(shard["samples"] for shard in require_manifest(shard_dir)["shards"])


def iterate_batches(
    data_iterator: ray.data.DataIterator,
    batch_size: int,
    resolution: int,
    mirror: bool,
    shuffle_buffer: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """One epoch of float32 NCHW batches in [-1, 1], exactly batch_size images each.

    The last partial batch is dropped so that all ranks take the same number of steps.
    Images are shuffled within a buffer of shuffle_buffer rows, average-pooled from the stored
    resolution down to `resolution`, and (mirror=True) flipped left-right with probability 0.5.
    """
    flips = torch.Generator().manual_seed(seed)
    batches = data_iterator.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=seed,
        device=device,
    )
    for batch in batches:
        images = to_training_range(batch[IMAGE_COLUMN], resolution)
        if mirror:
            images = mirror_randomly(images, flips)
        yield images


def to_training_range(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 NHWC at the stored resolution -> float32 NCHW in [-1, 1] at `resolution`."""
    stored = images.shape[1]
    if resolution > stored or stored % resolution:
        raise ValueError(f"cannot make {resolution}px batches from shards stored at {stored}px")
    nchw = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    factor = stored // resolution
    return F.avg_pool2d(nchw, factor) if factor > 1 else nchw.contiguous()


def mirror_randomly(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)
