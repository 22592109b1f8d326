"""Builds the Ray Train `TorchTrainer` for a run: scaling, storage, failure and checkpoint policy."""
from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from data_pipeline import storage
from progan.config import Config
from progan.train_loop import train_loop_per_worker


def bind_rendezvous_store_to_master_address() -> None:
    """torch's rendezvous store (a TCPStore served by rank 0) listens on every interface of its
    machine, though the workers only ever reach it at MASTER_ADDR. Here rank 0 serves it from a
    socket bound to that address alone: on a local cluster, 127.0.0.1. Runs in each worker before
    the process group is set up (torch's own `master_listen_fd` option; the store is the same)."""
    from torch.distributed import TCPStore

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the module, not its function

    create_store = rendezvous._create_c10d_store
    if getattr(create_store, "binds_master_address", False):
        return

    def create_bound_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0:
            return create_store(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        listener = socket.create_server((hostname, port), family=family, backlog=128)
        return TCPStore(hostname, port, world_size, True, timeout, multi_tenant=True,
                        master_listen_fd=listener.detach(), use_libuv=use_libuv)

    create_bound_store.binds_master_address = True
    rendezvous._create_c10d_store = create_bound_store


class _BoundStoreTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_rendezvous_store_to_master_address)
        super().on_start(worker_group, backend_config)


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """Ray Train's torch set-up, with the rendezvous store on the master address only."""

    @property
    def backend_cls(self):
        return _BoundStoreTorchBackend


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of the workers' process group. On GPUs DDP reduces CUDA
    gradients (NCCL) while the loop's stats, NaN and STOP all-reduces and its object collectives
    use CPU tensors, which an NCCL-only group cannot reduce: one group with both backends."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def _use_gpu(cfg: Config) -> bool:
    """cluster.use_gpu, or when it is null (auto): whether the cluster has a GPU."""
    if cfg.cluster.use_gpu is None:
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.cluster.use_gpu


def scaling_config(cfg: Config, workers: int, train_slot: str | None) -> ScalingConfig:
    """`train_slot`: a custom resource each worker also takes one of (the launcher's local nodes
    carry one each, so that workers spread one per node); None for none."""
    use_gpu = _use_gpu(cfg)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    if train_slot:
        resources[train_slot] = 1
    low = cfg.cluster.min_workers
    num_workers = (low, workers) if low < workers else workers  # elastic between the two
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy="SPREAD", elastic_resize_monitor_interval_s=10.0)


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
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "shards": storage.absolute(shards),
                           **(extra_loop_config or {})},
        scaling_config=scaling,
        torch_config=BoundStoreTorchConfig(backend=process_group_backend(scaling.use_gpu)),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
    )
