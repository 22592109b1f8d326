import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import keep_ray_on_loopback

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "faces"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not (FACES / "aligned").is_dir():
        pytest.fail(f"{FACES} is missing: the tests need ../shared/faces beside the repo")
    return FACES


keep_ray_on_loopback()  # every Ray node a test starts, before any test module imports Ray


@pytest.fixture(scope="module")
def cluster(request):
    """One local Ray cluster per test module (a module sets CLUSTER_NODES; default 2)."""
    from ray.cloudpickle import register_pickle_by_value

    from cluster.local import LocalCluster

    register_pickle_by_value(request.module)  # workers cannot import the tests folder
    with LocalCluster(getattr(request.module, "CLUSTER_NODES", 2), include_dashboard=False) as local:
        yield local


def copy_test_photos(faces_dir: Path, dest: Path) -> Path:
    """64 real aligned photos into dest, the same ones for every test that makes shards."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted((faces_dir / "aligned").glob("*.jpg"))[32:96]:
        shutil.copy(path, dest)
    return dest


def make_shards(photos: Path, out: Path, address: str, *extra_args: str) -> Path:
    """16x16 shards of `photos` by the data pipeline's CLI, on the cluster at `address`."""
    subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", str(out),
                    "--resolution", "16", "--shard-size", "16", "--address", address, *extra_args],
                   check=True, cwd=REPO, timeout=600)
    return out


@pytest.fixture(scope="module")
def shards(cluster, faces_dir, tmp_path_factory):
    """16x16 face shards made by the data pipeline, on the module's cluster, from 64 real photos."""
    photos = copy_test_photos(faces_dir, tmp_path_factory.mktemp("photos"))
    return make_shards(photos, tmp_path_factory.mktemp("shards") / "faces16", cluster.cluster.address)


def square_photo(path: Path, size: int) -> bytes:
    """A real photo centre-cropped and resized to size x size, as PNG bytes (shards without the detector)."""
    import io

    from PIL import Image

    image = Image.open(path).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    buffer = io.BytesIO()
    image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


# A 16x16 network small enough for CPU tests: five phases of 128 images (640 in all), at the
# learning rate the tests were written for (the demo's is tuned for the demo's networks).
TINY_OVERRIDES = (
    "model.max_resolution=16", "model.latent_size=16", "model.fmap_base=64", "model.fmap_max=16", "optimizer.lr=0.003",
    "schedule.stabilize_kimg_at={}", "schedule.fade_kimg_at={}", "schedule.stabilize_kimg=0.128",
    "schedule.fade_kimg=0.128", "schedule.total_kimg=0.64", "schedule.minibatch={}",
    "schedule.minibatch_default=16", "checkpoint.every_kimg=0.096", "checkpoint.num_to_keep=3",
    "checkpoint.sample_grid=4", "monitoring.log_every_steps=2", "cluster.max_failures=0")


def tiny_config(*overrides):
    from progan.model.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", [*TINY_OVERRIDES, *overrides])
