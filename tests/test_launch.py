"""`python launch.py` end to end, as a user runs it: from another folder, on raw photos, with its
own local Ray cluster, the data pipeline and Ray Train (no cluster shared with other tests)."""
import ipaddress
import os
import re
import subprocess
import sys
import shutil
import signal
import time
from pathlib import Path

import pytest

import cluster.local
import launch
from base.ports import free_port
from conftest import TINY_OVERRIDES, copy_test_photos, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def launch_command(data: Path, run_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), "--nodes", "2", "--data", str(data), "--no-prometheus",
            "--dashboard-port", str(free_port()), *extra, *TINY_OVERRIDES, f"checkpoint.run_root={run_root}"]


def descendants(pid: int) -> set[int]:
    parents = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        parents[child] = parent
    tree, grew = {pid}, True
    while grew:
        new = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def listening_sockets(pids: set[int]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket that the given processes listen on."""
    found = set()
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                found.add((name, address.strip("[]"), int(port)))
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 and ::1, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1); not '*'."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # '*' or '0.0.0.0'-like wildcards that ss prints as names
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_a_run_listens_on_loopback_only_and_writes_movable_artifacts(faces_dir, tmp_path):
    """From another folder, on raw photos: the pipeline and a tiny schedule to its end, while every
    second the sockets of launch.py's process tree are read with `ss`."""
    photos = copy_test_photos(faces_dir, tmp_path / "photos")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.Popen([*launch_command(photos, tmp_path / "runs", "--run-name", "short")], cwd=elsewhere,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listeners, deadline = set(), time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        listeners |= listening_sockets(descendants(proc.pid))
        time.sleep(1)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    # a quiet start: no traceback and no warning of Ray's own internals on the console
    assert "Traceback" not in output and "DeprecationWarning" not in output, output[-3000:]
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names and len(listeners) > 10, listeners  # the check did see Ray's servers
    outside = {item for item in listeners if not is_loopback(item[1])}
    assert not outside, f"listening beyond loopback: {sorted(outside)}"
    run = tmp_path / "runs" / "short"
    assert (run / "data").is_symlink() and not os.readlink(run / "data").startswith("/")
    assert (run / "data" / "manifest.json").is_file()
    for name in ("events.jsonl", "stats.jsonl"):
        assert str(tmp_path) not in (run / name).read_text(), name
    grids = [e["sample_grid"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint"]
    assert grids and all((run / grid).is_file() for grid in grids)


def test_photos_without_a_face_stop_before_training_in_one_line(faces_dir, tmp_path):
    """Files that are not photos of faces: the pipeline counts them, and launch.py stops with those
    counts instead of starting workers that would fail again and again."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for index in range(4):
        (bad / f"photo{index}.jpg").write_text(f"text file {index} with an image's name")
    proc = subprocess.run(launch_command(bad, tmp_path / "runs", "--run-name", "bad"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable face: 0 faces in 4 files (not_an_image 4)" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "[launch] training" not in proc.stdout
    assert not (tmp_path / "runs" / "bad" / "events.jsonl").exists()  # no training attempt started


@pytest.mark.parametrize("gpus, extra, message", [
    (1, [], "error: --nodes 4: this machine has 1 GPU, fewer than the nodes, so no node would get one and "
            "training would run on the CPUs; pass --nodes 1 (one GPU per node) or add cluster.use_gpu=false"),
    (0, ["cluster.use_gpu=true"], "error: cluster.use_gpu=true: Ray sees no GPU on this machine; "
                                  "add cluster.use_gpu=auto or cluster.use_gpu=false"),
])
def test_nodes_that_cannot_each_have_a_gpu_are_refused_before_ray_starts(faces_dir, tmp_path, monkeypatch, capsys,
                                                                          gpus, extra, message):
    """The machine's GPU count (what Ray would see) is set by the test: 4 local nodes and 1 GPU
    would give every node 0 GPUs and train on the CPUs without a word."""
    monkeypatch.setattr(cluster.local, "local_gpu_count", lambda: gpus)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((faces_dir / "aligned").glob("*.jpg"))[0], photos)
    status = launch.main(["--nodes", "4", "--data", str(photos), "--no-prometheus", "--run-name", "gpu",
                          "--dashboard-port", str(free_port()), f"checkpoint.run_root={tmp_path / 'runs'}", *extra])
    err = capsys.readouterr().err
    assert status == 2 and err.splitlines() == [err.strip()] and err.startswith(message), err
    assert not (tmp_path / "runs" / "gpu").exists()  # refused before the run folder, before Ray


def test_shards_from_before_the_pyramid_get_one_warning_line(faces_dir, tmp_path, monkeypatch, capsys):
    """Shards written before each phase had its own resolution still train, with one line that
    says they decode the full size in every phase and how to rebuild them (issue 24). The run is
    stopped right after by the GPU check, before Ray starts."""
    from test_shard_checks import write_shards

    write_shards(tmp_path / "old-shards", faces_dir, [4, 4])  # 16 px, no "levels" in the manifest
    monkeypatch.setattr(cluster.local, "local_gpu_count", lambda: 1)
    status = launch.main(["--nodes", "4", "--data", str(tmp_path / "old-shards"), "--no-prometheus", "--run-name", "old",
                          "--dashboard-port", str(free_port()), f"checkpoint.run_root={tmp_path / 'runs'}",
                          "model.max_resolution=16"])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 2 and err[1].startswith("error: --nodes 4"), err
    assert err[0].startswith(f"[launch] warning: {tmp_path / 'old-shards'} was made before shards held every resolution")
    assert err[0].endswith(f"--output {tmp_path / 'old-shards'} --resolution 16 --overwrite"), err[0]


@pytest.mark.parametrize("nodes, gpus, use_gpu", [(2, 4, None), (2, 2, True), (4, 1, False), (4, 0, None)])
def test_nodes_that_each_get_a_gpu_or_use_none_pass(monkeypatch, nodes, gpus, use_gpu):
    monkeypatch.setattr(cluster.local, "local_gpu_count", lambda: gpus)
    cluster.local.check_gpus_for_nodes(nodes, use_gpu)  # no UserError


@pytest.mark.parametrize("flags, message", [
    (["--workers", "3", "--max-nodes", "2"],
     "error: --workers 3 and --max-nodes 2: both set the most training workers; give one of them"),
    (["--workers", "2", "--min-nodes", "3"], "error: --min-nodes/--max-nodes: got 3..2, allowed: 1 <= min <= max"),
    (["cluster.min_workers=0"], "error: cluster.min_workers: got 0, allowed: >= 1"),
    # issue 25: a fixed size the local nodes cannot give retried without end (max allowed: inf)
    (["--nodes", "1", "--workers", "2", "--min-nodes", "2"],
     "error: --min-nodes 2: 1 local node runs at most 1 training worker (one each); pass --nodes 2 or --min-nodes 1"),
    (["--workers", "4", "--min-nodes", "3"],
     "error: --min-nodes 3: 2 local nodes run at most 2 training workers (one each); pass --nodes 3 or --min-nodes 2"),
])
def test_worker_counts_that_contradict_each_other_are_refused(faces_dir, tmp_path, capsys, flags, message):
    """No flag silently wins over another, and no count silently becomes another."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted((faces_dir / "aligned").glob("*.jpg"))[0], photos)
    status = launch.main(["--nodes", "2", "--data", str(photos), "--no-prometheus", "--run-name", "w",
                          f"checkpoint.run_root={tmp_path / 'runs'}", *flags])
    err = capsys.readouterr().err
    assert status == 2 and err.splitlines() == [err.strip()] and err.startswith(message), err


def test_ctrl_c_says_where_the_run_stopped_and_resume_goes_on_from_there_leaving_no_stray_folders(
        faces_dir, tmp_path):
    """Issue 25: Ctrl-C during training ended with Ray's tracebacks and no hint, and the checkpoint
    written last was missing from Ray's record of the run, so --resume went back to an earlier one;
    folders beyond checkpoint.num_to_keep stayed. Ctrl-C (SIGINT to the whole process group, as a
    terminal sends it) now ends with one line naming the last complete checkpoint and the exact
    command, exit 130; the resume starts from that checkpoint; strays are gone at the end."""
    photos = copy_test_photos(faces_dir, tmp_path / "photos")
    command = launch_command(photos, tmp_path / "runs", "--run-name", "cut", "schedule.total_kimg=20")
    command[command.index("--nodes") + 1] = "1"
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run, deadline = tmp_path / "runs" / "cut", time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "events.jsonl").is_file() and sum(
                '"checkpoint"' in line for line in (run / "events.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(r"interrupted: the run stopped at its checkpoint at kimg (\d+\.\d{3}) \((checkpoint_\S+)\); "
                         r"continue it with: python (\S+) --resume (\S+)", last)
    assert found, last
    kimg, folder, program, resume = found.groups()
    assert Path(program).name == "launch.py" and resume == str(run) and (run / folder / "checkpoint.pt").is_file()
    newest_complete = sorted(p.parent.name for p in run.glob("checkpoint_*/checkpoint.pt"))[-1]
    assert folder == newest_complete
    # strays an earlier attempt might have left: Ray-named, older, unknown to Ray's record
    strays = [run / f"checkpoint_2000-01-01_00-00-0{i}.000000" for i in range(3)]
    for stray in strays:
        shutil.copytree(run / folder, stray)
    resumed = subprocess.run([sys.executable, str(REPO / "launch.py"), "--resume", str(run), "--no-prometheus",
                              "--dashboard-port", str(free_port()), "--override-config", "schedule.total_kimg=0.32"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumes = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert resumes and resumes[0]["kimg"] == pytest.approx(float(kimg)), resumes
    assert not any(stray.exists() for stray in strays)
    assert len([p for p in run.glob("checkpoint_*") if p.is_dir()]) <= 3  # TINY_OVERRIDES' num_to_keep


def post_job(dashboard: str, headers: dict) -> int:
    """The HTTP status of a job submission (a shell command) to a Ray dashboard."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{dashboard}/api/jobs/", method="POST", headers={
        "Content-Type": "application/json", **headers}, data=json.dumps({"entrypoint": "true"}).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_runs_dashboard_refuses_job_submission_without_the_runs_token(faces_dir, tmp_path):
    """Issue 25: a plain POST /api/jobs/ to the run's dashboard ran a shell command as the user
    who started the run, for any local user or process. The launcher's local nodes now use Ray's
    token authentication with a fresh token per run, in a file only the user can read, outside
    the run folder, removed when the run ends; the run's own driver and workers train as before."""
    photos = copy_test_photos(faces_dir, tmp_path / "photos")
    command = launch_command(photos, tmp_path / "runs", "--run-name", "locked", "schedule.total_kimg=0.256")
    command[command.index("--nodes") + 1] = "1"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH_")}
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, dashboard, token_file = [], None, None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[launch] Ray dashboard: "):
            dashboard = line.split(": ", 1)[1].strip()
        found = re.search(r"paste the contents of (\S+) when the dashboard asks", line)
        if found:
            token_file = Path(found.group(1))
            break
    assert dashboard and token_file, "".join(lines)[-3000:]
    assert token_file.is_file() and token_file.stat().st_mode & 0o777 == 0o600
    assert str(tmp_path / "runs") not in str(token_file)  # no secret in the run folder
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert post_job(dashboard, {}) == 401
    assert post_job(dashboard, {"Authorization": "Bearer not-the-token"}) == 403
    rest = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, rest[-3000:]
    assert "Traceback" not in rest, rest[-3000:]
    assert not token_file.exists()  # a new token for the next run
    run = tmp_path / "runs" / "locked"
    assert token not in "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file() and p.suffix in (
        ".jsonl", ".yaml", ".json"))
