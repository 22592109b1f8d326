"""Raw photos -> face shards for a training run, made once and kept in a cache folder beside the
runs, by the data pipeline's own command on the run's Ray cluster."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from base import storage
from base.errors import UserError
from data_pipeline.manifest import check_face_count

PROJECT = Path(__file__).resolve().parents[1]


def shards_for_run(photos: Path, resolution: int, run_root: str, run_dir: Path | storage.RemotePath,
                   workers: int, label: str) -> str:
    """The shards of `photos` at `resolution`, made on the running Ray cluster. They go to a cache
    folder named by the photos' listing and the resolution (the pipeline leaves complete output
    alone, so a second run with the same photos starts at once); the run's `data` folder links to
    them. `workers` and `label` (--data's value) are for the face-count check."""
    import ray

    listing = sorted((str(p.relative_to(photos)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in photos.rglob("*") if p.is_file())
    # "levels": shards with the resolution pyramid; a cache made before it is not reused (nor removed)
    key = hashlib.sha1(json.dumps([str(photos.resolve()), resolution, "levels", listing]).encode()).hexdigest()[:16]
    # on object storage beside the runs when they are there: every node reads the shards
    cache = storage.join(storage.absolute(run_root), ".shards", f"{photos.name}-{resolution}-{key}")
    print(f"[launch] face shards from {photos} -> {cache}", flush=True)
    address = ray.get_runtime_context().gcs_address
    status = subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", str(cache),
                             "--resolution", str(resolution), "--address", address,
                             "--run-name", run_dir.name],  # its metrics carry the run's label
                            cwd=PROJECT).returncode
    if status:
        raise UserError(f"the data pipeline stopped (exit status {status}) on {photos}")
    link = run_dir / "data"
    if isinstance(run_dir, Path) and not link.is_symlink():  # relative: runs and shards move together
        link.symlink_to(os.path.relpath(cache, run_dir), target_is_directory=True)
    check_face_count(cache, workers, label)
    return cache
