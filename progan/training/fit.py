"""Training a planned run on the cluster this process is connected to: Ray Train's fit in a thread
of its own, so that Ctrl-C reaches the launcher as a KeyboardInterrupt (in the main thread Ray
Train installs its own SIGINT handler, which aborted the run amid Ray's tracebacks and told
nothing of how to go on); a fixed size the cluster did not give, in one line; and the one line
Ctrl-C prints."""
from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

from base import storage
from base.errors import UserError
from progan.training.run_plan import RunPlan


def fit_run(plan: RunPlan, shards: Path | str, train_slot: str | None) -> dict:
    """Ray Train on the cluster (`train_slot`: the resource each worker takes on our own local
    nodes); the final metrics. UserError, one line, when a fixed size never started."""
    from ray.train import ControllerError

    from progan.training.train_loop import build_trainer

    trainer = build_trainer(plan.cfg, plan.run_dir, shards, plan.workers, train_slot=train_slot)
    print(f"[launch] training: up to {plan.workers} workers", flush=True)
    if note := capacity_note(plan, alive_node_resources(), trainer.scaling_config.resources_per_worker):
        print(f"[launch] {note}", flush=True)
    try:
        return dict(fit_in_thread(trainer).metrics or {})
    except ControllerError as exc:  # a fixed size the cluster did not give (build_trainer: not retried)
        c = plan.cfg.cluster
        reason = (str(exc.controller_failure).strip().splitlines() or [type(exc.controller_failure).__name__])[0]
        raise UserError(f"the cluster did not start {c.min_workers} training workers within "
                        f"cluster.worker_start_timeout_s={c.worker_start_timeout_s:g} s ({reason[:200]}); "
                        f"add nodes, or pass fewer --min-nodes/--workers") from None


def alive_node_resources() -> list[dict[str, float]]:
    """Each alive node's total resources, as Ray knows them now."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers, each taking `per_worker`, the nodes' totals hold (a worker on one node)."""
    needs = {name: need for name, need in per_worker.items() if need > 0}
    return sum(min(int(node.get(name, 0.0) // need) for name, need in needs.items()) for node in nodes) if needs else 0


def capacity_note(plan: RunPlan, nodes: list[dict[str, float]], per_worker: dict[str, float]) -> str | None:
    """One line when the cluster's nodes cannot hold the run's fewest workers yet (a cluster
    started elsewhere, launch.py --address): what is missing, and what the run does meanwhile
    (Ray Train waits for nodes; nothing else would say so). None when they fit."""
    c = plan.cfg.cluster
    fits = workers_that_fit(nodes, per_worker)
    if fits >= c.min_workers:
        return None
    each = ", ".join(f"{need:g} {name}" for name, need in sorted(per_worker.items()) if need > 0)
    then = (f"the run ends if they do not start within cluster.worker_start_timeout_s={c.worker_start_timeout_s:g} s"
            if c.min_workers >= plan.workers else
            "the run waits until nodes join (an autoscaler's, or `ray start --address ...`); Ctrl-C stops it")
    return (f"waiting for the cluster: its {len(nodes)} node{'s' * (len(nodes) != 1)} hold {fits} of the "
            f"{c.min_workers} training workers the run needs at least (each takes {each}); {then}")


def fit_in_thread(trainer):
    """trainer.fit() in a thread of its own; this thread waits for it, so Ctrl-C lands here."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def interrupted_line(run_dir: Path | storage.RemotePath) -> str:
    """What Ctrl-C prints, in one line: where the run stopped (its latest checkpoint, the one
    --resume continues from) and the command that continues it."""
    from progan.model.checkpoint import CheckpointError, latest_checkpoint

    program = sys.argv[0] if Path(sys.argv[0]).name == "launch.py" else "launch.py"
    command = f"python {shlex.quote(program)} --resume {shlex.quote(str(run_dir))}"
    if isinstance(run_dir, Path):
        try:
            state, folder, _ = latest_checkpoint(run_dir)
        except CheckpointError:
            return f"interrupted before the run's first checkpoint; start it again with: {command}"
        return (f"interrupted: the run stopped at its checkpoint at kimg {state['images_seen'] / 1000:.3f} "
                f"({folder.name}); continue it with: {command}")
    return f"interrupted: continue the run from its latest checkpoint with: {command}"
