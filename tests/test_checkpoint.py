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
