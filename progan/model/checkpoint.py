"""The full training state <-> one file, written atomically and checked on load.

A checkpoint is a plain dict (nanoGPT style): the model arguments, the three networks, both
optimisers, progress counters, RNG states and the resolved config. `torch.load(weights_only=True)`
reads it, so a checkpoint file cannot run code.
"""
from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path

import torch

from base import storage
from base.errors import UserError
from base.storage import atomic_path

FORMAT_VERSION = 1
FILENAME = "checkpoint.pt"
# Fields that must match for a checkpoint to continue under a config: they fix the networks' shapes.
SHAPE_FIELDS = ("max_resolution", "latent_size", "fmap_base", "fmap_max", "num_channels", "mbstd_group_size")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; str() is one line."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint whose networks have other shapes than the config's."""


def save_checkpoint(state: dict, directory: str | Path) -> Path:
    """Writes `state` to directory/checkpoint.pt via a temporary file and a rename, so a process
    killed mid-write leaves either the old file or the new one, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / FILENAME
    with atomic_path(final) as temporary:
        torch.save({"format_version": FORMAT_VERSION, **state}, temporary)
    return final


def load_checkpoint(path: str | Path, model_config: dict | None = None) -> dict:
    """Loads and checks a checkpoint file (or a folder holding one). With `model_config`, refuses a
    checkpoint whose networks have other shapes, naming the field."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or unsafe content
        reason = textwrap.shorten((str(exc).strip().splitlines() or [""])[0], 160, placeholder=" ...")
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {reason})")
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version!r}, this code reads {FORMAT_VERSION}")
    if model_config is not None:
        saved = state["config"]["model"]
        for name in SHAPE_FIELDS:
            if saved[name] != model_config[name]:
                raise CheckpointMismatch(f"checkpoint {path}: model.{name} is {saved[name]!r} there but "
                                      f"{model_config[name]!r} in the config; they must match to continue")
    return state


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run folder, newest first (Ray names the folders by time)."""
    return sorted(Path(run_dir).glob("checkpoint_*/" + FILENAME), reverse=True)


def load_usable_checkpoint(preferred: str | Path, run_dir: str | Path,
                           model_config: dict | None = None) -> tuple[dict, Path, list[str]]:
    """The state of `preferred` (a checkpoint folder), or, when that file does not load (cut short
    by a crash, damaged on disk), of the newest older checkpoint of the run that does: (state, the
    folder used, one line per checkpoint passed over). A checkpoint of other network shapes is
    refused, not passed over; so is a run without any readable checkpoint."""
    preferred = Path(preferred)
    older = [path.parent for path in run_checkpoints(run_dir) if path.parent.name < preferred.name]
    skipped = []
    for folder in [preferred, *older]:
        try:
            return load_checkpoint(folder, model_config), folder, skipped
        except CheckpointMismatch:
            raise
        except CheckpointError as exc:
            skipped.append(str(exc))
    raise CheckpointError(f"no checkpoint of {run_dir} loads; the newest: {skipped[0]}")


def latest_checkpoint(run_dir: str | Path, model_config: dict | None = None) -> tuple[dict, Path, list[str]]:
    """The run's latest checkpoint, the one definition that resume (the training loop, check_resume)
    and the tools (generate, evaluate, export, serve: progan.model.trained) share: the newest
    checkpoint_* folder of the run whose checkpoint.pt loads completely. A folder whose file is
    missing or cut short (a run killed while Ray copied it in) is passed over for the next older
    one. Returns (state, the folder, one line per newer checkpoint passed over); CheckpointError
    when the run has none that loads."""
    found = run_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no {FILENAME} there, nor in checkpoint_* folders below it")
    return load_usable_checkpoint(found[0].parent, run_dir, model_config)


def load_resolved(path: str | Path, model_config: dict | None = None) -> tuple[dict, Path]:
    """A run folder (its latest checkpoint: latest_checkpoint), a `checkpoint_*` folder or a
    checkpoint file -> (its state, the file)."""
    path = Path(path)
    if path.is_dir() and not (path / FILENAME).exists():
        state, folder, _ = latest_checkpoint(path, model_config)
        return state, folder / FILENAME
    file = path / FILENAME if path.is_dir() else path
    return load_checkpoint(file, model_config), file


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint: latest_checkpoint), a `checkpoint_*` folder or a
    checkpoint file -> the file."""
    return load_resolved(path)[1]


def check_resume(run_dir: Path | storage.RemotePath, model_config: dict) -> list[str]:
    """Before a run is resumed: refuses (CheckpointMismatch, UserError) a config that the run's
    checkpoints do not fit, and returns one line per newest checkpoint that does not load, naming
    the older one the run continues from (the training loop makes the same choice and records it
    in events.jsonl)."""
    if isinstance(run_dir, storage.RemotePath):
        check_remote_resume(run_dir, model_config)
        return []
    if not run_checkpoints(run_dir):
        return []
    state, used, skipped = latest_checkpoint(run_dir, model_config)
    return [f"{reason}; resuming from the older {used.name} (kimg {state['images_seen'] / 1000:.3f})"
            for reason in skipped]


def check_remote_resume(run_dir: storage.RemotePath, model_config: dict) -> None:
    """For a run on object storage: its newest checkpoint, downloaded, must fit the config's
    networks. (An unreadable newest checkpoint is left to the training loop, which on object
    storage does not fall back to older ones.)"""
    try:
        newest = max((name for name in storage.subfolders(run_dir) if name.startswith("checkpoint_")), default=None)
        if newest is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / newest / FILENAME
            local.parent.mkdir()
            local.write_bytes((run_dir / newest / FILENAME).read_bytes())
            try:
                load_checkpoint(local, model_config)
            except CheckpointMismatch as exc:
                raise UserError(str(exc).replace(str(local.parent), str(run_dir / newest)))
            except Exception:
                pass  # unreadable here: the training loop reports it in events.jsonl
    except UserError:
        raise
    except Exception as exc:  # the bucket unreachable mid-way: one line, not a traceback
        raise UserError(f"--resume {run_dir}: cannot read its checkpoints ({storage.describe_error(exc)})")
