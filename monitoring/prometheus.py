"""A local Prometheus server for one run, scraping the run's Ray cluster. Loopback only.

    handle = start_prometheus(port=None, ray_temp_dir=session_dir, data_dir=run_dir / "prometheus")
    ...                       # handle.url -> "http://127.0.0.1:PORT", handle.query("up")
    handle.stop()

`ray_temp_dir` is where Ray writes `prom_metrics_service_discovery.json`: a Ray temp dir (default
/tmp/ray, where the file is a link to the newest session's copy) or, better, the session dir of the
cluster (`current_session_dir()` in a connected driver), whose copy belongs to that cluster alone,
so two clusters on one machine never mix. The file need not exist yet: Prometheus re-reads it
every 5 s. The config written to `data_dir/prometheus.yml` is monitoring/prometheus.yml with that
path (and any `extra_targets`, e.g. the launcher's own exporter); the time series go to
`data_dir/data` and the server's log to `data_dir/prometheus.log`.

If the `prometheus` binary is missing or the server does not come up (port taken, bad data dir),
start_prometheus logs one line and returns None: monitoring never stops a run.

To look at a finished run again: `python -m monitoring.prometheus --data RUN_DIR/prometheus`.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

log = logging.getLogger("progan.monitoring")

TEMPLATE = Path(__file__).with_name("prometheus.yml")
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DEFAULT_RAY_TEMP_DIR = "/tmp/ray"
RAY_JOB = "ray"
LAUNCHER_JOB = "progan-launcher"


def current_session_dir() -> str | None:
    """The session dir of the Ray cluster this process is connected to, or None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:
        return None


def discovery_file(ray_dir: str | os.PathLike | None) -> Path:
    """The discovery file in a Ray temp or session dir (None: the connected cluster's session,
    else Ray's default temp dir)."""
    ray_dir = ray_dir or current_session_dir() or DEFAULT_RAY_TEMP_DIR
    return Path(ray_dir).expanduser().resolve() / DISCOVERY_FILE


def render_config(ray_dir: str | os.PathLike | None, extra_targets: tuple[str, ...] | list[str] = (),
                  template: Path = TEMPLATE) -> str:
    """monitoring/prometheus.yml with the run's discovery file, plus a static job for
    `extra_targets` ("127.0.0.1:PORT" exporters outside Ray, e.g. LauncherMetrics.address)."""
    config = yaml.safe_load(Path(template).read_text())
    jobs = [job for job in config["scrape_configs"] if job.get("job_name") == RAY_JOB]
    if len(jobs) != 1:
        raise ValueError(f"{template}: expected one scrape job named {RAY_JOB!r}")
    jobs[0]["file_sd_configs"][0]["files"] = [str(discovery_file(ray_dir))]
    targets = [t for t in extra_targets if t]
    if targets:
        config["scrape_configs"].append({"job_name": LAUNCHER_JOB, "static_configs": [{"targets": targets}]})
    return "# Rendered by monitoring/prometheus.py from monitoring/prometheus.yml\n" + yaml.safe_dump(
        config, sort_keys=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a crashed launcher leaves no
    Prometheus behind (Linux only; harmless elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class QueryError(RuntimeError):
    """Prometheus refused a query (bad PromQL, bad parameters)."""


def _get_json(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 422):
            try:
                detail = json.loads(exc.read().decode()).get("error", "")
            except Exception:
                detail = ""
            raise QueryError(f"{exc.code} {detail} <- {urllib.parse.unquote(url)}") from None
        raise


class PrometheusHandle:
    """A running Prometheus: `url`, `port`, `config_path`, `data_dir`, `query()`, `stop()`."""

    def __init__(self, process: subprocess.Popen, port: int, config_path: Path, data_dir: Path, log_path: Path):
        self.process, self.port = process, port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path, self.data_dir, self.log_path = config_path, data_dir, log_path
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return response.status == 200
        except Exception:
            return False

    def query(self, expr: str, time_s: float | None = None) -> list[dict]:
        """Instant query; returns the `result` list (raises on an HTTP or PromQL error)."""
        params = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        body = _get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        if body.get("status") != "success":
            raise QueryError(f"query {expr!r}: {body}")
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
        body = _get_json(f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}")
        if body.get("status") != "success":
            raise QueryError(f"query_range {expr!r}: {body}")
        return body["data"]["result"]

    def targets(self) -> list[dict]:
        return _get_json(f"{self.url}/api/v1/targets?state=active")["data"]["activeTargets"]

    def stop(self, timeout: float = 10.0) -> None:
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout)
        except Exception as exc:
            log.warning("prometheus: stopping pid %s failed: %s", self.process.pid, exc)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"PrometheusHandle(url={self.url!r}, pid={self.process.pid}, data_dir={str(self.data_dir)!r})"


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][-300:] if lines else "no output"
    except OSError:
        return "no log"


def start_prometheus(port: int | None, ray_temp_dir: str | os.PathLike | None, data_dir: str | os.PathLike, *,
                     extra_targets: tuple[str, ...] | list[str] = (), binary: str | None = None,
                     ready_timeout_s: float = 30.0) -> PrometheusHandle | None:
    """Starts Prometheus on 127.0.0.1:`port` (None: a free port) scraping the cluster whose Ray
    temp or session dir is `ray_temp_dir`, storing into `data_dir`. Returns a handle once the
    server answers /-/ready, or None (after one log line) when it cannot run."""
    try:
        binary = binary or shutil.which("prometheus")
        if not binary:
            log.warning("prometheus: no `prometheus` binary on PATH; metrics are still exported by Ray "
                        "(apt-get install prometheus, or see monitoring/README.md)")
            return None
        data_dir = Path(data_dir).resolve()
        (data_dir / "data").mkdir(parents=True, exist_ok=True)
        config_path = data_dir / "prometheus.yml"
        config_path.write_text(render_config(ray_temp_dir, extra_targets))
        sd_dir = discovery_file(ray_temp_dir).parent
        if not sd_dir.is_dir():
            log.warning("prometheus: %s does not exist on this machine (a remote cluster? run `python -m "
                        "monitoring.prometheus` on its head node); no Ray targets until it does", sd_dir)
        log_path = data_dir / "prometheus.log"
        attempts = 3 if port is None else 1
        reason = ""
        for _ in range(attempts):
            chosen = port if port is not None else free_port()
            handle = _launch(binary, chosen, config_path, data_dir, log_path, ready_timeout_s)
            if isinstance(handle, PrometheusHandle):
                return handle
            reason = handle
            if "address already in use" not in reason:
                break
        log.warning("prometheus: did not start (%s); see %s. Training goes on without it", reason, log_path)
        return None
    except Exception as exc:
        log.warning("prometheus: did not start (%s: %s). Training goes on without it", type(exc).__name__, exc)
        return None


def _launch(binary: str, port: int, config_path: Path, data_dir: Path, log_path: Path,
            ready_timeout_s: float) -> PrometheusHandle | str:
    args = [binary, f"--config.file={config_path}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={data_dir / 'data'}", "--storage.tsdb.retention.time=30d", "--log.level=warn"]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, close_fds=True,
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
    handle = PrometheusHandle(process, port, config_path, data_dir, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.stop()
            return f"exit status {process.returncode}: {_last_line(log_path)}"
        if handle.ready():
            return handle
        time.sleep(0.2)
    handle.stop()
    return f"not ready after {ready_timeout_s:.0f} s: {_last_line(log_path)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a local Prometheus (127.0.0.1) on a Ray cluster's metrics, "
                                            "or on a finished run's stored data.")
    p.add_argument("--data", required=True, help="folder for config, time series and log (e.g. RUN_DIR/prometheus)")
    p.add_argument("--ray-dir", default=None,
                   help=f"Ray temp or session dir holding {DISCOVERY_FILE} (default: {DEFAULT_RAY_TEMP_DIR})")
    p.add_argument("--port", type=int, default=9090, help="0: a free port")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    handle = start_prometheus(args.port or None, args.ray_dir, args.data)
    if handle is None:
        return 1
    print(f"Prometheus: {handle.url}  (config {handle.config_path}; Ctrl-C stops it)", flush=True)
    try:
        while handle.running():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
