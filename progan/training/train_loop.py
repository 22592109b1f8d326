"""The training job on Ray Train: `build_trainer` (workers, process group, storage, failure and
checkpoint policy) and `train_loop_per_worker`, the progressive training each worker runs.

Every rank runs the same schedule from the same global image count, so collective calls (DDP
all-reduces, the stats all-reduce, `ray.train.report`) happen at the same steps everywhere. The
step itself is `training_step.train_step`; what a phase trains with, `phase_training`; the state a
checkpoint holds, `run_state`, and the checkpoints themselves, `run_checkpoints`; the run folder's
logs, `run_log` (all in progan/training/). Only these modules know about ranks and Ray; the
networks, losses and step do not.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from base import storage
from data_pipeline.loader import BatchReader, FaceStream
from monitoring.metrics import TrainingMetrics
from progan.model import conv2d_gradfix
from progan.model.config import Config, config_from_dict
from progan.model.ema import ema_beta, update_ema
from progan.model.layers import fade_reals
from progan.model.losses import make_loss
from progan.model.schedule import Phase, build_phases, phase_at
from progan.training.phase_training import PhaseTraining, enter_phase
from progan.training.process_group import BoundStoreTorchConfig, process_group_backend
from progan.training.run_checkpoints import RunCheckpoints
from progan.training.run_log import STOP_FILE, RunLog, error_signature
from progan.training.run_state import RunState
from progan.training.training_step import train_step

# grad_norm: the critic's mean input-gradient norm at the current resolution (near k =
# max_resolution / resolution once the penalty, on the official full-resolution scale, holds)
STAT_KEYS = ("loss_d", "loss_g", "grad_penalty", "grad_norm", "score_real", "score_fake")


class Callback:
    """Points where tests inject faults (tests/faults.py); the loop's default does nothing."""

    def on_losses(self, losses: torch.Tensor, kimg: float, resumed: bool) -> torch.Tensor:
        """Sees each step's (loss_d, loss_g) on the device before the non-finite check."""
        return losses

    def after_checkpoint(self, kimg: float, resumed: bool) -> None:
        """Runs on every rank once a checkpoint has been reported."""


def open_rank_batches(cfg: Config, shards: str, rank: int, world: int, images_seen: int,
                      device: torch.device, resolution: int) -> BatchReader:
    """This rank's share of the shards at a phase's `resolution` (its level of the shards'
    pyramid: only those bytes are read), from where the images seen so far have reached (a
    resumed run, or a new phase, goes on with the pass: FaceStream)."""
    d = cfg.data
    stream = FaceStream(shards, rank, world, d.seed, d.shuffle_buffer, images_seen=images_seen, resolution=resolution)
    return BatchReader(stream, d.mirror, seed=d.seed * 1000 + rank + stream.first_pass,
                       loader_workers=d.loader_workers, device=device)


def log_workers(log: RunLog, rank: int, world: int) -> None:
    """Which process on which node holds each rank, in the event log (for operators and tests)."""
    me = {"rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
    workers = [None] * world
    dist.all_gather_object(workers, me)
    log.event("workers", world_size=world, workers=workers)


class NonFiniteGuard:
    """NaN/Inf losses: marked on the training device at every step without waiting for the step
    to finish there (no host synchronisation per step), and checked across ranks by one small
    all-reduce every `monitoring.log_every_steps` steps and before each checkpoint, so a NaN is
    caught at most that many steps late and never checkpointed."""

    def __init__(self, callback: Callback, checkpoints: RunCheckpoints, metrics: TrainingMetrics, log: RunLog):
        self.callback, self.checkpoints, self.metrics, self.log = callback, checkpoints, metrics, log
        self.mark: torch.Tensor | None = None

    def note(self, stats: dict, kimg: float) -> None:
        losses = self.callback.on_losses(torch.stack([stats["loss_d"], stats["loss_g"]]).float(),
                                         kimg, self.checkpoints.resumed)
        bad = ~torch.isfinite(losses).all()
        self.mark = bad if self.mark is None else self.mark | bad

    def check(self, kimg: float) -> None:
        """A NaN/Inf loss on any rank since the last check fails this attempt on every rank at the
        same step, so Ray Train restarts the workers from the last good checkpoint."""
        mark, self.mark = self.mark, None
        bad = torch.zeros(1) if mark is None else mark.float().reshape(1).cpu()
        dist.all_reduce(bad)
        if bad.item() == 0:
            return
        self.metrics.count_rollback()
        if self.checkpoints.rank == 0:
            self.checkpoints.count_rollback()
        dist.barrier()  # the count is stored before any rank's failure ends the attempt
        back_to = self.checkpoints.images / 1000
        self.log.event("nan_rollback", kimg=kimg, checkpoint_kimg=back_to)
        raise FloatingPointError(f"non-finite loss at kimg {kimg:.3f}: rolling back to the checkpoint at kimg {back_to:.3f}")


class Trainer:
    """One worker's run: restore, then phase after phase of steps, with stats and checkpoints."""

    def __init__(self, loop_config: dict):
        self.cfg = config_from_dict(loop_config["config"])
        self.run_dir = storage.location(loop_config["run_dir"])  # a Path, or a RemotePath (s3://...)
        self.shards = loop_config["shards"]
        self.callback: Callback = loop_config.get("callback") or Callback()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed within a phase: autotune each conv once
        conv2d_gradfix.use_on_cuda(self.cfg.model.conv_gradfix)
        self.phases = build_phases(self.cfg)
        self.log = RunLog(self.run_dir, self.rank == 0, total_kimg=self.phases[-1].end_kimg)
        self.metrics = TrainingMetrics(run=self.run_dir.name, rank=self.rank, node="")
        self.run = RunState(self.cfg, self.device)
        self.checkpoints = RunCheckpoints(self.run, self.run_dir, self.rank, self.world, self.log)
        self.loss = make_loss(**dataclasses.asdict(self.cfg.loss))
        self.training: PhaseTraining | None = None
        self.nonfinite = NonFiniteGuard(self.callback, self.checkpoints, self.metrics, self.log)
        self.stop_requested = False
        self.last_stats: dict = {}
        # the repeated-error policy is asked before restoring too: the error may be the restore's
        self.stopped = self.checkpoints.stop_reason() is not None
        if not self.stopped:
            self.saved_optimizers = self.checkpoints.restore()
            if self.checkpoints.resumed:
                self.metrics.count_restart()
            self.stopped = self.checkpoints.stop_reason() is not None
        self.batches: BatchReader | None = None  # the current phase's (opened as it begins)
        self.batches_resolution = 0
        if not self.stopped:
            log_workers(self.log, self.rank, self.world)

    # ---------------------------------------------------------------- the loop

    def train(self) -> None:
        if self.stopped:
            return
        try:
            self._reset_window()
            while self.run.images_seen < round(self.phases[-1].end_kimg * 1000) and not self.stopped:
                phase = phase_at(self.phases, self.run.kimg)
                if self.training is None or phase.index != self.training.phase.index:
                    self._open_batches(phase)
                    self.training = enter_phase(self.run, phase, self.training, self.saved_optimizers, self.rank, self.world)
                    self.saved_optimizers = None
                    self.log.event("phase", index=phase.index, resolution=phase.resolution, phase=phase.name,
                                   kimg=self.run.kimg, global_batch=self.training.global_batch, world_size=self.world)
                self._train_phase(phase)
        finally:
            self.log.flush()  # stats lines still held back for a run on object storage
            if self.batches is not None:
                self.batches.close()

    def _open_batches(self, phase: Phase) -> None:
        """The batches of a phase's resolution (a phase that keeps the resolution, as a fade-in's
        stable phase, keeps the open stream)."""
        if self.batches is not None and self.batches_resolution == phase.resolution:
            return
        if self.batches is not None:
            self.batches.close()
        self.batches = open_rank_batches(self.cfg, self.shards, self.rank, self.world, self.run.images_seen,
                                         self.device, phase.resolution)
        self.batches_resolution = phase.resolution

    def _train_phase(self, phase: Phase) -> None:
        while True:
            # the data wait: host time in next_batch (which never waits for the GPU) plus, on
            # CUDA, the time the step's stream stood waiting on batch copies (CUDA events, read
            # once complete, so a step or two late): BatchReader's docstring
            waiting_since = time.perf_counter()
            reals = self.batches.next_batch(self.training.batch, phase.resolution)
            data_wait = time.perf_counter() - waiting_since + self.batches.stream_wait_seconds()
            self._train_one_step(phase, reals, data_wait=data_wait)
            phase_done = self.run.images_seen >= round(phase.end_kimg * 1000)
            if phase_done or self.stop_requested or self.checkpoints.due():
                self.nonfinite.check(self.run.kimg)  # never save weights a NaN has reached
                self._checkpoint(1.0 if phase_done else phase.alpha(self.run.kimg))
                self.callback.after_checkpoint(self.run.kimg, self.checkpoints.resumed)
            if phase_done and self.rank == 0:
                self._evaluate_swd(phase)
            if self.stop_requested:
                self.stopped = True
                self.log.event("stopped", reason=f"{STOP_FILE} file in the run folder", kimg=self.run.kimg, requested=True)
            if phase_done or self.stopped:
                return

    def _train_one_step(self, phase: Phase, reals: torch.Tensor, data_wait: float) -> None:
        started, run, t = time.perf_counter(), self.run, self.training
        alpha = phase.alpha(run.kimg)
        stats = train_step(t.G_ddp, t.D_ddp, run.D, t.opt_g, t.opt_d, self.loss, fade_reals(reals, alpha),
                           phase.resolution, alpha, self.cfg.model.latent_size, loss_weight=t.loss_weight,
                           precision=self.cfg.model.precision)
        self.nonfinite.note(stats, run.kimg)
        o = self.cfg.optimizer
        update_ema(run.G_ema, run.G, ema_beta(t.global_batch, o.ema_beta, o.ema_half_life_kimg))
        run.images_seen += t.global_batch
        run.step += 1
        self.metrics.observe_step(t.batch, time.perf_counter() - started + data_wait, data_wait,
                                  backward_seconds=stats["backward_seconds"])
        self.window_images += t.global_batch
        self.window_wait += data_wait
        if run.step % self.cfg.monitoring.log_every_steps == 0:
            self.nonfinite.check(run.kimg)
            elapsed = max(time.perf_counter() - self.window_start, 1e-9)
            self.last_stats = self._log_stats(stats, alpha, self.window_images / elapsed, self.window_wait / elapsed)
            self._reset_window()

    def _reset_window(self) -> None:
        """Throughput and data-wait share are measured over the steps between two stats lines."""
        self.window_start, self.window_images, self.window_wait = time.perf_counter(), 0, 0.0

    # ---------------------------------------------------------------- stats, checkpoints, SWD

    def _log_stats(self, stats: dict, alpha: float, img_per_s: float, data_wait_share: float) -> dict:
        """Averages the stats over ranks, each weighted by its share of the global batch (so they
        are means over all of its images); the same all-reduce carries rank 0's view of the STOP
        file, so every rank learns of a stop request at the same step."""
        t = self.training
        stop = float(self.rank == 0 and (self.run_dir / STOP_FILE).exists())
        # one device-to-host copy for all the stats (not one sync per value); the same float32
        # products as scaling each value on the CPU
        local = torch.stack([stats[k].float() for k in STAT_KEYS]).cpu() * t.loss_weight
        values = torch.cat([local, torch.tensor([stop * self.world])])
        dist.all_reduce(values)
        values /= self.world
        values = values.tolist()
        self.stop_requested = values[-1] > 0
        record = {"time": time.time(), "kimg": self.run.kimg, "step": self.run.step, "resolution": t.phase.resolution,
                  "phase": t.phase.name, "alpha": alpha, "img_per_s": img_per_s, "data_wait_share": data_wait_share,
                  "world_size": self.world, "global_batch": t.global_batch, "lr": t.phase.lr,
                  **dict(zip(STAT_KEYS, values))}
        if not all(math.isfinite(record[k]) for k in STAT_KEYS):
            record["nonfinite"] = True
        self.log.stats(record)
        self.metrics.observe_stats(record)
        return record

    def _checkpoint(self, alpha: float) -> None:
        seconds = self.checkpoints.save(self.training, alpha, {k: v for k, v in self.last_stats.items()
                                                              if k in STAT_KEYS + ("img_per_s",)})
        if seconds is not None:
            self.metrics.observe_checkpoint(seconds)

    def _evaluate_swd(self, phase: Phase) -> None:
        """The paper's SWD of the EMA generator against the shards at the end of each phase (the
        last one ends the run): into events.jsonl and Prometheus. Rank 0 alone; the other ranks
        wait for it at their next all-reduce."""
        from progan.metrics.evaluation import swd_at_phase_end  # only where it is used: the metrics load late

        result = swd_at_phase_end(self.run, phase, self.shards, self.cfg.monitoring.swd_images, self.run_dir)
        if result is not None:
            self.metrics.observe_swd(phase.resolution, result["avg"])
            self.log.event("swd", kimg=self.run.kimg, resolution=phase.resolution, **result)
            print(f"[progan] SWD x1e3 at {phase.resolution}x{phase.resolution}, kimg {self.run.kimg:.2f}: "
                  f"{result['avg']:.2f} ({result['num_images']} images)", flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    try:
        Trainer(loop_config).train()
    except FloatingPointError:
        raise  # a non-finite loss: rolled back to the last checkpoint, under its own limit
    except Exception as exc:
        rank = ray.train.get_context().get_world_rank()
        RunLog(storage.location(loop_config["run_dir"]), True).event(
            "worker_error", rank=rank, error=str(exc).strip()[:2000], signature=error_signature(exc))
        raise


# ---------------------------------------------------------------- the job

def uses_gpu(cfg: Config) -> bool:
    """cluster.use_gpu, or when it is null (auto): whether the cluster has a GPU."""
    if cfg.cluster.use_gpu is None:
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.cluster.use_gpu


def scaling_config(cfg: Config, workers: int, train_slot: str | None) -> ScalingConfig:
    """`train_slot`: a custom resource each worker also takes one of (the launcher's local nodes
    carry one each, so that workers spread one per node); None for none."""
    use_gpu = uses_gpu(cfg)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    if train_slot:
        resources[train_slot] = 1
    low = cfg.cluster.min_workers
    num_workers = (low, workers) if low < workers else workers  # elastic between the two
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy="SPREAD", elastic_resize_monitor_interval_s=10.0)


def start_autoscaling_coordinator(timeout_s: float = 60.0) -> None:
    """Starts Ray's AutoscalingCoordinator actor, where Train's controller registers the run's
    resources as it starts, and waits until it is up. Train creates it on its first request and
    waits 5 s for the answer; on a machine busy starting a run (the H200 machine's launches) a new
    actor process took longer, and the controller printed a 20-line GetTimeoutError traceback
    ("Failed to send resource request ... safe to ignore"). The actor is a named, detached one,
    so this costs one process start per cluster; a failure here only leaves things as they were."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator)

    try:
        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=timeout_s)
    except Exception:
        pass  # Train asks again every 20 s: a slow start costs it one warning, as before


def build_trainer(cfg: Config, run_dir: Path, shards: str | Path, workers: int,
                  train_slot: str | None = None, extra_loop_config: dict | None = None) -> TorchTrainer:
    """`run_dir` is storage_path/name, so Ray's checkpoints land in the run folder, and a new
    trainer on the same folder resumes from its latest checkpoint. A URL (s3://bucket/runs/NAME)
    puts them on object storage, where every node reaches them (Ray uploads each checkpoint from
    the worker that reports it). `shards`: a folder or URL of face shards that every node can
    read (each worker reads its share itself: data_pipeline.loader)."""
    run_dir = storage.location(storage.absolute(run_dir))
    # read by Ray Train's controller, which inherits the driver's RAY_TRAIN_* variables
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.cluster.worker_start_timeout_s)
    scaling = scaling_config(cfg, workers, train_slot)
    start_autoscaling_coordinator()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "shards": storage.absolute(shards),
                           **(extra_loop_config or {})},
        scaling_config=scaling,
        torch_config=BoundStoreTorchConfig(backend=process_group_backend(scaling.use_gpu)),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            # A fixed size that the cluster cannot give (too few nodes, resources or GPUs) ends the
            # run after one worker start time-out: Ray Train would retry it without end (its
            # controller_failure_limit, -1 by default). An elastic run waits for capacity instead.
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures,
                                         controller_failure_limit=-1 if scaling.elasticity_enabled else 0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            # Train's own INFO lines (state transitions, "Did not detect any changes in the cluster
            # resources" every 10 s of an elastic run, each reported checkpoint) stay in Ray's log
            # files; the console keeps our progress lines and Train's warnings and errors
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
