"""Fault tolerance on a real 3-node local Ray cluster: a worker killed with SIGKILL, a node removed
and added back, a NaN in the loss. Training runs in a thread; the test acts on the cluster."""
import os
import signal

import pytest

from progan.training.background_run import BackgroundRun
from cluster.local import TRAIN_SLOT
from progan.training.train_loop import build_trainer

from conftest import read_jsonl, tiny_config
from faults import FaultInjection

CLUSTER_NODES = 3


def start_run(cfg, run_dir, shards, workers, **loop_config) -> BackgroundRun:
    run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, run_dir, shards, workers=workers, train_slot=TRAIN_SLOT,
                            extra_loop_config=loop_config)
    return BackgroundRun(trainer, run_dir)


def test_killed_worker_restarts_from_checkpoint_and_completes(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=3", "cluster.min_workers=1")
    run = start_run(cfg, tmp_path / "run", shards, workers=3)
    run.wait_for(lambda e: e["event"] == "checkpoint" and e["kimg"] >= 0.19)  # mid fade-in to 8x8
    pids = run.worker_pids()
    assert len(pids) == 3
    os.kill(pids[-1], signal.SIGKILL)
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
    run = start_run(cfg, tmp_path / "run", shards, workers=2, callback=FaultInjection(nan_at_kimg=0.2))
    result = run.join()
    events = run.events()
    rollbacks = [e for e in events if e["event"] == "nan_rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["checkpoint_kimg"] == pytest.approx(0.192)
    assert [e["kimg"] for e in events if e["event"] == "resume"] == [pytest.approx(0.192)]
    assert result.metrics["images_seen"] == 640


def test_repeated_nan_stops_the_run_with_a_clear_event(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=5", "checkpoint.max_nan_rollbacks=2")
    run = start_run(cfg, tmp_path / "run", shards, workers=2, callback=FaultInjection(nan_at_kimg=0.2, nan_every_attempt=True))
    result = run.join()
    events = run.events()
    assert len([e for e in events if e["event"] == "nan_rollback"]) == 2
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and "2 rollbacks to the checkpoint at kimg 0.192" in stopped[0]["reason"]
    assert result.metrics["images_seen"] == 192
    assert result.checkpoint.get_metadata()["nan_rollbacks"] == 2  # the count lives with the checkpoint


def test_removed_node_trains_on_and_an_added_node_is_used(cluster, shards, tmp_path):
    cfg = tiny_config("cluster.max_failures=5", "cluster.min_workers=1", "schedule.total_kimg=100",
                      "checkpoint.every_kimg=0.192", "cluster.worker_start_timeout_s=15")
    run = start_run(cfg, tmp_path / "run", shards, workers=3)
    run.wait_for(lambda e: e["event"] == "checkpoint" and e["kimg"] >= 0.19)
    victim = cluster.cluster.list_all_nodes()[-1]  # a worker node; the head hosts this driver
    cluster.remove_node(victim)
    shrunk = run.wait_for(lambda e: e["event"] == "resume" and e["world_size"] == 2)
    run.wait_for(lambda s: s["world_size"] == 2, name="stats.jsonl")  # it trained on 2 before the node returns
    cluster.add_node()
    grown = run.wait_for(lambda e: e["event"] == "resume" and e["world_size"] == 3 and e["time"] > shrunk["time"])
    run.wait_for(lambda e: e["event"] == "checkpoint" and e["time"] > grown["time"])
    run.stop()  # a STOP file: the run ends cleanly at its next stats line
    result = run.join()
    assert shrunk["previous_world_size"] == 3  # the world size of the checkpoint it resumed from
    assert result.metrics["world_size"] == 3
    stats = read_jsonl(run.run_dir / "stats.jsonl")
    assert {s["world_size"] for s in stats} == {2, 3}
    # the global batch stays 16 (or 15: 3 workers x 5) whatever the world size
    assert {s["global_batch"] for s in stats} <= {15, 16}


def test_the_same_error_twice_stops_the_run_with_that_error(cluster, shards, tmp_path):
    """A worker that fails on the same error after a restart would fail on every restart: the run
    stops after the first repeat, not after all of cluster.max_failures."""
    cfg = tiny_config("cluster.max_failures=5")
    run = start_run(cfg, tmp_path / "run", shards, workers=2, callback=FaultInjection(error_after_kimg=0.09))
    run.join()
    events = run.events()
    assert [e["event"] for e in events if e["event"] in ("start", "resume")] == ["start", "resume"]
    assert {e["signature"] for e in events if e["event"] == "worker_error"} == {
        "ValueError: test hook: the same error on every attempt, at kimg #.#"}
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and not stopped[0].get("requested")
    assert stopped[0]["reason"].startswith("the same error in two attempts in a row: ValueError: test hook")
