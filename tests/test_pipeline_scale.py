"""python -m data_pipeline at ten times the photos, and stopped by Ctrl-C halfway.

The photos are distinct variations (mirrored, shifted, scaled) of the aligned faces in
../shared/faces, tiny (long sides of 64 to 128 px) so that detection is quick and CI can run the
pair 200 vs 2,000; bench/pipeline_scale.py measures 2,000 vs 20,000 at up to 1024 px (README,
Benchmarks). Every run is the CLI in a subprocess with its own local Ray node, as a user runs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from base.process_memory import TreeMemory
from data_pipeline.shards import WORK_DIR_NAME

REPO = Path(__file__).resolve().parents[1]
SMALL, LARGE = 200, 2000
LONG_SIDE = 128  # the photos' long sides: 64..128 px
RESOLUTION = 128
SHARD_SIZE = 10  # blocks of 10 photos: 20 blocks in the smaller run, 200 in the larger
# How much more private memory (the Python heap: TreeMemory's root_private_mb)
# the driver may take at its peak with ten times the photos. What legitimately grows with the
# photos is their listing, hashes, plan and outcomes, some hundreds of bytes to a few KB per photo:
# under 10 MB for 1,800 more. What a block's results take until its shard is written depends on
# the block size, not on the number of photos. A real leak breaks it: each kept face leaves the
# detector as a 128 px PNG with its pyramid (4..64 px, raw RGB), about 40 KB, so a driver that kept
# every result would hold some 70 MB more in the larger run; one that kept every photo's bytes
# (2-5 KB here) would not, and is not what this catches. The resident set is not compared: it also
# holds the object-store pages the driver has read results from, which grow with the run up to
# the store's size whatever the driver keeps.
DRIVER_GROWTH_MB = 32
# The whole tree (Ray's processes and workers): its proportional set size. It differs from run to
# run by which pages happen to be touched at the moment of the peak (README, Benchmarks), so its
# bound is looser: a leak of 100 KB per photo anywhere in the tree (an actor keeping each photo's
# float tensors, say) breaks it, one of a few KB per photo does not.
TREE_GROWTH_MB = 160
INTERRUPTED_LINE = "python -m data_pipeline: interrupted; run the same command again to resume"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, faces_dir) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scale")
    return {n: make_photos(sorted((faces_dir / "aligned").glob("*.jpg")), n, root / f"photos-{n}") for n in (SMALL, LARGE)}


def make_photos(bases: list[Path], n: int, folder: Path) -> Path:
    """n photos of distinct content: photo i is base i % len(bases), its k-th variation (k = i //
    len(bases)) mirrored if k is odd and shifted by k // 2 pixels (a strip of edge pixels added on the
    left and the top), scaled to a long side of 64..128 px."""
    folder.mkdir(parents=True)
    digests = set()
    for i in range(n):
        k = i // len(bases)
        with Image.open(bases[i % len(bases)]) as base:
            image = base.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k % 2 else base.convert("RGB")
        image = Image.fromarray(np.pad(np.asarray(image), ((k // 2, 0), (k // 2, 0), (0, 0)), mode="edge"))
        scale = (64 + i % (LONG_SIDE - 63)) / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=90)
        digests.add(hashlib.sha1(path.read_bytes()).hexdigest())
    assert len(digests) == n  # the pipeline drops photos of equal content
    return folder


def command_for(photos: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", str(output),
            "--resolution", str(RESOLUTION), "--shard-size", str(SHARD_SIZE), "--quiet"]


def run_sampled(photos: Path, output: Path) -> dict:
    """The pipeline on `photos`, its memory sampled every 0.5 s as it runs (TreeMemory); the peaks, the
    manifest and the samples taken."""
    process = subprocess.Popen(command_for(photos, output), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    with TreeMemory(process.pid, interval_s=0.5) as memory:
        log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    return {**memory.peaks, "samples": memory.samples, "manifest": json.loads((output / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def small_run(photos, tmp_path_factory) -> tuple[Path, dict]:
    """The smaller set, uninterrupted: its output folder and figures."""
    output = tmp_path_factory.mktemp("small") / "shards"
    return output, run_sampled(photos[SMALL], output)


def test_peak_memory_does_not_grow_with_the_number_of_photos(photos, small_run, tmp_path):
    _, small = small_run
    large = run_sampled(photos[LARGE], tmp_path / "shards")
    for run, n in ((small, SMALL), (large, LARGE)):
        counts = run["manifest"]["counts"]
        assert counts["files_seen"] == n and counts["duplicate_content"] == 0
        # faces in nearly every photo: the results that would pile up are really there
        assert counts["faces_kept"] >= 0.9 * n, counts
        assert run["samples"] >= 10, run["samples"]
    figures = json.dumps({"small": {k: v for k, v in small.items() if k != "manifest"},
                          "large": {k: v for k, v in large.items() if k != "manifest"}})
    assert large["root_private_mb"] - small["root_private_mb"] <= DRIVER_GROWTH_MB, figures
    # as many processes (no more workers for more photos), so the trees' sums compare like for like
    assert large["processes"] <= small["processes"], figures
    assert large["tree_pss_mb"] - small["tree_pss_mb"] <= TREE_GROWTH_MB, figures


def test_ctrl_c_halfway_then_the_same_command_redoes_no_finished_block(photos, small_run, tmp_path):
    clean_output, clean = small_run
    output = tmp_path / "shards"
    command = command_for(photos[SMALL], output)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    lines = Lines(process)
    try:
        wait_for(lambda: any((output / WORK_DIR_NAME).glob("shard-*.json")) or process.poll() is not None, 300)
        assert process.poll() is None, f"the run ended before any block finished: {lines.all()}"
        signalled = time.monotonic()
        # Ctrl-C as a terminal sends it, to every process of the command; then again and again
        # while it stops, as an impatient user does: the nodes' shutdown and the exit must
        # still end in the one line (a second SIGINT once cut Python's exit short in a traceback)
        while process.poll() is None and time.monotonic() - signalled < 60:
            send_sigint(process.pid)
            time.sleep(0.25)
        status = process.wait(timeout=1)
        stopped_after = time.monotonic() - signalled
        lines.join()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert status == 130, lines.all()
    assert stopped_after < 30, f"{stopped_after:.0f} s from SIGINT to exit"
    assert lines.after(signalled) == [INTERRUPTED_LINE], lines.all()
    assert "Traceback" not in lines.all()
    assert gone(process.pid, timeout=30), "Ray processes of the interrupted run were left running"

    assert not (output / "manifest.json").exists()
    finished = finished_blocks(output)
    blocks = len(clean["manifest"]["shards"])
    assert 1 <= len(finished) < blocks, f"{len(finished)} of {blocks} blocks were finished"
    before = {name: file_identity(output / name) for name in files_of(finished)}

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {name: file_identity(output / name) for name in before} == before  # not rewritten: same inode, time, bytes
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest == json.loads((clean_output / "manifest.json").read_text())
    assert (output / "rejects.jsonl").read_bytes() == (clean_output / "rejects.jsonl").read_bytes()


class Lines:
    """A subprocess's stdout and stderr lines, each with the time it was read."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self.read, args=(stream,), daemon=True)
                        for stream in (process.stdout, process.stderr)]
        for thread in self.threads:
            thread.start()

    def read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=10)

    def after(self, moment: float) -> list[str]:
        return [line for at, line in self.lines if at >= moment and line.strip()]

    def all(self) -> str:
        return "\n".join(line for _, line in self.lines)


def finished_blocks(output: Path) -> dict[str, dict]:
    """The records of the blocks an interrupted run finished (.partial/shard-NNNNNN.json)."""
    return {path.name: json.loads(path.read_text()) for path in sorted((output / WORK_DIR_NAME).glob("shard-*.json"))}


def files_of(records: dict[str, dict]) -> list[str]:
    """The shard files the records name: each block's shard and its pyramid levels."""
    names = []
    for record in records.values():
        assert record["shard"] is not None  # every block here has faces, so a redone block would show
        names += [record["shard"]["file"], *(level["file"] for level in (record.get("levels") or {}).values())]
    return names


def file_identity(path: Path) -> tuple[int, int, str]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def send_sigint(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:  # it ended since the last look
        pass


def gone(pgid: int, timeout: float) -> bool:
    """Whether every process of the group has ended within `timeout` (those left are killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return False


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
