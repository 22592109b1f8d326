"""The workers' torch.distributed process group as Ray Train sets it up, with two changes: one
group that serves CPU and CUDA collectives, and torch's rendezvous store on the master address
only (not on every interface)."""
from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


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
