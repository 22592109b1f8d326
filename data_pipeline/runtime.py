"""Where the preparation runs: local nodes on this machine, or a running cluster."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from cluster.local import ray_cluster


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def ray_session(address: str | None = None, nodes: int | None = None) -> Iterator[None]:
    """Join `address` ("auto": the running cluster), or start `nodes` (default 1) local nodes on
    127.0.0.1 sharing this machine's CPUs, without a dashboard (cluster.local.ray_cluster)."""
    nodes = nodes or 1
    with ray_cluster(address, nodes, log_to_driver=False, include_dashboard=False,
                     cpus_per_node=max(1, available_cpus() // nodes)):
        quiet_ray_data()
        yield


def quiet_ray_data() -> None:
    """Our own progress bar replaces Ray Data's per-operator bars and execution logs."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
