"""Fault tolerance on a real 3-node local Ray cluster: a worker killed with SIGKILL, a node removed
and added back, a NaN in the loss. Training runs in a thread; the test acts on the cluster."""
import os
import signal
import threading
import time

import pytest

from data_pipeline.loader import read_shards
from progan.trainer import build_trainer

from conftest import read_jsonl, tiny_config

CLUSTER_NODES = 3


class Run:
    """fit() in a background thread, with helpers to wait on the run's event log."""

    def __init__(self, cfg, run_dir, shards, workers, **loop_config):
        run_dir.mkdir(parents=True)
        self.run_dir = run_dir
        self.trainer = build_trainer(cfg, run_dir, read_shards(str(shards)), workers=workers, train_slot=True,
                                     extra_loop_config=loop_config)
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()

    def _fit(self):
        try:
            self.result = self.trainer.fit()
        except BaseException as exc:  # reported by join()
            self.error = exc

    def events(self) -> list[dict]:
        path = self.run_dir / "events.jsonl"
        return read_jsonl(path) if path.exists() else []

    def wait_for(self, predicate, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            assert self.thread.is_alive(), f"the run ended early: {self.error!r}"
            time.sleep(0.2)
        raise AssertionError(f"no such event within {timeout} s; events: {self.events()[-5:]}")

    def join(self, timeout: float = 400):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not finish"
        if self.error:
            raise self.error
        return self.result


def test_killed_worker_restarts_from_checkpoint_and_completes(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=3", "cluster.min_workers=1")
    run = Run(cfg, tmp_path / "run", shards, workers=3)
    run.wait_for(lambda e: e["event"] == "checkpoint" and e["kimg"] >= 0.19)  # mid fade-in to 8x8
    workers = [e for e in run.events() if e["event"] == "workers"][-1]["workers"]
    assert len(workers) == 3
    os.kill(workers[-1]["pid"], signal.SIGKILL)
    result = run.join()
    events = run.events()
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) >= 1 and all(r["kimg"] > 0 for r in resumes)
    # three workers take 5 images each: the last step overshoots 640 by less than a batch of 15
    assert 640 <= result.metrics["images_seen"] < 655
    assert result.metrics["ranks_identical"] is True
    assert not [e for e in events if e["event"] == "rank_divergence"]


def test_nan_in_the_loss_rolls_back_once_and_finishes(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=3")
    run = Run(cfg, tmp_path / "run", shards, workers=2, test_hooks={"nan_at_kimg": 0.2})
    result = run.join()
    events = run.events()
    rollbacks = [e for e in events if e["event"] == "nan_rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["checkpoint_kimg"] == pytest.approx(0.192)
    assert [e["kimg"] for e in events if e["event"] == "resume"] == [pytest.approx(0.192)]
    assert result.metrics["images_seen"] == 640


def test_repeated_nan_stops_the_run_with_a_clear_event(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=5", "checkpoint.max_nan_rollbacks=2")
    run = Run(cfg, tmp_path / "run", shards, workers=2, test_hooks={"nan_at_kimg": 0.2, "nan_every_attempt": True})
    result = run.join()
    events = run.events()
    assert len([e for e in events if e["event"] == "nan_rollback"]) == 2
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and "2 rollbacks to the checkpoint at kimg 0.192" in stopped[0]["reason"]
    assert result.metrics["images_seen"] == 192


def test_removed_node_trains_on_and_an_added_node_is_used(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=5", "cluster.min_workers=1", "schedule.total_kimg=100",
                      "checkpoint.every_kimg=0.192", "cluster.worker_start_timeout_s=15")
    run = Run(cfg, tmp_path / "run", shards, workers=3)
    run.wait_for(lambda e: e["event"] == "checkpoint" and e["kimg"] >= 0.19)
    victim = cluster.cluster.list_all_nodes()[-1]  # a worker node; the head hosts this driver
    cluster.remove_node(victim)
    shrunk = run.wait_for(lambda e: e["event"] == "resume" and e["world_size"] == 2)
    cluster.add_node()
    grown = run.wait_for(lambda e: e["event"] == "resume" and e["world_size"] == 3 and e["time"] > shrunk["time"])
    run.wait_for(lambda e: e["event"] == "checkpoint" and e["time"] > grown["time"])
    (run.run_dir / "STOP").touch()  # ends the run cleanly at its next stats line
    result = run.join()
    assert shrunk["previous_world_size"] == 3  # the world size of the checkpoint it resumed from
    assert result.metrics["world_size"] == 3
    stats = read_jsonl(run.run_dir / "stats.jsonl")
    assert {s["world_size"] for s in stats} == {2, 3}
    # the global batch stays 16 (or 15: 3 workers x 5) whatever the world size
    assert {s["global_batch"] for s in stats} <= {15, 16}
