"""The Grafana dashboard JSON as the tests read it (its panels, their PromQL, that PromQL made
runnable against Prometheus' HTTP API with Grafana's variables replaced), and a small client of
that API."""
from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "progan-training.json"
DATASOURCE_PROVISIONING = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVISIONING = MONITORING / "grafana" / "provisioning" / "dashboards" / "progan.yml"

# Panels whose description starts with this read Ray's GPU metrics only: on CPU-only clusters they
# have no data, so the end-to-end test exempts them there (and only there).
GPU_ONLY = "GPU only:"
GPU_METRICS = ("ray_node_gpus_utilization", "ray_node_gpus_available", "ray_node_gram_used", "ray_node_gram_available")


@dataclass(frozen=True)
class Query:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str
    gpu_only: bool

    @property
    def name(self) -> str:
        return f"{self.panel_title} [{self.ref_id}]"


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    out = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def queries(dashboard: dict) -> list[Query]:
    out = []
    for panel in panels(dashboard):
        gpu = str(panel.get("description", "")).startswith(GPU_ONLY)
        for target in panel.get("targets", []):
            out.append(Query(panel["id"], panel.get("title", ""), target.get("refId", ""), target.get("expr", ""), gpu))
    return out


def variable_queries(dashboard: dict) -> dict[str, str]:
    """Template variables as PromQL: Grafana's `label_values(metric, label)` becomes
    `group by (label) (metric)`, which returns one series per value."""
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var.get("query"), dict) else var.get("query", "")
        m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", q)
        if not m:
            raise ValueError(f"variable {var.get('name')}: unsupported query {q!r}")
        out[var["name"]] = f"group by ({m.group(2)}) ({m.group(1)})"
    return out


def runnable(expr: str, run_regex: str = ".*", rate_interval: str = "20s", range_: str = "10m") -> str:
    """The expression as Grafana would send it: $run, $__rate_interval, $__range and friends replaced."""
    out = (expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
           .replace("$__interval", rate_interval).replace("$__range", range_)
           .replace("${run}", run_regex).replace("$run", run_regex))
    if "$" in out:
        raise ValueError(f"unreplaced variable in {expr!r}")
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers left after removing label matchers, ranges,
    grouping clauses and function calls."""
    s = re.sub(r"\{[^}]*\}", " ", expr)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for token in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if s[token.end():].lstrip().startswith("("):
            continue  # a function or aggregation
        if token.group() not in ("and", "or", "unless", "bool", "offset", "inf", "nan"):
            names.add(token.group())
    return names


class PrometheusAPI:
    """Prometheus' HTTP API at `url`: instant and range queries, active targets. Raises on an HTTP
    error or a query Prometheus refuses."""

    def __init__(self, url: str):
        self.url = url

    def _get(self, path: str, **params) -> dict | list:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.loads(r.read().decode())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, time_s: float | None = None) -> list[dict]:
        return self._get("/api/v1/query", query=expr, **({} if time_s is None else {"time": f"{time_s:.3f}"}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets", state="active")["activeTargets"]
