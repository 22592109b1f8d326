"""The memory of a process and its descendants, sampled in a thread until stopped (psutil).

    with TreeMemory(process.pid, interval_s=0.5) as memory:
        process.wait()
    memory.peaks["tree_pss_mb"]

Per sample, each process of the tree is read once (`memory_full_info`: its resident set, the
shared part of it, and its proportional set size from /proc/PID/smaps_rollup). The peaks kept:
- root_private_mb: the root's resident memory less its shared (file-backed and shared) pages,
  which is where a Python process's heap lives;
- root_rss_mb: the root's resident set;
- tree_rss_mb: the resident sets of all the tree's processes, summed (counts shared pages once
  per process);
- tree_pss_mb: their proportional set sizes, summed (each shared page split among its users: the
  tree's real footprint);
- processes: the most processes seen in one sample.
A subclass that wants more of each sample (by kind of process, a timeline) overrides `record`.
"""
from __future__ import annotations

import dataclasses
import threading

import psutil

MB = 2**20


@dataclasses.dataclass(frozen=True)
class Reading:
    """One process's memory in one sample, in MB."""
    process: psutil.Process
    is_root: bool
    rss_mb: float
    pss_mb: float
    private_mb: float  # resident less shared pages


class TreeMemory:
    def __init__(self, pid: int, interval_s: float = 1.0):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peaks = {"root_private_mb": 0.0, "root_rss_mb": 0.0, "tree_rss_mb": 0.0, "tree_pss_mb": 0.0, "processes": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def readings(self) -> list[Reading]:
        """The tree's processes now; those that end between the listing and their reading are
        left out. Empty once the root has ended."""
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        found = []
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            found.append(Reading(process, process.pid == self.root.pid, info.rss / MB, info.pss / MB,
                                 (info.rss - info.shared) / MB))
        return found

    def sample(self) -> None:
        readings = self.readings()
        if not readings:
            return
        for reading in readings:
            if reading.is_root:
                self._peak("root_private_mb", reading.private_mb)
                self._peak("root_rss_mb", reading.rss_mb)
        self._peak("tree_rss_mb", sum(reading.rss_mb for reading in readings))
        self._peak("tree_pss_mb", sum(reading.pss_mb for reading in readings))
        self._peak("processes", len(readings))
        self.samples += 1
        self.record(readings)

    def record(self, readings: list[Reading]) -> None:
        """Called with each sample's readings, after the peaks are updated."""

    def _peak(self, name: str, value: float) -> None:
        self.peaks[name] = max(self.peaks[name], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
