"""Where the preparation runs: a local Ray instance, a local N-node cluster, or a running one."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import ray


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def ray_session(address: str | None = None, nodes: int | None = None) -> Iterator[None]:
    """Join `address` ("auto": the running cluster), or start `nodes` local nodes sharing this
    machine's CPUs, or (neither) one local instance without a dashboard.

    Nodes started here stay on 127.0.0.1 only if RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was in the
    environment when Ray was first imported (Ray reads it then), so callers set it before that.
    """
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    cluster = None
    if address:
        ray.init(address=address, **quiet)
    elif nodes:
        from ray.cluster_utils import Cluster

        per_node = max(1, available_cpus() // nodes)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=per_node)
        ray.init(address=cluster.address, **quiet)
    else:
        ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False, **quiet)
    quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def quiet_ray_data() -> None:
    """Our own progress bar replaces Ray Data's per-operator bars and execution logs."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
