"""The one entry point: `python launch.py --nodes 4 [--config FILE] [--data DIR] [key.sub=value ...]`.

Validates everything it can before Ray starts (a user mistake costs a second, not a minute),
starts a local N-node Ray cluster on loopback or joins one (`--address`), turns raw photos into
shards with the data pipeline when needed, runs progressive training on Ray Train, and prints
the dashboard URL, the run folder and where the final sample grid is.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cluster.local import TRAIN_SLOT, check_gpus_for_nodes, keep_ray_on_loopback
from data_pipeline import storage
from data_pipeline.errors import OneLineParser, UserError, check_port_free, run_cli
from progan.config import Config, load_config, save_config
from progan.run_log import STOP_FILE


PROJECT = Path(__file__).resolve().parent
DEFAULT_CONFIG = PROJECT / "configs" / "demo.yaml"  # and its data.path: the project's, from any folder
# How a run is executed rather than what it learns: on --resume these follow the command line and
# the given config freely; every other value stays the run's own unless --override-config.
RUNTIME_FIELDS = ("cluster.", "monitoring.", "data.path", "data.loader_workers")


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


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path]:
    overrides = list(args.overrides)
    if args.resume:
        run_dir = storage.location(args.resume)
        if not has_run_config(run_dir):
            raise UserError(f"--resume {run_dir}: not a run folder (no config.yaml)")
        cfg = resume_config(run_dir, args.config, overrides, args.override_config)
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
        if args.storage is not None:
            cfg.checkpoint.run_root = args.storage
        data_given = args.data is not None or any(o.startswith("data.path=") for o in overrides)
        if args.config is None and not data_given and not Path(cfg.data.path).is_absolute():
            cfg.data.path = str(PROJECT / cfg.data.path)  # the demo photos that ship with the project
        name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = storage.location(cfg.checkpoint.run_root) / name
        if run_folder_used(run_dir):
            raise UserError(f"run folder {run_dir} exists already: pick another --run-name or --resume it")
    c = cfg.cluster
    if args.nodes is not None:
        if args.nodes < 1:
            raise UserError(f"--nodes: got {args.nodes}, allowed: >= 1")
        c.nodes = args.nodes
    if args.address is not None:
        c.address = args.address
    if None not in (args.workers, args.max_nodes) and args.workers != args.max_nodes:
        raise UserError(f"--workers {args.workers} and --max-nodes {args.max_nodes}: both set the most "
                        f"training workers; give one of them")
    for most in (args.workers, args.max_nodes):
        if most is not None:
            c.workers = most
    if args.min_nodes is not None:
        c.min_workers = args.min_nodes
    if args.data is not None:
        cfg.data.path = args.data
    workers = c.workers or c.nodes
    if not 1 <= c.min_workers <= workers:
        raise UserError(f"--min-nodes/--max-nodes: got {c.min_workers}..{workers}, allowed: 1 <= min <= max")
    if not cfg.data.path:
        raise UserError("no data: pass --data DIR (shards or raw photos) or set data.path")
    return cfg, run_dir.resolve()


def has_run_config(run_dir: Path | storage.RemotePath) -> bool:
    try:
        return (run_dir / "config.yaml").is_file()
    except Exception as exc:  # object storage unreachable, no credentials: one line, not a traceback
        raise UserError(f"{run_dir}: cannot read it ({storage.describe_error(exc)})")


def run_folder_used(run_dir: Path | storage.RemotePath) -> bool:
    """Whether the folder (or, on object storage, the prefix) holds anything yet."""
    if isinstance(run_dir, Path):
        return run_dir.exists() and any(run_dir.iterdir())
    try:
        return run_dir.exists()
    except Exception as exc:
        raise UserError(f"run folder {run_dir}: cannot reach it ({storage.describe_error(exc)})")


@contextlib.contextmanager
def run_config_file(run_dir: Path | storage.RemotePath):
    """The run's config.yaml as a local file (a copy, for a run on object storage)."""
    if isinstance(run_dir, Path):
        yield run_dir / "config.yaml"
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "config.yaml"
        local.write_bytes((run_dir / "config.yaml").read_bytes())
        yield local


def save_run_config(cfg: Config, run_dir: Path | storage.RemotePath) -> None:
    with storage.written_at(run_dir / "config.yaml") as local:
        save_config(cfg, local)


def flat_items(tree: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            items.update(flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def resume_config(run_dir: Path, config: str | None, overrides: list[str], override: bool) -> Config:
    """The run's own config on --resume. Values that the given config or overrides change are
    listed one per line, and applied only with --override-config; the runtime fields (cluster,
    monitoring, where the data is) follow the command line either way."""
    with run_config_file(run_dir) as own_file:
        own = load_config(own_file)
        asked = load_config(config or own_file, overrides)
    before, after = flat_items(own.to_dict()), flat_items(asked.to_dict())
    changed = [key for key in after if before.get(key) != after[key] and not key.startswith(RUNTIME_FIELDS)]
    for key in changed:
        verdict = "applied" if override else "not applied (add --override-config to apply it)"
        print(f"[launch] --resume: {key} is {before.get(key)!r} in the run, {after[key]!r} asked: {verdict}",
              file=sys.stderr, flush=True)
    if override or not changed:
        return asked
    own.cluster, own.monitoring = asked.cluster, asked.monitoring
    own.data.path, own.data.loader_workers = asked.data.path, asked.data.loader_workers
    return own


def check_address(address: str) -> None:
    """A cluster to join must answer at HOST:PORT within seconds (Ray itself would wait minutes)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected 'auto' or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                         f"start one with `ray start --head`, or leave out --address for a local one")


def make_run_folder(run_dir: Path | storage.RemotePath) -> None:
    reason = storage.unwritable(str(run_dir))
    if reason:
        fix = ("check the bucket and the AWS_* credentials, or pass another --storage"
               if isinstance(run_dir, storage.RemotePath) else "set checkpoint.run_root to a writable folder")
        raise UserError(f"run folder {run_dir}: cannot write there ({reason}); {fix}")


def check_face_count(cfg: Config, shards: Path) -> None:
    """Every training worker needs faces: too few stop here, in one line, not in restarting workers."""
    from data_pipeline.manifest import require_manifest

    manifest = require_manifest(shards)
    faces = sum(shard["samples"] for shard in manifest["shards"])
    workers = cfg.cluster.workers or cfg.cluster.nodes
    if faces >= workers:
        return
    counts = manifest["counts"]
    rejected = ", ".join(f"{name} {n}" for name, n in counts.items() if name not in ("files_seen", "faces_kept") and n)
    found = f"{faces} faces in {counts['files_seen']} files ({rejected or 'no rejects'})"
    if faces == 0:
        raise UserError(f"--data {cfg.data.path}: no usable face: {found}; give photos that each show a face "
                         f"(why each file was left out: {storage.join(shards, 'rejects.jsonl')})")
    raise UserError(f"--data {cfg.data.path}: {found}, fewer than the {workers} training workers; "
                     f"add photos or pass --workers {faces}")


def check_shards(cfg: Config, path: Path | str) -> None:
    """Complete shards, at the model's resolution or above, with a face for every worker."""
    from data_pipeline.manifest import stored_resolution

    stored = stored_resolution(str(path))
    if stored < cfg.model.max_resolution:
        raise UserError(f"--data {path}: shards hold {stored}x{stored} images but model.max_resolution is "
                         f"{cfg.model.max_resolution}; make shards at >= {cfg.model.max_resolution} or lower it")
    check_face_count(cfg, path)


def check_remote_shards(cfg: Config) -> str:
    """Shards on object storage (raw photos there are not supported: prepare them first)."""
    url = cfg.data.path
    try:
        found = storage.exists(storage.join(url, "manifest.json"))
    except Exception as exc:  # no credentials, no such endpoint: one line, not a traceback
        raise UserError(f"--data {url}: cannot read it ({storage.describe_error(exc)})")
    if not found:
        raise UserError(f"--data {url}: no manifest.json there; on object storage --data must be face shards: "
                         f"python -m data_pipeline --input PHOTOS --output {url}")
    check_shards(cfg, url)
    return url


def check_data(cfg: Config) -> tuple[Path | str, bool]:
    """(path, is_shards): a shards folder or URL is used as is, a folder of photos goes through the pipeline."""
    from data_pipeline.sources import IMAGE_SUFFIXES

    if storage.is_remote(cfg.data.path):
        return check_remote_shards(cfg), True
    path = Path(cfg.data.path)
    if not path.is_dir():
        raise UserError(f"--data {path}: no such folder")
    if (path / "manifest.json").is_file():
        check_shards(cfg, path)
        return path, True
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise UserError(f"--data {path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return path, False


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Refuses a config that the run's checkpoints do not fit, before anything starts, and says
    which older checkpoint the run continues from when the newest does not load (the training
    loop makes the same choice and records it in events.jsonl)."""
    if isinstance(run_dir, storage.RemotePath):
        check_remote_resume(cfg, run_dir)
        return
    # imports torch: only a resume pays for it here
    from progan.checkpoint import load_usable_checkpoint, run_checkpoints

    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        return
    state, used, skipped = load_usable_checkpoint(checkpoints[0].parent, run_dir, cfg.to_dict()["model"])
    for reason in skipped:
        print(f"[launch] {reason}; resuming from the older {used.name} (kimg {state['images_seen'] / 1000:.3f})",
              file=sys.stderr, flush=True)


def check_remote_resume(cfg: Config, run_dir: storage.RemotePath) -> None:
    """For a run on object storage: its newest checkpoint, downloaded, must fit the config's
    networks. (An unreadable newest checkpoint is left to the training loop, which on object
    storage does not fall back to older ones.)"""
    from progan.checkpoint import FILENAME, CheckpointMismatch, load_checkpoint

    try:
        newest = max((name for name in storage.subfolders(run_dir) if name.startswith("checkpoint_")), default=None)
        if newest is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / newest / FILENAME
            local.parent.mkdir()
            local.write_bytes((run_dir / newest / FILENAME).read_bytes())
            try:
                load_checkpoint(local, cfg.to_dict()["model"])
            except CheckpointMismatch as exc:
                raise UserError(str(exc).replace(str(local.parent), str(run_dir / newest)))
            except Exception:
                pass  # unreadable here: the training loop reports it in events.jsonl
    except UserError:
        raise
    except Exception as exc:  # the bucket unreachable mid-way: one line, not a traceback
        raise UserError(f"--resume {run_dir}: cannot read its checkpoints ({storage.describe_error(exc)})")


def preload_trainer() -> None:
    """Imports the trainer (Ray Train, torch, the training loop: seconds of CPU) in a thread while
    the Ray nodes start. Starting nodes is mostly waiting for their processes to register, so the
    imports cost no time there; after the cluster is up they would delay the first step."""
    def load() -> None:
        try:
            importlib.import_module("progan.train_loop")
        except Exception:
            pass  # train() imports it again and shows what is wrong

    threading.Thread(target=load, name="preload-trainer", daemon=True).start()


@contextlib.contextmanager
def ray_cluster(cfg: Config, dashboard_port: int):
    """Starts a local cluster (nothing beyond 127.0.0.1) or joins cfg.cluster.address."""
    import ray

    if cfg.cluster.address:
        try:
            context = ray.init(address=cfg.cluster.address, logging_level="WARNING")
        except ConnectionError as exc:
            raise UserError(f"--address {cfg.cluster.address}: {str(exc).splitlines()[0]}")
        try:
            yield (f"http://{context.dashboard_url}" if context.dashboard_url else ""), False
        finally:
            ray.shutdown()
        return
    from cluster.local import LocalCluster

    with LocalCluster(cfg.cluster.nodes, dashboard_port=dashboard_port) as local:
        yield local.dashboard_url, True


def prepare_shards(cfg: Config, photos: Path, run_dir: Path) -> Path:
    """Raw photos -> shards at the model's final resolution, by the data pipeline's own command on
    this cluster. The shards go to a cache folder named by the photos' listing and the resolution
    (the pipeline leaves complete output alone, so a second run with the same photos starts at
    once); the run's `data` folder links to them."""
    import ray

    listing = sorted((str(p.relative_to(photos)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in photos.rglob("*") if p.is_file())
    key = hashlib.sha1(json.dumps([str(photos.resolve()), cfg.model.max_resolution, listing]).encode()).hexdigest()[:16]
    # on object storage beside the runs when they are there: every node reads the shards
    cache = storage.join(storage.absolute(cfg.checkpoint.run_root), ".shards",
                         f"{photos.name}-{cfg.model.max_resolution}-{key}")
    print(f"[launch] face shards from {photos} -> {cache}", flush=True)
    address = ray.get_runtime_context().gcs_address
    status = subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", str(cache),
                             "--resolution", str(cfg.model.max_resolution), "--address", address,
                             "--run-name", run_dir.name],  # its metrics carry the run's label
                            cwd=PROJECT).returncode
    if status:
        raise UserError(f"the data pipeline stopped (exit status {status}) on {photos}")
    link = run_dir / "data"
    if isinstance(run_dir, Path) and not link.is_symlink():  # relative: runs and shards move together
        link.symlink_to(os.path.relpath(cache, run_dir), target_is_directory=True)
    check_face_count(cfg, cache)
    return cache


@contextlib.contextmanager
def prometheus(cfg: Config, args: argparse.Namespace, run_dir: Path):
    """If wanted, the run's Prometheus, started before Ray: Ray's dashboard reads where it is (and
    where --grafana-url's Grafana is) once, as the head starts. Yields its folder for
    scrape_cluster(), or None. Metrics never stop a run: a Prometheus that fails costs one line."""
    from monitoring.prometheus import ray_dashboard_env, run_prometheus

    wanted = args.prometheus if args.prometheus is not None else cfg.monitoring.prometheus
    if wanted is None:  # auto: when one is installed
        wanted = bool(shutil.which("prometheus"))
    folder, url = local_folder(run_dir) / "prometheus", None
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(run_prometheus(folder, args.prometheus_port or 0)) if wanted else None
        except (OSError, RuntimeError) as exc:
            print(f"[launch] no Prometheus for this run: {exc}", flush=True)
        os.environ.update(ray_dashboard_env(url, args.grafana_url))
        if url:
            print(f"[launch] Prometheus: {url} (data in {folder})", flush=True)
        if url and cfg.cluster.address:
            print(f"[launch] a dashboard started elsewhere shows it if its head had RAY_PROMETHEUS_HOST={url}")
        if args.grafana_url:
            print(f"[launch] Grafana: {args.grafana_url.rstrip('/')}/d/progan-training (\"ProGAN training\")")
        yield folder if url else None


def train(cfg: Config, run_dir: Path, shards: Path, local_nodes: bool) -> dict:
    """Ray Train on the cluster; on our own local nodes each worker also takes the node's TRAIN_SLOT."""
    from progan.train_loop import build_trainer

    workers = cfg.cluster.workers or cfg.cluster.nodes
    trainer = build_trainer(cfg, run_dir, shards, workers, train_slot=TRAIN_SLOT if local_nodes else None)
    print(f"[launch] training: up to {workers} workers", flush=True)
    result = trainer.fit()
    return dict(result.metrics or {})


def local_folder(run_dir: Path | storage.RemotePath) -> Path:
    """The run folder for what stays on this machine (Prometheus's database): itself, or for a
    run on object storage a folder named after it in the system's temporary folder."""
    if isinstance(run_dir, Path):
        return run_dir
    folder = Path(tempfile.gettempdir()) / "progan-runs" / run_dir.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def final_grids(run_dir: Path | storage.RemotePath) -> list:
    """The run's sample grids, oldest first (their names, res<R>_kimg<K>.png, sort by progress)."""
    if isinstance(run_dir, Path):
        return sorted((run_dir / "samples").glob("*.png"), key=os.path.getmtime)
    return [run_dir / "samples" / name for name in sorted(storage.file_sizes(run_dir / "samples"))
            if name.endswith(".png")]


def check_before_start(args: argparse.Namespace) -> tuple[Config, Path, Path, bool]:
    """Everything that can be checked before Ray starts; a mistake is a UserError (one line)."""
    cfg, run_dir = resolve_config(args)
    data_path, is_shards = check_data(cfg)
    if args.resume:
        check_resume(cfg, run_dir)
    if cfg.cluster.address:
        check_address(cfg.cluster.address)
    else:
        check_port_free("--dashboard-port", args.dashboard_port)
        check_gpus_for_nodes(cfg.cluster.nodes, cfg.cluster.use_gpu)
    if args.prometheus_port is not None:
        check_port_free("--prometheus-port", args.prometheus_port)
    if args.grafana_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", args.grafana_url):
        raise UserError(f"--grafana-url {args.grafana_url}: expected a URL such as http://127.0.0.1:3000")
    make_run_folder(run_dir)
    return cfg, run_dir, data_path, is_shards


def launch(args: argparse.Namespace) -> int:
    cfg, run_dir, data_path, is_shards = check_before_start(args)
    keep_ray_on_loopback(cfg.cluster.address)  # before the preload thread or anything else imports Ray
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request belongs to the attempt it stopped
    save_run_config(cfg, run_dir)
    print(f"[launch] run folder: {run_dir}", flush=True)
    started = time.time()
    preload_trainer()
    # under `ray job submit --working-dir`, `monitoring` imported after ray.init was not found
    # (tests/test_external_cluster.py): import it before Ray connects
    import monitoring.metrics  # noqa: F401
    from monitoring.prometheus import scrape_cluster
    with (prometheus(cfg, args, run_dir) as prometheus_dir,  # before Ray: see prometheus()
          ray_cluster(cfg, args.dashboard_port) as (dashboard_url, local)):
        if prometheus_dir:  # this session's own discovery file (no public Ray API names the session folder)
            import ray
            scrape_cluster(prometheus_dir, ray._private.worker._global_node.get_session_dir_path())
        if dashboard_url:
            print(f"[launch] Ray dashboard: {dashboard_url}", flush=True)
        print(f"[launch] Ray ready after {time.time() - started:.1f} s", flush=True)
        shards = data_path if is_shards else prepare_shards(cfg, data_path, run_dir)
        metrics = train(cfg, run_dir, shards, local_nodes=local)
    return report(run_dir, metrics)


def report(run_dir: Path | storage.RemotePath, metrics: dict) -> int:
    """The run's outcome on the console: its metrics, final grid and SWD; 1 if it failed."""
    grids = final_grids(run_dir)
    print(f"[launch] done: {json.dumps({k: v for k, v in metrics.items() if k != 'sample_grid'})}")
    if grids:
        print(f"[launch] final sample grid: {grids[-1]}")
    events = [json.loads(line) for line in storage.read_text_or_empty(run_dir / "events.jsonl").splitlines()]
    swds = [e for e in events if e["event"] == "swd"]
    if swds:
        last = swds[-1]
        levels = ", ".join(f"{res}: {value:.1f}" for res, value in last["levels"].items())
        print(f"[launch] SWD x1e3 of the final EMA generator at {last['resolution']}x{last['resolution']}: "
              f"{last['avg']:.1f} (levels {levels}; {last['num_images']} images per set)")
    stops = [e for e in events if e["event"] == "stopped"]
    if stops and stops[-1].get("requested"):
        print(f"[launch] the run stopped early: {stops[-1]['reason']}; continue it with --resume {run_dir}",
              file=sys.stderr)
    elif stops:
        print(f"error: training stopped: {stops[-1]['reason']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("", lambda: launch(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
