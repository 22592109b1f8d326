"""The data pipeline's output folder (issue 25): it removes or replaces only its own output, what
its manifest or its plan in .partial/ names, and stops in one line on anything else unless
--overwrite. These run without Ray: the checks come before any photo is read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from base.errors import UserError
from data_pipeline.shards import WORK_DIR_NAME, ShardProgress, check_own_output, owned_names, shard_name

REPO = Path(__file__).resolve().parents[1]


def run_pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def photos(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 100, 50)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("name", ["shard-mydata.tar", "rejects.jsonl", f"{WORK_DIR_NAME}/notes.txt", "notes.tmp"])
def test_the_cli_stops_on_a_users_file_in_the_output_and_leaves_it(tmp_path, name):
    output = tmp_path / "out"
    (output / name).parent.mkdir(parents=True)
    (output / name).write_text("mine")
    result = run_pipeline("--input", str(photos(tmp_path)), "--output", str(output), "--resolution", "16",
                          "--nodes", "1", "--quiet")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name.split("/")[-1] in lines[0] and "--overwrite" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (output / name).read_text() == "mine"


def own_partial_output(folder: Path, fingerprint: str, shards: int = 3) -> None:
    """What a run of the pipeline killed after its first shard leaves."""
    work = folder / WORK_DIR_NAME
    work.mkdir(parents=True)
    (work / "plan.json").write_text(json.dumps({"fingerprint": fingerprint, "shards": shards}))
    (folder / shard_name(0)).write_bytes(b"shard 0")
    (work / "shard-000000.json").write_text(json.dumps({"shard": {"file": shard_name(0), "samples": 1, "bytes": 7,
                                                                  "sha256": "0" * 64}, "outcomes": []}))
    (folder / f".{shard_name(1)}.4242.tmp").write_bytes(b"half a shard")  # killed mid-write


def test_its_own_partial_output_is_resumed_and_another_plans_is_replaced(tmp_path):
    folder = tmp_path / "out"
    own_partial_output(folder, "plan-a")
    check_own_output(folder)  # all of it the pipeline's own
    progress = ShardProgress(folder, "plan-a", fresh=False, shard_count=3)
    assert progress.is_done(0) and (folder / shard_name(0)).read_bytes() == b"shard 0"
    assert not list(folder.glob("*.tmp"))

    ShardProgress(folder, "plan-b", fresh=False, shard_count=2, levels=(4, 8))  # another plan: the old one's files go
    assert not (folder / shard_name(0)).exists()
    assert json.loads((folder / WORK_DIR_NAME / "plan.json").read_text()) == {"fingerprint": "plan-b", "shards": 2,
                                                                            "levels": [4, 8]}
    # the plan's shards at each level of its pyramid are the pipeline's own, and no others
    assert {"shard-000001.tar", "shard-000001-8px.tar", "shard-000000-4px.tar"} <= owned_names(folder)
    assert "shard-000002-4px.tar" not in owned_names(folder) and "shard-000001-16px.tar" not in owned_names(folder)


@pytest.mark.parametrize("name", ["shard-mydata.tar", "rejects.jsonl", "shard-000007.tar", "sub/x.png"])
def test_prepare_refuses_a_folder_with_other_files_and_overwrite_keeps_them(tmp_path, name):
    folder = tmp_path / "out"
    own_partial_output(folder, "plan-a")
    if name == "rejects.jsonl":  # without the pipeline's plan or manifest, a rejects.jsonl is the user's
        (folder / WORK_DIR_NAME / "plan.json").unlink()
        (folder / WORK_DIR_NAME / "shard-000000.json").unlink()
        (folder / shard_name(0)).unlink()
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("mine")
    with pytest.raises(UserError, match="is not this pipeline's output"):
        ShardProgress(folder, "plan-b", fresh=False, shard_count=2)
    assert (folder / name).read_text() == "mine"
    if name in ("shard-mydata.tar", "sub/x.png"):  # --overwrite replaces the pipeline's names only
        ShardProgress(folder, "plan-b", fresh=True, shard_count=2)
        assert (folder / name).read_text() == "mine"
        assert not (folder / shard_name(0)).exists()


def finished_output(folder: Path, inputs_record: dict | None) -> None:
    """A complete output (no shards: nothing to check) as a run on some inputs leaves it."""
    folder.mkdir(parents=True)
    config = {"resolution": 16, "image_format": "png", "shard_size": 1000, "min_prob": 0.95, "margin": 0.4}
    if inputs_record is not None:
        config["inputs_fingerprint"] = inputs_record
    (folder / "manifest.json").write_text(json.dumps({
        "format_version": 1, "resolution": 16, "image_format": "png", "shards": [], "config": config,
        "counts": {"files_seen": 1, "faces_kept": 0, "no_face": 1}}))
    (folder / "rejects.jsonl").write_text("")


def test_a_rerun_on_other_inputs_is_refused_not_reported_complete(tmp_path):
    from data_pipeline.sources import inputs_fingerprint, list_sources

    first = photos(tmp_path)
    output = tmp_path / "out"
    finished_output(output, inputs_fingerprint(list_sources([str(first)])))
    args = ["--output", str(output), "--resolution", "16", "--nodes", "1", "--quiet"]
    same = run_pipeline("--input", str(first), *args)
    assert same.returncode == 0 and "already complete" in same.stdout, same.stderr

    other = tmp_path / "other" / "photos"
    other.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (other / name).write_bytes((first / "a.png").read_bytes())
    result = run_pipeline("--input", str(other), *args)
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--input (1 -> 2 files)" in lines[0] and "--overwrite" in lines[0], result.stderr

    import os
    os.utime(first / "a.png", ns=(1, 1))  # the same name and size, another time: another photo, maybe
    result = run_pipeline("--input", str(first), *args)
    assert result.returncode == 2 and "--input (1 files, some with other names, sizes or times)" in result.stderr


def test_an_older_manifest_without_the_inputs_fingerprint_is_not_compared(tmp_path):
    output = tmp_path / "out"
    finished_output(output, None)
    result = run_pipeline("--input", str(photos(tmp_path)), "--output", str(output), "--resolution", "16", "--quiet")
    assert result.returncode == 0 and "already complete" in result.stdout, result.stderr
