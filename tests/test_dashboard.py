"""The Grafana dashboard JSON and its provisioning, checked without Grafana (not installable here):
uids and datasource references, one or more queries per panel, metric names that exist, queries that
aggregate away per-process labels, and the docker-compose file that mounts it all."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import dashboard_queries as dash
from monitoring import metrics as M

MONITORING = dash.MONITORING
AGGREGATIONS = ("sum", "max", "min", "avg", "count", "histogram_quantile", "group")
PER_PROCESS_LABELS = ("WorkerId", "SessionName", "Component", "pid", "node", "NodeAddress", "job")


@pytest.fixture(scope="module")
def board() -> dict:
    return dash.load_dashboard()


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    config = yaml.safe_load(dash.DATASOURCE_PROVISIONING.read_text())
    sources = config["datasources"]
    assert config["apiVersion"] == 1 and len(sources) == 1
    assert sources[0]["type"] == "prometheus" and sources[0]["access"] == "proxy"
    return sources[0]["uid"]


def _ray_node_metric_names() -> set[str]:
    from ray.dashboard.modules.reporter import reporter_agent

    return {"ray_" + name for name in reporter_agent.METRICS_GAUGES}


def test_dashboard_identity(board):
    assert board["uid"] == "progan-training" and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"])
    assert board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]] + [p["id"] for p in dash.panels(board) if p not in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_datasource_reference_is_the_provisioned_one(board, datasource_uid):
    refs = []
    for panel in dash.panels(board):
        refs.append((panel["title"], panel.get("datasource")))
        refs += [(f"{panel['title']} {t.get('refId')}", t.get("datasource")) for t in panel.get("targets", [])]
    refs += [(f"${v['name']}", v.get("datasource")) for v in board["templating"]["list"] if v["type"] == "query"]
    wrong = [(where, ref) for where, ref in refs if ref != {"type": "prometheus", "uid": datasource_uid}]
    assert not wrong, wrong


def test_every_panel_has_a_query_and_a_place(board):
    occupied = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in dash.panels(board):
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for t in targets:
            assert t.get("expr", "").strip(), f"{panel['title']} {t['refId']}: empty expr"
            assert "legendFormat" in t
        assert panel.get("description"), panel["title"]


def test_queries_read_only_known_metrics_and_use_every_metric(board):
    ours = {name for spec in M.ALL_METRICS for name in spec.series}
    rays = _ray_node_metric_names()
    used = set()
    for q in dash.queries(board):
        names = dash.metric_names(q.expr)
        assert names, q.name
        unknown = names - ours - rays
        assert not unknown, f"{q.name}: unknown metrics {unknown}"
        used |= names
    for name, expr in dash.variable_queries(board).items():
        assert dash.metric_names(expr) <= ours, name
    unused = [spec.exported for spec in M.ALL_METRICS if not set(spec.series) & used]
    assert not unused, f"metrics no panel shows: {unused}"


def test_gpu_only_panels_are_marked_and_read_only_gpu_metrics(board):
    gpu = set(dash.GPU_METRICS)
    assert gpu <= _ray_node_metric_names()
    marked = [q for q in dash.queries(board) if q.gpu_only]
    assert marked, "the dashboard shows GPU use from Ray's metrics"
    for q in dash.queries(board):
        reads_gpu = bool(dash.metric_names(q.expr) & gpu)
        assert reads_gpu == q.gpu_only, f"{q.name}: GPU-only marking ({dash.GPU_ONLY!r}) does not match its metrics"
        if q.gpu_only:
            assert dash.metric_names(q.expr) <= gpu


def _top_level_operands(expr: str) -> list[str]:
    operands, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        c = expr[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c in "+-*/" and not (c == "-" and re.match(r"\d", expr[i + 1:i + 2] or "")):
            operands.append(expr[start:i])
            start = i + 1
        i += 1
    operands.append(expr[start:])
    return [o.strip() for o in operands]


def test_queries_aggregate_by_labels_that_survive_restarts(board):
    """Every operand is an aggregation (or a number), grouped by run/rank/outcome/instance-like
    labels, never by labels that change when Ray restarts a worker (WorkerId, SessionName...)."""
    for q in dash.queries(board):
        for operand in _top_level_operands(q.expr):
            if re.fullmatch(r"[\d.e]+", operand):
                continue
            head = re.match(r"(\w+)\s*(?:by\s*\([^)]*\)\s*)?\(", operand)
            assert head and head.group(1) in AGGREGATIONS, f"{q.name}: {operand!r} is not aggregated"
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", q.expr):
            labels = {label.strip() for label in clause.split(",")}
            assert not labels & set(PER_PROCESS_LABELS), f"{q.name}: groups by {labels & set(PER_PROCESS_LABELS)}"
        assert not re.search(r"\bwithout\s*\(", q.expr), f"{q.name}: use by (...), not without (...)"


def test_project_queries_filter_by_the_run_variable(board):
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "run" in variables
    for q in dash.queries(board):
        for selector in re.findall(r"\b((?:ray_)?progan_\w+)\s*(\{[^}]*\})?", q.expr):
            assert 'run=~"$run"' in selector[1], f"{q.name}: {selector[0]} is not filtered by $run"
        dash.runnable(q.expr)  # no variable Grafana would have to fill in that the tests cannot


def test_provisioning_and_compose_fit_together(datasource_uid):
    providers = yaml.safe_load(dash.DASHBOARD_PROVISIONING.read_text())["providers"]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    container_path = providers[0]["options"]["path"]
    compose = yaml.safe_load((MONITORING / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name  # reaches Ray's agents on 127.0.0.1
        for volume in service["volumes"]:
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (MONITORING / host).exists(), f"{name}: {host} missing"
    grafana_volumes = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_volumes["./grafana/dashboards"] == container_path
    assert (MONITORING / "grafana" / "dashboards" / Path(services["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).name).is_file()
    assert grafana_volumes["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    listen = [a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address=")]
    assert listen and listen[0].split("=", 1)[1].startswith("127.0.0.1:")
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert "PROMETHEUS_URL" in dash.DATASOURCE_PROVISIONING.read_text()


def test_prometheus_template_scrapes_rays_discovery_file():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    files = jobs["ray"]["file_sd_configs"][0]["files"]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
