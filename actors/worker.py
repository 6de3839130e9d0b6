"""ShardWorker: the Ray actor that owns one TP rank (its weight shard, KV cache and place in the
process group).

An async actor: Ray calls land on its event loop, the model runs on threads (rank 0: the
`Leader`'s loop; the others: `ShardEngine.follow`, which runs whatever steps the leader
broadcasts). So a worker answers health calls while it computes. Rank 0 also serves the group's
API: `generate` is a streaming generator of `TokenEvent`s, `cancel`, `health`, `stats`,
`encode`, `info`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
import torch

from ladder.engine.build import build_engine
from ladder.engine.group import GroupInfo
from ladder.engine.leader import Leader
from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import Request
from ladder.links.factory import close_comm, free_port, make_comm
from ladder.options import GroupOptions


class ShardWorker:
    def __init__(self, opts: GroupOptions, rank: int) -> None:
        self.opts, self.rank = opts, rank
        torch.set_num_threads(opts.threads or 1)
        self.leader: Leader | None = None
        self.comm = None
        self._follower: threading.Thread | None = None
        self.follower_error: str | None = None
        # tokenizing runs here, one prompt at a time, never on the actor's event loop
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="ladder-tokenize")

    # -- every rank ------------------------------------------------------------------------
    async def node_info(self) -> dict:
        return {"rank": self.rank, "ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "labels": dict(ray.get_runtime_context().get_node_labels())}

    async def free_port(self) -> int:
        return free_port(ray.util.get_node_ip_address())

    async def start(self, opts: GroupOptions, init_method: str, name: str, metrics: bool = True,
                    model_label: str = "") -> dict:
        """Join the process group at `init_method`, load this rank's shard, start its thread.
        Rank 0 leads group `name` and records its Prometheus metrics (`metrics`), labelled
        `model_label`."""
        if opts.device == "cuda":  # Ray gives each worker one GPU: its cuda:0
            opts = replace(opts, cuda_index=0)
        self.opts = opts
        await asyncio.to_thread(self._start, init_method, name, metrics, model_label)
        return {"rank": self.rank, "interconnect": self.comm.interconnect}

    def _start(self, init_method: str, name: str, metrics_on: bool, model_label: str) -> None:
        self.comm = make_comm(self.opts, self.rank, init_method)
        ckpt, engine = build_engine(self.opts, self.rank, self.comm)
        self.comm.barrier()  # every rank loaded: the leader may ping
        if self.rank == 0:
            self.leader = Leader.for_checkpoint(ckpt, engine, name=name)
            if metrics_on:
                from actors.metrics import GroupMetrics
                info = self.leader.info()
                self.leader.metrics = GroupMetrics(model_label or Path(self.opts.model).name,
                                                   info.residual, info.tp, info.interconnect)
            self.leader.start()
        else:
            self._follower = threading.Thread(target=self._follow, args=(engine,), daemon=True,
                                              name=f"ladder-follower{self.rank}")
            self._follower.start()

    def _follow(self, engine) -> None:
        try:
            engine.follow()
        except BaseException as e:  # the leader is gone or the link broke
            self.follower_error = f"{type(e).__name__}: {e}"
        finally:
            close_comm(self.comm)

    async def alive(self) -> dict:
        """Process liveness and the rank's own view (the group's health is `health`)."""
        if self.rank == 0:
            running = self.leader is not None and self.leader.error is None
            return {"rank": 0, "ok": running,
                    "error": self.leader.error if self.leader else None}
        running = self._follower is not None and self._follower.is_alive()
        return {"rank": self.rank, "ok": running, "error": self.follower_error}

    # -- rank 0: the group's API -----------------------------------------------------------
    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams):
        """Stream one request: first None, once the leader accepted it (so a caller can answer
        before any token), then `TokenEvent`s, the last with a finish_reason. Raises
        RequestError for a request that cannot be served, RequestFailed when it failed alone,
        GroupError when the group breaks."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        req = Request(prompt=list(prompt), params=params, id=request_id)
        self.leader.submit([req], [lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)])
        finished = False
        try:
            yield None
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    finished = True
                    raise ev
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            if not finished:  # the caller went away (cancelled the stream): free the slot
                self.leader.cancel(request_id)

    async def cancel(self, request_id: str) -> None:
        self.leader.cancel(request_id)

    async def health(self, timeout_s: float = 10.0) -> dict:
        """A collective round trip through every rank under `timeout_s`."""
        if self.leader.error is not None:
            return {"healthy": False, "reason": self.leader.error}
        try:
            rtt = await asyncio.wait_for(asyncio.wrap_future(self.leader.ping()), timeout_s)
        except asyncio.TimeoutError:
            return {"healthy": False,
                    "reason": f"the collective health check took over {timeout_s} s"}
        except Exception as e:
            return {"healthy": False, "reason": f"{type(e).__name__}: {e}"}
        return {"healthy": True, "reason": "", "rtt_s": rtt}

    async def stats(self, since: float = 0.0) -> dict:
        return self.leader.stats(since)

    async def info(self) -> GroupInfo:
        return self.leader.info()

    async def encode(self, text: str) -> list[int]:
        return await self._tokenize(self.leader.encode, text)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self._tokenize(self.leader.encode_chat, messages)

    async def decode(self, ids: list[int]) -> str:
        return await self._tokenize(self.leader.decode, ids)

    async def _tokenize(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    # -- shutdown --------------------------------------------------------------------------
    async def stop(self) -> None:
        """Rank 0: end pending requests, send the followers STOP, close the link."""
        if self.leader is not None:
            await asyncio.to_thread(self.leader.stop)
            close_comm(self.comm)
        elif self._follower is not None:
            await asyncio.to_thread(self._follower.join, 10.0)


__all__ = ["ShardWorker"]
