"""One preparation run, in two Ray Data passes.

1. Read every photo once to hash it (its key) and probe its size. Empty, unreadable and
   duplicate files are settled here, before any detector time is spent on them.
2. Plan: the unique photos sorted by key, cut into blocks of --shard-size; block k becomes
   shard k. Fixed plan, so the same input gives the same shards, a shard can be written as soon
   as its block is done (nothing large is held back), and a killed run resumes block by block.
   Each block is split into work units of photos of similar size for batched detection.
3. Detect faces in the units on an actor pool; write each shard when its block is complete.
4. rejects.jsonl, then manifest.json last: its presence means the output is complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import platform
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence, TypeVar

import ray
from PIL import Image
from tqdm import tqdm

from data_pipeline.config import PrepareConfig
from data_pipeline.faces import DETECT_BATCH, FaceDetector, FaceSettings, PhotoResult, describe
from base import storage
from base.errors import UserError
from data_pipeline.manifest import (
    DUPLICATE, FORMAT_VERSION, KEPT, MANIFEST_NAME, REJECTS_NAME, UNREADABLE, Outcome, changed_settings,
    check_same_settings, count_outcomes, level_format, level_resolutions, read_manifest, shard_files, write_json,
    write_rejects,
)
from data_pipeline.shards import Sample, ShardProgress, build_folder, listed_shards
from data_pipeline.sources import Source, content_key, inputs_fingerprint, list_sources, read_bytes, recorded_input
from monitoring.metrics import PipelineMetrics

HASH_BATCH = 64  # photos per hashing call
MAX_BLOCKS = 2000  # enough blocks to spread work over many actors, few enough to stay cheap
PACKAGES = ("torch", "facenet-pytorch", "ray", "webdataset", "pillow", "numpy")
T = TypeVar("T")


@dataclass(frozen=True)
class Hashed:
    source: Source
    key: str
    size: int  # bytes
    dims: tuple[int, int]  # width, height from the header; (0, 0) when unknown
    error: str = ""


@dataclass(frozen=True)
class ShardPlan:
    index: int
    sources: tuple[Source, ...]  # in detection order: by image size, then key


@dataclass(frozen=True)
class Plan:
    shards: list[ShardPlan]
    settled: list[Outcome]  # outcomes known before detection: empty, unreadable, duplicate
    fingerprint: str


def prepare(config: PrepareConfig, sources: list[Source] | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) the preparation on the connected Ray cluster; returns the manifest.
    An object-store output (s3://...) is built in a local work folder and published when complete."""
    sources = list_sources(list(config.inputs)) if sources is None else sources
    if config.inputs_fingerprint is None:  # compared with a finished output's, recorded in the manifest
        config = dataclasses.replace(config, inputs_fingerprint=inputs_fingerprint(sources))
    if not config.overwrite and (finished := read_manifest(config.output)) is not None:
        check_same_settings(finished, config, config.output)
        return finished
    output = build_folder(config.output)
    output.mkdir(parents=True, exist_ok=True)
    earlier = None
    if storage.is_remote(config.output):
        if config.overwrite:
            earlier = listed_shards(config.output)  # dropped once the new output is there
            storage.remove(storage.join(config.output, MANIFEST_NAME))  # never a manifest over missing shards
        elif (built := read_manifest(output)) is not None and not changed_settings(built, config):
            return publish(output, config.output, built)  # built before, its upload cut short
    settings = face_settings(config)
    plan = make_plan(hash_sources(sources, config.run_name, show_progress), config.shard_size,
                     run_record(config, settings))
    count_settled(plan, config.run_name)
    progress = ShardProgress(output, plan.fingerprint, fresh=config.overwrite, shard_count=len(plan.shards),
                             levels=tuple(level_resolutions(config.resolution)))
    todo = [shard for shard in plan.shards if not progress.is_done(shard.index)]
    with ProgressBar(len(sources), show_progress) as bar:
        bar.add([outcome.status for outcome in known_outcomes(plan, progress)])
        detect_faces(todo, settings, config.run_name, progress, bar)
    manifest = finish(output, plan, progress, config, settings)
    return publish(output, config.output, manifest, earlier) if storage.is_remote(config.output) else manifest


# ---------------------------------------------------------------------------------------------
# Object-store outputs: built locally (resumable shard by shard as a local output is), then
# uploaded: shards, rejects.jsonl, and manifest.json last, so that its presence still means
# the output is complete.


def publish(built: Path, output: str, manifest: dict, earlier: set[str] | None = None) -> dict:
    """Uploads a complete local output to `output`, drops the shards of the earlier remote output
    (`earlier`, default: as the manifest there lists them) that it does not list, then the local copy."""
    earlier = listed_shards(output) if earlier is None else earlier
    storage.remove(storage.join(output, MANIFEST_NAME))
    listed = set(shard_files(manifest))
    for name in sorted(listed) + [REJECTS_NAME, MANIFEST_NAME]:
        storage.upload(built / name, storage.join(output, name))
    for name in storage.file_sizes(output):
        if name in earlier and name not in listed:
            storage.remove(storage.join(output, name))  # an earlier output's extra shard
    shutil.rmtree(built, ignore_errors=True)
    return manifest


def known_outcomes(plan: Plan, progress: ShardProgress) -> list[Outcome]:
    """Outcomes settled before detection, and those of shards an earlier run finished."""
    resumed = (progress.load(shard.index) for shard in plan.shards)
    return plan.settled + [outcome for done in resumed if done is not None for outcome in done.outcomes]


def face_settings(config: PrepareConfig) -> FaceSettings:
    return FaceSettings(config.resolution, config.image_format, config.min_prob, config.margin)


def run_record(config: PrepareConfig, settings: FaceSettings) -> dict:
    """Everything that shapes the shards' content (the inputs enter through the plan)."""
    return {
        "resolution": config.resolution,
        "image_format": config.image_format,
        "shard_size": config.shard_size,
        "min_prob": config.min_prob,
        "margin": config.margin,
        "levels": level_resolutions(config.resolution),
        "detector": settings.detector_options(),
        "max_side": settings.max_side,
        "versions": package_versions(),
    }


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{name: metadata.version(name) for name in PACKAGES}}


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def dataset_of(rows: list[dict]) -> ray.data.Dataset:
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), MAX_BLOCKS)))


# ---------------------------------------------------------------------------------------------
# Pass 1: hash


def hash_sources(sources: list[Source], run: str, show_progress: bool) -> list[Hashed]:
    rows = [{"sources": chunk} for chunk in chunked(sources, HASH_BATCH)]
    hashed = []
    with tqdm(total=len(sources), desc="reading", unit="photo", disable=not show_progress) as bar:
        for row in dataset_of(rows).map_batches(hash_batch, fn_kwargs={"run": run}, batch_size=1).iter_rows():
            hashed.append(Hashed(row["source"], row["key"], row["size"], (row["width"], row["height"]), row["error"]))
            bar.update()
    return hashed


def hash_batch(batch: dict, run: str) -> dict[str, list]:
    """Reads and hashes photos, counting them as read for the metrics."""
    rows = [hash_one(source) for sources in batch["sources"] for source in sources]
    PipelineMetrics.shared(run).count("read", len(rows))
    return {column: [row[column] for row in rows] for column in rows[0]}


def hash_one(source: Source) -> dict:
    try:
        data = read_bytes(source)
    except OSError as error:
        return {"source": source, "key": "", "size": 0, "width": 0, "height": 0, "error": describe(error)}
    width, height = probe_size(data)
    return {"source": source, "key": content_key(data), "size": len(data), "width": width, "height": height, "error": ""}


def probe_size(data: bytes) -> tuple[int, int]:
    """Size from the header alone (nothing decoded); only used to batch similar photos."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # not an image: the detection pass reports why
        return 0, 0


# ---------------------------------------------------------------------------------------------
# Plan


def make_plan(hashed: list[Hashed], shard_size: int, record: dict) -> Plan:
    settled, unique = settle_before_detection(hashed)
    unique.sort(key=lambda item: item.key)
    blocks = chunked(unique, shard_size)
    shards = [
        ShardPlan(index, tuple(item.source for item in sorted(block, key=lambda item: (item.dims, item.key))))
        for index, block in enumerate(blocks)
    ]
    content = {"run": record, "blocks": [[(item.source.name, item.key) for item in block] for block in blocks]}
    fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return Plan(shards, settled, fingerprint)


def count_settled(plan: Plan, run: str) -> None:
    """The outcomes settled before detection, for the metrics: here, on the driver, because
    duplicates are only known once every photo is hashed."""
    metrics = PipelineMetrics.shared(run)
    for status, n in Counter(outcome.status for outcome in plan.settled).items():
        metrics.count(status, n)


def settle_before_detection(hashed: list[Hashed]) -> tuple[list[Outcome], list[Hashed]]:
    """Outcomes of unreadable, empty and duplicate files, and the photos left to detect.
    Of equal files the first by name is kept, so the choice does not depend on timing."""
    settled, by_key = [], defaultdict(list)
    for item in hashed:
        if item.error:
            settled.append(Outcome(item.source.name, "", UNREADABLE, item.error))
        elif item.size == 0:
            settled.append(Outcome(item.source.name, item.key, UNREADABLE, "empty file"))
        else:
            by_key[item.key].append(item)
    unique = []
    for key, items in by_key.items():
        first, *copies = sorted(items, key=lambda item: item.source.name)
        unique.append(first)
        settled += [Outcome(copy.source.name, key, DUPLICATE, f"same content as {first.source.name}") for copy in copies]
    return settled, unique


# ---------------------------------------------------------------------------------------------
# Pass 2: detect, and write each shard as soon as its block is complete


def detect_faces(shards: list[ShardPlan], settings: FaceSettings, run: str, progress: ShardProgress,
                 bar: ProgressBar) -> None:
    if not shards:
        return
    units = [{"shard": shard.index, "sources": unit} for shard in shards for unit in chunked(shard.sources, DETECT_BATCH)]
    results = dataset_of(units).map_batches(
        FaceDetector, fn_constructor_kwargs={"settings": settings, "run": run}, batch_size=1, **detector_resources()
    )
    expected = {shard.index: len(shard.sources) for shard in shards}
    pending: dict[int, list[PhotoResult]] = defaultdict(list)
    for row in results.iter_rows():
        index = row.pop("shard")
        result = PhotoResult(**row)
        bar.add([result.status])
        pending[index].append(result)
        if len(pending[index]) == expected[index]:
            finish_shard(progress, index, pending.pop(index), settings.image_format)


def detector_resources() -> dict:
    """One detector per GPU when the cluster has GPUs, else one per CPU, each single-threaded
    (Ray sets OMP_NUM_THREADS to the actor's one CPU), as bench/mtcnn.py measures it."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"num_gpus": 1, "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=gpus)}
    cpus = max(1, int(resources.get("CPU", 1)))
    return {"num_cpus": 1, "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=cpus)}


def finish_shard(progress: ShardProgress, index: int, results: list[PhotoResult], image_format: str) -> None:
    samples = [Sample(result.key, result.image, result.meta, tuple(result.levels))
               for result in results if result.status == KEPT]
    outcomes = [Outcome(result.source, result.key, result.status, result.detail) for result in results]
    progress.finish_shard(index, samples, outcomes, image_format)


class ProgressBar:
    """Photos done, faces kept, rejects and throughput on one line."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="faces", unit="photo", disable=not enabled, dynamic_ncols=True)
        self.kept = 0

    def add(self, statuses: list[str]) -> None:
        self.kept += statuses.count(KEPT)
        self.bar.update(len(statuses))
        self.bar.set_postfix(kept=self.kept, rejected=self.bar.n - self.kept, refresh=False)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# Finish


def finish(output: Path, plan: Plan, progress: ShardProgress, config: PrepareConfig, settings: FaceSettings) -> dict:
    outcomes, shards = list(plan.settled), []
    levels = {level: [] for level in level_resolutions(config.resolution)}
    for shard in plan.shards:
        done = progress.load(shard.index)
        if done is None:
            raise RuntimeError(f"block {shard.index} was not processed; rerun to complete the output")
        outcomes += done.outcomes
        if done.info is not None:
            shards.append(asdict(done.info))
            for level, info in done.levels.items():
                levels[level].append(asdict(info))
    write_rejects(output, outcomes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "resolution": config.resolution,
        "image_format": config.image_format,
        "counts": count_outcomes(outcomes),
        "shards": shards,
        # the pyramid (levels.py): the same blocks' faces at each lower resolution, in the same
        # order, so a phase reads only its own resolution's bytes
        "levels": [{"resolution": level, "image_format": level_format(level), "shards": infos}
                   for level, infos in levels.items()],
        # the inputs as the photo names start (see sources.py), not as paths of this machine:
        # the shards are shared without its folder layout, and they still say what went in
        "config": {"inputs": [recorded_input(spec) for spec in config.inputs],
                   "inputs_fingerprint": config.inputs_fingerprint, **run_record(config, settings)},
    }
    write_json(output / MANIFEST_NAME, manifest)
    progress.remove()
    return manifest
