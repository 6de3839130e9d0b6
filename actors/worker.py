"""ShardWorker: the Ray actor that owns one TP rank (its weight shard, KV cache and place in the
process group).

An async actor: Ray calls land on its event loop, the model runs on threads (rank 0: the
`LeaderLoop`; the others: `ShardEngine.follow`, which runs whatever steps the leader broadcasts).
So a worker answers health calls while it computes. Rank 0 also serves the group's API:
`generate` is a streaming generator of `TokenEvent`s, `cancel`, `health`, `stats`, `encode`.
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

from actors.leader import GroupFailed, LeaderLoop
from ladder.runner import GroupOptions, Leader, build_engine, free_port, make_comm
from ladder.sampling import SamplingParams
from ladder.scheduler import Request, RequestError


class ShardWorker:
    def __init__(self, opts: GroupOptions, rank: int) -> None:
        self.opts, self.rank = opts, rank
        torch.set_num_threads(opts.threads or 1)
        self.loop: LeaderLoop | None = None
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

    async def start(self, opts: GroupOptions, init_method: str, metrics: bool = True,
                    model_label: str = "") -> dict:
        """Join the process group at `init_method`, load this rank's shard, start its thread.
        Rank 0 records the group's Prometheus metrics (`metrics`), labelled `model_label`."""
        self.opts, self.metrics_on, self.model_label = opts, metrics, model_label
        if opts.device == "cuda":  # Ray gives each worker one GPU: its cuda:0
            self.opts = opts = replace(opts, cuda_index=0)
        await asyncio.to_thread(self._start, init_method)
        return {"rank": self.rank, "interconnect": self.comm.interconnect}

    def _start(self, init_method: str) -> None:
        self.comm = make_comm(self.opts, self.rank, init_method)
        ckpt, engine = build_engine(self.opts, self.rank, self.comm)
        self.comm.barrier()  # every rank loaded: the leader may ping
        if self.rank == 0:
            leader = Leader(ckpt, engine)
            metrics = None
            if self.metrics_on:
                from actors.metrics import GroupMetrics
                info = leader.info()
                metrics = GroupMetrics(self.model_label or Path(self.opts.model).name,
                                       info["residual"], info["tp"], info["interconnect"])
            self.loop = LeaderLoop(leader, metrics=metrics)
            self.loop.start()
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
            self._close_comm()

    def _close_comm(self) -> None:
        if self.comm is not None:
            self.comm.close()
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    async def alive(self) -> dict:
        """Process liveness and the rank's own view (the group's health is `health`)."""
        if self.rank == 0:
            running = self.loop is not None and self.loop.error is None
            return {"rank": 0, "ok": running, "error": self.loop.error if self.loop else None}
        running = self._follower is not None and self._follower.is_alive()
        return {"rank": self.rank, "ok": running, "error": self.follower_error}

    # -- rank 0: the group's API -----------------------------------------------------------
    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams):
        """Stream one request: first None, once the leader accepted it (so a caller can answer
        before any token), then `TokenEvent`s, the last with a finish_reason. Raises
        RequestError for a request that cannot be served, RequestFailed when it failed alone,
        GroupFailed when the group breaks."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        req = Request(prompt=list(prompt), params=params, id=request_id)
        self.loop.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
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
                self.loop.cancel(request_id)

    async def cancel(self, request_id: str) -> None:
        self.loop.cancel(request_id)

    async def health(self, timeout_s: float = 10.0) -> dict:
        """A collective round trip through every rank under `timeout_s`."""
        if self.loop.error is not None:
            return {"healthy": False, "reason": self.loop.error}
        try:
            rtt = await asyncio.wait_for(asyncio.wrap_future(self.loop.ping()), timeout_s)
        except asyncio.TimeoutError:
            return {"healthy": False,
                    "reason": f"the collective health check took over {timeout_s} s"}
        except Exception as e:
            return {"healthy": False, "reason": f"{type(e).__name__}: {e}"}
        return {"healthy": True, "reason": "", "rtt_s": rtt}

    async def stats(self, since: float = 0.0) -> dict:
        return self.loop.stats(since)

    async def info(self) -> dict:
        return self.loop.leader.info()

    async def encode(self, text: str, chat: bool = False) -> list[int]:
        return await self._tokenize(self.loop.leader.encode, text, chat)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self._tokenize(self.loop.leader.encode_chat, messages)

    async def _tokenize(self, fn, *args) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    # -- shutdown --------------------------------------------------------------------------
    async def stop(self) -> None:
        """Rank 0: end pending requests, send the followers STOP, close the link."""
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop)
            self._close_comm()
        elif self._follower is not None:
            await asyncio.to_thread(self._follower.join, 10.0)


__all__ = ["ShardWorker", "GroupFailed", "RequestError"]
