"""The group's Prometheus metrics, recorded on rank 0 through Ray's metrics API.

Ray's per-node metrics agent exports them (with Ray's `ray_` prefix: `ladder_ttft_seconds`
appears as `ray_ladder_ttft_seconds`); Prometheus finds the agents through Ray's
service-discovery file (dashboards/prometheus.yml). Seconds everywhere; histogram buckets follow
vLLM's, extended downwards where CPU steps need finer ones. Labels are bounded: model, residual,
tp, interconnect on every series, plus finish_reason / kind where named. No request or worker
ids: those belong in logs.
"""

from __future__ import annotations

from ray.util import metrics as m

from ladder.metric_buckets import E2E, RATIO, STEP, TPOT, TTFT, WAIT

LABELS = ("model", "residual", "tp", "interconnect")

# name -> (kind, description, buckets, extra label)
SPEC = {
    "ladder_ttft_seconds": ("histogram", "Time to first token", TTFT, None),
    "ladder_tpot_seconds": ("histogram", "Time per output token after the first", TPOT, None),
    "ladder_e2e_latency_seconds": ("histogram", "Request latency, arrival to last token", E2E,
                                   None),
    "ladder_queue_time_seconds": ("histogram", "Wait for a KV slot", E2E, None),
    "ladder_prompt_tokens_total": ("counter", "Prompt tokens of finished requests", None, None),
    "ladder_generation_tokens_total": ("counter", "Generated tokens", None, None),
    "ladder_requests_finished_total": ("counter", "Finished requests", None, "finish_reason"),
    "ladder_request_errors_total": ("counter", "Requests ended by an error", None, "kind"),
    "ladder_requests_running": ("gauge", "Requests holding a KV slot", None, None),
    "ladder_requests_waiting": ("gauge", "Requests waiting for a KV slot", None, None),
    "ladder_kv_slots_used_ratio": ("gauge", "Share of sequence slots in use", None, None),
    "ladder_kv_blocks_used_ratio": ("gauge", "Share of KV-cache blocks in use (cached ones "
                                    "nobody holds count as free)", None, None),
    "ladder_prefix_cache_queries_total": ("counter", "Prompt tokens looked up in the prefix "
                                          "cache", None, None),
    "ladder_prefix_cache_hits_total": ("counter", "Prompt tokens found in the prefix cache",
                                       None, None),
    "ladder_preemptions_total": ("counter", "Sequences preempted (blocks taken back, tokens "
                                 "recomputed later)", None, None),
    "ladder_decode_step_seconds": ("histogram", "One decode step (all rows), wall time", STEP,
                                   None),
    "ladder_decode_tokens_total": ("counter", "Tokens produced by decode steps", None, None),
    "ladder_allreduce_exposed_seconds": ("histogram", "All-reduce wait exposed per decode step",
                                         WAIT, None),
    "ladder_allreduce_bytes_total": ("counter", "Bytes all-reduced per rank", None, None),
    "ladder_overlap_efficiency": ("histogram", "Per decode step: share of all-reduce wait the "
                                  "ladder schedule hid (1 - ladder / module wait per reduce)",
                                  RATIO, None),
}


class GroupMetrics:
    """The series of one TP group, with its four labels fixed."""

    def __init__(self, model: str, residual: str, tp: int, interconnect: str) -> None:
        self.tags = {"model": model, "residual": residual, "tp": str(tp),
                     "interconnect": interconnect}
        self.s = {}
        for name, (kind, desc, buckets, extra) in SPEC.items():
            keys = LABELS + ((extra,) if extra else ())
            if kind == "histogram":
                self.s[name] = m.Histogram(name, desc, boundaries=buckets, tag_keys=keys)
            elif kind == "counter":
                self.s[name] = m.Counter(name, desc, tag_keys=keys)
            else:
                self.s[name] = m.Gauge(name, desc, tag_keys=keys)

    def _t(self, **extra) -> dict:
        return {**self.tags, **extra} if extra else self.tags

    def on_step(self, rec) -> None:
        if rec.kind != "decode":
            return
        s, t = self.s, self.tags
        s["ladder_decode_step_seconds"].observe(rec.step_s, tags=t)
        s["ladder_decode_tokens_total"].inc(rec.tokens, tags=t)
        s["ladder_allreduce_exposed_seconds"].observe(rec.exposed_s, tags=t)
        if rec.bytes:
            s["ladder_allreduce_bytes_total"].inc(rec.bytes, tags=t)
        if rec.overlap is not None:
            s["ladder_overlap_efficiency"].observe(rec.overlap, tags=t)

    def on_finish(self, stats, reason: str) -> None:
        s, t = self.s, self.tags
        s["ladder_requests_finished_total"].inc(1, tags=self._t(finish_reason=reason))
        if stats is None:
            return
        s["ladder_prompt_tokens_total"].inc(stats.prompt_tokens, tags=t)
        if stats.cached_query:  # (Ray's counters refuse an increment of 0)
            s["ladder_prefix_cache_queries_total"].inc(stats.prompt_tokens, tags=t)
            if stats.cached_tokens:
                s["ladder_prefix_cache_hits_total"].inc(stats.cached_tokens, tags=t)
        if stats.preempted:
            s["ladder_preemptions_total"].inc(stats.preempted, tags=t)
        if stats.generated_tokens:
            s["ladder_generation_tokens_total"].inc(stats.generated_tokens, tags=t)
        if stats.first_token:
            s["ladder_ttft_seconds"].observe(stats.ttft_s, tags=t)
            s["ladder_e2e_latency_seconds"].observe(stats.finished - stats.arrival, tags=t)
        if stats.generated_tokens > 1:
            s["ladder_tpot_seconds"].observe(stats.tpot_s, tags=t)
        if stats.admitted:
            s["ladder_queue_time_seconds"].observe(stats.queue_s, tags=t)

    def on_error(self, kind: str, n: int = 1) -> None:
        self.s["ladder_request_errors_total"].inc(n, tags=self._t(kind=kind))

    def set_load(self, running: int, waiting: int, slots: int, blocks_used: float = 0.0) -> None:
        t = self.tags
        self.s["ladder_requests_running"].set(running, tags=t)
        self.s["ladder_requests_waiting"].set(waiting, tags=t)
        self.s["ladder_kv_slots_used_ratio"].set(running / slots if slots else 0.0, tags=t)
        self.s["ladder_kv_blocks_used_ratio"].set(blocks_used, tags=t)
