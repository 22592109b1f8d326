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
import signal
import sys
import threading
import time
from pathlib import Path

from base.errors import OneLineParser, run_cli
from cluster.local import TRAIN_SLOT, keep_ray_on_loopback, ray_cluster, token_authentication, token_hint
from data_pipeline.shard_cache import shards_for_run
from monitoring.prometheus import prometheus_for_run, scrape_connected_cluster
from progan.training.fit import fit_run, interrupted_line
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
            plan.remove_stray_checkpoints()


def run(args: argparse.Namespace, plan: RunPlan, token: Path | None = None) -> int:
    cfg = plan.cfg
    if args.resume:
        plan.remove_stray_checkpoints()  # an interrupted attempt's, before Ray Train reads the folder
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
            print(f"[launch] {token_hint(token)}", flush=True)
        print(f"[launch] Ray ready after {time.time() - started:.1f} s", flush=True)
        shards = plan.data if plan.is_shards else shards_for_run(
            plan.data, cfg.model.max_resolution, cfg.checkpoint.run_root, plan.run_dir, plan.workers, cfg.data.path)
        try:
            metrics = fit_run(plan, shards, train_slot=TRAIN_SLOT if local else None)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the nodes' shutdown short
            raise
    return report(plan.run_dir, metrics)


def main(argv: list[str] | None = None) -> int:
    return run_cli("", lambda: launch(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
