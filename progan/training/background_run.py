"""A Ray Train run (`trainer.fit()`) in a thread of this process, watched through its run folder:
the harness of the tests and benchmarks that act on a cluster while it trains.

    run = BackgroundRun(build_trainer(cfg, run_dir, shards, workers=2), run_dir)
    run.wait_for(lambda e: e["event"] == "checkpoint")     # a line of events.jsonl
    ... kill a worker, remove a node, query Prometheus ...
    run.stop(); result = run.join()                          # a checkpoint, then a clean end
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from progan.training.run_log import STOP_FILE


class BackgroundRun:
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
        """The complete lines of a JSON-lines file of the run (one being written is left out)."""
        path = self.run_dir / name
        if not path.exists():
            return []
        text = path.read_text()
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]

    def events(self) -> list[dict]:
        return self.lines("events.jsonl")

    def stats(self) -> list[dict]:
        return self.lines("stats.jsonl")

    def alive(self) -> bool:
        return self.thread.is_alive()

    def wait_for(self, predicate, name: str = "events.jsonl", timeout: float = 240) -> dict:
        """The first line of `name` that `predicate` accepts, as soon as there is one."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for record in self.lines(name):
                if predicate(record):
                    return record
            if not self.alive():
                raise RuntimeError(f"the run ended early: {self.error!r}")
            time.sleep(0.1)
        raise TimeoutError(f"nothing matched in {name} within {timeout} s; events: {self.events()[-5:]}")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in [e for e in self.events() if e["event"] == "workers"][-1]["workers"]]

    def stop(self) -> None:
        """Asks the run to save a checkpoint and end (its STOP file)."""
        (self.run_dir / STOP_FILE).touch()

    def join(self, timeout: float = 400):
        """The run's result once it has ended; raises its error, or TimeoutError."""
        self.thread.join(timeout)
        if self.alive():
            raise TimeoutError(f"the run did not finish within {timeout} s")
        if self.error:
            raise self.error
        return self.result
