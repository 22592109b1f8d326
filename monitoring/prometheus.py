"""A Prometheus for one run, on 127.0.0.1, keeping its data in RUN_DIR/prometheus/.

    with run_prometheus(run_dir / "prometheus") as url:   # "http://127.0.0.1:PORT", or None
        os.environ.update(ray_dashboard_env(url, grafana_url))  # before the Ray head starts
        ... start or join Ray ...
        scrape_cluster(run_dir / "prometheus", session_dir)

Prometheus starts before Ray so that its address can be handed to Ray's dashboard, which reads it
once, when the head starts. It picks its own free port (listen address 127.0.0.1:0) and this
module reads the port back from its log. It scrapes the targets file `ray_targets.json` beside
its data, a link that scrape_cluster() points at the discovery file of the run's own Ray session
(Prometheus re-reads it every 5 s), so another Ray cluster on this machine never mixes in.

Why not `ray metrics launch-prometheus`: it downloads a Prometheus release, listens on every
interface at a fixed port and scrapes the newest session under /tmp/ray, whichever cluster that
is. monitoring/docker-compose.yml is the way with Docker; this is the way with a `prometheus`
binary on PATH (Debian: apt-get install prometheus). A finished run's data can be looked at with
`prometheus --config.file=RUN_DIR/prometheus/prometheus.yml --storage.tsdb.path=RUN_DIR/prometheus/data
--web.listen-address=127.0.0.1:9090`.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from base.errors import UserError
from base.ports import check_port_free

TEMPLATE = Path(__file__).with_name("prometheus.yml")
DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # what Ray's head writes into its session dir
TARGETS_LINK = "ray_targets.json"
LISTENING = re.compile(r'msg="Listening on" address=(127\.0\.0\.1:\d+)')


def render_config(targets_file: Path) -> str:
    """monitoring/prometheus.yml with its Ray job reading `targets_file`."""
    config = yaml.safe_load(TEMPLATE.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    job["file_sd_configs"][0]["files"] = [str(targets_file)]
    return "# Rendered by monitoring/prometheus.py from monitoring/prometheus.yml\n" + yaml.safe_dump(
        config, sort_keys=False)


def scrape_cluster(data_dir: Path, session_dir: str | os.PathLike) -> None:
    """Points the run's Prometheus at the discovery file of the Ray session in `session_dir`."""
    link = Path(data_dir) / TARGETS_LINK
    link.unlink(missing_ok=True)
    link.symlink_to(Path(session_dir).resolve() / DISCOVERY_FILE)


@contextlib.contextmanager
def run_prometheus(data_dir: Path, port: int = 0, ready_timeout_s: float = 60.0):
    """Runs Prometheus on 127.0.0.1:`port` (0: one it picks) with its config, time series and log
    in `data_dir`; yields its URL once it answers /-/ready, and stops it on exit. Raises
    RuntimeError, with the log's last line, if it exits or is not ready in time."""
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    config = data_dir / "prometheus.yml"
    config.write_text(render_config(data_dir / TARGETS_LINK))
    log_path = data_dir / "prometheus.log"
    with open(log_path, "ab") as log_file:
        start = log_file.tell()  # the log of this start only
        process = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={data_dir / 'data'}",
             "--storage.tsdb.retention.time=30d"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield _wait_until_ready(process, log_path, start, ready_timeout_s)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_ready(process: subprocess.Popen, log_path: Path, start: int, timeout_s: float) -> str:
    """The server's URL, from the port in its log, once it answers /-/ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with open(log_path, "rb") as f:
            f.seek(start)
            found = LISTENING.search(f.read().decode(errors="replace"))
        if found:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{found[1]}/-/ready", timeout=2):
                return f"http://{found[1]}"  # answered 200: a 503 (not ready yet) raises HTTPError
        time.sleep(0.2)
    lines = log_path.read_text(errors="replace").strip().splitlines() or ["no output"]
    state = f"exit status {process.returncode}" if process.poll() is not None else f"not ready after {timeout_s:.0f} s"
    raise RuntimeError(f"Prometheus did not start ({state}): {lines[-1][-300:]}")


def ray_dashboard_env(prometheus_url: str | None, grafana_url: str | None) -> dict[str, str]:
    """The variables that tell Ray's dashboard where Prometheus and Grafana are (its Overview and
    Metrics charts); the dashboard reads them once, when the Ray head starts."""
    env = {"RAY_PROMETHEUS_HOST": prometheus_url} if prometheus_url else {}
    if grafana_url:
        env |= {"RAY_GRAFANA_HOST": grafana_url, "RAY_GRAFANA_IFRAME_HOST": grafana_url}
    return env


def check_run_options(port: int | None, grafana_url: str | None) -> None:
    """launch.py's --prometheus-port and --grafana-url, before anything starts."""
    if port is not None:
        check_port_free("--prometheus-port", port)
    if grafana_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", grafana_url):
        raise UserError(f"--grafana-url {grafana_url}: expected a URL such as http://127.0.0.1:3000")


@contextlib.contextmanager
def prometheus_for_run(wanted: bool | None, folder: Path, port: int | None, grafana_url: str | None,
                       joins_cluster: bool):
    """If `wanted` (None: when a `prometheus` binary is on PATH), the run's Prometheus, with its
    data in `folder`, started before Ray: Ray's dashboard reads where it is (and where Grafana is)
    once, as the head starts. Yields `folder` for scrape_cluster(), or None. Metrics never stop a
    run: a Prometheus that fails costs one line."""
    if wanted is None:
        wanted = bool(shutil.which("prometheus"))
    url = None
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(run_prometheus(folder, port or 0)) if wanted else None
        except (OSError, RuntimeError) as exc:
            print(f"[launch] no Prometheus for this run: {exc}", flush=True)
        os.environ.update(ray_dashboard_env(url, grafana_url))
        if url:
            print(f"[launch] Prometheus: {url} (data in {folder})", flush=True)
        if url and joins_cluster:
            print(f"[launch] a dashboard started elsewhere shows it if its head had RAY_PROMETHEUS_HOST={url}")
        if grafana_url:
            print(f"[launch] Grafana: {grafana_url.rstrip('/')}/d/progan-training (\"ProGAN training\")")
        yield folder if url else None


def scrape_connected_cluster(data_dir: Path) -> None:
    """scrape_cluster() for the Ray session this process is connected to (no public Ray API names
    the session folder)."""
    import ray

    scrape_cluster(data_dir, ray._private.worker._global_node.get_session_dir_path())
