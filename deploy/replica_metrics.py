"""`GET /metrics` on the API port: the replica's own series, Prometheus text, for deployments that
scrape the ingress rather than Ray's metrics agents (where rank 0's `ray_ladder_*` series go,
actors.metrics).

Measured here, per request as the API sees it: time to first token, latency, tokens, finished
requests by finish_reason, errors by kind. Read from the group at each scrape (its `stats`):
requests running and waiting, KV slots, decode tokens and seconds, exposed all-reduce seconds
and bytes, the link's idle round trip. Same names as the Ray series without Ray's `ray_` prefix
where they mean the same; labels model, residual, tp, interconnect (bounded: no request ids).
A registry per server: several servers in one process keep their series apart.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ladder.metric_buckets import E2E, TTFT

CONTENT_TYPE = CONTENT_TYPE_LATEST
LABELS = ("model", "residual", "tp", "interconnect")
# group totals (stats key -> counter name, help), exported as counters at each scrape
GROUP_COUNTERS = {
    "steps_total": ("ladder_steps", "Steps the group ran (prefill and decode)"),
    "decode_tokens": ("ladder_decode_tokens", "Tokens produced by decode steps"),
    "decode_s": ("ladder_decode_seconds", "Wall time of decode steps"),
    "prefill_s": ("ladder_prefill_seconds", "Wall time of prefill steps"),
    "exposed_s": ("ladder_allreduce_exposed_seconds", "All-reduce wait exposed, all steps"),
    "bytes": ("ladder_allreduce_bytes", "Bytes all-reduced per rank"),
}


class ReplicaMetrics:
    def __init__(self, model: str, residual: str, tp: int, interconnect: str) -> None:
        self.values = (model, residual, str(tp), interconnect)
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("ladder_ttft_seconds", "Time to first token, at the API", LABELS,
                              buckets=TTFT, registry=r).labels(*self.values)
        self.e2e = Histogram("ladder_e2e_latency_seconds", "Request latency at the API", LABELS,
                             buckets=E2E, registry=r).labels(*self.values)
        self.prompt = Counter("ladder_prompt_tokens", "Prompt tokens of served requests",
                              LABELS, registry=r).labels(*self.values)
        self.generated = Counter("ladder_generation_tokens", "Generated tokens", LABELS,
                                 registry=r).labels(*self.values)
        self.finished = Counter("ladder_requests_finished", "Finished generations (choices)",
                                (*LABELS, "finish_reason"), registry=r)
        self.errors = Counter("ladder_request_errors", "Requests answered with an error",
                              (*LABELS, "kind"), registry=r)
        self._stats: dict = {}
        r.register(_FromGroup(self))

    def on_error(self, kind: str) -> None:
        self.errors.labels(*self.values, kind).inc()

    def request(self, n_prompt: int) -> "Observed":
        self.prompt.inc(n_prompt)
        return Observed(self)

    def text(self, stats: dict) -> bytes:
        """The exposition, with the group's figures of `stats` (its `stats()` just now)."""
        self._stats = stats
        return generate_latest(self.registry)


class Observed:
    """One request's timing: its first token, its tokens, each choice's finish."""

    def __init__(self, m: ReplicaMetrics) -> None:
        self.m, self.t0, self.first = m, time.monotonic(), False

    def event(self, ev) -> None:
        """A generation's event (ladder.engine.scheduler.TokenEvent)."""
        if ev.token_id is not None:
            if not self.first:
                self.first = True
                self.m.ttft.observe(time.monotonic() - self.t0)
            self.m.generated.inc()
        if ev.finish_reason:
            self.m.finished.labels(*self.m.values, ev.finish_reason).inc()

    def done(self) -> None:
        self.m.e2e.observe(time.monotonic() - self.t0)


class _FromGroup:
    """The group's totals and load, from the stats read at this scrape."""

    def __init__(self, m: ReplicaMetrics) -> None:
        self.m = m

    def collect(self):
        st, values = self.m._stats, list(self.m.values)
        for key, (name, doc) in GROUP_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=LABELS)
            if key in st:
                c.add_metric(values, st[key])
            yield c
        for key, name, doc in (("running", "ladder_requests_running", "Requests holding a slot"),
                               ("waiting", "ladder_requests_waiting", "Requests waiting"),
                               ("slots", "ladder_kv_slots", "KV slots of the group"),
                               ("link_rtt_s", "ladder_link_rtt_seconds",
                                "The link's idle collective round trip")):
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            if st.get(key) is not None:
                g.add_metric(values, st[key])
            yield g
