"""Monitoring of ProGAN runs: the metrics that training workers and the data pipeline publish
(monitoring.metrics), the run's own Prometheus (monitoring.prometheus), and a Grafana dashboard
with its provisioning (monitoring/grafana, monitoring/docker-compose.yml). See monitoring/README.md."""
