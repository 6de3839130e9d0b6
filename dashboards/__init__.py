"""Grafana dashboards as code, Prometheus config."""
