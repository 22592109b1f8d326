"""Monitoring: metric definitions, failure handling, the run's Prometheus, and one end-to-end run.

The end-to-end part starts a real Prometheus with the project's own monitoring/prometheus.yml on
a port it picks itself, then (as launch.py does) a 2-node local Ray cluster whose dashboard is told
where that Prometheus is, runs the real data pipeline there (its CLI, labelled with the run's
name, on real photos and a few bad files), then a tiny real training (progan's trainer, 2
workers) with those shards. The training's NaN test hook rolls it back once, so Ray Train
restarts the workers from a checkpoint; once every panel has data the test ends the run with its
STOP file. It checks through Prometheus' HTTP API that every target is up, that every PromQL
expression of the Grafana dashboard returns data (GPU-only panels are exempt on a CPU-only
cluster), that the restart and the rollback were counted once, and that the restart neither
doubled a line nor left a gap, that the pipeline's counts in Prometheus equal its manifest's, and
that Ray's dashboard reaches the run's Prometheus.

Skips (does not fail) the end-to-end part only when no `prometheus` binary is installed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from base.ports import free_port
from data_pipeline.manifest import COUNT_NAMES
from monitoring import metrics as M
from monitoring.prometheus import TARGETS_LINK, ray_dashboard_env, render_config, run_prometheus, scrape_cluster
from progan.training.background_run import BackgroundRun

import dashboard_queries as dash
from conftest import copy_test_photos, make_shards, tiny_config

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
RUN = f"mon-e2e-{uuid.uuid4().hex[:6]}"  # the run folder's name, which labels the loop's metrics
WORKERS = 2
CLUSTER_NODES = 2  # one training worker per node
# Ray's export interval for this test's cluster: 2 s instead of 10 s, so the test is quick.
REPORT_INTERVAL_MS = 2000
SCRAPE_INTERVAL_S = float(yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
                          ["global"]["scrape_interval"].rstrip("s"))
# tiny_config's 16x16 network: 4x4 until kimg 0.128, 8x8 (fade-in, stabilise) until 0.384, then
# 16x16 until total_kimg, far beyond what the test waits for: it ends the run with the STOP file.
TRAINING_OVERRIDES = ("schedule.total_kimg=200", "cluster.max_failures=2", "checkpoint.every_kimg=0.064",
                      "monitoring.log_every_steps=2", f"cluster.min_workers={WORKERS}")
NAN_AT_KIMG = 0.08        # one NaN two steps after the first checkpoint (kimg 0.064), still at 4x4
GAUGE_WINDOW_S = 4        # gauges checked for gaps over at least this long after the restart
# Ray Train for this module: no Train state actor (LocalCluster turns it on with a dashboard; one
# process less to start), and the controller notices the rollback and the end of the run sooner.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
DATA_DEADLINE_S = 240     # from the start of fit() to every dashboard query having data (a loaded machine)
ALLOWED_RESULT_LABELS = {"run", "rank", "outcome", "resolution", "instance", "GpuIndex"}


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
            assert spec.name.endswith("_seconds")
        assert spec.exported.startswith("ray_progan_")
        assert spec.help.strip(), spec.name
    assert M.SECONDS_BUCKETS == tuple(sorted(M.SECONDS_BUCKETS))
    for spec in M.TRAINING_METRICS:
        assert spec.tags[:3] == ("run", "rank", "node")
    assert set(M.STAT_GAUGES) == {"resolution", "alpha", "world_size", "lr", "loss_d", "loss_g", "grad_penalty",
                                  "grad_norm", "score_real", "score_fake", "img_per_s"}


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


def test_training_metrics_swallow_bad_input_and_log_once_per_method(caplog):
    caplog.set_level(logging.WARNING, logger="progan.monitoring")
    m = M.TrainingMetrics("unit", 0, "n0")  # no Ray cluster here: recording is a no-op, not an error
    m.observe_step(32, 0.1, 0.01, backward_seconds=0.05)
    m.observe_stats({"resolution": 8, "phase": "fade-in", "alpha": 0.5, "world_size": 2, "lr": 1e-3,
                     "loss_d": float("nan"), "loss_g": 1.0, "grad_penalty": 0.1, "grad_norm": 3.9, "score_real": 1.0,
                     "score_fake": -1.0, "img_per_s": 100.0, "kimg": 1.2, "nonfinite": True})
    m.observe_checkpoint(1.5)
    m.observe_swd(8, 123.0)
    m.count_restart()
    m.count_rollback()
    assert _warnings(caplog) == []
    for _ in range(3):
        assert m.observe_step("many", None, object()) is None  # type: ignore[arg-type]
        m.observe_stats({"alpha": "not a number"})
    msgs = _warnings(caplog)
    assert len(msgs) == 2 and "observe_step" in msgs[0] and "observe_stats" in msgs[1], msgs


def test_metrics_survive_a_broken_export(caplog, monkeypatch):
    """If creating or recording metrics raises (a broken metrics agent), nothing reaches the caller."""
    caplog.set_level(logging.WARNING, logger="progan.monitoring")

    def broken(*args, **kwargs):
        raise OSError("metrics agent unreachable")

    monkeypatch.setattr(M, "_make", broken)
    m, p = M.TrainingMetrics("unit", 1, ""), M.PipelineMetrics("unit")
    for _ in range(3):
        m.observe_step(32, 0.1, 0.01)
        m.count_restart()
        p.count("kept")
    assert [msg.split(":")[0] for msg in _warnings(caplog)] == [
        "TrainingMetrics.__init__", "PipelineMetrics.__init__", "TrainingMetrics.observe_step",
        "TrainingMetrics.count_restart", "PipelineMetrics.count"]


def test_pipeline_metrics_unknown_outcome_logs_once(caplog):
    caplog.set_level(logging.WARNING, logger="progan.monitoring")
    p = M.PipelineMetrics("unit")
    for outcome in ("read",) + M.OUTCOMES:
        p.count(outcome, 3)
    p.count("kept", 0)
    assert _warnings(caplog) == []
    p.count("eaten_by_cat")
    p.count("eaten_by_cat")
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "eaten_by_cat" in msgs[0], msgs


# ------------------------------------------------------------------------------ the run's Prometheus

def test_render_config_reads_the_targets_link_and_passes_promtool(tmp_path):
    text = render_config(tmp_path / TARGETS_LINK)
    jobs = yaml.safe_load(text)["scrape_configs"]
    assert [job["file_sd_configs"][0]["files"] for job in jobs] == [[str(tmp_path / TARGETS_LINK)]]
    promtool = shutil.which("promtool")
    if promtool:
        (tmp_path / "p.yml").write_text(text)
        out = subprocess.run([promtool, "check", "config", str(tmp_path / "p.yml")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_run_prometheus_on_a_taken_port_says_why(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(RuntimeError, match="address already in use"):
            with run_prometheus(tmp_path / "prom", port=s.getsockname()[1]):
                pass


# ------------------------------------------------------------------------------ end to end

def _run_pipeline(cluster, faces_dir: Path, work: Path) -> dict:
    """The real data pipeline (its CLI, as launch.py runs it) on this cluster, labelled with the
    run's name, on 64 real photos plus an empty file, a text file named .jpg and a duplicate;
    returns its manifest. Its shards feed the training."""
    photos = copy_test_photos(faces_dir, work / "photos")
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.jpg").write_text("not a photo")
    shutil.copy(sorted(photos.glob("0*.jpg"))[0], photos / "copy.jpg")
    out = make_shards(photos, work / "faces16", cluster.cluster.address, "--run-name", RUN, "--quiet")
    return json.loads((out / "manifest.json").read_text()) | {"path": out}


def _start_training(run_dir: Path, shards: Path) -> BackgroundRun:
    """The job under test: a tiny real training (progan.training.train_loop.build_trainer, as launch.py builds
    it) on the module's 2-node cluster. Its NaN test hook fails the first attempt once, so that Ray
    Train restarts the workers from a checkpoint."""
    from faults import FaultInjection
    from cluster.local import TRAIN_SLOT
    from progan.training.train_loop import build_trainer

    run_dir.mkdir(parents=True)
    return BackgroundRun(build_trainer(tiny_config(*TRAINING_OVERRIDES), run_dir, shards, workers=WORKERS,
                                       train_slot=TRAIN_SLOT,
                                       extra_loop_config={"callback": FaultInjection(nan_at_kimg=NAN_AT_KIMG)}),
                         run_dir)


def _pid_running(config: Path) -> int:
    """The process whose command line names `config` (the run's Prometheus)."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if f"--config.file={config}".encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                return int(proc.name)
    raise LookupError(config)


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


def _get_json(url: str) -> dict:
    """The JSON body of a GET, also of an error status (Ray's dashboard answers 500 with a reason)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}") | {"http_status": exc.code}


def _has_finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def _gauges_visible_from(training: BackgroundRun) -> float | None:
    """When Prometheus holds the restarted workers' gauges for sure: their first stats line after
    the resume, exported by Ray's agent, then scraped."""
    resumes = [e["time"] for e in training.events() if e["event"] == "resume"]
    first = [s["time"] for s in training.stats() if resumes and s["time"] > resumes[0]]
    return first[0] + REPORT_INTERVAL_MS / 1000 + SCRAPE_INTERVAL_S + 1 if first else None


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """The run's Prometheus, started before the cluster as launch.py starts it: its URL and folder."""
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("monitoring_e2e") / "prometheus"
    with run_prometheus(folder) as url:
        yield url, folder


@pytest.fixture(scope="module")
def cluster(request, prometheus):
    """This module's cluster (instead of conftest's): its dashboard knows the run's Prometheus,
    metrics are exported every 2 s, and the dashboard's and autoscaler's exporters take free
    ports, so every target is this cluster's."""
    from ray.cloudpickle import register_pickle_by_value

    from cluster.local import LocalCluster, temporary_environ

    register_pickle_by_value(request.module)  # workers cannot import the tests folder
    started = time.time()
    with temporary_environ(TRAIN_ENV | ray_dashboard_env(prometheus[0], None)), \
            LocalCluster(CLUSTER_NODES, dashboard_port=free_port(), include_dashboard=True,
                         system_config={"metrics_report_interval_ms": REPORT_INTERVAL_MS},
                         free_metric_ports=True) as local:
        local.up_s = time.time() - started
        yield local


def _wait_for_data(api: dash.PrometheusAPI, training: BackgroundRun, fit_started: float, seen: dict) -> None:
    """Polls until the restart is counted, the restarted workers' gauges have been scraped for
    GAUGE_WINDOW_S (long enough to show a gap if there were one), and then until every dashboard
    query and variable has data; records what was still missing in seen["missing"]."""
    missing = ["(not checked: no stats line from the restarted workers yet)"]
    restarted_at = gauges_from = None
    while time.time() - fit_started < DATA_DEADLINE_S and training.alive():
        time.sleep(1)
        try:
            if restarted_at is None and api.query(f'max({M.RESTARTS.exported}{{run="{RUN}"}}) >= 1'):
                restarted_at = time.time()
            gauges_from = gauges_from or _gauges_visible_from(training)
            if restarted_at is None or gauges_from is None or time.time() < gauges_from + GAUGE_WINDOW_S:
                continue
            missing = [name for name, expr in seen["runnable"].items() if not _has_finite(api.query(expr))]
            missing += [f"variable ${name}" for name, expr in seen["variables_expr"].items() if not api.query(expr)]
        except OSError:
            continue
        if not missing:
            break
    seen.update(missing=missing, restarted_at=restarted_at, gauges_from=gauges_from,
                data_after_s=time.time() - fit_started,
                restart_seen_after_s=restarted_at - fit_started if restarted_at else None)


def _look_after_stop(api: dash.PrometheusAPI, fit_started: float, now: float, seen: dict) -> None:
    """What Prometheus holds at `now`, the moment the test asked the run to stop."""
    seen["instant"] = {name: api.query(expr, now) for name, expr in seen["runnable"].items()}
    seen["variables"] = {name: api.query(expr, now) for name, expr in seen["variables_expr"].items()}
    seen["range"] = {name: api.query_range(expr, fit_started, now, 5) for name, expr in seen["runnable"].items()}
    seen["targets"] = api.targets()
    seen["worker_ids"] = api.query(
        f'count by (rank) (count by (rank, WorkerId) (last_over_time({M.STEPS.exported}{{run="{RUN}"}}[10m])))', now)
    if seen["gauges_from"] and seen["gauges_from"] < now:
        seen["gauge_range_after_restart"] = api.query_range(
            f'max by (rank) ({M.WORLD_SIZE.exported}{{run="{RUN}"}})', seen["gauges_from"], now, 1)


@pytest.fixture(scope="module")
def e2e(prometheus, cluster, faces_dir, tmp_path_factory):
    """Runs the scenario once; the tests below check what it saw."""
    import ray

    url, folder = prometheus
    api = dash.PrometheusAPI(url)
    work = tmp_path_factory.mktemp("monitoring_e2e")
    scrape_cluster(folder, ray._private.worker._global_node.get_session_dir_path())  # as launch.py does
    board = dash.load_dashboard()
    gpus = ray.cluster_resources().get("GPU", 0)
    run_regex = re.escape(RUN).replace("\\", "\\\\")  # a regex inside a PromQL string
    seen: dict = {"cluster_up_s": cluster.up_s, "prometheus_url": url,
                  "prometheus_listens": _listening_addresses(_pid_running(folder / "prometheus.yml")),
                  "node_targets": {f'{n["NodeManagerAddress"]}:{n["MetricsExportPort"]}'
                                   for n in ray.nodes() if n["Alive"]},
                  "runnable": {q.name: dash.runnable(q.expr, run_regex) for q in dash.queries(board)
                               if not (q.gpu_only and gpus == 0)},
                  "variables_expr": dash.variable_queries(board)}
    pipeline_started = time.time()
    seen["manifest"] = _run_pipeline(cluster, faces_dir, work)
    seen["shards_s"] = time.time() - pipeline_started
    fit_started = time.time()
    training = _start_training(work / RUN, seen["manifest"]["path"])
    try:
        _wait_for_data(api, training, fit_started, seen)
        seen["prometheus_health"] = _get_json(f"{cluster.dashboard_url}/api/prometheus_health")
        now = time.time()
        training.stop()  # the run finishes its step, saves a checkpoint and ends; the queries look at `now`
        _look_after_stop(api, fit_started, now, seen)
        try:
            seen["result"], seen["training_error"] = training.join(120), None
        except Exception as exc:  # reported by test_e2e_training_finished_cleanly
            seen["result"], seen["training_error"] = None, exc
        seen["stop_s"] = time.time() - now
        seen["events"] = training.events()
        seen["timeline"] = [(round(e["time"] - fit_started, 1), e["event"], e.get("kimg"), e.get("resolution"))
                            for e in seen["events"]]
        seen["training_alive"] = training.alive()
        yield seen
    finally:
        if training.alive():
            training.stop()
            training.thread.join(60)


def test_e2e_every_target_up_and_on_loopback(e2e):
    by_instance = {t["labels"]["instance"]: t for t in e2e["targets"]}
    missing = [a for a in sorted(e2e["node_targets"]) if a not in by_instance]
    assert not missing, f"not scraped: {missing}; scraped: {sorted(by_instance)}"
    down = [(a, by_instance[a]["health"], by_instance[a].get("lastError")) for a in sorted(e2e["node_targets"])
            if by_instance[a]["health"] != "up"]
    assert down == []
    others = {a: t["health"] for a, t in by_instance.items() if a not in e2e["node_targets"]}
    print(f"Ray component targets (dashboard, autoscaler): {others}")
    assert all(a.startswith("127.0.0.1:") for a in by_instance)
    assert e2e["prometheus_url"].startswith("http://127.0.0.1:")
    assert e2e["prometheus_listens"] == {e2e["prometheus_url"].removeprefix("http://")}


def test_e2e_ray_dashboard_reaches_the_runs_prometheus(e2e):
    """The dashboard's own health check of Prometheus (what its Overview and Metrics pages ask)."""
    assert e2e["prometheus_health"]["result"] is True, e2e["prometheus_health"]
    assert e2e["prometheus_health"]["msg"] == "prometheus running"


def test_e2e_every_dashboard_query_returns_data(e2e):
    print(f"cluster up in {e2e['cluster_up_s']:.0f} s, shards made in {e2e['shards_s']:.0f} s; after fit() "
          f"started: restart seen at {e2e['restart_seen_after_s'] or float('nan'):.0f} s, all dashboard queries "
          f"had data at {e2e['data_after_s']:.0f} s; STOP took {e2e['stop_s']:.0f} s")
    print("  run events (s after fit(), event, kimg, resolution):", e2e["timeline"])
    for name, results in e2e["instant"].items():  # shown with pytest -s
        print(f"  {name}: " + ", ".join(f"{dict(r['metric'])}={float(r['value'][1]):.4g}" for r in results))
    assert e2e["missing"] == [], f"no data after {e2e['data_after_s']:.0f} s for: {e2e['missing']}"
    assert all(e2e["variables"].values())
    per_rank = e2e["instant"]["Throughput per worker [A]"]
    assert sorted(r["metric"]["rank"] for r in per_rank) == [str(r) for r in range(WORKERS)]


def test_e2e_pipeline_counts_match_its_manifest(e2e):
    """What the pipeline's tasks, actors and driver counted for Prometheus is what its manifest says."""
    counts = e2e["manifest"]["counts"]
    assert counts["files_seen"] == 67 and counts["unreadable"] >= 1 and counts["not_an_image"] == 1
    assert counts["duplicate_content"] == 1 and counts["faces_kept"] >= 50
    assert [float(r["value"][1]) for r in e2e["instant"]["Pipeline outcomes [A]"]] == [counts["files_seen"]]
    by_outcome = {r["metric"]["outcome"]: float(r["value"][1]) for r in e2e["instant"]["Pipeline outcomes [B]"]}
    manifest_by_outcome = {status: counts[name] for status, name in COUNT_NAMES.items() if counts[name]}
    assert by_outcome == manifest_by_outcome  # an outcome that never happened has no series


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
    events = e2e["events"]
    assert len([e for e in events if e["event"] == "nan_rollback"]) == 1
    assert len([e for e in events if e["event"] == "resume"]) == 1
    # the restart really gave the ranks new processes (new WorkerId label) ...
    assert {r["metric"]["rank"]: r["value"][1] for r in e2e["worker_ids"]} == {"0": "2", "1": "2"}
    # ... yet the per-rank lines stayed one per rank over the whole run
    per_rank = e2e["range"]["Throughput per worker [A]"]
    assert sorted(r["metric"]["rank"] for r in per_rank) == ["0", "1"]
    assert [float(r["value"][1]) for r in e2e["instant"]["Restarts [A]"]] == [1]  # no extra 0 from `or`
    assert [float(r["value"][1]) for r in e2e["instant"]["NaN rollbacks [A]"]] == [1]
    # the restarted workers' gauges stayed visible, without a gap, from their first stats line on
    gauge = e2e.get("gauge_range_after_restart")
    assert gauge, "the restarted workers logged no stats line in time"
    assert sorted(r["metric"]["rank"] for r in gauge) == ["0", "1"]
    for r in gauge:
        stamps = [float(t) for t, _ in r["values"]]
        assert stamps[-1] - stamps[0] >= GAUGE_WINDOW_S - 1
        assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 1.01, f"gap in rank {r['metric']['rank']}"
        assert {v for _, v in r["values"]} == {str(WORKERS)}


def test_e2e_gauges_follow_the_training(e2e):
    """The real loop's gauges change: the resolution grows 4 -> 8 -> 16 and never goes back (the
    rollback here stays within the 4x4 phase: NAN_AT_KIMG and the checkpoint before it), the
    losses move."""
    (resolution,) = e2e["range"]["Resolution [A]"]
    values = [float(v) for _, v in resolution["values"]]
    assert values and set(values) <= {4.0, 8.0, 16.0} and values == sorted(values), values
    (loss_d,) = e2e["range"]["Losses [A]"]
    assert len({v for _, v in loss_d["values"]}) > 1


def test_e2e_training_finished_cleanly(e2e):
    assert not e2e["training_alive"]
    assert e2e["training_error"] is None, repr(e2e["training_error"])
    stopped = [e for e in e2e["events"] if e["event"] == "stopped"]
    assert len(stopped) == 1 and "STOP" in stopped[0]["reason"], stopped
    assert e2e["events"][-2]["event"] == "checkpoint" and e2e["events"][-1] == stopped[0]
    assert e2e["result"].metrics["ranks_identical"] is True
