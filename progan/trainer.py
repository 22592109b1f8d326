"""Builds the Ray Train `TorchTrainer` for a run: scaling, storage, failure and checkpoint policy."""
from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.local import TRAIN_SLOT
from progan.config import Config
from progan.train_loop import train_loop_per_worker


def _use_gpu(cfg: Config) -> bool:
    if cfg.cluster.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.cluster.use_gpu == "true"


def scaling_config(cfg: Config, workers: int, train_slot: bool) -> ScalingConfig:
    use_gpu = _use_gpu(cfg)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    if train_slot:
        resources[TRAIN_SLOT] = 1
    low = cfg.cluster.min_workers
    num_workers = (low, workers) if 0 < low < workers else workers
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy="SPREAD", elastic_resize_monitor_interval_s=10.0)


def build_trainer(cfg: Config, run_dir: Path, shards: str | Path, workers: int,
                  train_slot: bool = False, extra_loop_config: dict | None = None) -> TorchTrainer:
    """`run_dir` is storage_path/name, so Ray's checkpoints land in the run folder, and a new
    trainer on the same folder resumes from its latest checkpoint. `shards`: a folder of face
    shards that every node can read (each worker reads its share itself: data_pipeline.loader)."""
    run_dir = Path(run_dir).resolve()
    # read by Ray Train's controller, which inherits the driver's RAY_TRAIN_* variables
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.cluster.worker_start_timeout_s)
    scaling = scaling_config(cfg, workers, train_slot)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "shards": str(Path(shards).resolve()),
                           **(extra_loop_config or {})},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
    )
