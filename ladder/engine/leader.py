"""Rank 0's serving loop: the scheduler on a thread of its own, requests in, token events out.

One leader for every kind of group: a local group's rank 0 process (`ladder.engine.local`) and
a Ray group's rank 0 actor (`actors.worker`) both build a `Leader` and hand it requests from
their own transport (a pipe, Ray calls). The forward passes run on the loop's thread, so that
every rank sees the same sequence of steps. Between steps the loop takes what arrived (new
requests, cancellations, health checks, calls); new requests join the running batch at the
next step (continuous batching, `ladder.engine.scheduler`). Each step's plan reaches the other
ranks through the process group (`ShardEngine.step` broadcasts it): no call per rank per token.

An idle loop pings the group every `heartbeat_s` (a collective round trip, `ShardEngine.ping`),
which keeps the followers' waits inside the link's timeout and finds a dead peer while idle.
When a step or a ping fails, every request the loop holds ends with GroupError and the loop
stops: the group is unhealthy for good, and its owner builds a new one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ladder.engine.group import GroupError, GroupInfo
from ladder.engine.guided import Guide
from ladder.engine.scheduler import (
    Request,
    RequestError,
    RequestFailed,
    Scheduled,
    Scheduler,
    TokenEvent,
)
from ladder.engine.step import ShardEngine

Sink = Callable[[object], None]  # receives TokenEvents, then possibly an exception

log = logging.getLogger(__name__)


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


class Leader:
    """`engine` is rank 0's; `tokenizer` None serves token ids only. `metrics` (duck-typed:
    on_step, on_finish, on_error, set_load) records Prometheus series, or None. `after_step`
    runs on the loop's thread after each step's events are delivered (a transport that sends
    a step's events together flushes there)."""

    def __init__(self, engine: ShardEngine, tokenizer, *, eos_token_ids: tuple[int, ...],
                 name: str = "", adapted: bool = False, metrics=None,
                 after_step: Callable[[], None] | None = None, heartbeat_s: float = 1.0,
                 keep_steps: int = 4096) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        guide = Guide(tokenizer, engine.model.config.vocab_size, eos_token_ids) \
            if tokenizer else None
        self.scheduler = Scheduler(
            engine, eos_token_ids=eos_token_ids,
            decoder_factory=tokenizer.incremental_decoder if tokenizer else None,
            token_text=(lambda i: tokenizer.decode([i])) if tokenizer else None,
            token_bytes=guide.token_bytes if guide else None,
            guide=guide, prefix_caching=engine.prefix_caching,
            max_batched_tokens=engine.max_batched_tokens)
        self.name, self.adapted = name, adapted
        self.metrics, self.after_step, self.heartbeat_s = metrics, after_step, heartbeat_s
        self.steps: deque[StepRecord] = deque(maxlen=keep_steps)
        self.steps_total = 0
        self.error: str | None = None
        self.link_rtt_s = 0.0  # a collective round trip when idle (two small collectives)
        self._sinks: dict[object, Sink] = {}
        self._metric_failures: set[str] = set()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ladder-leader", daemon=True)

    @classmethod
    def for_checkpoint(cls, ckpt, engine: ShardEngine, **kw) -> "Leader":
        """A leader with the checkpoint's tokenizer (if it has one) and end-of-text ids."""
        from ladder.tokenizer import TokenizerError
        try:
            tokenizer = ckpt.tokenizer()
        except TokenizerError:  # a bare checkpoint still serves token ids
            tokenizer = None
        eos = set(ckpt.config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        return cls(engine, tokenizer, eos_token_ids=tuple(sorted(eos)),
                   adapted=ckpt.adapted is not None, **kw)

    def start(self) -> None:
        """Run the loop in a thread of its own."""
        self.link_rtt_s = min(self.engine.ping() for _ in range(5))
        self._thread.start()

    def run(self) -> None:
        """Run the loop in the calling thread until `stop()` (from another thread). For a rank
        process: the thread that built the engine computes fastest (at two threads, torch's
        OpenMP team of any other thread took 30 ms a SmolLM2 token here against 22)."""
        self.link_rtt_s = min(self.engine.ping() for _ in range(5))
        self._run()

    # -- called from other threads -----------------------------------------------------------
    def submit(self, reqs: list[Request], sinks: list[Sink]) -> None:
        """Queue `reqs` (together: they join the same step); each one's events go to its sink
        from the loop's thread. Raises RequestError for a request that cannot be served (none
        is queued then) and GroupError when the group is down."""
        if self.error is not None:
            raise GroupError(self.error)
        try:
            for r in reqs:
                self.scheduler.prepare(r)
        except RequestError:
            self._record("on_error", "bad_request")
            raise
        self._post(("add", reqs, sinks))

    def cancel(self, request_id) -> None:
        self._post(("cancel", request_id, None))

    def ping(self) -> Future:
        """A collective round trip through every rank, run between steps; resolves to seconds."""
        return self.call(lambda engine: engine.ping())

    def call(self, fn: Callable[[ShardEngine], object]) -> Future:
        """Run fn(engine) on the loop's thread between steps (collectives keep their order);
        the Future resolves to its result."""
        fut: Future = Future()
        self._post(("call", fn, fut))
        return fut

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish: pending requests end as cancelled, the followers leave their loops."""
        self._post(("stop", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer().encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation through the model's chat template (RequestError when
        the template refuses it)."""
        try:
            return self._tokenizer().apply_chat_template(messages)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def decode(self, ids: list[int]) -> str:
        n = self.engine.model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{n - 1})")
        return self._tokenizer().decode(ids)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: pass token ids")
        return self.tokenizer

    def info(self) -> GroupInfo:
        e, m = self.engine, self.engine.model
        return GroupInfo(
            name=self.name, tp=e.comm.world_size, interconnect=e.comm.interconnect,
            emulated=e.comm.emulated, residual=m.plan.label_for(m.config.n_layers),
            residual_plan=m.plan.spec(m.config.n_layers), adapted=self.adapted,
            max_seq=e.max_seq, n_slots=e.n_slots, vocab_size=m.config.vocab_size,
            has_tokenizer=self.tokenizer is not None,
            max_token_chars=self.tokenizer.max_token_chars if self.tokenizer else 0,
            config=m.config.to_dict(),
            device_name=torch.cuda.get_device_name(e.device) if e.device.type == "cuda" else "")

    def stats(self, since: float = 0.0) -> dict:
        """Totals, the link's idle round trip, and the steps that ended after `since`."""
        t = self.engine.timing
        running, waiting, slots = self.scheduler.load()
        return {"steps_total": self.steps_total, "decode_tokens": t.decode_tokens,
                "decode_s": t.decode_s, "prefill_s": t.prefill_s, "exposed_s": t.exposed_s,
                "decode_exposed_s": t.decode_exposed_s, "bytes": t.bytes,
                "link_rtt_s": self.link_rtt_s, "running": running, "waiting": waiting,
                "slots": slots, "error": self.error, "kv_cache": self.kv_cache(),
                "steps": [asdict(s) for s in list(self.steps) if s.at > since]}

    def kv_cache(self) -> dict:
        """The KV cache's blocks and the prefix cache's counts since the start."""
        pool, e = self.scheduler.pool, self.engine
        c = pool.stats
        return {"blocks": pool.n_blocks, "block_size": e.block, "blocks_used": pool.used(),
                "blocks_cached": len(pool.key_of), "bytes_per_rank": e.cache.nbytes(),
                "prefix_caching": pool.caching, "queried_tokens": c.queried_tokens,
                "hit_tokens": c.hit_tokens, "hit_rate": c.hit_rate,
                "evicted_blocks": c.evicted_blocks, "preemptions": c.preemptions}

    def _post(self, cmd) -> None:
        if self._stopped.is_set():
            _refuse(cmd, GroupError(self.error or "the group has stopped"))
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
            self._drop_all(GroupError(self.error))
        finally:
            self._stopped.set()
            while True:
                try:
                    _refuse(self._inbox.get_nowait(), GroupError(self.error or "stopped"))
                except queue.Empty:
                    break

    def _take_commands(self) -> bool:
        while True:
            try:
                op, arg, extra = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if op == "add":
                for req, sink in zip(arg, extra):
                    self._sinks[req.id] = sink
                    self.scheduler.add(req)
            elif op == "cancel":
                ev = self.scheduler.cancel(arg)
                if ev is not None:
                    self._deliver([ev])
            elif op == "call":
                try:
                    extra.set_result(arg(self.engine))
                except BaseException as e:
                    extra.set_exception(e)
                    raise  # a failed collective: the group is broken
            elif op == "stop":
                return False

    def _step(self) -> None:
        t0 = time.perf_counter()
        done: Scheduled | None = self.scheduler.step()
        dt = time.perf_counter() - t0
        if done is None:
            return
        if done.rows:
            c = self.engine.last
            rec = StepRecord(at=time.time(), kind=done.kind, rows=done.rows,
                             tokens=done.tokens, step_s=dt, exposed_s=c.exposed_s,
                             bytes=c.bytes, ops=c.ops, overlap=c.overlap)
            self.steps.append(rec)
            self.steps_total += 1
            self._record("on_step", rec)
        self._deliver(done.events)
        self._publish_load()

    def _publish_load(self) -> None:
        if self.metrics:
            pool = self.scheduler.pool
            self._record("set_load", *self.scheduler.load(), pool.used() / pool.n_blocks)

    def _deliver(self, events: list[TokenEvent]) -> None:
        """Each event to its request's sink; a request that failed alone (finish_reason
        "error") gets RequestFailed instead."""
        for ev in events:
            sink = self._sinks.get(ev.request_id)
            if ev.finish_reason is not None:
                self._sinks.pop(ev.request_id, None)
                if ev.finish_reason == "error":
                    self._record("on_error", "request_failed")
                else:
                    self._record("on_finish", ev.stats, ev.finish_reason)
            if sink is not None:
                sink(RequestFailed(f"request {ev.request_id}: {ev.error}")
                     if ev.finish_reason == "error" else ev)
        if self.after_step is not None:
            self.after_step()

    def _record(self, what: str, *args) -> None:
        """A metrics call that cannot take the group down: a failure is logged, once a kind."""
        if not self.metrics:
            return
        try:
            getattr(self.metrics, what)(*args)
        except Exception:  # noqa: BLE001 - observability must not end the serving
            if what not in self._metric_failures:
                self._metric_failures.add(what)
                log.exception("recording metrics (%s) failed; serving goes on", what)

    def _drop_all(self, error: BaseException | None) -> None:
        """End every request the loop holds: with `error`, or as cancelled on a clean stop."""
        if error is None:
            sch = self.scheduler
            for rid in [r.id for r in list(sch.waiting) + list(sch.running.values())]:
                ev = sch.cancel(rid)
                if ev is not None:
                    self._deliver([ev])
        if error is not None and self._sinks:
            self._record("on_error", "group_failed", len(self._sinks))
        for sink in self._sinks.values():
            sink(error or GroupError("the group has stopped"))
        self._sinks.clear()
        if self.after_step is not None:
            self.after_step()


def _refuse(cmd, error: GroupError) -> None:
    """A command that came when the loop had stopped: its caller learns why."""
    op, arg, extra = cmd
    if op == "add":
        for sink in extra:
            sink(error)
    elif op == "call":
        extra.set_exception(error)
