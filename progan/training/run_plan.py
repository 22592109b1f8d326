"""One plan of a run, made before Ray starts: its config, its data, its run folder, where it
resumes from and where the cluster is. Every mistake found here is a UserError (one line), so a
user mistake costs a second, not a minute; nothing here imports torch or Ray Train."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from base import storage
from base.errors import UserError
from cluster.local import check_cluster
from data_pipeline.manifest import check_training_data, old_shards_note
from monitoring.prometheus import check_run_options
from progan.model.config import Config, load_config, save_config
from progan.training.run_log import STOP_FILE

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = PROJECT / "configs" / "demo.yaml"  # and its data.path: the project's, from any folder
# How a run is executed rather than what it learns: on --resume these follow the command line and
# the given config freely; every other value stays the run's own unless --override-config.
RUNTIME_FIELDS = ("cluster.", "monitoring.", "data.path", "data.loader_workers")


@dataclass
class RunPlan:
    cfg: Config
    run_dir: Path | storage.RemotePath
    data: Path | str          # face shards (folder or URL), or a folder of photos when not is_shards
    is_shards: bool

    @property
    def workers(self) -> int:
        return self.cfg.cluster.workers or self.cfg.cluster.nodes

    def begin(self) -> None:
        """The run folder for this attempt: a stop request belongs to the attempt it stopped, and
        the config the run trains with is written beside its checkpoints."""
        clear_stop_request(self.run_dir / STOP_FILE)
        with storage.written_at(self.run_dir / "config.yaml") as local:
            save_config(self.cfg, local)
        print(f"[launch] run folder: {self.run_dir}", flush=True)

    def remove_stray_checkpoints(self) -> None:
        """Checkpoint folders beyond checkpoint.num_to_keep that an interrupted attempt left and Ray
        Train no longer knows of: removed when no trainer runs on the run folder."""
        if isinstance(self.run_dir, Path) and any(self.run_dir.glob("checkpoint_*")):
            from progan.training.run_checkpoints import remove_stray_checkpoints  # imports Ray Train

            remove_stray_checkpoints(self.run_dir, self.cfg.checkpoint.num_to_keep)

    def local_folder(self) -> Path:
        """The run folder for what stays on this machine (Prometheus's database): itself, or for a
        run on object storage a folder named after it in the system's temporary folder."""
        if isinstance(self.run_dir, Path):
            return self.run_dir
        folder = Path(tempfile.gettempdir()) / "progan-runs" / self.run_dir.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def clear_stop_request(stop: Path | storage.RemotePath) -> None:
    """Removes RUN/STOP before an attempt. Made with `mkdir` instead of `touch` it is an empty folder,
    removed as well; a folder with files in it (or a pipe, a socket) is not ours to delete: one line."""
    if isinstance(stop, storage.RemotePath) or stop.is_symlink() or not stop.exists():
        stop.unlink(missing_ok=True)
        return
    try:
        if stop.is_file():
            stop.unlink()
        elif stop.is_dir():
            stop.rmdir()  # an OSError when it holds anything
        else:
            raise UserError(f"{stop} is neither a file nor a folder; remove it, then run again")
    except OSError as exc:
        what = "a folder that is not empty" if stop.is_dir() else "a stop request"
        raise UserError(f"{stop}: cannot remove {what} ({exc.strerror or exc}); "
                        f"move it away, then run again") from None


def plan_run(args: argparse.Namespace, before_ray=None) -> RunPlan:
    """launch.py's arguments -> the checked plan (every check that can run before Ray starts).
    `before_ray(cfg, run_dir)`: called once the config is known, before anything here imports Ray
    (the GPU check does), for what must be set before Ray is first imported."""
    cfg, run_dir = resolve_config(args)
    if before_ray is not None:
        before_ray(cfg, run_dir)
    data, manifest = check_training_data(cfg.data.path, cfg.model.max_resolution, cfg.cluster.workers or cfg.cluster.nodes)
    plan = RunPlan(cfg, run_dir, data, is_shards=manifest is not None)
    if manifest is not None and (note := old_shards_note(data, manifest)):
        print(f"[launch] {note}", file=sys.stderr, flush=True)
    if args.resume:
        from progan.model.checkpoint import check_resume  # imports torch: only a resume pays for it here

        for note in check_resume(run_dir, cfg.to_dict()["model"]):
            print(f"[launch] {note}", file=sys.stderr, flush=True)
    check_cluster(cfg.cluster.address, cfg.cluster.nodes, cfg.cluster.use_gpu, args.dashboard_port)
    check_run_options(args.prometheus_port, args.grafana_url)
    make_run_folder(run_dir)
    return plan


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | storage.RemotePath]:
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
    if not c.address and c.min_workers > c.nodes:
        # each local node carries one training slot (cluster.local.TRAIN_SLOT): Ray Train would
        # wait for the missing workers and retry without end
        raise UserError(f"--min-nodes {c.min_workers}: {c.nodes} local node{'s' * (c.nodes > 1)} run{'s' * (c.nodes == 1)} at most "
                        f"{c.nodes} training worker{'s' * (c.nodes > 1)} (one each); pass --nodes {c.min_workers} "
                        f"or --min-nodes {c.nodes}")
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


def flat_items(tree: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            items.update(flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def resume_config(run_dir: Path | storage.RemotePath, config: str | None, overrides: list[str],
                  override: bool) -> Config:
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


def make_run_folder(run_dir: Path | storage.RemotePath) -> None:
    reason = storage.unwritable(str(run_dir))
    if reason:
        fix = ("check the bucket and the AWS_* credentials, or pass another --storage"
               if isinstance(run_dir, storage.RemotePath) else "set checkpoint.run_root to a writable folder")
        raise UserError(f"run folder {run_dir}: cannot write there ({reason}); {fix}")


def final_grids(run_dir: Path | storage.RemotePath) -> list:
    """The run's sample grids, oldest first (their names, res<R>_kimg<K>.png, sort by progress)."""
    if isinstance(run_dir, Path):
        return sorted((run_dir / "samples").glob("*.png"), key=os.path.getmtime)
    return [run_dir / "samples" / name for name in sorted(storage.file_sizes(run_dir / "samples"))
            if name.endswith(".png")]


def report(run_dir: Path | storage.RemotePath, metrics: dict) -> int:
    """The run's outcome on the console: its metrics, final grid and SWD; 1 if it failed."""
    grids = final_grids(run_dir)
    print(f"[launch] done: {json.dumps({k: v for k, v in metrics.items() if k != 'sample_grid'})}")
    if grids:
        print(f"[launch] final sample grid: {grids[-1]}")
    events = storage.read_jsonl(run_dir / "events.jsonl")
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
