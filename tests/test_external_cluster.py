"""A Ray cluster started by someone else (issue 17): a head and a second node started with
`ray start` as separate processes, the way a user or a cluster manager starts them, then

1. `launch.py --address 127.0.0.1:PORT --data s3://... --storage s3://...` runs a tiny schedule to
   its end on it (the shards made into the bucket by the data pipeline, on the same cluster);
2. the cluster is stopped and a fresh one started (new processes, new temp dir, nothing of the
   first left), this time *without* any AWS_* variable in the nodes' environment;
3. `ray job submit --working-dir . --runtime-env-json '{"env_vars": {AWS_*}}' -- python launch.py
   --address auto --resume s3://.../NAME --override-config schedule.total_kimg=0.64` continues the
   run from the bucket to its longer end: the job's environment (inherited by Ray Train's
   controller and workers) is the only way the credentials reach the cluster, and the secret
   ends up in no object of the bucket.

Only the processes started here are stopped (each node's `ray start --block` and its process
tree, by PID); every node keeps to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, explicit free
ports for everything Ray would otherwise put on a fixed port).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.local import LOOPBACK_VARIABLE
from conftest import REPO, TINY_OVERRIDES, copy_test_photos
from s3 import SeaweedS3, free_ports

BUCKET = "external"
RUN = "ext-tiny"
VENV_BIN = Path(sys.executable).parent
NODE_START_TIMEOUT_S = 120
TIMINGS: dict[str, float] = {}
JOIN_ON_LOOPBACK = """
import sys, types
import ray._private.ray_constants as constants
import ray.scripts.scripts as scripts
scripts.ray_constants = types.SimpleNamespace(**{**vars(constants), "ENABLE_RAY_CLUSTER": True})
sys.argv[0] = "ray"
scripts.main()
"""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ExternalCluster:
    """A head and a worker node, each a `ray start --block` process of its own (as a user would
    start them in two shells), on 127.0.0.1 with free ports and a temp dir of their own."""

    def __init__(self, env: dict[str, str]):
        # Ray 2.60 turns token authentication on for a head when ~/.ray/auth_token exists (another
        # cluster on this machine may have written it), and a joining node does not follow: every
        # process of this cluster (nodes, drivers, `ray job submit`) gets this cluster's own token.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**env, **self.auth, LOOPBACK_VARIABLE: "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}  # `python` in a job: this venv's
        self.temp_dir = tempfile.mkdtemp(prefix="rx", dir="/tmp")  # short: Ray's socket paths live below it
        (self.port, self.dashboard_port, client, agent_head, agent_node, dash_metrics,
         autoscaler_metrics) = free_ports(7)
        self.env["DASHBOARD_METRIC_PORT"], self.env["AUTOSCALER_METRIC_PORT"] = str(dash_metrics), str(autoscaler_metrics)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        common = ["--num-cpus=2", '--resources={"trainslot": 1}', f"--temp-dir={self.temp_dir}",
                  "--disable-usage-stats", "--block"]
        self.head_args = [str(VENV_BIN / "ray"), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                          "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                          f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_head}",
                          *common]
        # `ray start --address` aborts under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("Multi-node Ray
        # clusters are not supported on Windows and OSX"), and without it turns 127.0.0.1, in
        # --address and in --node-ip-address alike, into the machine's interface address, where the
        # loopback head does not listen (both checked with Ray 2.60). So the second node is Ray's own
        # `ray start` command with only that abort lifted: everything else stays the CLI's.
        self.node_args = [sys.executable, "-c", JOIN_ON_LOOPBACK, "start", f"--address={self.address}",
                          f"--dashboard-agent-listen-port={agent_node}", *common]
        self.processes: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str) -> None:
        env = dict(self.env)
        log = open(Path(self.temp_dir) / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               cwd=self.temp_dir, start_new_session=True))

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` for a driver or `ray job submit` talking to this cluster."""
        return {**env, **self.auth, LOOPBACK_VARIABLE: "0"}

    def log_tail(self) -> str:
        return " | ".join((Path(self.temp_dir) / f"{name}.log").read_text(errors="replace")[-1500:]
                          for name in ("head", "node") if (Path(self.temp_dir) / f"{name}.log").exists())

    def alive_nodes(self) -> list[dict]:
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes",
                                         headers={"Authorization": f"Bearer {self.auth['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            nodes = json.load(reply)["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def start(self) -> "ExternalCluster":
        started = time.monotonic()
        deadline = started + NODE_START_TIMEOUT_S
        self._start(self.head_args, "head")
        while True:  # the GCS answers: the second node can join
            with socket.socket() as probe:
                probe.settimeout(1)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            self._check(deadline)
            time.sleep(0.5)
        self._start(self.node_args, "node")
        while True:
            try:
                nodes = self.alive_nodes()
                if len(nodes) == 2:
                    break
            except (OSError, KeyError, ValueError):
                pass
            self._check(deadline)
            time.sleep(1)
        assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}, nodes
        assert all(n["resources_total"].get("trainslot") == 1 for n in nodes), nodes
        self.start_s = time.monotonic() - started
        return self

    def _check(self, deadline: float) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"`ray start` exited ({process.returncode}): {self.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster was not up after {NODE_START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` (it stops its node's processes), then SIGKILL to
        whatever of their process trees is left: only processes started here."""
        pids = [pid for process in self.processes for pid in descendants(process.pid)]
        for process in reversed(self.processes):  # the worker node first, then the head
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.processes = []
        deadline = time.monotonic() + 10  # SIGKILL is not instant either
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.leftover = [pid for pid in pids if alive(pid)]
        if not self.leftover:
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # logs and sessions of this cluster only

    def __enter__(self) -> "ExternalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.make_bucket(BUCKET)
        yield server


def without_aws(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


def read_jsonl(s3, url: str) -> list[dict]:
    text = s3.filesystem().cat_file(url.removeprefix("s3://")).decode()
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_on_a_user_started_cluster_resumes_on_a_recreated_one_through_ray_job_submit(
        s3, faces_dir, tmp_path):
    runs, run = f"s3://{BUCKET}/runs", f"s3://{BUCKET}/runs/{RUN}"
    shards = f"s3://{BUCKET}/shards16"
    env = {**s3.environ(), "DATA_PIPELINE_WORK_DIR": str(tmp_path / "pipeline-work")}
    photos = copy_test_photos(faces_dir, tmp_path / "photos")
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    # --- 1. a cluster with the credentials in its nodes' environment (a machine role's stand-in)
    with ExternalCluster(env) as first:
        TIMINGS["cluster 1 up (2 nodes)"] = first.start_s
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "data_pipeline", "--input", str(photos), "--output", shards,
                        "--resolution", "16", "--shard-size", "16", "--address", first.address],
                       check=True, cwd=REPO, env=first.client_env(env), timeout=600, capture_output=True)
        TIMINGS["shards into the bucket"] = time.monotonic() - t
        t = time.monotonic()
        launch = subprocess.run(
            [sys.executable, str(REPO / "launch.py"), "--address", first.address, "--data", shards,
             "--storage", runs, "--run-name", RUN, "--workers", "2", "--no-prometheus",
             *TINY_OVERRIDES, "schedule.total_kimg=0.384"],
            capture_output=True, text=True, cwd=workdir, env=first.client_env(env), timeout=600)
        TIMINGS["launch.py --address to the end (0.384 kimg)"] = time.monotonic() - t
        assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
        assert f"[launch] Ray dashboard: {first.dashboard}" in launch.stdout
    assert first.leftover == [], f"processes of the first cluster still running: {first.leftover}"
    assert os.listdir(workdir) == []  # the run lives in the bucket only
    events = read_jsonl(s3, f"{run}/events.jsonl")
    assert [(e["event"], e["world_size"]) for e in events if e["event"] in ("start", "resume")] == [("start", 2)]
    assert [e["kimg"] for e in events if e["event"] == "checkpoint"][-1] == pytest.approx(0.384)

    # --- 2. a fresh cluster, without the credentials; 3. the resume as a submitted job
    aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
    with ExternalCluster(without_aws(env)) as second:
        TIMINGS["cluster 2 up (2 nodes)"] = second.start_s
        assert second.temp_dir != first.temp_dir and second.port != first.port
        t = time.monotonic()
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", second.dashboard, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"env_vars": aws}), "--",
             "python", "launch.py", "--address", "auto", "--resume", run, "--override-config",
             "--workers", "2", "--no-prometheus", "schedule.total_kimg=0.64"],
            capture_output=True, text=True, cwd=REPO, env=second.client_env(without_aws(env)), timeout=600)
        TIMINGS["ray job submit: resume to the end (0.384 -> 0.64 kimg)"] = time.monotonic() - t
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-5000:]
        assert "succeeded" in output, output[-3000:]
        assert "[launch] final sample grid: " in output
    assert second.leftover == [], f"processes of the second cluster still running: {second.leftover}"

    events = read_jsonl(s3, f"{run}/events.jsonl")
    runs_seen = [(e["event"], e["world_size"]) for e in events if e["event"] in ("start", "resume")]
    assert runs_seen == [("start", 2), ("resume", 2)], runs_seen
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["kimg"] == pytest.approx(0.384) and resume["previous_world_size"] == 2
    checkpoints = [e["kimg"] for e in events if e["event"] == "checkpoint"]
    assert checkpoints[-1] == 0.64  # exact: 640 images, no more, no fewer
    stats = read_jsonl(s3, f"{run}/stats.jsonl")
    assert max(s["kimg"] for s in stats) == 0.64 and {s["world_size"] for s in stats} == {2}
    assert stats[-1]["resolution"] == 16

    # the secret went to the job's environment only: no object in the bucket holds it
    fs = s3.filesystem()
    holding = [name for name in fs.find(BUCKET) if s3.secret_key.encode() in fs.cat_file(name)]
    assert holding == [], holding
    print("\n[timings] " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
