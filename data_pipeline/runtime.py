"""Where the preparation runs: local nodes on this machine, or a running cluster; and handing the
C heap's freed memory back from its long-lived workers."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

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


def release_freed_memory() -> bool:
    """Hand the free memory the C heap keeps back to the system (glibc's malloc_trim(0)); False,
    doing nothing, where the C library has no malloc_trim (musl, macOS, Windows).

    glibc keeps the memory that large temporary arrays (torch tensors, decoded images) are freed
    from, for the next allocations; a long-lived worker that makes many of differing sizes grows
    by that until the heap is trimmed. A trim costs more than the call: what it hands back is
    faulted in again by the next allocations that need it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # 1 if it gave memory back, 0 if there was none to give
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Trims the C heap (release_freed_memory) at the first check, then only once the process's
    resident memory has grown by more than `slack_bytes` past its size after the last trim: the
    heap's growth is bounded by the slack, and the trims, each of which costs the next allocations
    their page faults, stay rare."""

    def __init__(self, slack_bytes: int, resident_bytes: Callable[[], int] | None = None):
        self.slack_bytes = slack_bytes
        self.resident_bytes = resident_bytes or _resident_bytes
        self.baseline: int | None = None
        self.trims = 0

    def check(self) -> bool:
        """After a piece of work: trim if grown past the slack; whether it trimmed."""
        resident = self.resident_bytes()
        if self.baseline is not None and resident - self.baseline <= self.slack_bytes:
            return False
        trimmed = release_freed_memory()
        self.baseline = self.resident_bytes()
        self.trims += trimmed
        return trimmed


def _resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss
