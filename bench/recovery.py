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
import time
from pathlib import Path

from progan.training.background_run import BackgroundRun
from progan.model.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    args = p.parse_args()
    from cluster.local import LocalCluster
    from cluster.local import TRAIN_SLOT
    from progan.training.train_loop import build_trainer

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
