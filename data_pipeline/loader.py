"""Face shards -> training batches, read with webdataset inside each training worker.

Why webdataset's own reader and not Ray Train's dataset ingest (`TorchTrainer(datasets=...)`,
which this project used first): with `launch.py --nodes 4` on a small CPU, Ray Data's
SplitCoordinator, stats actor, read tasks and block-splitting tasks (each a new Python process)
took longer before the first batch arrived than the first training steps, and small steps then
waited on data for a large share of their time (README, Benchmarks). Read in the worker, the
first batch is there at once and the wait is the time to decode a few PNGs. For large images, `loader_workers` decodes in
DataLoader processes beside the training step.

How the ranks share the data, without talking to each other: the manifest gives every shard's
sample count, so each rank can compute its share without reading anything. Every pass lays the
shards out in an order shuffled by (seed, pass), the same on every rank, and rank r takes the
positions [o + r * share, o + (r + 1) * share) of that layout, read as a ring, with share =
images // world_size and o an offset drawn from the same (seed, pass). So in
one pass the ranks' images are disjoint and equally many (at most world_size - 1 left out), each
rank opens only the shards its range covers, and after an elastic restart the ranges simply
follow the new world size. The stream never ends (pass follows pass, the image count decides
when training stops), so no rank runs dry before another and DDP never waits on an epoch's end.

Which shards: each phase opens a stream at its resolution, which reads that resolution's level
of the shards' pyramid (levels.py: 4 px to below the stored size, raw RGB up to 128 px, PNG
above), so a 32 px phase of 1024 px shards reads and decodes 32 px images. Shards written
before the pyramid, or a resolution without a level, are read at the stored size and averaged
down to the same pixels.

Where the shards are: a folder every node can read, or an object store (s3://bucket/prefix, through
fsspec: base.storage); either way each rank streams its own shards, block by block.

What is decoded: only each sample's image member, of the format the manifest names, by PIL's
decoder for that format alone. webdataset's own decoders are never used: they unpickle members
named .pyd/.pkl/.pickle and torch.load .pth ones, so a tar dropped into a shards folder could run
code on every training worker. A sample without a decodable image of the stored size is skipped.

Shards are checked, not trusted (each check once per process: the training worker, or each
DataLoader worker):
- When a shard is first read, its sha256 is computed (one streamed read) and compared with the
  manifest's. A shard that differs (a header overwritten at the same size silently gave half its
  faces) is left out, not read: the run goes on with the others, and a warning line names it,
  once per shard and process. Left out rather than stopping the run because one damaged shard
  of many should not cost a long run; when every shard a pass needs is left out, the pass below
  stops it.
- Only what the pipeline writes is read: a plain (uncompressed) tar of regular files, each member
  at most MAX_MEMBER_BYTES (a 1024 px PNG face is about 3 MB). A compressed file, a link or
  other member kind, or a larger member leaves the shard out in the same way; members of other
  names than `<key>.<format>` and `<key>.json` are passed over unread.
- A full pass over this rank's shards that gives no usable image at all (every sample skipped
  or every shard left out: say, a manifest that names another resolution or image format than
  the members hold) stops with a UserError naming the shard folder and the reason, instead of
  looping for ever.
"""
from __future__ import annotations

import collections
import functools
import io
import hashlib
import itertools
import logging
import random
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from base import storage
from base.errors import UserError
from data_pipeline.levels import average_down, decode_raw
from data_pipeline.manifest import RAW_FORMAT, require_manifest, shards_at

log = logging.getLogger(__name__)
# The one PIL decoder each stored format may use (Image.open would otherwise try every plugin).
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG"}
# The largest tar member a shard may hold: a 1024 px PNG face is about 3 MB, so this is ample,
# and it bounds the memory one member can take (a member is read whole).
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# Leading bytes of the compressed formats tarfile (and webdataset) would otherwise open.
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class ShardSlice:
    """`take` samples of one shard after skipping its first `skip`."""
    url: str
    skip: int
    take: int


def shard_list(shard_dir: str, manifest: dict | None = None, resolution: int | None = None) -> list[tuple[str, int]]:
    """(path, samples) for every shard in the manifest (read from `shard_dir` unless given) that a
    reader at `resolution` uses (manifest.shards_at; the stored resolution's by default).
    Raises ValueError without a complete one."""
    if manifest is None:
        manifest = require_manifest(shard_dir)
    listed = shards_at(manifest, resolution)[0]
    shards = [(storage.join(shard_dir, s["file"]), int(s["samples"])) for s in listed if s["samples"]]
    if not shards:
        raise ValueError(f"{shard_dir} holds no faces (its manifest lists no shards)")
    return shards


def count_images(shard_dir: str) -> int:
    return sum(samples for _, samples in shard_list(shard_dir))


def share_size(images: int, world_size: int) -> int:
    """Images per rank and pass; ValueError when some rank would get none."""
    if images < world_size:
        raise ValueError(f"the shards hold {images} images, fewer than the {world_size} training workers")
    return images // world_size


def rank_slices(shards: list[tuple[str, int]], rank: int, world_size: int, pass_index: int,
                seed: int) -> list[ShardSlice]:
    """The parts of the shards that are this rank's in this pass (see the module's docstring).
    The pass's layout also starts at a random offset (wrapping around), so that even a single
    shard is dealt out to the ranks differently from pass to pass."""
    total = sum(samples for _, samples in shards)
    share = share_size(total, world_size)
    rng = random.Random(f"{seed}/{pass_index}")
    order = list(shards)
    rng.shuffle(order)
    begin = rng.randrange(total) + rank * share
    end = begin + share  # < 2 * total: two laps over the layout cover it
    slices, position = [], 0
    for url, samples in order + order:
        low, high = max(begin, position), min(end, position + samples)
        if low < high:
            slices.append(ShardSlice(url, low - position, high - low))
        position += samples
    return slices


class BadShard(Exception):
    """A shard that is left out: not the plain tar the pipeline writes, or not the file the
    manifest describes (one line)."""


def shard_samples(url: str, image_format: str | None = None, max_member: int | None = None) -> Iterator[dict]:
    """The samples of one shard (a path or an object-store URL), streamed: the file is read in
    blocks as the samples are used, never copied whole to disk. Closing the iterator (a slice
    that ends early) closes the stream. Only a plain tar of regular files is read, each member
    at most `max_member` bytes (default MAX_MEMBER_BYTES; BadShard otherwise); with `image_format`, only members named
    `<key>.<image_format>` and `<key>.json` are read, others passed over unread."""
    with storage.open_binary(url) as stream:
        check_plain_tar(stream.read(512))
        stream.seek(0)
        bound = MAX_MEMBER_BYTES if max_member is None else max_member
        yield from wds.tariterators.group_by_keys(tar_members(stream, url, image_format, bound))


def check_plain_tar(head: bytes) -> None:
    """BadShard unless `head` (a file's first 512 bytes) starts a plain tar: no compression, a
    ustar header."""
    for magic, name in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            raise BadShard(f"it is {name}-compressed, not the plain tar the pipeline writes")
    if len(head) < 512 or head[257:262] != b"ustar":
        raise BadShard("it is not a tar file (no ustar header)")


def tar_members(stream, url: str, image_format: str | None, max_member: int) -> Iterator[dict]:
    """{"fname", "data", "__url__"} of each member to read, for webdataset's group_by_keys."""
    wanted = None if image_format is None else {image_format, "json"}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:  # "r|": a plain stream, no compression
            for member in archive:
                if not member.isreg():
                    raise BadShard(f"member {member.name[:80]!r} is not a regular file")
                if member.size > max_member:
                    raise BadShard(f"member {member.name[:80]!r} is {member.size} bytes, above the "
                                   f"{max_member} a shard member may hold")
                parts = wds.tariterators.base_plus_ext(member.name)
                if wanted is not None and (parts[0] is None or parts[1] not in wanted):
                    continue
                yield {"fname": member.name, "data": archive.extractfile(member).read(), "__url__": url}
    except (tarfile.TarError, EOFError) as error:
        raise BadShard(f"it is not a readable tar ({type(error).__name__}: {error})") from None


def file_sha256(url: str) -> str:
    digest = hashlib.sha256()
    with storage.open_binary(url) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FaceStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of faces: uint8 HxWx3 tensors, pass after pass, shuffled within
    a buffer of `shuffle_buffer` images. Iterated by a DataLoader with workers, each worker
    decodes every n-th image of the rank's share.

    What it reads: with `resolution`, that resolution's level of the shards' pyramid where the
    manifest lists one (levels.py: only those bytes are read and decoded); otherwise, and for
    shards written before the pyramid, the shards at their stored resolution (`self.resolution`
    says which), averaged down by the reader (to_training_range) to the same pixels. Every
    level holds the same faces in the same shards and order, so a stream's images are the
    same faces whatever it reads."""

    def __init__(self, shard_dir: str, rank: int, world_size: int, seed: int, shuffle_buffer: int,
                 images_seen: int = 0, resolution: int | None = None):
        """Starts where `images_seen` (counted over all ranks) has reached: at that pass, after this
        rank's part of the images the pass has already dealt out, so a resumed run, or the
        stream a new phase opens, goes on with the pass rather than replaying it."""
        manifest = require_manifest(shard_dir)
        listed, self.image_format, self.resolution = shards_at(manifest, resolution)
        self.shard_dir = shard_dir
        self.shards = shard_list(shard_dir, manifest, resolution)
        self.sha256 = {storage.join(shard_dir, s["file"]): s["sha256"] for s in listed}
        self.checked: set[str] = set()      # shards whose sha256 matched, in this process
        self.left_out: dict[str, str] = {}  # shard -> why it is left out, in this process
        self.pass_samples = self.pass_images = 0
        self.first_reason = ""
        self.skipped = 0  # samples without a decodable image, in this process
        self.images = sum(samples for _, samples in self.shards)
        share_size(self.images, world_size)  # too few images fails here, not in a DataLoader worker
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.first_pass = shuffle_buffer, images_seen // self.images
        self.first_skip = (images_seen % self.images) // world_size  # of the first pass's share

    def _pass_samples(self, pass_index: int, worker: int, workers: int) -> Iterator[dict]:
        """This rank's encoded samples of one pass; with DataLoader workers, every n-th of them.
        The first pass begins after the part of the share already dealt out (`first_skip`)."""
        position = 0
        for part in rank_slices(self.shards, self.rank, self.world_size, pass_index, self.seed):
            skip = self.first_skip - position if pass_index == self.first_pass else 0
            if skip >= part.take:  # dealt out before this stream began: not opened
                position += part.take
                continue
            if skip > 0:
                part, position = ShardSlice(part.url, part.skip + skip, part.take - skip), position + skip
            if part.url in self.left_out or not self._checked(part.url):
                self.pass_samples += 1  # counts as seen: a pass of left-out shards is no empty share
                position += part.take
                continue
            try:
                samples = shard_samples(part.url, self.image_format)
                for sample in itertools.islice(samples, part.skip, part.skip + part.take):
                    if position % workers == worker:
                        self.pass_samples += 1
                        yield sample
                    position += 1
            except BadShard as error:
                self._leave_out(part.url, str(error))

    def _checked(self, url: str) -> bool:
        """Whether the shard's sha256 is the manifest's (computed when first read in this process);
        a shard that differs is left out."""
        if url not in self.checked:
            try:
                digest = file_sha256(url)
            except OSError as error:
                self._leave_out(url, f"it cannot be read ({storage.describe_error(error)})")
                return False
            if digest != self.sha256.get(url):
                self._leave_out(url, "its sha256 is not the one the manifest records (changed or damaged since written)")
                return False
            self.checked.add(url)
        return True

    def _leave_out(self, url: str, reason: str) -> None:
        """Leaves a shard out of this process's stream, with one warning line naming it."""
        self.left_out[url] = reason
        self.first_reason = self.first_reason or f"{url} is left out: {reason}"
        log.warning("leaving out shard %s: %s", url, reason)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}/{self.first_pass}/{self.rank}/{worker}")
        for pass_index in itertools.count(self.first_pass):
            self.pass_samples = self.pass_images = 0
            # shuffled within the pass, so a pass ends before the next begins (no image twice in a
            # pass); yields after a few hundred images (a quick first batch), then fills the buffer
            pipeline = wds.DataPipeline(functools.partial(self._pass_samples, pass_index, worker, workers),
                                        wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 256), rng=rng),
                                        self._decoded_images)
            for image in pipeline:
                self.pass_images += 1
                yield torch.from_numpy(image)  # the array is a fresh copy: no second one
            if self.pass_samples and not self.pass_images:
                raise UserError(f"{self.shard_dir}: no usable image in a full pass over the shards "
                                f"({self.image_format} at {self.resolution}x{self.resolution}, as the manifest says); "
                                f"{self.first_reason or 'no sample decodes'}; make the shards again with python -m data_pipeline")

    def _decoded_images(self, samples: Iterator[dict]) -> Iterator[np.ndarray]:
        """Each sample's image as a writable uint8 HxWx3 array; samples without one are skipped."""
        for sample in samples:
            try:
                yield decode_image(sample, self.image_format, self.resolution)
            except BadSample as error:
                self._skip(sample, str(error))

    def _skip(self, sample: dict, reason: str) -> None:
        """Counts a skipped sample; only the first one gets a warning line (per process)."""
        self.skipped += 1
        self.first_reason = self.first_reason or f"first {sample.get('__key__')} in {sample.get('__url__')}: {reason}"
        if self.skipped == 1:
            log.warning("skipping shard samples without a decodable %s image, first %s in %s: %s",
                        self.image_format, sample.get("__key__"), sample.get("__url__"), reason)


class BadSample(Exception):
    """A shard sample the stream skips: it holds no decodable image of the stored size."""


def decode_image(sample: dict, image_format: str, resolution: int) -> np.ndarray:
    """The sample's `image_format` member decoded by PIL's decoder for that format alone, as RGB
    at resolution x resolution; BadSample (one line) for anything else. Other members are never
    looked at."""
    data = sample.get(image_format)
    if not isinstance(data, bytes):
        raise BadSample(f"no .{image_format} member")
    if image_format == RAW_FORMAT:
        pixels = decode_raw(data, resolution)
        if pixels is None:
            raise BadSample(f"the .{image_format} member holds {len(data)} bytes, not a {resolution}x{resolution} RGB image")
        return pixels
    try:
        with Image.open(io.BytesIO(data), formats=[PIL_FORMATS[image_format]]) as image:
            size = image.size
            # the size comes from the header: an image of another size is never decoded
            pixels = np.array(image.convert("RGB")) if size == (resolution, resolution) else None
    except Exception as error:  # PIL raises many types for broken data
        raise BadSample(f"the .{image_format} member does not decode ({type(error).__name__})") from None
    if pixels is None:
        raise BadSample(f"the image is {size[0]}x{size[1]}, not {resolution}x{resolution}")
    return pixels


LOADER_CHUNK = 16


class BatchReader:
    """Float32 NCHW batches in [-1, 1] from a FaceStream: any batch size and resolution, for as
    long as the training asks (the batch size and resolution change with the schedule).

    On the CPU a batch is read, converted and mirrored when asked for, as always.

    On a CUDA device nothing in the hand-over blocks on the GPU: each batch's uint8 images are
    stacked in pinned memory, with its flip mask (drawn on the CPU from the same generator, so
    the batches are bit for bit those of the CPU path), and copied with non_blocking=True on a
    side stream (CudaStaging). When the step asks for batch i, its copy was queued at the
    previous call, while the previous step ran; the step's stream waits on the copy's event (a
    wait on the device, not on the host), the conversion and mirroring are queued there, and
    batch i+1 is taken from the stream and its copy queued before next_batch returns. Batch i+1
    is sent at batch i's size; when the schedule then asks for another size, its images go back
    to the front of the stream and the generator to its state before them, so every batch is
    still the one the CPU path would give. An error from the stream while taking batch i+1 is
    raised when batch i+1 is asked for, as before.

    What the step waited for data (`data_wait_share`): the loop counts the host time spent in
    next_batch (taking images from the stream, decoding in-process or waiting on DataLoader
    workers, stacking; on CUDA it no longer includes waiting for the GPU to finish the queued
    step), plus stream_wait_seconds(): on CUDA, for each batch, how long the step's stream
    stood waiting on the copy, from CUDA events (recorded where the step's stream began to wait,
    and where the copy ended), read once both have completed (never waiting for them), so a
    step's stall is counted a step or two later. 0.0 on the CPU."""

    def __init__(self, stream: FaceStream, mirror: bool, seed: int, loader_workers: int = 0,
                 device: str | torch.device = "cpu"):
        if loader_workers:
            # the workers hand over stacks of LOADER_CHUNK images: one tensor through shared
            # memory costs about as much as decoding a small image, so not one per image
            chunks = torch.utils.data.DataLoader(stream, batch_size=LOADER_CHUNK, num_workers=loader_workers,
                                                 prefetch_factor=4, persistent_workers=True)
            stream = (image for chunk in chunks for image in chunk)
        self.images = iter(stream)
        self.mirror, self.device = mirror, torch.device(device)
        self.flips = torch.Generator().manual_seed(seed)
        self.staging = CudaStaging(self.device) if self.device.type == "cuda" else None
        self.staged: Staged | None = None  # the next batch, on its way to the device (CUDA only)
        self.flips_before_staged: torch.Tensor | None = None  # the generator's state before its flips
        self.deferred: Exception | None = None  # met while taking the next batch: raised when it is asked for

    def close(self) -> None:
        """Ends the DataLoader processes now (dropping the last reference shuts them down), not at
        interpreter exit, where their teardown can crash."""
        self.images = iter(())
        self.staged = None

    def next_batch(self, batch_size: int, resolution: int) -> torch.Tensor:
        if self.staging is None:
            images = stack_images(self._take(batch_size)).to(self.device)
            images = to_training_range(images, resolution)
            return mirror_randomly(images, self.flips) if self.mirror else images
        images, flip = self.staging.hand_over(self._staged(batch_size))
        images = to_training_range(images, resolution)
        images = mirror_with(images, flip) if flip is not None else images
        try:  # the next batch's copy runs while this step does
            self._stage(batch_size)
        except Exception as error:  # noqa: BLE001 - raised again when that batch is asked for
            self.deferred = error
        return images

    def stream_wait_seconds(self) -> float:
        """Seconds the step's stream waited on batch copies, of the waits measured since the last
        call (see the class docstring); 0.0 on the CPU."""
        return 0.0 if self.staging is None else self.staging.wait_seconds()

    def _take(self, batch_size: int) -> list[torch.Tensor]:
        try:
            return [next(self.images) for _ in range(batch_size)]
        except UserError as error:
            raise UserError(worker_error_line(str(error))) from None

    def _stage(self, batch_size: int) -> None:
        """Takes the next batch from the stream and queues its copy to the device."""
        state = self.flips.get_state()
        images = self._take(batch_size)
        flip = flip_mask(batch_size, self.flips) if self.mirror else None
        self.staged, self.flips_before_staged = self.staging.send(images, flip), state

    def _staged(self, batch_size: int) -> "Staged":
        """The staged batch if it has this size; otherwise (first call, or a new size) its images
        and flip draws are given back and a batch of this size is staged now."""
        staged, self.staged = self.staged, None
        if staged is not None and staged.size != batch_size:
            self.images = itertools.chain(staged.images, self.images)
            self.flips.set_state(self.flips_before_staged)
            staged = None
        if staged is None:
            if self.deferred is not None:
                error, self.deferred = self.deferred, None
                raise error
            self._stage(batch_size)
            staged, self.staged = self.staged, None
        return staged


@dataclass
class Staged:
    """A batch on its way to the device: its host images (given back if the batch size changes),
    the device copies (uint8 NHWC, bool flip mask or None) and the copy's end event."""
    size: int
    images: list[torch.Tensor]
    device_images: torch.Tensor
    device_flip: torch.Tensor | None
    done: object  # torch.cuda.Event


class CudaStaging:
    """Pinned-memory batches copied to a CUDA device on a side stream (see BatchReader)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.waits: collections.deque = collections.deque()  # (step stream began waiting, copy done)

    def send(self, images: list[torch.Tensor], flip: torch.Tensor | None) -> Staged:
        """Stacks the images in pinned memory and queues their copy (and the flip mask's) on the
        side stream; returns at once. The pinned blocks are not reused before the copy ends
        (PyTorch's pinned-memory allocator records the copy's event)."""
        host = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
        torch.stack(images, out=host)
        host_flip = flip.pin_memory() if flip is not None else None
        with torch.cuda.stream(self.stream):
            device_images = host.to(self.device, non_blocking=True)
            device_flip = host_flip.to(self.device, non_blocking=True) if host_flip is not None else None
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.stream)
        return Staged(len(images), images, device_images, device_flip, done)

    def hand_over(self, staged: Staged) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The staged tensors, for use on the current stream, which waits (on the device) for
        their copy; the host goes on at once."""
        current = torch.cuda.current_stream(self.device)
        began = torch.cuda.Event(enable_timing=True)
        began.record(current)
        current.wait_event(staged.done)
        staged.device_images.record_stream(current)  # allocated on the side stream, used on this one
        if staged.device_flip is not None:
            staged.device_flip.record_stream(current)
        self.waits.append((began, staged.done))
        return staged.device_images, staged.device_flip

    def wait_seconds(self) -> float:
        """The stream waits whose events have both completed (queried, never waited for)."""
        total = 0.0
        while self.waits and self.waits[0][0].query() and self.waits[0][1].query():
            began, done = self.waits.popleft()
            total += max(0.0, began.elapsed_time(done)) / 1000.0  # a copy done before the wait: none
        return total


def worker_error_line(message: str) -> str:
    """A UserError's own line out of the text a DataLoader worker's error arrives with ("Caught
    UserError in DataLoader worker process 0." and the worker's traceback)."""
    marker = "UserError: "
    last = [line for line in message.splitlines() if line.strip()][-1:] or [message]
    return last[0].split(marker, 1)[1] if marker in last[0] else last[0]


# Why the CPU path's batches are made with numpy (stack_images, to_training_range, mirror_with):
# torch splits each element-wise op and copy above 32768 elements over every core with OpenMP,
# and then waits for all its threads. Where the cores are busy (the training step's own
# threads, other processes), that wait cost many times the work, which is a few memory passes
# over the batch: numpy does them in one thread (README's Benchmarks: the loader at real sizes,
# before and after). The operations are the same IEEE float32 ones, so the values are the same
# to the bit (tests/test_loader_prefetch.py). Tensors that require grad, or live on a device,
# take torch's path.


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """HxWx3 uint8 CPU images -> one NHWC batch (numpy's copy, in one thread: see above)."""
    return torch.from_numpy(np.stack([image.numpy() for image in images]))


def on_host(tensor: torch.Tensor) -> bool:
    """Whether `tensor` takes the numpy path (see above): on the CPU, no autograd."""
    return tensor.device.type == "cpu" and not tensor.requires_grad


def to_training_range(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 NHWC as read -> float32 NCHW in [-1, 1] at `resolution`: images at a larger size are
    first averaged down to it as the pyramid's levels are (levels.average_down), so a phase
    gets the same pixels from a level as from the full size."""
    stored = images.shape[1]
    if resolution > stored or stored % resolution:
        raise ValueError(f"cannot make {resolution}px batches from shards stored at {stored}px")
    factor = stored // resolution
    if factor == 1 and on_host(images):
        pixels = images.numpy().transpose(0, 3, 1, 2).astype(np.float32, order="C")
        pixels /= np.float32(127.5)
        pixels -= np.float32(1.0)
        return torch.from_numpy(pixels)
    if factor == 1:
        return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
    return average_down(images.permute(0, 3, 1, 2).float(), factor).div_(127.5).sub_(1.0)


def mirror_randomly(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return mirror_with(images, flip_mask(images.shape[0], generator))


def flip_mask(count: int, generator: torch.Generator) -> torch.Tensor:
    """Which of `count` images to mirror: drawn on the CPU from `generator`, a bool tensor."""
    return torch.rand(count, generator=generator) < 0.5


def mirror_with(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """NCHW images, those where `flip` is true mirrored left to right (`flip` moved to their
    device if it is elsewhere: a blocking copy; BatchReader's CUDA path hands it over there)."""
    if on_host(images):
        pixels = images.numpy()
        return torch.from_numpy(np.where(flip.cpu().numpy()[:, None, None, None], pixels[..., ::-1], pixels))
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
