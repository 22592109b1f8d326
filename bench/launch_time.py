"""Seconds from `python launch.py --nodes N` to the first training step, and what took them.

Runs the real command in a subprocess on shards (so the data pipeline is not timed) and watches
the run folder: the first line of stats.jsonl is written right after the first step
(monitoring.log_every_steps=1). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from base import storage

REPO = Path(__file__).resolve().parents[1]


def first_line_time(path: Path, proc: subprocess.Popen, timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().strip():
            return time.time()
        time.sleep(0.1)
    return None


def watch_output(proc: subprocess.Popen, seen: dict) -> None:
    """When each of the launcher's own lines appeared (its stdout, read as it comes)."""
    for line in proc.stdout:
        for key, marker in MARKERS.items():
            if line.startswith(marker) and key not in seen:
                seen[key] = time.time()
        if "Ray ready after" in line:
            seen["ray_ready_reported_s"] = float(line.split("after")[1].split()[0])


# launch.py's lines, in the order they come
MARKERS = {"config_checked": "[launch] run folder:", "ray_ready": "[launch] Ray ready",
           "prometheus_up": "[launch] Prometheus:", "fit_called": "[launch] training:"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--data", required=True, help="a shards folder")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    args = p.parse_args()
    seen: dict = {}
    with tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "bench"
        started = time.time()
        proc = subprocess.Popen([sys.executable, "launch.py", "--nodes", str(args.nodes), "--config", args.config,
                                 "--data", args.data, "--run-name", "bench", f"checkpoint.run_root={root}",
                                 "monitoring.log_every_steps=1", "schedule.total_kimg=100"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=watch_output, args=(proc, seen), daemon=True)
        reader.start()
        first_step = first_line_time(run_dir / "stats.jsonl", proc, args.timeout)
        for event in storage.read_jsonl(run_dir / "events.jsonl"):  # proc still runs: its last line may be torn
            seen.setdefault(f"{event['event']}_event", event["time"])
        proc.terminate()
        proc.wait(timeout=120)
        reader.join(timeout=10)
    # seconds after `python launch.py` started, for each step of the way
    steps = {"config_checked": "config_checked", "ray_ready": "ray_ready", "prometheus_up": "prometheus_up",
             "fit_called": "fit_called", "loop_started": "start_event", "first_phase_ready": "phase_event"}
    print(json.dumps({
        "nodes": args.nodes,
        "launch_to_first_step_s": round(first_step - started, 1) if first_step else None,
        "cluster_ready_s": seen.get("ray_ready_reported_s"),
        **{f"{name}_s": round(seen[key] - started, 1) for name, key in steps.items() if key in seen},
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
