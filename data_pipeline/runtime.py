"""Where the preparation runs: local nodes on this machine, or a running cluster."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import ray

from cluster.local import LocalCluster


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def ray_session(address: str | None = None, nodes: int | None = None) -> Iterator[None]:
    """Join `address` ("auto": the running cluster), or start `nodes` (default 1) local nodes on
    127.0.0.1 sharing this machine's CPUs, without a dashboard (cluster.local.LocalCluster)."""
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        local = None
    else:
        nodes = nodes or 1
        local = LocalCluster(nodes, include_dashboard=False, cpus_per_node=max(1, available_cpus() // nodes),
                             log_to_driver=False).start()
    quiet_ray_data()
    try:
        yield
    finally:
        if local:
            local.shutdown()
        else:
            ray.shutdown()


def quiet_ray_data() -> None:
    """Our own progress bar replaces Ray Data's per-operator bars and execution logs."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
