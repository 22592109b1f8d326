"""Recovery time on a local 3-node cluster: a training worker killed with SIGKILL -> the first
training step after the restart, and a node removed -> the first step on the remaining nodes.
Prints one JSON line. Shards: any data-pipeline output (e.g. of ../shared/faces/aligned).

Both are read off the run's own logs: the kill/removal time is taken here, the first step after
it is the first stats.jsonl line written later (monitoring.log_every_steps=1).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from progan.config import load_config


class BackgroundRun:
    """A Ray Train run (`trainer.fit()`) in a thread, watched through its run folder's logs."""

    def __init__(self, trainer, run_dir: Path):
        self.trainer, self.run_dir = trainer, Path(run_dir)
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()

    def _fit(self):
        try:
            self.result = self.trainer.fit()
        except BaseException as exc:  # re-raised by join()
            self.error = exc

    def lines(self, name: str) -> list[dict]:
        path = self.run_dir / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def events(self) -> list[dict]:
        return self.lines("events.jsonl")

    def wait_for(self, predicate, name: str = "events.jsonl", timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for record in self.lines(name):
                if predicate(record):
                    return record
            if not self.thread.is_alive():
                raise AssertionError(f"the run ended early: {self.error!r}")
            time.sleep(0.1)
        raise AssertionError(f"nothing matched in {name} within {timeout} s; events: {self.events()[-5:]}")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in [e for e in self.events() if e["event"] == "workers"][-1]["workers"]]

    def stop(self) -> None:
        (self.run_dir / "STOP").touch()  # progan.train_loop.STOP_FILE

    def join(self, timeout: float = 400):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the run did not finish")
        if self.error:
            raise self.error
        return self.result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    args = p.parse_args()
    from cluster.local import LocalCluster
    from cluster.local import TRAIN_SLOT
    from progan.trainer import build_trainer

    cfg = load_config("configs/demo.yaml", [
        "model.max_resolution=16", "schedule.start_resolution=16", "schedule.total_kimg=1000",
        "schedule.minibatch_default=24", "schedule.minibatch={}", "checkpoint.every_kimg=0.24",
        "monitoring.log_every_steps=1", "cluster.min_workers=1", "cluster.max_failures=5"])
    figures = {}
    with LocalCluster(3, include_dashboard=False) as local, tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "recovery"
        run_dir.mkdir()
        run = BackgroundRun(build_trainer(cfg, run_dir, args.shards,
                                          workers=3, train_slot=TRAIN_SLOT), run_dir)
        run.wait_for(lambda e: e["event"] == "checkpoint")
        killed = time.time()
        os.kill(run.worker_pids()[-1], signal.SIGKILL)
        first = run.wait_for(lambda s: s["time"] > killed + 0.5 and s["step"] > 1, "stats.jsonl")
        figures["worker_killed_to_first_step_s"] = round(first["time"] - killed, 1)
        run.wait_for(lambda e: e["event"] == "checkpoint" and e["time"] > first["time"])
        removed = time.time()
        local.remove_node(local.cluster.list_all_nodes()[-1])
        first = run.wait_for(lambda s: s["time"] > removed and s["world_size"] == 2, "stats.jsonl")
        figures["node_removed_to_first_step_s"] = round(first["time"] - removed, 1)
        figures["worker_start_timeout_s"] = cfg.cluster.worker_start_timeout_s
        run.stop()
        run.join()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
