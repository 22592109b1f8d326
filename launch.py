"""The one entry point: `python launch.py --nodes 4 [--config FILE] [--data DIR] [key.sub=value ...]`.

Makes the run's plan (every check that can run before Ray starts: progan.training.run_plan),
starts a local N-node Ray cluster on loopback or joins one (`--address`), turns raw photos into
shards with the data pipeline when needed, runs progressive training on Ray Train, and prints
the dashboard URL, the run folder and where the final sample grid is.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from base.errors import OneLineParser, UserError, run_cli
from cluster.local import TRAIN_SLOT, keep_ray_on_loopback, ray_cluster, token_authentication
from data_pipeline.shard_cache import shards_for_run
from monitoring.prometheus import prometheus_for_run, scrape_connected_cluster
from progan.training.run_plan import RunPlan, plan_run, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="launch.py", description="Progressive GAN training on a Ray cluster.")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--nodes", type=int, default=None, help="local Ray nodes to start (default: cluster.nodes)")
    p.add_argument("--address", default=None, help="join a running cluster: 'auto' or HOST:PORT")
    p.add_argument("--config", default=None, help="YAML config (default: the project's configs/demo.yaml, or the run's own on --resume)")
    p.add_argument("--data", default=None,
                   help="shards folder or URL (s3://bucket/prefix, with manifest.json) or a folder of raw photos")
    p.add_argument("--storage", default=None, metavar="URL_OR_DIR",
                   help="where run folders go (sets checkpoint.run_root): a folder, or s3://bucket/prefix so "
                        "that checkpoints, logs and samples live on object storage every node reaches")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run (folder or URL) from its latest checkpoint")
    p.add_argument("--override-config", action="store_true",
                   help="on --resume: apply config values that differ from the run's own (default: list them, keep the run's)")
    p.add_argument("--run-name", default=None, help="name of the run folder under checkpoint.run_root")
    p.add_argument("--workers", type=int, default=None,
                   help="training workers, the most an elastic run grows back to (default: one per node)")
    p.add_argument("--min-nodes", type=int, default=None,
                   help="elastic: fewest workers to keep training with (default: cluster.min_workers, 1; "
                        "equal to --workers for a fixed size)")
    p.add_argument("--max-nodes", type=int, default=None, help="the same as --workers")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--prometheus", action=argparse.BooleanOptionalAction, default=None,
                   help="a local Prometheus on 127.0.0.1 for the run (default: on when `prometheus` is on PATH)")
    p.add_argument("--prometheus-port", type=int, default=None, help="default: one Prometheus picks")
    p.add_argument("--grafana-url", default=None, metavar="URL",
                   help="a Grafana reading the run's Prometheus (e.g. monitoring/docker-compose.yml's "
                        "http://127.0.0.1:3000): Ray's dashboard embeds its charts")
    return p.parse_args(argv)


def preload_trainer() -> None:
    """Imports the trainer (Ray Train, torch, the training loop: seconds of CPU) in a thread while
    the Ray nodes start. Starting nodes is mostly waiting for their processes to register, so the
    imports cost no time there; after the cluster is up they would delay the first step."""
    def load() -> None:
        try:
            importlib.import_module("progan.training.train_loop")
        except Exception:
            pass  # train() imports it again and shows what is wrong

    threading.Thread(target=load, name="preload-trainer", daemon=True).start()


def fit_in_thread(trainer):
    """trainer.fit() in a thread of its own, so that Ctrl-C reaches this (the main) thread as a
    KeyboardInterrupt: in the main thread Ray Train installs its own SIGINT handler, which aborted
    the run amid Ray's tracebacks and told nothing of how to go on."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def interrupted_line(run_dir) -> str:
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


def train(plan: RunPlan, shards, local_nodes: bool) -> dict:
    """Ray Train on the cluster; on our own local nodes each worker also takes the node's TRAIN_SLOT."""
    from ray.train import ControllerError

    from progan.training.train_loop import build_trainer

    trainer = build_trainer(plan.cfg, plan.run_dir, shards, plan.workers,
                            train_slot=TRAIN_SLOT if local_nodes else None)
    print(f"[launch] training: up to {plan.workers} workers", flush=True)
    try:
        return dict(fit_in_thread(trainer).metrics or {})
    except ControllerError as exc:  # a fixed size the cluster did not give (build_trainer: not retried)
        c = plan.cfg.cluster
        reason = (str(exc.controller_failure).strip().splitlines() or [type(exc.controller_failure).__name__])[0]
        raise UserError(f"the cluster did not start {c.min_workers} training workers within "
                        f"cluster.worker_start_timeout_s={c.worker_start_timeout_s:g} s ({reason[:200]}); "
                        f"add nodes, or pass fewer --min-nodes/--workers") from None


def launch(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        tokens: list = []

        def before_ray(cfg, run_dir) -> None:
            """Local nodes ask for a token of this run (cluster.local.token_authentication)."""
            if not cfg.cluster.address:
                tokens.append(stack.enter_context(token_authentication(run_dir.name)))

        plan = plan_run(args, before_ray=before_ray)
        keep_ray_on_loopback(plan.cfg.cluster.address)  # before the preload thread or anything else imports Ray
        plan.begin()
        try:
            return run(args, plan, token=tokens[0] if tokens else None)
        except KeyboardInterrupt:
            print(interrupted_line(plan.run_dir), file=sys.stderr, flush=True)
            return 130
        finally:
            remove_stray_checkpoints(plan)


def remove_stray_checkpoints(plan: RunPlan) -> None:
    """Checkpoint folders beyond checkpoint.num_to_keep that an interrupted attempt left and Ray
    Train no longer knows of: removed once no trainer runs on the run folder."""
    if isinstance(plan.run_dir, Path) and any(plan.run_dir.glob("checkpoint_*")):
        from progan.training.run_checkpoints import remove_stray_checkpoints as remove

        remove(plan.run_dir, plan.cfg.checkpoint.num_to_keep)


def run(args: argparse.Namespace, plan: RunPlan, token: Path | None = None) -> int:
    cfg = plan.cfg
    if args.resume:
        remove_stray_checkpoints(plan)  # an interrupted attempt's, before Ray Train reads the folder
    started = time.time()
    preload_trainer()
    # under `ray job submit --working-dir`, `monitoring` imported after ray.init was not found
    # (tests/test_external_cluster.py): import it before Ray connects
    import monitoring.metrics  # noqa: F401
    wanted = args.prometheus if args.prometheus is not None else cfg.monitoring.prometheus
    with (prometheus_for_run(wanted, plan.local_folder() / "prometheus", args.prometheus_port, args.grafana_url,
                             joins_cluster=bool(cfg.cluster.address)) as prometheus_dir,  # before Ray starts
          ray_cluster(cfg.cluster.address, cfg.cluster.nodes, dashboard_port=args.dashboard_port) as (dashboard, local)):
        if prometheus_dir:
            scrape_connected_cluster(prometheus_dir)
        if dashboard:
            print(f"[launch] Ray dashboard: {dashboard}", flush=True)
        if token:
            print(f"[launch] this run's Ray asks for its token (a new one each run): paste the contents of {token} "
                  f"when the dashboard asks; for `ray` commands set RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}",
                  flush=True)
        print(f"[launch] Ray ready after {time.time() - started:.1f} s", flush=True)
        shards = plan.data if plan.is_shards else shards_for_run(
            plan.data, cfg.model.max_resolution, cfg.checkpoint.run_root, plan.run_dir, plan.workers, cfg.data.path)
        try:
            metrics = train(plan, shards, local_nodes=local)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the nodes' shutdown short
            raise
    return report(plan.run_dir, metrics)


def main(argv: list[str] | None = None) -> int:
    return run_cli("", lambda: launch(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
