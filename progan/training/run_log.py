"""Rank 0's files in the run folder: stats as JSON lines, events, and the progress line a person
reads; and the one policy read back from the events: the same error in two attempts in a row."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from base import storage

STOP_FILE = "STOP"  # `touch RUN_DIR/STOP`: the run saves a checkpoint and ends cleanly


def format_duration(seconds: float) -> str:
    """`1h05m`, `4m10s`, `12s`: the ETA in the progress line."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(s: dict, total_kimg: float) -> str:
    """One line per stats interval: where the run is (phase, kimg of the total, percent), when it
    ends at the current speed (later phases are slower: the ETA grows as the images grow), and
    the losses."""
    done = s["kimg"] / total_kimg if total_kimg > 0 else 1.0
    left = max(total_kimg - s["kimg"], 0.0) * 1000 / s["img_per_s"] if s["img_per_s"] > 0 else float("inf")
    eta = format_duration(left) if left != float("inf") else "?"
    return (f"[progan] {s['resolution']}x{s['resolution']} {s['phase']} alpha {s['alpha']:.2f} | "
            f"kimg {s['kimg']:.2f}/{total_kimg:g} ({done:.0%}) ETA {eta} | {s['img_per_s']:.1f} img/s | "
            f"loss_d {s['loss_d']:+.4f} loss_g {s['loss_g']:+.4f} gp {s['grad_penalty']:.4f}")


class RunLog:
    """In a run folder on object storage (no append there: each write puts the whole file again)
    stats lines wait for the next event, at the latest the next checkpoint's; events, which the
    repeated-error policy reads back after a failure, are written at once."""

    def __init__(self, run_dir: Path | storage.RemotePath, enabled: bool, total_kimg: float = 0.0):
        self.run_dir, self.enabled, self.total_kimg = run_dir, enabled, total_kimg
        self.pending: dict[str, str] = {}

    def append(self, name: str, record: dict) -> None:
        if self.enabled:
            self.pending[name] = self.pending.get(name, "") + json.dumps(record) + "\n"
            if isinstance(self.run_dir, Path) or name == "events.jsonl":
                self.flush()

    def flush(self) -> None:
        for name, text in self.pending.items():  # fresh_line: never glued onto a line a kill tore
            storage.append_text(self.run_dir / name, text, fresh_line=True)
        self.pending.clear()

    def event(self, kind: str, **fields) -> None:
        self.append("events.jsonl", {"time": time.time(), "event": kind, **fields})

    def stats(self, record: dict) -> None:
        self.append("stats.jsonl", record)
        if self.enabled:
            print(progress_line(record, self.total_kimg), flush=True)


def error_signature(exc: BaseException) -> str:
    """An error's type and first line, numbers masked: the same fault at another step is the same error."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {re.sub(r'[0-9]+', '#', first)[:300]}"


def repeated_error(events_file: Path | storage.RemotePath) -> str | None:
    """The error that the last two attempts (the runs of the workers between two `start`/`resume`
    events) both failed with, if any."""
    events = storage.read_jsonl(events_file)  # a torn last line (a kill, a full disk) is skipped
    attempts: list[set[str]] = []
    for event in events:
        if event["event"] in ("start", "resume"):
            attempts.append(set())
        elif event["event"] == "worker_error" and attempts:
            attempts[-1].add(event["signature"])
    if len(attempts) < 2:
        return None
    same = attempts[-1] & attempts[-2]
    return min(same) if same else None
