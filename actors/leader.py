"""Rank 0's serving loop: the scheduler on a thread of its own, requests in, token events out.

Ray calls arrive on the worker's event loop; the forward passes run here, on one thread, so that
every rank sees the same sequence of steps. Between steps the loop takes what arrived (new
requests, cancellations, health checks); new requests join the running batch at the next step
(continuous batching, `ladder.scheduler`). Each step's plan reaches the other ranks through the
process group (`ShardEngine.step` broadcasts it): no Ray call per rank per token.

An idle loop pings the group every `heartbeat_s` (a collective round trip, `ShardEngine.ping`),
which keeps the followers' waits inside the link's timeout and finds a dead peer while idle.
When a step or a ping fails, every request the loop holds ends with that error and the loop
stops: the group is unhealthy for good, and its owner builds a new one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Callable

from ladder.runner import Leader
from ladder.scheduler import Request, RequestError, RequestFailed, TokenEvent

Sink = Callable[[object], None]  # receives TokenEvents, then possibly an exception


class GroupFailed(RuntimeError):
    """The TP group can no longer serve (a rank died or the link broke)."""


@dataclass(slots=True)
class StepRecord:
    """One engine step as the metrics see it."""

    at: float  # time.time() when it ended
    kind: str  # prefill | decode
    rows: int
    tokens: int  # new tokens fed to the model
    step_s: float  # the whole step: plan broadcast, forward, LM head, sampling
    exposed_s: float  # blocked in all-reduce waits
    bytes: int  # all-reduced per rank
    ops: int  # all-reduces
    overlap: float | None  # CommStats.overlap_estimate(): the share of waits ladder hid


class LeaderLoop:
    def __init__(self, leader: Leader, *, metrics=None, heartbeat_s: float = 1.0,
                 keep_steps: int = 4096) -> None:
        self.leader, self.engine, self.scheduler = leader, leader.engine, leader.scheduler
        self.metrics = metrics  # actors.metrics.GroupMetrics, or None: not recorded
        self.heartbeat_s = heartbeat_s
        self.steps: deque[StepRecord] = deque(maxlen=keep_steps)
        self.steps_total = 0
        self.error: str | None = None
        self.link_rtt_s = 0.0  # a collective round trip when idle (two small collectives)
        self._sinks: dict[object, Sink] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ladder-leader", daemon=True)

    def start(self) -> None:
        self.link_rtt_s = min(self.engine.ping() for _ in range(5))
        self._thread.start()

    # -- called from other threads -----------------------------------------------------------
    def submit(self, req: Request, sink: Sink) -> None:
        """Queue `req`; its events go to `sink` from the loop's thread. Raises RequestError for a
        request that cannot be served and GroupFailed when the group is down."""
        if self.error is not None:
            raise GroupFailed(self.error)
        try:
            self.scheduler.check(req)
        except RequestError:
            if self.metrics:
                self.metrics.on_error("bad_request")
            raise
        self._post(("add", req, sink))

    def cancel(self, request_id) -> None:
        self._post(("cancel", request_id, None))

    def ping(self) -> Future:
        """A collective round trip through every rank, run between steps; resolves to seconds."""
        fut: Future = Future()
        self._post(("ping", None, fut))
        return fut

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish: pending requests end as cancelled, the followers leave their loops."""
        self._post(("stop", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _post(self, cmd) -> None:
        if self._stopped.is_set():
            if cmd[0] == "ping":
                cmd[2].set_exception(GroupFailed(self.error or "the group has stopped"))
                return
            if cmd[0] == "add":
                raise GroupFailed(self.error or "the group has stopped")
            return
        self._inbox.put(cmd)
        self._wake.set()

    # -- the loop's thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._take_commands():
                if self.scheduler.has_work():
                    self._step()
                elif not self._wake.wait(self.heartbeat_s):
                    self.engine.ping()
                    self._publish_load()  # gauges not set for a while drop out of the export
                self._wake.clear()
            self._drop_all(None)
            self.engine.stop_followers()
        except BaseException as e:  # the link or a rank failed: nothing more can run here
            self.error = f"TP group failed: {type(e).__name__}: {e}"
            self._drop_all(GroupFailed(self.error))
        finally:
            self._stopped.set()
            self._fail_inbox()

    def _take_commands(self) -> bool:
        while True:
            try:
                op, arg, extra = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if op == "add":
                self._sinks[arg.id] = extra
                self.scheduler.add(arg)
            elif op == "cancel":
                ev = self.scheduler.cancel(arg)
                if ev is not None:
                    self._deliver([ev])
            elif op == "ping":
                try:
                    extra.set_result(self.engine.ping())
                except BaseException as e:
                    extra.set_exception(e)
                    raise
            elif op == "stop":
                return False

    def _step(self) -> None:
        sch, stats = self.scheduler, self.engine.comm.stats
        prefill = bool(sch.waiting and sch.free)
        if prefill:  # the requests this step admits (as Scheduler._prefill picks them)
            n = min(len(sch.waiting), len(sch.free), sch.max_prefill_rows)
            rows, tokens = n, sum(len(sch.waiting[i].prompt) for i in range(n))
        else:
            rows = tokens = len(sch.running)
        t0 = time.perf_counter()
        events = sch.step()
        dt = time.perf_counter() - t0
        rec = StepRecord(
            at=time.time(), kind="prefill" if prefill else "decode", rows=rows, tokens=tokens,
            step_s=dt, exposed_s=stats.exposed_s, bytes=stats.bytes, ops=stats.ops,
            overlap=stats.overlap_estimate())
        self.steps.append(rec)
        self.steps_total += 1
        self._deliver(events)
        if self.metrics:
            self.metrics.on_step(rec)
        self._publish_load()

    def _publish_load(self) -> None:
        if self.metrics:
            sch = self.scheduler
            self.metrics.set_load(len(sch.running), len(sch.waiting), sch.engine.n_slots)

    def _deliver(self, events: list[TokenEvent]) -> None:
        """Each event to its request's sink; a request that failed alone (finish_reason
        "error") gets RequestFailed instead."""
        for ev in events:
            sink = self._sinks.get(ev.request_id)
            if ev.finish_reason is not None:
                self._sinks.pop(ev.request_id, None)
                if self.metrics and ev.finish_reason == "error":
                    self.metrics.on_error("request_failed")
                elif self.metrics:
                    self.metrics.on_finish(ev.stats, ev.finish_reason)
            if sink is not None:
                sink(RequestFailed(f"request {ev.request_id}: {ev.error}")
                     if ev.finish_reason == "error" else ev)

    def _drop_all(self, error: BaseException | None) -> None:
        """End every request the loop holds: with `error`, or as cancelled on a clean stop."""
        if error is None:
            ids = [r.id for r in list(self.scheduler.waiting) + list(self.scheduler.running.values())]
            for rid in ids:
                ev = self.scheduler.cancel(rid)
                if ev is not None:
                    self._deliver([ev])
        if error is not None and self.metrics and self._sinks:
            self.metrics.on_error("group_failed", len(self._sinks))
        for sink in self._sinks.values():
            sink(error or GroupFailed("the group has stopped"))
        self._sinks.clear()

    def _fail_inbox(self) -> None:
        while True:
            try:
                op, arg, extra = self._inbox.get_nowait()
            except queue.Empty:
                return
            err = GroupFailed(self.error or "the group has stopped")
            if op == "add":
                extra(err)
            elif op == "ping":
                extra.set_exception(err)

    # -- statistics ------------------------------------------------------------------------
    def stats(self, since: float = 0.0) -> dict:
        """Totals, the link's idle round trip, and the steps that ended after `since`."""
        t = self.engine.timing
        steps = [asdict(s) for s in list(self.steps) if s.at > since]
        return {"steps_total": self.steps_total, "decode_tokens": t.decode_tokens,
                "decode_s": t.decode_s, "prefill_s": t.prefill_s, "exposed_s": t.exposed_s,
                "decode_exposed_s": t.decode_exposed_s, "bytes": t.bytes,
                "link_rtt_s": self.link_rtt_s, "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "slots": self.engine.n_slots,
                "error": self.error, "steps": steps}
