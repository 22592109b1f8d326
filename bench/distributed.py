"""Distribution overhead: training images/s with 1 worker vs 2 workers at the same global batch,
and the share of step time spent waiting for data. Prints one JSON line.

Both runs use the same local 2-node cluster, shards and config (start at --resolution, no growth);
throughput and data-wait share are the medians of the run's stats.jsonl lines after the first
few (warm-up). On this 2-core machine two workers share the two cores, so the figure shows
DDP's cost (all-reduces, process overhead) rather than a speed-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from progan.model.config import load_config


def run_once(cfg, shards: str, workers: int, root: Path) -> dict:
    from cluster.local import TRAIN_SLOT
    from progan.training.train_loop import build_trainer

    run_dir = root / f"workers{workers}"
    run_dir.mkdir()
    cfg.cluster.min_workers = workers  # a fixed size: each figure at exactly this many workers
    started = time.time()
    build_trainer(cfg, run_dir, shards, workers=workers, train_slot=TRAIN_SLOT).fit()
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()][3:]
    return {"img_per_s": statistics.median(s["img_per_s"] for s in stats),
            "data_wait_share": statistics.median(s["data_wait_share"] for s in stats),
            "wall_s": round(time.time() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch", type=int, default=32, help="global minibatch")
    p.add_argument("--kimg", type=float, default=3.0, help="images per run, in thousands")
    p.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    args = p.parse_args()
    cfg = load_config(args.config, [
        f"model.max_resolution={args.resolution}", f"schedule.start_resolution={args.resolution}",
        f"schedule.total_kimg={args.kimg}", f"schedule.minibatch_default={args.batch}", "schedule.minibatch={}",
        "checkpoint.every_kimg=1000", "monitoring.log_every_steps=5"])
    from cluster.local import LocalCluster

    with LocalCluster(2, include_dashboard=False), tempfile.TemporaryDirectory() as root:
        one = run_once(cfg, args.shards, 1, Path(root))
        two = run_once(cfg, args.shards, 2, Path(root))
    print(json.dumps({"resolution": args.resolution, "global_batch": args.batch,
                      "img_per_s_1_worker": round(one["img_per_s"], 1), "img_per_s_2_workers": round(two["img_per_s"], 1),
                      "ratio_2_over_1": round(two["img_per_s"] / one["img_per_s"], 3),
                      "data_wait_share_1_worker": round(one["data_wait_share"], 4),
                      "data_wait_share_2_workers": round(two["data_wait_share"], 4)}))


if __name__ == "__main__":
    main()
