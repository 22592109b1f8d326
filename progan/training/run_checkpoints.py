"""A run's Ray Train checkpoints on one rank: where the run resumes from, what it saves (after
checking that every rank holds the same weights), and the policies that end a run which would
fail the same way on every restart."""
from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import torch.distributed as dist

from base import storage
from progan.model.checkpoint import latest_checkpoint, load_usable_checkpoint, run_checkpoints, save_checkpoint
from progan.training.phase_training import PhaseTraining
from progan.training.run_log import RunLog, repeated_error
from progan.training.run_state import RunState, SavedOptimizers, rng_state, weights_digest
from progan.model.samples import fixed_latents, sample_name, write_sample_grid

# the folders Ray Train makes for a run's checkpoints (checkpoint_%Y-%m-%d_%H-%M-%S.%f)
RAY_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{6}")

# Ray Train's record of a run's checkpoints, in the run folder; a folder it names must stay (a
# resume refuses a run folder whose record names a missing checkpoint)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def remove_stray_checkpoints(run_dir: Path | storage.RemotePath, num_to_keep: int) -> list[str]:
    """For a run folder on this machine, while no trainer runs on it (before a resume, after a run
    ends or is interrupted): removes the checkpoint folders beyond `num_to_keep` that Ray Train no
    longer knows of. Ray removes the old ones it knows; an attempt stopped by Ctrl-C or a crash
    left ones it had lost track of. Only folders named as Ray names them and older than the
    newest `num_to_keep`, never one that Ray's record names. Returns the names removed."""
    if not isinstance(run_dir, Path) or not run_dir.is_dir():
        return []
    try:
        named = set(RAY_CHECKPOINT_NAME.findall((run_dir / RAY_SNAPSHOT).read_text()))
    except FileNotFoundError:
        named = set()
    ours = sorted((folder for folder in run_dir.iterdir()
                   if RAY_CHECKPOINT_NAME.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink()),
                  reverse=True)
    removed = []
    for folder in ours[num_to_keep:]:
        if folder.name not in named:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


class RunCheckpoints:
    def __init__(self, run: RunState, run_dir: Path | storage.RemotePath, rank: int, world: int, log: RunLog):
        self.run, self.run_dir, self.rank, self.world, self.log = run, run_dir, rank, world, log
        self.resumed = False
        self.restored: ray.train.Checkpoint | None = None  # the checkpoint this attempt started from
        self.restored_images = self.images = 0  # images seen at that one, and at the latest one
        self.rollbacks = 0  # NaN rollbacks to the restored checkpoint so far (its metadata)
        self.next_images = self._next_after(0)
        self.sample_latents = fixed_latents(run.cfg.checkpoint.sample_grid ** 2, run.cfg.model.latent_size)

    def _next_after(self, images: int) -> int:
        every = round(self.run.cfg.checkpoint.every_kimg * 1000)
        return (images // every + 1) * every

    def due(self) -> bool:
        return self.run.images_seen >= self.next_images

    def restore(self) -> SavedOptimizers | None:
        """The run's latest checkpoint. In a run folder on this machine: the newest one on disk that
        loads completely (progan.model.checkpoint.latest_checkpoint, as generate and the other
        tools take it), also when Ray's snapshot of the run lacks it (the run was stopped just after
        writing it). On object storage: Ray's latest, which must load."""
        model = dataclasses.asdict(self.run.cfg.model)
        local = isinstance(self.run_dir, Path)
        if local and run_checkpoints(self.run_dir):
            state, used, skipped = latest_checkpoint(self.run_dir, model)
            self.restored = ray.train.Checkpoint(str(used))
        else:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                self.run.seed_rank(self.rank)
                self.log.event("start", world_size=self.world, kimg=0.0)
                return None
            with checkpoint.as_directory() as directory:
                state, used, skipped = load_usable_checkpoint(directory, directory, model)
            self.restored = checkpoint
        self.resumed = True
        for reason in skipped:  # a checkpoint cut short or damaged: the run goes on from an older one
            self.log.event("checkpoint_unusable", reason=reason, resumed_from=used.name,
                           kimg=state["images_seen"] / 1000)
        self.rollbacks = self.restored.get_metadata().get("nan_rollbacks", 0)
        saved = self.run.load(state, self.rank, self.world)
        self.restored_images = self.images = self.run.images_seen
        self.next_images = self._next_after(self.images)
        self.log.event("resume", world_size=self.world, kimg=self.run.kimg, previous_world_size=state["world_size"])
        return saved

    def stop_reason(self) -> str | None:
        """Rank 0 ends a run that would fail the same way on every restart: the same worker error
        in the last two attempts, or `checkpoint.max_nan_rollbacks` rollbacks to this checkpoint."""
        reason = None
        if self.rank == 0:
            error = repeated_error(self.run_dir / "events.jsonl")
            limit = self.run.cfg.checkpoint.max_nan_rollbacks
            if error:
                reason = f"the same error in two attempts in a row: {error}"
            elif self.rollbacks >= limit:
                reason = f"non-finite losses after {limit} rollbacks to the checkpoint at kimg {self.images / 1000:.3f}"
        decision = [reason]
        dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            self.log.event("stopped", reason=decision[0])
        return decision[0]

    def count_rollback(self) -> None:
        """Rank 0: the checkpoint the restart goes back to keeps how many rollbacks went to it, in
        its metadata (Ray's, beside the checkpoint), which `restore` reads. Without a checkpoint
        yet there is nothing to roll back to: Ray's max_failures bounds those restarts."""
        target = self.restored if self.restored_images == self.images else None
        for reported in ray.train.get_all_reported_checkpoints():
            if reported.metrics.get("images_seen") == self.images:
                target = reported.checkpoint
        if target is not None:
            target.update_metadata({"nan_rollbacks": target.get_metadata().get("nan_rollbacks", 0) + 1})

    def save(self, training: PhaseTraining, alpha: float, metrics: dict) -> float | None:
        """Every rank calls report (a collective); rank 0 attaches the checkpoint and a sample grid
        (and returns the seconds the checkpoint took to write and report).
        Before that the ranks compare weight digests: a divergence fails the attempt, so Ray Train
        restarts from the last checkpoint instead of saving weights that differ across ranks."""
        run, phase = self.run, training.phase
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (rng_state(run.device), weights_digest(run.G, run.D)))
        digests = [digest for _, digest in gathered]
        if len(set(digests)) != 1:
            self.log.event("rank_divergence", kimg=run.kimg, digests=digests)
            raise RuntimeError(f"ranks hold different weights at kimg {run.kimg:.3f}")
        self.images, self.next_images = run.images_seen, self._next_after(run.images_seen)
        metrics = {"kimg": run.kimg, "images_seen": run.images_seen, "step": run.step, "resolution": phase.resolution,
                   "phase": phase.name, "alpha": alpha, "world_size": self.world, "ranks_identical": True,
                   "weights_digest": digests[0], **metrics}
        if self.rank != 0:
            ray.train.report(metrics)
            return None
        sample = self.run_dir / "samples" / sample_name(phase.resolution, run.images_seen)
        with storage.written_at(sample) as local:  # uploaded after, for a run on object storage
            write_sample_grid(run.G_ema, self.sample_latents, phase.resolution, alpha, local)
        metrics["sample_grid"] = str(sample)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(run.to_checkpoint(phase, alpha, training.opt_g, training.opt_d, [g[0] for g in gathered]), tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.log.event("checkpoint", kimg=run.kimg, sample_grid=str(sample.relative_to(self.run_dir)))
        return time.perf_counter() - started
