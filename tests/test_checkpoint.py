import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from progan.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from progan.model.config import Config

REPO = Path(__file__).resolve().parents[1]


def small_state(value: float) -> dict:
    return {"config": Config().to_dict(), "images_seen": 1234, "generator": {"w": torch.full((3, 3), value)}}


def test_round_trip_and_checks(tmp_path):
    save_checkpoint(small_state(1.0), tmp_path)
    state = load_checkpoint(tmp_path, Config().to_dict()["model"])
    assert state["images_seen"] == 1234 and torch.equal(state["generator"]["w"], torch.ones(3, 3))
    other = Config()
    other.model.max_resolution = 256
    with pytest.raises(CheckpointError, match=r"model.max_resolution is 1024 there but 256 in the config"):
        load_checkpoint(tmp_path, other.to_dict()["model"])
    other = Config()
    other.model.latent_size = 128
    with pytest.raises(CheckpointError, match="model.latent_size"):
        load_checkpoint(tmp_path, other.to_dict()["model"])


def test_refuses_other_versions_garbage_and_pickled_code(tmp_path):
    torch.save({"format_version": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)
    torch.save({"format_version": 1, "payload": Path("/etc/passwd")}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="unreadable"):  # weights_only refuses arbitrary objects
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


WRITER = """
import sys, torch
from progan.model.checkpoint import save_checkpoint
from progan.model.config import Config
big = {"config": Config().to_dict(), "images_seen": 9999, "generator": {"w": torch.randn(64, 1024, 1024)}}
while True:
    save_checkpoint(big, sys.argv[1])
"""


def kill_mid_write(directory: Path) -> bool:
    """Starts a writer, SIGKILLs it once its temporary file exists; True if it died mid-write."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not list(directory.glob(".checkpoint.pt.*.tmp")):  # a 256 MB write has begun
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    return bool(list(directory.glob(".checkpoint.pt.*.tmp")))


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    save_checkpoint(small_state(7.0), tmp_path)
    for _ in range(5):
        if kill_mid_write(tmp_path):
            break
        save_checkpoint(small_state(7.0), tmp_path)  # the write won the race: try again
    else:
        pytest.fail("could not kill the writer mid-write")
    state = load_checkpoint(tmp_path)
    assert state["images_seen"] == 1234 and torch.equal(state["generator"]["w"], torch.full((3, 3), 7.0))


def ray_named(run: Path, second: int) -> Path:
    return run / f"checkpoint_2026-01-02_03-04-{second:02d}.000000"


def test_the_runs_latest_checkpoint_is_the_newest_that_loads_for_resume_and_the_tools(tmp_path):
    """Issue 25: one definition of a run's latest checkpoint, the newest checkpoint_* folder whose
    checkpoint.pt loads completely. `progan.generate --checkpoint RUN` took the newest folder
    whatever it held, --resume the newest that loads: two different checkpoints."""
    from checkpoints import make_checkpoint, tiny_model_config

    from progan.model.checkpoint import check_resume, latest_checkpoint, resolve_checkpoint
    from progan.model.trained import load_trained_generator

    run = tmp_path / "run"
    make_checkpoint(ray_named(run, 1), images_seen=128)
    good = make_checkpoint(ray_named(run, 2), images_seen=256).parent
    cut = make_checkpoint(ray_named(run, 3), images_seen=384)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # killed while it was copied in
    ray_named(run, 4).mkdir()  # a folder Ray made, its file not there yet
    state, folder, skipped = latest_checkpoint(run)
    assert folder == good and state["images_seen"] == 256 and len(skipped) == 1 and "unreadable" in skipped[0]
    assert resolve_checkpoint(run) == good / "checkpoint.pt"
    assert load_trained_generator(run).path == good / "checkpoint.pt" and load_trained_generator(run).images_seen == 256
    notes = check_resume(run, tiny_model_config().to_dict()["model"])
    assert len(notes) == 1 and notes[0].endswith(f"resuming from the older {good.name} (kimg 0.256)")
    with pytest.raises(CheckpointError, match="no checkpoint.pt there"):
        latest_checkpoint(tmp_path / "empty")


def test_stray_checkpoints_beyond_num_to_keep_are_removed_but_never_ones_ray_names_or_the_users(tmp_path):
    """Issue 25: an interrupted attempt left checkpoint folders beyond checkpoint.num_to_keep that
    Ray Train had lost track of. Removed: those, oldest first beyond the newest num_to_keep. Kept:
    the newest, any that Ray's record names (a resume refuses a record naming a missing one), and
    folders not named as Ray names them."""
    from progan.training.run_checkpoints import remove_stray_checkpoints

    run = tmp_path / "run"
    for second in range(1, 7):
        ray_named(run, second).mkdir(parents=True)
        (ray_named(run, second) / "checkpoint.pt").write_bytes(b"x")
    (run / "checkpoint_mine").mkdir()
    (run / "checkpoint_manager_snapshot.json").write_text(
        '{"checkpoint_results": [{"checkpoint_dir_name": "%s"}]}' % ray_named(run, 2).name)
    removed = remove_stray_checkpoints(run, 3)
    assert sorted(removed) == [ray_named(run, 1).name, ray_named(run, 3).name]
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == sorted(
        [ray_named(run, s).name for s in (2, 4, 5, 6)] + ["checkpoint_mine"])
    assert remove_stray_checkpoints(tmp_path / "nowhere", 3) == []
