"""Monitoring of ProGAN runs: metrics published by training workers and the data pipeline
(monitoring.metrics), a local Prometheus for a run (monitoring.prometheus), and a Grafana
dashboard with its provisioning (monitoring/grafana, monitoring/docker-compose.yml).
See monitoring/README.md. Names are imported lazily, so `python -m monitoring.metrics` and
`python -m monitoring.prometheus` run cleanly."""
from __future__ import annotations

_EXPORTS = {"TrainingMetrics": "metrics", "PipelineMetrics": "metrics", "LauncherMetrics": "metrics",
            "AllReduceTimer": "metrics", "start_prometheus": "prometheus", "current_session_dir": "prometheus"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"monitoring.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'monitoring' has no attribute {name!r}")
