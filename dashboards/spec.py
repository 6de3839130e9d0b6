"""The dashboards as lists of panels: a title, a unit, and PromQL with its legend.

Series come from `actors/metrics.py` through Ray's metrics agents, so they carry Ray's `ray_`
prefix. `$model`, `$tp`, `$interconnect` are the template variables; `$__rate_interval` is
Grafana's. `build.py` turns these lists into Grafana JSON with grafana-foundation-sdk; the
integration test runs every expression against a real Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass

SEL = 'model=~"$model", tp=~"$tp", interconnect=~"$interconnect"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


def quantile(q: float, metric: str, by: str = "interconnect, residual") -> str:
    return (f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate(ray_{metric}_bucket{{{SEL}}}[{RATE}])))")


def mean(metric: str, by: str = "interconnect, residual") -> str:
    return (f"sum by ({by}) (rate(ray_{metric}_sum{{{SEL}}}[{RATE}])) / "
            f"sum by ({by}) (rate(ray_{metric}_count{{{SEL}}}[{RATE}]))")


def per_token(residual: str) -> str:
    """Mean decode step time per token for one residual mode, by interconnect."""
    return (f"sum by (interconnect) (rate(ray_ladder_decode_step_seconds_sum{{{SEL}, "
            f'residual="{residual}"}}[{RATE}])) / sum by (interconnect) '
            f"(rate(ray_ladder_decode_tokens_total{{{SEL}, "
            f'residual="{residual}"}}[{RATE}]))')


IR = "{{interconnect}} {{residual}}"

INTERCONNECTS = (
    PanelSpec("Time per output token p50 / p99", "s", (
        Query(quantile(0.5, "ladder_tpot_seconds"), f"p50 {IR}"),
        Query(quantile(0.99, "ladder_tpot_seconds"), f"p99 {IR}"))),
    PanelSpec("Time to first token p50 / p99", "s", (
        Query(quantile(0.5, "ladder_ttft_seconds"), f"p50 {IR}"),
        Query(quantile(0.99, "ladder_ttft_seconds"), f"p99 {IR}"))),
    PanelSpec("Decode step time per token (mean)", "s", (
        Query(f"sum by (interconnect, residual) (rate(ray_ladder_decode_step_seconds_sum{{{SEL}}}"
              f"[{RATE}])) / sum by (interconnect, residual) (rate("
              f"ray_ladder_decode_tokens_total{{{SEL}}}[{RATE}]))", IR),)),
    PanelSpec("Ladder speedup per interconnect (standard / partial ladder, per token)", "x", (
        Query(f"({per_token('standard')}) / ({per_token('partial')})",
              "{{interconnect}} partial"),
        Query(f"({per_token('standard')}) / ({per_token('ladder')})",
              "{{interconnect}} ladder")),
        "Above 1: the ladder schedule decodes faster on this link."),
    PanelSpec("Exposed all-reduce wait per decode step (mean)", "s", (
        Query(mean("ladder_allreduce_exposed_seconds"), IR),)),
    PanelSpec("Exposed communication share of the decode step", "percentunit", (
        Query(f"sum by (interconnect, residual) (rate(ray_ladder_allreduce_exposed_seconds_sum"
              f"{{{SEL}}}[{RATE}])) / sum by (interconnect, residual) (rate("
              f"ray_ladder_decode_step_seconds_sum{{{SEL}}}[{RATE}]))", IR),)),
    PanelSpec("Overlap efficiency (mean per decode step)", "percentunit", (
        Query(mean("ladder_overlap_efficiency"), IR),),
        "1 - exposed wait per ladder reduce / per reduce waited at once, same link, same step."),
    PanelSpec("All-reduce traffic per rank", "Bps", (
        Query(f"sum by (interconnect, residual) (rate(ray_ladder_allreduce_bytes_total{{{SEL}}}"
              f"[{RATE}]))", IR),)),
)

G = "{{model}} tp={{tp}} {{interconnect}}"

SERVING = (
    PanelSpec("Finished requests per second by reason", "reqps", (
        Query(f"sum by (finish_reason) (rate(ray_ladder_requests_finished_total{{{SEL}}}"
              f"[{RATE}]))", "{{finish_reason}}"),)),
    PanelSpec("Time to first token p50 / p90 / p99", "s", tuple(
        Query(quantile(q, "ladder_ttft_seconds", "model, tp, interconnect"), f"p{int(q * 100)} {G}")
        for q in (0.5, 0.9, 0.99))),
    PanelSpec("Time per output token p50 / p90 / p99", "s", tuple(
        Query(quantile(q, "ladder_tpot_seconds", "model, tp, interconnect"), f"p{int(q * 100)} {G}")
        for q in (0.5, 0.9, 0.99))),
    PanelSpec("End-to-end latency p50 / p99", "s", tuple(
        Query(quantile(q, "ladder_e2e_latency_seconds", "model, tp, interconnect"),
              f"p{int(q * 100)} {G}") for q in (0.5, 0.99))),
    PanelSpec("Throughput: generated and prompt tokens per second", "short", (
        Query(f"sum by (model, tp, interconnect) (rate(ray_ladder_generation_tokens_total{{{SEL}}}"
              f"[{RATE}]))", f"generated {G}"),
        Query(f"sum by (model, tp, interconnect) (rate(ray_ladder_prompt_tokens_total{{{SEL}}}"
              f"[{RATE}]))", f"prompt {G}"))),
    PanelSpec("Queue time p50 / p99", "s", tuple(
        Query(quantile(q, "ladder_queue_time_seconds", "model, tp, interconnect"),
              f"p{int(q * 100)} {G}") for q in (0.5, 0.99))),
    PanelSpec("Running and waiting requests", "short", (
        Query(f"sum by (model, tp, interconnect) (ray_ladder_requests_running{{{SEL}}})",
              f"running {G}"),
        Query(f"sum by (model, tp, interconnect) (ray_ladder_requests_waiting{{{SEL}}})",
              f"waiting {G}"))),
    PanelSpec("KV cache in use: blocks and sequence slots", "percentunit", (
        Query(f"avg by (model, tp, interconnect) (ray_ladder_kv_blocks_used_ratio{{{SEL}}})",
              f"blocks {G}"),
        Query(f"avg by (model, tp, interconnect) (ray_ladder_kv_slots_used_ratio{{{SEL}}})",
              f"slots {G}"))),
    # hits over lookups; no hit yet (its counter not exported yet) reads as 0
    PanelSpec("Prefix cache: share of prompt tokens found", "percentunit", (
        Query(f"(sum by (model, tp, interconnect) (rate(ray_ladder_prefix_cache_hits_total"
              f"{{{SEL}}}[{RATE}])) or sum by (model, tp, interconnect) (rate("
              f"ray_ladder_prefix_cache_queries_total{{{SEL}}}[{RATE}])) * 0) / sum by (model, "
              f"tp, interconnect) (rate(ray_ladder_prefix_cache_queries_total{{{SEL}}}"
              f"[{RATE}]))", G),)),
    PanelSpec("Request errors per second by kind", "reqps", (
        Query(f"sum by (kind) (rate(ray_ladder_request_errors_total{{{SEL}}}[{RATE}]))",
              "{{kind}}"),)),
)

# Ray Serve's own series (the deployment's replicas, autoscaling, requests)
SERVE = 'application=~".*"'
SERVING += (
    PanelSpec("Serve autoscaling: desired and target replicas (whole TP groups)", "short", (
        Query(f"max by (application, deployment) (ray_serve_autoscaling_desired_replicas"
              f"{{{SERVE}}})", "desired {{application}}/{{deployment}}"),
        Query(f"max by (application, deployment) (ray_serve_autoscaling_target_replicas"
              f"{{{SERVE}}})", "target {{application}}/{{deployment}}"))),
    PanelSpec("Serve replica starts (new and replaced TP groups)", "short", (
        Query(f"sum by (application, deployment) (increase("
              f"ray_serve_deployment_replica_starts_total{{{SERVE}}}[1h]))",
              "{{application}}/{{deployment}}"),)),
    PanelSpec("Serve requests per second by deployment", "reqps", (
        Query(f"sum by (application, deployment) (rate(ray_serve_deployment_request_counter_total"
              f"{{{SERVE}}}[{RATE}]))", "{{application}}/{{deployment}}"),)),
)

DASHBOARDS = {
    "interconnects": ("ladder-interconnects", "Interconnects: ladder vs standard", INTERCONNECTS),
    "serving": ("ladder-serving", "Serving", SERVING),
}
