"""`train_loop_per_worker`: progressive training on one Ray Train worker.

The only module that knows about ranks, DistributedDataParallel and Ray. Every rank runs the same
schedule from the same global image count, so collective calls (DDP all-reduces, stats
all-reduce, `ray.train.report`) happen at the same steps everywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data_pipeline import storage
from data_pipeline.loader import BatchReader, FaceStream
from monitoring.metrics import TrainingMetrics
from progan.checkpoint import load_usable_checkpoint, save_checkpoint
from progan.config import Config, config_from_dict
from progan.ema import ema_beta, make_ema, update_ema
from progan.losses import make_loss
from progan.networks import Discriminator, Generator, set_trainable
from progan.samples import fixed_latents, sample_name, write_sample_grid
from progan.trained import TrainedGenerator
from progan.schedule import Phase, batch_shares, build_phases, phase_at, share_weights
from progan.training_step import fade_reals, make_optimizer, memory_format, train_step

# grad_norm: the critic's mean input-gradient norm at the current resolution (near k =
# max_resolution / resolution once the penalty, on the official full-resolution scale, holds)
STAT_KEYS = ("loss_d", "loss_g", "grad_penalty", "grad_norm", "score_real", "score_fake")
STOP_FILE = "STOP"  # `touch RUN_DIR/STOP`: the run saves a checkpoint and ends cleanly


def build_networks(cfg: Config) -> tuple[Generator, Discriminator]:
    m = cfg.model
    torch.manual_seed(cfg.data.seed)  # the same initial weights on every rank
    G = Generator(m.max_resolution, m.latent_size, m.fmap_base, m.fmap_max, m.num_channels)
    D = Discriminator(m.max_resolution, m.fmap_base, m.fmap_max, m.num_channels, m.mbstd_group_size)
    return G, D


def wrap_for_phase(G, D, resolution: int, fading: bool, device: torch.device) -> tuple[DDP, DDP]:
    """Freezes the layers this phase does not use and wraps both networks in a new DDP:
    fade-in and stable phases use different parameter sets, and DDP with
    find_unused_parameters=False (and never static_graph, which lets ranks drift under the
    gradient penalty) needs exactly the used ones to require grad (ddp-growing-gan-facts.md)."""
    set_trainable(G, resolution, fading)
    set_trainable(D, resolution, fading)
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(G, device_ids=device_ids), DDP(D, device_ids=device_ids)  # the models have no buffers


def weights_digest(*modules: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal digests on all ranks mean bit-identical weights."""
    h = hashlib.sha1()
    for module in modules:
        for p in module.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator's state when training on `device` is a GPU (latents and penalty mixes
    are drawn there), else None."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng_state(states: list | None, rank: int, device: torch.device) -> None:
    """Puts back this rank's CUDA generator state from a checkpoint of the same world size;
    checkpoints of CPU training, or written before this state was saved, hold none."""
    if device.type == "cuda" and states and states[rank] is not None:
        torch.cuda.set_rng_state(states[rank], device)


def model_args(cfg: Config) -> dict:
    return dataclasses.asdict(cfg.model)


class _RunLog:
    """Rank 0's files in the run folder: stats as JSON lines, events, and the progress line.
    In a run folder on object storage (no append there: each write puts the whole file again)
    stats lines wait for the next event, at the latest the next checkpoint's; events, which the
    stop policies read back after a failure, are written at once."""

    def __init__(self, run_dir: Path | storage.RemotePath, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.pending: dict[str, str] = {}

    def append(self, name: str, record: dict) -> None:
        if self.enabled:
            self.pending[name] = self.pending.get(name, "") + json.dumps(record) + "\n"
            if isinstance(self.run_dir, Path) or name == "events.jsonl":
                self.flush()

    def flush(self) -> None:
        for name, text in self.pending.items():
            storage.append_text(self.run_dir / name, text)
        self.pending.clear()

    def event(self, kind: str, **fields) -> None:
        self.append("events.jsonl", {"time": time.time(), "event": kind, **fields})

    def progress(self, s: dict) -> None:
        if self.enabled:
            print(f"[progan] res {s['resolution']:4d} {s['phase']:9s} alpha {s['alpha']:.3f} "
                  f"kimg {s['kimg']:9.2f} img/s {s['img_per_s']:7.1f} "
                  f"loss_d {s['loss_d']:+.4f} loss_g {s['loss_g']:+.4f} gp {s['grad_penalty']:.4f}", flush=True)


class _Trainer:
    """The state of one worker's run; methods are the loop's steps."""

    def __init__(self, loop_config: dict):
        self.cfg = config_from_dict(loop_config["config"])
        self.run_dir = storage.location(loop_config["run_dir"])  # a Path, or a RemotePath (s3://...)
        self.shards = loop_config["shards"]
        self.test_hooks = loop_config.get("test_hooks", {})  # failure injection for tests; off by default
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.log = _RunLog(self.run_dir, self.rank == 0)
        self.metrics = TrainingMetrics(run=self.run_dir.name, rank=self.rank, node="")
        self.phases = build_phases(self.cfg)
        self.total_images = round(self.phases[-1].end_kimg * 1000)
        self.G, self.D = build_networks(self.cfg)
        for net in (self.G, self.D):
            net.to(self.device, memory_format=memory_format(self.cfg.model.channels_last))
        self.G_ema = make_ema(self.G)
        self.loss = make_loss(**dataclasses.asdict(self.cfg.loss))
        self.sample_latents = fixed_latents(self.cfg.checkpoint.sample_grid ** 2, self.cfg.model.latent_size)
        self.images_seen, self.step = 0, 0
        self.nonfinite_mark: torch.Tensor | None = None  # see _note_nonfinite
        self.phase: Phase | None = None
        self.opt_g = self.opt_d = None
        self.saved_optimizers: dict | None = None
        self.batches: BatchReader | None = None
        self._restore()
        if self.stopped:
            return
        self.batches = self._open_data()
        self._log_workers()
        self.next_checkpoint = self._next_checkpoint_after(self.images_seen)

    # ---------------------------------------------------------------- state

    def _restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        self.resumed, self.stopped, self.checkpoint_images = checkpoint is not None, False, 0
        self.stop_requested = False
        self._check_repeated_errors()
        if self.stopped:
            return
        if checkpoint is None:
            torch.manual_seed(self.cfg.data.seed * 1000 + 1 + self.rank)
            self.log.event("start", world_size=self.world, kimg=0.0)
            self._check_repeated_rollbacks()
            return
        self.metrics.count_restart()
        with checkpoint.as_directory() as directory:
            # older checkpoints to fall back on are looked for in a local run folder only
            older_in = self.run_dir if isinstance(self.run_dir, Path) else directory
            state, used, skipped = load_usable_checkpoint(directory, older_in, model_args(self.cfg))
        for reason in skipped:  # a checkpoint cut short or damaged: the run goes on from an older one
            self.log.event("checkpoint_unusable", reason=reason, resumed_from=used.name,
                           kimg=state["images_seen"] / 1000)
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.G_ema.load_state_dict(state["generator_ema"])
        self.images_seen, self.step = state["images_seen"], state["step"]
        self.checkpoint_images = self.images_seen
        self._check_repeated_rollbacks()
        self.saved_optimizers = {"phase_index": state["phase_index"], "g": state["opt_g"], "d": state["opt_d"]}
        rng = state["rng_states"]
        if len(rng) == self.world:  # same world size: every rank continues its own random stream
            torch.set_rng_state(rng[self.rank])
            restore_cuda_rng_state(state.get("cuda_rng_states"), self.rank, self.device)
        else:
            torch.manual_seed(self.cfg.data.seed * 1000 + 1 + self.rank + self.images_seen)
        self.log.event("resume", world_size=self.world, kimg=self.images_seen / 1000,
                       previous_world_size=len(rng))

    def _open_data(self) -> BatchReader:
        """This rank's share of the shards, from the pass the images seen so far have reached (a
        resumed run does not replay the first passes' order)."""
        d = self.cfg.data
        stream = FaceStream(self.shards, self.rank, self.world, d.seed, d.shuffle_buffer, images_seen=self.images_seen)
        return BatchReader(stream, d.mirror, seed=d.seed * 1000 + self.rank + stream.first_pass,
                           loader_workers=d.loader_workers, device=self.device)

    def _log_workers(self) -> None:
        """Which process on which node holds each rank, in the event log (for operators and tests)."""
        me = {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        workers = [None] * self.world
        dist.all_gather_object(workers, me)
        self.log.event("workers", world_size=self.world, workers=workers)

    def _check_repeated_rollbacks(self) -> None:
        """Rolling back to the same checkpoint again and again would loop forever: after
        `checkpoint.max_nan_rollbacks` of them the run stops with a clear event instead."""
        if self.rank == 0:
            events = self.run_dir / "events.jsonl"
            lines = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
            here = [e for e in lines if e["event"] == "nan_rollback"
                    and e["checkpoint_kimg"] == self.checkpoint_images / 1000]
            decision = [len(here) >= self.cfg.checkpoint.max_nan_rollbacks, self.checkpoint_images / 1000]
        else:
            decision = [None, None]
        dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            self.stopped = True
            self.log.event("stopped", reason=f"non-finite losses after {self.cfg.checkpoint.max_nan_rollbacks} "
                                             f"rollbacks to the checkpoint at kimg {decision[1]:.3f}")

    def _check_repeated_errors(self) -> None:
        """A worker that fails twice in a row on the same error (bad data, a bug) would fail on
        every restart: the attempt after the repeat stops the run with that error instead of
        spending all of `cluster.max_failures`."""
        if self.rank == 0:
            repeated = repeated_error(self.run_dir / "events.jsonl")
        else:
            repeated = None
        decision = [repeated]
        dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            self.stopped = True
            self.log.event("stopped", reason=f"the same error in two attempts in a row: {decision[0]}")

    def _state(self, rng_states: list, cuda_rng_states: list) -> dict:
        return {
            "model_args": model_args(self.cfg), "config": self.cfg.to_dict(),
            "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
            "generator_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "images_seen": self.images_seen, "step": self.step,
            "phase_index": self.phase.index, "resolution": self.phase.resolution,
            "fading": self.phase.fading, "alpha": self.phase.alpha(self.kimg),
            "rng_states": rng_states, "cuda_rng_states": cuda_rng_states, "world_size": self.world,
        }

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    def _next_checkpoint_after(self, images: int) -> int:
        every = round(self.cfg.checkpoint.every_kimg * 1000)
        return (images // every + 1) * every

    # ---------------------------------------------------------------- phases

    def _enter_phase(self, phase: Phase) -> None:
        first = self.phase is None
        self.phase = phase
        self.G_ddp = self.D_ddp = None  # drop the previous phase's wrappers before making new ones
        self.G_ddp, self.D_ddp = wrap_for_phase(self.G, self.D, phase.resolution, phase.fading, self.device)
        o = self.cfg.optimizer
        if first or self.cfg.schedule.reset_optimizer_on_fade:
            # the official code resets Adam whenever the level of detail starts or stops changing
            self.opt_g = make_optimizer(self.G, phase.lr, o.beta1, o.beta2, o.eps)
            self.opt_d = make_optimizer(self.D, phase.lr, o.beta1, o.beta2, o.eps)
        saved = self.saved_optimizers
        if first and saved is not None and (saved["phase_index"] == phase.index
                                            or not self.cfg.schedule.reset_optimizer_on_fade):
            self.opt_g.load_state_dict(saved["g"])
            self.opt_d.load_state_dict(saved["d"])
        self.saved_optimizers = None
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = phase.lr
        # the schedule's global batch exactly, split in whole minibatch-stddev groups; each rank's
        # loss weighted so that DDP's averaged gradient is the one-worker gradient on all of it
        shares = batch_shares(phase.batch, self.world, self.cfg.model.mbstd_group_size)
        self.batch, self.global_batch = shares[self.rank], sum(shares)
        self.loss_weight = share_weights(shares)[self.rank]
        self.log.event("phase", index=phase.index, resolution=phase.resolution, phase=phase.name,
                       kimg=self.kimg, global_batch=self.global_batch, world_size=self.world)

    # ---------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            if self.stopped:
                return
            self._reset_window()
            while self.images_seen < self.total_images and not self.stopped:
                phase = phase_at(self.phases, self.kimg)
                if self.phase is None or phase.index != self.phase.index:
                    self._enter_phase(phase)
                self._train_until_phase_end(phase)
        finally:
            self.log.flush()  # stats lines still held back for a run on object storage
            if self.batches is not None:
                self.batches.close()

    def _train_until_phase_end(self, phase: Phase) -> None:
        while True:
            waiting_since = time.perf_counter()
            reals = self.batches.next_batch(self.batch, phase.resolution)
            self._train_one_step(phase, reals, data_wait=time.perf_counter() - waiting_since)
            phase_done = self.images_seen >= round(phase.end_kimg * 1000)
            if phase_done or self.stop_requested or self.images_seen >= self.next_checkpoint:
                self._stop_if_nonfinite()  # never save weights a NaN has reached
                self._checkpoint(1.0 if phase_done else phase.alpha(self.kimg))
                self._after_checkpoint()
            if phase_done and self.rank == 0:
                self._evaluate_swd(phase)
            if self.stop_requested:
                self.stopped = True
                self.log.event("stopped", reason=f"{STOP_FILE} file in the run folder", kimg=self.kimg, requested=True)
            if phase_done or self.stopped:
                return

    def _train_one_step(self, phase: Phase, reals: torch.Tensor, data_wait: float) -> None:
        started = time.perf_counter()
        alpha = phase.alpha(self.kimg)
        stats = train_step(self.G_ddp, self.D_ddp, self.D, self.opt_g, self.opt_d, self.loss,
                           fade_reals(reals, alpha), phase.resolution, alpha, self.cfg.model.latent_size,
                           loss_weight=self.loss_weight)
        self._note_nonfinite(stats)
        o = self.cfg.optimizer
        images = self.global_batch
        update_ema(self.G_ema, self.G, ema_beta(images, o.ema_beta, o.ema_half_life_kimg))
        self.images_seen += images
        self.step += 1
        self.metrics.observe_step(self.batch, time.perf_counter() - started + data_wait, data_wait,
                                  backward_seconds=stats["backward_seconds"])
        self.window_images += images
        self.window_wait += data_wait
        if self.step % self.cfg.monitoring.log_every_steps == 0:
            self._stop_if_nonfinite()
            elapsed = max(time.perf_counter() - self.window_start, 1e-9)
            self.last_stats = self._log_stats(stats, alpha, self.window_images / elapsed, self.window_wait / elapsed)
            self._reset_window()

    def _reset_window(self) -> None:
        """Throughput and data-wait share are measured over the steps between two stats lines."""
        self.window_start, self.window_images, self.window_wait = time.perf_counter(), 0, 0.0

    def _note_nonfinite(self, stats: dict) -> None:
        """Marks a NaN/Inf loss on the training device without waiting for the step to finish
        there (no host synchronisation per step); _stop_if_nonfinite reads the mark."""
        losses = torch.stack([stats["loss_d"], stats["loss_g"]]).float()
        nan_at = self.test_hooks.get("nan_at_kimg")
        once = not self.resumed or self.test_hooks.get("nan_every_attempt", False)
        if nan_at is not None and once and self.kimg >= nan_at:
            losses[0] = float("nan")  # test hook: a loss blow-up (once per run unless nan_every_attempt)
        bad = ~torch.isfinite(losses).all()
        self.nonfinite_mark = bad if self.nonfinite_mark is None else self.nonfinite_mark | bad

    def _stop_if_nonfinite(self) -> None:
        """A NaN/Inf loss on any rank since the last look fails this attempt on every rank at the
        same step, so Ray Train restarts the workers from the last good checkpoint. One small
        all-reduce (and host sync) every `monitoring.log_every_steps` steps and before each
        checkpoint: a NaN is caught at most that many steps late and never checkpointed."""
        mark, self.nonfinite_mark = self.nonfinite_mark, None
        bad = torch.zeros(1) if mark is None else mark.float().reshape(1).cpu()
        dist.all_reduce(bad)
        if bad.item() > 0:
            self.metrics.count_rollback()
            self.log.event("nan_rollback", kimg=self.kimg, checkpoint_kimg=self.checkpoint_images / 1000)
            raise FloatingPointError(f"non-finite loss at kimg {self.kimg:.3f}: rolling back to the checkpoint "
                                     f"at kimg {self.checkpoint_images / 1000:.3f}")

    def _log_stats(self, stats: dict, alpha: float, img_per_s: float, data_wait_share: float) -> dict:
        """Averages the stats over ranks, each weighted by its share of the global batch (so they
        are means over all of its images); the same all-reduce carries rank 0's view of the STOP
        file, so every rank learns of a stop request at the same step."""
        stop = float(self.rank == 0 and (self.run_dir / STOP_FILE).exists())
        values = torch.stack([stats[k].float().cpu() * self.loss_weight for k in STAT_KEYS]
                             + [torch.tensor(stop * self.world)])
        dist.all_reduce(values)
        values /= self.world
        self.stop_requested = bool(values[-1] > 0)
        record = {"time": time.time(), "kimg": self.kimg, "step": self.step, "resolution": self.phase.resolution,
                  "phase": self.phase.name, "alpha": alpha, "img_per_s": img_per_s, "data_wait_share": data_wait_share,
                  "world_size": self.world,
                  "global_batch": self.global_batch, "lr": self.phase.lr,
                  **{k: float(v) for k, v in zip(STAT_KEYS, values)}}
        if not all(math.isfinite(record[k]) for k in STAT_KEYS):
            record["nonfinite"] = True
        self.log.append("stats.jsonl", record)
        self.log.progress(record)
        self.metrics.observe_stats(record)
        return record

    def _checkpoint(self, alpha: float) -> None:
        """Every rank calls report (a collective); rank 0 attaches the checkpoint and a sample grid.
        Before that the ranks compare weight digests: a divergence fails the attempt, so Ray Train
        restarts from the last checkpoint instead of saving weights that differ across ranks."""
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (torch.get_rng_state(), weights_digest(self.G, self.D),
                                          cuda_rng_state(self.device)))
        rng_states, cuda_rng_states = [g[0] for g in gathered], [g[2] for g in gathered]
        if len({g[1] for g in gathered}) != 1:
            self.log.event("rank_divergence", kimg=self.kimg, digests=[g[1] for g in gathered])
            raise RuntimeError(f"ranks hold different weights at kimg {self.kimg:.3f}")
        self.next_checkpoint = self._next_checkpoint_after(self.images_seen)
        self.checkpoint_images = self.images_seen
        metrics = {"kimg": self.kimg, "images_seen": self.images_seen, "step": self.step,
                   "resolution": self.phase.resolution, "phase": self.phase.name, "alpha": alpha,
                   "world_size": self.world, "ranks_identical": True, "weights_digest": gathered[0][1]}
        metrics.update({k: v for k, v in getattr(self, "last_stats", {}).items() if k in STAT_KEYS + ("img_per_s",)})
        if self.rank != 0:
            ray.train.report(metrics)
            return
        sample = self.run_dir / "samples" / sample_name(self.phase.resolution, self.images_seen)
        with storage.written_at(sample) as local:  # uploaded after, for a run on object storage
            write_sample_grid(self.G_ema, self.sample_latents, self.phase.resolution, alpha, local)
        metrics["sample_grid"] = str(sample)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(self._state(rng_states, cuda_rng_states), tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.metrics.observe_checkpoint(time.perf_counter() - started)
        self.log.event("checkpoint", kimg=self.kimg, sample_grid=str(sample.relative_to(self.run_dir)))

    def _evaluate_swd(self, phase: Phase) -> None:
        """The paper's SWD of the EMA generator against the shards at the end of each phase (the
        last one ends the run): into events.jsonl and Prometheus. Rank 0 alone; the other ranks
        wait for it at their next all-reduce. SWD needs 8x8 images at least."""
        images = self.cfg.monitoring.swd_images
        if images == -1:
            images = 4096 if self.device.type == "cuda" else 256
        if images == 0 or phase.resolution < 8:
            return
        from progan.evaluate import swd_against_shards  # only where it is used: the CLI's imports

        started = time.perf_counter()
        trained = TrainedGenerator(self.G_ema, phase.resolution, 1.0, self.images_seen, self.cfg, self.run_dir)
        result = swd_against_shards(trained, self.shards, images, seed=self.cfg.data.seed, device=self.device)
        self.metrics.observe_swd(phase.resolution, result["avg"])
        self.log.event("swd", kimg=self.kimg, resolution=phase.resolution, avg=result["avg"], levels=result["levels"],
                       num_images=images, seconds=round(time.perf_counter() - started, 2))
        print(f"[progan] SWD x1e3 at {phase.resolution}x{phase.resolution}, kimg {self.kimg:.2f}: "
              f"{result['avg']:.2f} ({images} images)", flush=True)

    def _after_checkpoint(self) -> None:
        fail_after = self.test_hooks.get("fail_after_kimg")
        if fail_after is not None and not self.resumed and self.kimg >= fail_after:
            raise RuntimeError(f"test hook: injected failure after the checkpoint at kimg {self.kimg:.3f}")
        error_after = self.test_hooks.get("error_after_kimg")
        if error_after is not None and self.kimg >= error_after:
            raise ValueError(f"test hook: the same error on every attempt, at kimg {self.kimg:.3f}")


def error_signature(exc: BaseException) -> str:
    """An error's type and first line, numbers masked: the same fault at another step is the same error."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {re.sub(r'[0-9]+', '#', first)[:300]}"


def repeated_error(events_file: Path) -> str | None:
    """The error that the last two attempts (the runs of the workers between two `start`/`resume`
    events) both failed with, if any."""
    events = [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    attempts: list[set[str]] = []
    for event in events:
        if event["event"] in ("start", "resume"):
            attempts.append(set())
        elif event["event"] == "worker_error" and attempts:
            attempts[-1].add(event["signature"])
    if len(attempts) < 2:
        return None
    same = attempts[-1] & attempts[-2]
    return min(same) if same else None


def train_loop_per_worker(loop_config: dict) -> None:
    try:
        _Trainer(loop_config).run()
    except FloatingPointError:
        raise  # a non-finite loss: rolled back to the last checkpoint, under its own limit
    except Exception as exc:
        rank = ray.train.get_context().get_world_rank()
        _RunLog(storage.location(loop_config["run_dir"]), True).event(
            "worker_error", rank=rank, error=str(exc).strip()[:2000], signature=error_signature(exc))
        raise
