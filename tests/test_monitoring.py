"""Monitoring: metric definitions, failure handling, the Prometheus launcher, and one end-to-end run.

The end-to-end part (one Ray cluster for the module) starts a real Prometheus with the project's
own monitoring/prometheus.yml on a free loopback port, runs a small 2-worker Ray Train job on a
2-node local cluster (`_train_fn` below publishes metrics the way a training loop does, with one
injected failure so Ray Train restarts the workers), a pipeline actor, and the launcher's
exporter, then checks through Prometheus' HTTP API that every target is up, that every PromQL
expression of the Grafana dashboard returns data (GPU-only panels are exempt on a CPU-only
cluster), and that the restart neither doubled a line nor left a gap.

To run the real training instead, replace `_start_training` (see its docstring): everything else
only needs a running job that publishes metrics for `RUN`.

Skips (does not fail) the end-to-end part only when no `prometheus` binary is installed.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from monitoring import dashboard as dash
from monitoring import metrics as M
from monitoring.prometheus import DISCOVERY_FILE, free_port, render_config, start_prometheus

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
RUN = f"mon-e2e-{uuid.uuid4().hex[:6]}"
WORKERS = 2
# Ray's export interval for this test's cluster: 2 s instead of 10 s, so the test is quick. The
# gauge refresh adapts to it (TrainingMetrics reads it), and the gauges set once per attempt below
# only stay visible through that refresh.
REPORT_INTERVAL_MS = 2000
ATTEMPT_1_S = 6           # first attempt: this long (its counters outlive it in Ray's agent), then rank 0 fails
DATA_DEADLINE_S = 170     # from the start of fit() to every dashboard query having data
ALLOWED_RESULT_LABELS = {"run", "rank", "outcome", "instance", "GpuIndex"}


# ------------------------------------------------------------------------------ definitions

def test_metric_names_follow_prometheus_conventions():
    names = [spec.exported for spec in M.ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in M.ALL_METRICS:
        assert re.fullmatch(r"progan_[a-z0-9_]+", spec.name), spec.name
        assert not spec.name.endswith("_total"), f"{spec.name}: Ray adds _total to counters itself"
        if spec.kind == "counter":
            assert spec.exported.endswith("_total")
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and spec.boundaries == tuple(sorted(spec.boundaries))
        if spec.source == "ray":
            assert spec.exported.startswith("ray_progan_")
        assert spec.help.strip(), spec.name
    for spec in M.TRAINING_METRICS:
        assert spec.tags[:3] == ("run", "rank", "node")
    assert set(M.STAT_GAUGES) == {"resolution", "alpha", "world_size", "lr", "loss_d", "loss_g", "grad_penalty",
                                  "score_real", "score_fake", "img_per_s"}


def test_metric_names_live_only_in_metrics_py_and_the_dashboard():
    allowed = {REPO / "monitoring" / "metrics.py", dash.DASHBOARD}
    pattern = re.compile("|".join(sorted((re.escape(s.name) for s in M.ALL_METRICS), key=len, reverse=True)))
    offenders = []
    for path in REPO.rglob("*"):
        if (path.suffix not in {".py", ".json", ".yml", ".yaml", ".md"} or path in allowed or not path.is_file()
                or any(part.startswith(".") or part in {"data", "runs", "__pycache__"}
                       for part in path.relative_to(REPO).parts)):
            continue
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{line_no}: {line.strip()[:100]}")
    assert not offenders, "metric names outside monitoring/metrics.py and the dashboard:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------ never break training

def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "progan.monitoring" and r.levelno >= logging.WARNING]


def test_training_metrics_swallow_bad_input_and_log_once(caplog):
    caplog.set_level(logging.WARNING, logger="progan.monitoring")
    m = M.TrainingMetrics("unit", 0, "n0")  # no Ray cluster here: recording is a no-op, not an error
    m.observe_step(32, 0.1, 0.01, backward_seconds=0.05, allreduce_seconds=0.01)
    m.observe_stats({"resolution": 8, "phase": "fade-in", "alpha": 0.5, "world_size": 2, "lr": 1e-3,
                     "loss_d": float("nan"), "loss_g": 1.0, "grad_penalty": 0.1, "score_real": 1.0,
                     "score_fake": -1.0, "img_per_s": 100.0, "kimg": 1.2, "nonfinite": True})
    m.observe_checkpoint(1.5)
    m.count_restart()
    m.count_rollback()
    assert _warnings(caplog) == []
    for _ in range(3):
        m.observe_step("many", None, object())  # type: ignore[arg-type]
        m.observe_stats({"alpha": "not a number"})
    msgs = _warnings(caplog)
    assert len(msgs) == 2 and "observe_step" in msgs[0] and "observe_stats" in msgs[1], msgs
    m.close()


def test_metrics_survive_a_broken_export(caplog, monkeypatch):
    """If creating or recording metrics raises (no Ray, a broken agent), nothing reaches the caller."""
    caplog.set_level(logging.WARNING, logger="progan.monitoring")

    def broken(*args, **kwargs):
        raise OSError("metrics agent unreachable")

    monkeypatch.setattr(M, "_make", broken)
    m = M.TrainingMetrics("unit", 1, "")
    for _ in range(3):
        m.observe_step(32, 0.1, 0.01)
        m.observe_stats({"alpha": 1.0})
        m.observe_checkpoint(1.0)
        m.count_restart()
        m.count_rollback()
    p = M.PipelineMetrics("unit")
    p.count("kept")
    assert len(_warnings(caplog)) == 2  # one per object, at creation

    monkeypatch.undo()
    caplog.clear()
    m = M.TrainingMetrics("unit", 1, "n1")
    m._m[M.STEPS.name].inc = broken
    for _ in range(5):
        m.observe_step(32, 0.1, 0.01)
    assert len(_warnings(caplog)) == 1


def test_pipeline_metrics_unknown_outcome_logs_once(caplog):
    caplog.set_level(logging.WARNING, logger="progan.monitoring")
    p = M.PipelineMetrics("unit")
    for outcome in ("read",) + M.OUTCOMES:
        p.count(outcome, 3)
    p.count("kept", 0)
    assert _warnings(caplog) == []
    p.count("eaten_by_cat")
    p.count("eaten_by_cat")
    assert len(_warnings(caplog)) == 1


def test_gauges_are_refreshed_until_the_worker_goes_quiet():
    m = M.TrainingMetrics("unit", 0, "n0")
    calls = []

    class FakeGauge:
        def set(self, value, tags=None):
            calls.append((value, tags))

    m._m[M.ALPHA.name] = m._m[M.PHASE.name] = FakeGauge()
    m.observe_stats({"alpha": 0.5, "phase": "fade-in"})
    calls.clear()
    m._refresh()
    assert sorted(calls, key=str) == sorted([(0.5, None), (1.0, {"phase": "fade-in"}), (0.0, {"phase": "stabilise"})],
                                            key=str)
    calls.clear()
    m._last_call -= 121  # no call for 2 minutes: a hung worker's gauges are left to age out
    m._refresh()
    assert calls == []
    m.observe_step(32, 30.0, 0.1)  # 30 s steps: quiet for 150 s is still normal
    m._last_call -= 150
    m._refresh()
    assert calls
    m.close()


def test_allreduce_timer_counts_overlapping_buckets_once():
    timer = M.AllReduceTimer()
    timer._intervals = [[0.0, 1.0], [0.5, 1.5], [3.0, 3.25], [3.1, 3.2]]
    assert timer.take() == pytest.approx(1.75)
    assert timer.take() == 0.0


def test_launcher_metrics_exposition_on_loopback():
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    lm = M.LauncherMetrics("unit-run", max_workers=4, min_workers=2)
    try:
        assert lm.address and lm.address.startswith("127.0.0.1:")
        body = urllib.request.urlopen(f"http://{lm.address}/metrics", timeout=5).read().decode()
        samples = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples}
        assert samples[M.LAUNCHER_MAX_WORKERS.exported].value == 4
        assert samples[M.LAUNCHER_MIN_WORKERS.exported].value == 2
        assert samples[M.LAUNCHER_MAX_WORKERS.exported].labels == {"run": "unit-run"}
        assert abs(samples[M.LAUNCHER_START_TIME.exported].value - time.time()) < 60
    finally:
        lm.stop()


# ------------------------------------------------------------------------------ Prometheus launcher

def test_render_config_points_at_the_run_and_passes_promtool(tmp_path):
    session = tmp_path / "session_2030-01-01_00-00-00_000000_1"
    text = render_config(session, ["127.0.0.1:9999"])
    assert f"{session.resolve() / DISCOVERY_FILE}" in text and "/tmp/ray/" not in text
    assert "127.0.0.1:9999" in text
    promtool = shutil.which("promtool")
    if promtool:
        (tmp_path / "p.yml").write_text(text)
        out = subprocess.run([promtool, "check", "config", str(tmp_path / "p.yml")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_start_prometheus_without_binary_returns_none_and_logs_one_line(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="progan.monitoring")
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus on PATH
    assert start_prometheus(None, tmp_path, tmp_path / "prom") is None
    assert len(_warnings(caplog)) == 1


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_start_prometheus_on_a_taken_port_returns_none(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="progan.monitoring")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert start_prometheus(s.getsockname()[1], tmp_path, tmp_path / "prom", ready_timeout_s=20) is None
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "did not start" in msgs[0], msgs


# ------------------------------------------------------------------------------ end to end

def _train_fn(cfg: dict) -> None:
    """Stands in for progan's train loop: publishes every training metric the way it will.
    Attempt 1 runs ATTEMPT_1_S seconds, then rank 0 fails; Ray Train restarts both workers, and
    attempt 2 counts the restart and runs until the test writes the stop file."""
    import sys as _sys
    if cfg["repo"] not in _sys.path:
        _sys.path.insert(0, cfg["repo"])
    import time as _time
    from pathlib import Path as _Path

    import ray.train
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from monitoring.metrics import AllReduceTimer, TrainingMetrics

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    work = _Path(cfg["workdir"])
    restarted = (work / "attempt1-failed").exists()
    metrics = TrainingMetrics(cfg["run"], rank, "")
    if restarted:
        metrics.count_restart()
    # Gauges are set once per attempt: they stay visible only through TrainingMetrics' refresh.
    metrics.observe_stats({"resolution": 16 if restarted else 8, "phase": "stabilise" if restarted else "fade-in",
                           "alpha": 1.0 if restarted else 0.25, "world_size": world, "lr": 1e-3,
                           "loss_d": -0.5, "loss_g": 0.7, "grad_penalty": 0.02, "score_real": 1.5,
                           "score_fake": -0.8, "img_per_s": 120.0 * world})
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)),
                                    bucket_cap_mb=0.05)
    timer = AllReduceTimer()
    model.register_comm_hook(None, timer.hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    started, step = _time.time(), 0
    while _time.time() - started < cfg["max_s"]:
        t0 = _time.perf_counter()
        _time.sleep(0.03)  # waiting for the batch
        wait = _time.perf_counter() - t0
        loss = model(torch.randn(32, 64)).square().mean()
        tb = _time.perf_counter()
        loss.backward()
        backward = _time.perf_counter() - tb
        opt.step()
        opt.zero_grad()
        _time.sleep(0.2)
        metrics.observe_step(32, _time.perf_counter() - t0, wait, backward_seconds=backward,
                             allreduce_seconds=timer.take())
        step += 1
        if rank == 0 and step % 10 == 0:
            tc = _time.perf_counter()
            torch.save(model.state_dict(), work / "checkpoint.pt")
            metrics.observe_checkpoint(_time.perf_counter() - tc)
        if restarted and rank == 0 and step == 3:
            metrics.count_rollback()
        if not restarted and _time.time() - started > cfg["attempt_1_s"]:
            if rank == 0:
                (work / "attempt1-failed").touch()
                raise RuntimeError("test: injected worker failure")
        if restarted and (work / "stop").exists():
            break
    ray.train.report({"steps": step})


def _pipeline_actor_cls():
    import ray

    @ray.remote(num_cpus=0)
    class FacePipelineStandIn:
        """Counts like the data pipeline's actors do."""

        def __init__(self, repo: str, run: str):
            sys.path.insert(0, repo)
            from monitoring.metrics import PipelineMetrics
            self.metrics = PipelineMetrics(run)

        def process(self, counts: dict) -> int:
            for outcome, n in counts.items():
                self.metrics.count(outcome, n)
            return sum(counts.values())

    return FacePipelineStandIn


class _Training:
    """A training job running in a thread: `.stop()` asks it to finish, `.join()` waits."""

    def __init__(self, workdir: Path):
        import ray.cloudpickle
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.workdir = workdir
        self.error: BaseException | None = None
        self.trainer = TorchTrainer(
            _train_fn,
            train_loop_config={"repo": str(REPO), "workdir": str(workdir), "run": RUN,
                               "attempt_1_s": ATTEMPT_1_S, "max_s": DATA_DEADLINE_S + 60},
            scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1},
                                         placement_strategy="SPREAD"),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name=RUN, storage_path=str(workdir / "ray_results"),
                                 failure_config=FailureConfig(max_failures=1)),
        )
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()

    def _fit(self):
        try:
            self.trainer.fit()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        (self.workdir / "stop").touch()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


def _start_training(workdir: Path) -> _Training:
    """The job under test. To test the real training instead, return an object with the same
    alive/stop/join methods that runs `python launch.py --address <cluster> --data <shards>
    --run-name RUN ...` in a subprocess (stop: terminate it). It must fail once (a test hook)
    so that the restart checks below have a restart to look at."""
    return _Training(workdir)


def _listening_addresses(pid: int) -> set[str]:
    """host:port of every TCP socket process `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)
            if v6:
                host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            else:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.add(f"{host}:{int(port, 16)}")
    return found


def _has_finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Runs the scenario once; the tests below check what it saw."""
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run installs it)")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    work = tmp_path_factory.mktemp("monitoring_e2e")
    seen: dict = {"t0": time.time()}
    # Ray's dashboard and autoscaler export on fixed ports (44227, 44217) that another cluster on
    # this machine may hold: take free ones, so every target in our discovery file is our own.
    saved_env = {k: os.environ.get(k) for k in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")}
    for key in saved_env:
        os.environ[key] = str(free_port())
    node_args = {"num_cpus": 2}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node_args, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "_system_config": {"metrics_report_interval_ms": REPORT_INTERVAL_MS}})
    prometheus = launcher = training = actor = None
    try:
        for _ in range(WORKERS - 1):
            cluster.add_node(**node_args)
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        seen["cluster_up_s"] = time.time() - seen["t0"]
        from monitoring.prometheus import current_session_dir
        session = current_session_dir()
        seen["session_dir"] = session
        seen["node_targets"] = {f'{n["NodeManagerAddress"]}:{n["MetricsExportPort"]}' for n in ray.nodes() if n["Alive"]}
        seen["gpus"] = ray.cluster_resources().get("GPU", 0)

        launcher = M.LauncherMetrics(RUN, max_workers=WORKERS, min_workers=WORKERS)
        prometheus = start_prometheus(None, session, work / "prometheus", extra_targets=[launcher.address])
        assert prometheus is not None, "prometheus did not start: see the log line above"
        seen["prometheus_listens"] = _listening_addresses(prometheus.pid)
        seen["prometheus_url"] = prometheus.url
        seen["launcher_address"] = launcher.address

        actor = _pipeline_actor_cls().remote(str(REPO), RUN)
        ray.get(actor.process.remote({"read": 20, "kept": 12, "no_face": 3, "below_threshold": 2,
                                      "unreadable": 1, "not_image": 1, "duplicate": 1}))

        fit_started = time.time()
        training = _start_training(work)
        board = dash.load_dashboard()
        run_regex = re.escape(RUN).replace("\\", "\\\\")  # a regex inside a PromQL string
        queries = [q for q in dash.queries(board) if not (q.gpu_only and seen["gpus"] == 0)]
        variables = dash.variable_queries(board)
        missing: list[str] = []
        restarted_at = None
        while time.time() - fit_started < DATA_DEADLINE_S and training.alive():
            time.sleep(2)
            try:
                if restarted_at is None and prometheus.query(
                        f'max({M.RESTARTS.exported}{{run="{RUN}"}}) >= 1'):
                    restarted_at = time.time()
                missing = [q.name for q in queries
                           if not _has_finite(prometheus.query(dash.runnable(q.expr, run_regex)))]
                missing += [f"variable ${name}" for name, expr in variables.items()
                            if not prometheus.query(expr)]
            except OSError:
                continue
            # after the restart, give the gauges (set once per attempt) time to need their refresh
            if not missing and restarted_at and time.time() - restarted_at > 4 * REPORT_INTERVAL_MS / 1000:
                break
        seen["data_after_s"] = time.time() - fit_started
        seen["missing"] = missing
        seen["restarted_at"] = restarted_at
        seen["restart_seen_after_s"] = restarted_at - fit_started if restarted_at else None
        now = time.time()
        seen["instant"] = {q.name: prometheus.query(dash.runnable(q.expr, run_regex), now) for q in queries}
        seen["variables"] = {name: prometheus.query(expr, now) for name, expr in variables.items()}
        seen["range"] = {q.name: prometheus.query_range(dash.runnable(q.expr, run_regex), fit_started, now, 5)
                         for q in queries}
        seen["targets"] = prometheus.targets()
        seen["worker_ids"] = prometheus.query(
            f'count by (rank) (count by (rank, WorkerId) (last_over_time({M.STEPS.exported}{{run="{RUN}"}}[10m])))',
            now)
        if restarted_at:
            seen["gauge_range_after_restart"] = prometheus.query_range(
                f'max by (rank) ({M.WORLD_SIZE.exported}{{run="{RUN}"}})', restarted_at + 6, now, 1)
        training.stop()
        training.join(90)
        seen["training_error"] = training.error
        seen["training_alive"] = training.alive()
        yield seen
    finally:
        if training is not None:
            training.stop()
        for closer in (getattr(prometheus, "stop", None), getattr(launcher, "stop", None)):
            if closer:
                closer()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_e2e_every_target_up_and_on_loopback(e2e):
    by_instance = {t["labels"]["instance"]: t for t in e2e["targets"]}
    workers_and_launcher = sorted(e2e["node_targets"]) + [e2e["launcher_address"]]
    missing = [a for a in workers_and_launcher if a not in by_instance]
    assert not missing, f"not scraped: {missing}; scraped: {sorted(by_instance)}"
    down = [(a, by_instance[a]["health"], by_instance[a].get("lastError")) for a in workers_and_launcher
            if by_instance[a]["health"] != "up"]
    assert down == []
    others = {a: t["health"] for a, t in by_instance.items() if a not in workers_and_launcher}
    print(f"Ray component targets (dashboard, autoscaler): {others}")
    assert all(a.startswith("127.0.0.1:") for a in by_instance)
    assert e2e["prometheus_listens"] and all(a.startswith("127.0.0.1:") for a in e2e["prometheus_listens"])
    assert e2e["prometheus_url"].startswith("http://127.0.0.1:")


def test_e2e_every_dashboard_query_returns_data(e2e):
    print(f"cluster up in {e2e['cluster_up_s']:.0f} s; after fit() started: restart seen at "
          f"{e2e['restart_seen_after_s'] or float('nan'):.0f} s, all dashboard queries had data at {e2e['data_after_s']:.0f} s")
    for name, results in e2e["instant"].items():  # shown with pytest -s
        print(f"  {name}: " + ", ".join(f"{dict(r['metric'])}={float(r['value'][1]):.4g}" for r in results))
    assert e2e["missing"] == [], f"no data after {e2e['data_after_s']:.0f} s for: {e2e['missing']}"
    assert all(e2e["variables"].values())
    per_rank = e2e["instant"]["Throughput per worker [A]"]
    assert sorted(r["metric"]["rank"] for r in per_rank) == [str(r) for r in range(WORKERS)]


def test_e2e_queries_aggregate_away_worker_identity(e2e):
    """Series are keyed by run/rank/outcome/instance only: a restart (new WorkerId) continues the
    same lines instead of adding new ones."""
    for name, results in {**e2e["instant"], **e2e["range"]}.items():
        for r in results:
            extra = set(r["metric"]) - ALLOWED_RESULT_LABELS
            assert not extra, f"{name}: result keeps {extra}"
    for name, results in e2e["range"].items():
        keys = [tuple(sorted(r["metric"].items())) for r in results]
        assert len(keys) == len(set(keys)), name


def test_e2e_restart_is_counted_without_doubled_lines_or_gaps(e2e):
    assert e2e["restarted_at"], "Ray Train did not restart the workers (or the restart was not seen)"
    # the restart really gave the ranks new processes (new WorkerId label) ...
    assert {r["metric"]["rank"]: r["value"][1] for r in e2e["worker_ids"]} == {"0": "2", "1": "2"}
    # ... yet the per-rank lines stayed one per rank over the whole run
    per_rank = e2e["range"]["Throughput per worker [A]"]
    assert sorted(r["metric"]["rank"] for r in per_rank) == ["0", "1"]
    assert float(e2e["instant"]["Restarts [A]"][0]["value"][1]) == 1
    assert float(e2e["instant"]["NaN rollbacks [A]"][0]["value"][1]) == 1
    # gauges set once at the start of attempt 2 stayed visible (TrainingMetrics refreshes them)
    gauge = e2e["gauge_range_after_restart"]
    assert sorted(r["metric"]["rank"] for r in gauge) == ["0", "1"]
    for r in gauge:
        stamps = [float(t) for t, _ in r["values"]]
        assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 1.01, f"gap in rank {r['metric']['rank']}"
        assert {v for _, v in r["values"]} == {str(WORKERS)}


def test_e2e_training_finished_cleanly(e2e):
    assert not e2e["training_alive"]
    assert e2e["training_error"] is None, repr(e2e["training_error"])
