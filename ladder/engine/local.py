"""A TP group of local processes, without Ray: the CLI's, the benchmarks' and the tests' group.

`LocalTPGroup` spawns one process per rank (torch.distributed over gloo, one or more threads per
rank; each rank in a network namespace of its own when given `Namespaces`), loads each rank's
shard, and talks to rank 0's `Leader` through a pipe; the leader drives the other ranks through
the process group. On the pipe, requests go down in batches (`open_many` submits them in one
message, so they join one step) and events come up once per step, not per token: on a machine
whose cores all run ranks, each message wakes the parent, which takes a core from a rank.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import threading
import time
import uuid
from concurrent.futures import Future

import torch

from ladder.engine.group import EventStream, Group, GroupError, Health
from ladder.engine.local_rank import rank_main
from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import TokenEvent
from ladder.engine.step import StepTiming
from ladder.links.factory import free_port
from ladder.links.netns import Namespaces
from ladder.options import GroupOptions

ACCEPTED = "accepted"  # the first item of a request's channel when rank 0 took it
STARTS = 3  # start-ups tried when the rendezvous port turns out taken


class LocalTPGroup(Group):
    """`opts.tp` local processes serving one model. Use as a context manager or `shutdown()`."""

    def __init__(self, opts: GroupOptions | None = None, *,
                 namespaces: Namespaces | None = None, **kw) -> None:
        self.opts = opts or GroupOptions(**kw)
        if namespaces is not None:
            namespaces.check(self.opts.tp)
        self._send_lock = threading.Lock()
        self._channels: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self.procs: list = []
        self._closed = False
        # rank 0 hosts the rendezvous; in a namespace, at its address there (a fresh namespace
        # has every port free)
        host = namespaces.hosts[0] if namespaces else "127.0.0.1"
        for attempt in range(1, STARTS + 1):
            try:
                self._start(f"tcp://{host}:{free_port()}", namespaces)
                break
            except GroupError as e:
                self.shutdown()
                # the probed port was taken (by any process's socket) before rank 0 listened
                # on it: start again on another
                if attempt == STARTS or "EADDRINUSE" not in str(e):
                    raise
        self._reader = threading.Thread(target=self._read, daemon=True, name="ladder-pipe")
        self._reader.start()
        self.info = self._call("info")

    def _start(self, init: str, namespaces: Namespaces | None) -> None:
        """Spawn the ranks with rendezvous `init` and wait until every one is ready."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        status = ctx.Queue()
        self._closed = False
        self.procs = [ctx.Process(target=rank_main, args=(r, self.opts, init, status,
                                                           child if r == 0 else None,
                                                           namespaces),
                                  daemon=True, name=f"ladder-rank{r}")
                      for r in range(self.opts.tp)]
        for p in self.procs:
            p.start()
        _wait_ready(self.procs, status, self.opts.startup_timeout_s)

    # -- the contract --------------------------------------------------------------------------
    async def open(self, prompt: list[int], params: SamplingParams,
                   request_id: str | None = None) -> EventStream:
        return (await self._submit([(request_id or uuid.uuid4().hex, prompt, params)]))[0]

    async def open_many(self, prompts: list[list[int]], params: list[SamplingParams]
                        ) -> list[EventStream]:
        return await self._submit([(uuid.uuid4().hex, p, sp) for p, sp in zip(prompts, params)])

    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None
                       ) -> list[int]:
        if messages is not None:
            return await self._acall("encode_chat", messages)
        return await self._acall("encode", text)

    async def detokenize(self, ids: list[int]) -> str:
        return await self._acall("decode", ids)

    async def health(self, timeout_s: float = 10.0) -> Health:
        try:
            rtt = await asyncio.wait_for(self._acall("ping", timeout_s), timeout_s + 5)
        except (GroupError, asyncio.TimeoutError, TimeoutError) as e:
            return Health(False, f"{type(e).__name__}: {e}")
        return Health(True, "", rtt)

    async def cancel(self, request_id: str) -> None:
        self._send(("cancel", request_id))

    async def stats(self, since: float = 0.0) -> dict:
        return await self._acall("stats", since)

    def shutdown(self) -> None:
        """End every rank (pending requests end as cancelled); never hangs."""
        if self.procs and self.procs[0].is_alive() and not self._closed:
            try:
                self._send(("close",))
            except GroupError:
                pass
        self._closed = True
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []

    close = shutdown

    # -- local extras (reference checks and benchmarks) ----------------------------------------
    def logits(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Full-sequence logits per row through the cached path (slots 0..B-1, positions 0..);
        the group must be idle."""
        return self._call("logits", rows)

    def timing(self) -> StepTiming:
        return self._call("timing")

    def reset_timing(self) -> None:
        self._call("reset_timing")

    # -- the pipe ------------------------------------------------------------------------------
    async def _submit(self, items: list[tuple]) -> list[EventStream]:
        loop = asyncio.get_running_loop()
        for rid, _, _ in items:
            self._channels[rid] = (loop, asyncio.Queue())
        self._send(("submit", [(rid, list(p), sp) for rid, p, sp in items]))
        streams = [_LocalStream(self, rid) for rid, _, _ in items]
        try:
            for s in streams:
                first = await s.queue.get()
                if isinstance(first, BaseException):
                    raise first
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return streams

    def _send(self, msg: tuple) -> None:
        if self._closed:
            raise GroupError("the group has shut down")
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (BrokenPipeError, OSError) as e:
            raise GroupError(f"rank 0 is gone: {e}") from None

    def _call(self, name: str, *args):
        fut = self._start_call(name, args)
        try:
            return fut.result(timeout=self.opts.op_timeout_s)
        except TimeoutError:
            raise GroupError(f"rank 0 did not answer {name} within "
                             f"{self.opts.op_timeout_s} s") from None

    async def _acall(self, name: str, *args):
        return await asyncio.wrap_future(self._start_call(name, args))

    def _start_call(self, name: str, args: tuple) -> Future:
        cid, fut = next(self._ids), Future()
        self._calls[cid] = fut
        try:
            self._send(("call", cid, name, args))
        except GroupError as e:
            self._calls.pop(cid, None)
            fut.set_exception(e)
        return fut

    def _read(self) -> None:
        """The parent's reader: rank 0's messages to the requests and calls waiting for them."""
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "events":
                    for rid, ev in msg[1]:
                        self._put(rid, ev)
                elif msg[0] in ("accepted", "refused"):
                    for rid in msg[1]:
                        self._put(rid, ACCEPTED if msg[0] == "accepted" else msg[2])
                else:  # ("reply" | "raise", call id, value)
                    fut = self._calls.pop(msg[1], None)
                    if fut is not None and msg[0] == "reply":
                        fut.set_result(msg[2])
                    elif fut is not None:
                        fut.set_exception(msg[2])
        except (EOFError, OSError):  # rank 0 exited (or the pipe was closed): all of it ends
            err = GroupError("rank 0 exited" if not self._closed else "the group has shut down")
            for rid in list(self._channels):
                self._put(rid, err)
            for fut in list(self._calls.values()):
                fut.set_exception(err)
            self._calls.clear()

    def _put(self, rid: str, item) -> None:
        ch = self._channels.get(rid)
        if ch is not None:
            loop, q = ch
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # its event loop has closed: nobody is listening
                self._channels.pop(rid, None)


class _LocalStream:
    """One request's events from the parent's channel; `aclose` cancels it unless finished."""

    def __init__(self, group: LocalTPGroup, rid: str) -> None:
        self.group, self.rid, self.done = group, rid, False
        self.queue = group._channels[rid][1]

    def __aiter__(self) -> "_LocalStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self.done:
            raise StopAsyncIteration
        ev = await self.queue.get()
        if isinstance(ev, BaseException):
            self._end()
            raise ev
        if ev.finish_reason is not None:
            self._end()
        return ev

    async def aclose(self) -> None:
        if not self.done:
            try:
                self.group._send(("cancel", self.rid))
            except GroupError:
                pass
            self._end()

    def _end(self) -> None:
        self.done = True
        self.group._channels.pop(self.rid, None)


def _wait_ready(procs: list, status, timeout_s: float) -> None:
    """Every rank reports ready, or the first error (or death) fails the start."""
    deadline = time.monotonic() + timeout_s
    ready = 0
    while ready < len(procs):
        try:
            kind, rank, msg = status.get(timeout=0.5)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if not p.is_alive()]
            if dead:
                r, code = dead[0]
                raise GroupError(f"rank {r} exited with code {code} during start-up") from None
            if time.monotonic() > deadline:
                raise GroupError(f"the group did not start within {timeout_s} s") from None
            continue
        if kind == "error":
            raise GroupError(f"rank {rank} failed to start: {msg}")
        ready += 1
