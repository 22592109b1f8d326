"""Seconds from `python launch.py --nodes N` to the first training step, and what took them.

Runs the real command in a subprocess on shards (so the data pipeline is not timed) and watches
the run folder: the first line of stats.jsonl is written right after the first step
(monitoring.log_every_steps=1). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def first_line_time(path: Path, proc: subprocess.Popen, timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().strip():
            return time.time()
        time.sleep(0.1)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--data", required=True, help="a shards folder")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "bench"
        started = time.time()
        proc = subprocess.Popen([sys.executable, "launch.py", "--nodes", str(args.nodes), "--config", args.config,
                                 "--data", args.data, "--run-name", "bench", f"checkpoint.run_root={root}",
                                 "monitoring.log_every_steps=1", "schedule.total_kimg=100"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ray_ready = None
        first_step = first_line_time(run_dir / "stats.jsonl", proc, args.timeout)
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
        for line in output.splitlines():
            if "Ray ready after" in line:
                ray_ready = float(line.split("after")[1].split()[0])
        events = run_dir / "events.jsonl"
        start_event = json.loads(events.read_text().splitlines()[0])["time"] if events.exists() else None
    print(json.dumps({
        "nodes": args.nodes,
        "launch_to_first_step_s": round(first_step - started, 1) if first_step else None,
        "cluster_ready_s": ray_ready,
        "launch_to_workers_running_s": round(start_event - started, 1) if start_event else None,
    }))


if __name__ == "__main__":
    main()
