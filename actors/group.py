"""TPGroup: a tensor-parallel group of ShardWorker actors, placed, started, checked, torn down.

Placement is a Ray placement group with one bundle per rank, so Ray's scheduler (not luck)
decides where each rank runs: PACK puts the ranks on one node (they all-reduce through shared
memory), SPREAD / STRICT_SPREAD on different nodes (the all-reduce crosses the network, gloo
bound to each node's own address). A group built inside an existing placement group (a Ray Serve
replica's, whose bundle 0 is the replica itself) uses that one's bundles from `bundle_offset`.

Start-up: every worker reports its node; the link follows (`auto`: shm when all ranks share a
node, gloo otherwise on CPU; NCCL on GPUs); rank 0 picks a free port on its node's address for
the rendezvous; all ranks load their shards under `startup_timeout_s`, or the group is torn down
and the error names the rank. Then rank 0 serves: `stream` yields TokenEvents as they come.
`health` is a real collective round trip through every rank under a timeout, not liveness.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.worker import ShardWorker
from ladder.engine.group import Group, GroupError, Health
from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import RequestError, RequestFailed, TokenEvent
from ladder.options import GroupOptions

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Ray node labels a launcher sets (cluster/launcher.py): the node's link profile, which becomes
# the group's `interconnect` label when its ranks span nodes, and an emulated link latency
LINK_LABEL = "ladder.io/link"
LATENCY_LABEL = "ladder.io/emu-latency-us"


class TPGroup(Group):
    """`opts.tp` ShardWorkers serving one model. Use as a context manager or call `shutdown()`.

    `placement_group`: None creates one with `strategy`; "current" uses the placement group
    this code already runs in (bundles `bundle_offset` .. `bundle_offset + tp - 1`); or pass one.
    `fault_timeout_s` bounds every wait on the link, so a dead rank fails the group's requests
    within it. `link` places the ranks only on nodes labelled with that link profile.
    """

    def __init__(self, opts: GroupOptions, *, strategy: str = "PACK",
                 placement_group: PlacementGroup | str | None = None, bundle_offset: int = 0,
                 cpus_per_worker: float | None = None, startup_timeout_s: float = 300.0,
                 fault_timeout_s: float = 20.0, name: str = "", metrics: bool = True,
                 model_label: str = "", link: str = "") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
        self.name = name or f"ladder-{uuid.uuid4().hex[:8]}"
        self.metrics, self.model_label = metrics, model_label  # rank 0 records Prometheus series
        self.strategy, self.link = strategy, link
        gpu = opts.device == "cuda"
        threads = opts.threads or 1
        self.cpus = cpus_per_worker if cpus_per_worker is not None else float(threads)
        self.opts = replace(opts, threads=threads, op_timeout_s=fault_timeout_s)
        self.workers: list = []
        self._own_pg = False
        self.pg = self._placement(placement_group, gpu)
        self.bundle_offset = bundle_offset
        try:
            self._start(gpu, startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    # -- start-up --------------------------------------------------------------------------
    def _placement(self, pg, gpu: bool) -> PlacementGroup:
        if pg == "current":
            pg = ray.util.get_current_placement_group()
            if pg is None:
                raise GroupError("placement_group='current' but this code runs in none")
            return pg
        if pg is not None:
            return pg
        bundle = {"CPU": self.cpus, **({"GPU": 1.0} if gpu else {})}
        selector = [{LINK_LABEL: self.link}] * self.opts.tp if self.link else None
        pg = ray.util.placement_group([dict(bundle) for _ in range(self.opts.tp)],
                                      strategy=self.strategy, name=self.name,
                                      bundle_label_selector=selector)
        self._own_pg = True
        return pg

    def _start(self, gpu: bool, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            raise GroupError(
                f"{self.name}: the placement group ({self.opts.tp} x {self.cpus} CPU"
                f"{' + 1 GPU' if gpu else ''}, {self.strategy}) was not placed within "
                f"{timeout_s} s: the cluster lacks the resources") from None
        actor = ray.remote(ShardWorker)
        self.workers = [
            actor.options(
                num_cpus=self.cpus, num_gpus=1 if gpu else 0, name=f"{self.name}-rank{r}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=self.bundle_offset + r),
            ).remote(self.opts, r)
            for r in range(self.opts.tp)]
        nodes = self._get([w.node_info.remote() for w in self.workers], deadline, "report")
        self.nodes = nodes
        one_node = len({n["node_id"] for n in nodes}) == 1
        opts = self.opts
        if opts.comm == "auto" and opts.tp > 1:
            opts = replace(opts, comm="nccl" if gpu else ("shm" if one_node else "gloo"))
        if not one_node and not opts.interconnect:
            opts = replace(opts, interconnect=link_label(nodes))
        if not one_node and not opts.latency_s:
            opts = replace(opts, latency_s=max(
                float(n["labels"].get(LATENCY_LABEL, 0)) for n in nodes) * 1e-6)
        self.opts = opts
        port = self._get([self.workers[0].free_port.remote()], deadline, "pick a port")[0]
        init = f"tcp://{nodes[0]['ip']}:{port}"
        starts = [w.start.remote(replace(opts, host=n["ip"]), init, self.name, self.metrics,
                                 self.model_label)
                  for w, n in zip(self.workers, nodes)]
        self._get(starts, deadline, "start")
        self.leader = self.workers[0]
        self.info = ray.get(self.leader.info.remote())

    def _get(self, refs: list, deadline: float, what: str) -> list:
        """ray.get under the start-up deadline; the error names the rank that failed."""
        out = [None] * len(refs)
        for r, ref in enumerate(refs):
            try:
                out[r] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except GetTimeoutError:
                raise GroupError(f"{self.name}: rank {r} did not {what} before the start-up "
                                 f"timeout") from None
            except (RayActorError, RayTaskError) as e:
                raise GroupError(f"{self.name}: rank {r} failed to {what}: "
                                 f"{_cause(e)}") from None
        return out

    # -- serving ---------------------------------------------------------------------------
    async def open(self, prompt: list[int], params: SamplingParams,
                   request_id: str | None = None) -> "GenerationStream":
        """Submit one request and return, once rank 0 has accepted it, the stream of its
        TokenEvents. Raises RequestError for a request the group cannot serve and GroupError
        when the group is down, before anything was generated."""
        gen = self.leader.generate.remote(request_id or uuid.uuid4().hex, list(prompt), params)
        try:
            await self._next(gen)  # None: accepted
        except BaseException:
            ray.cancel(gen)
            raise
        return GenerationStream(self, gen)

    async def _next(self, gen):
        """The next item of rank 0's stream, its Ray errors as the API's own."""
        try:
            return await (await gen.__anext__())
        except (RayActorError, RayTaskError) as e:
            raise _translate(e, self.name) from None
        except StopAsyncIteration:
            raise GroupError(f"{self.name}: rank 0 ended a stream before it finished") from None

    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None
                       ) -> list[int]:
        if messages is not None:
            return await self._call(self.leader.encode_chat.remote(messages))
        return await self._call(self.leader.encode.remote(text))

    async def detokenize(self, ids: list[int]) -> str:
        return await self._call(self.leader.decode.remote(ids))

    async def cancel(self, request_id: str) -> None:
        await self._call(self.leader.cancel.remote(request_id))

    async def stats(self, since: float = 0.0) -> dict:
        return await self._call(self.leader.stats.remote(since))

    async def _call(self, ref):
        try:
            return await ref
        except (RayActorError, RayTaskError) as e:
            raise _translate(e, self.name) from None

    async def health(self, timeout_s: float = 10.0) -> Health:
        """Every rank's process answers, and a collective round trip through all of them
        completes within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        try:
            alive = await asyncio.wait_for(
                asyncio.gather(*(w.alive.remote() for w in self.workers)), timeout_s)
        except asyncio.TimeoutError:
            return Health(False, f"a rank did not answer within {timeout_s} s")
        except RayActorError as e:
            return Health(False, f"a rank died: {_cause(e)}")
        for a in alive:
            if not a["ok"]:
                return Health(False, f"rank {a['rank']}: {a['error'] or 'not running'}")
        left = max(0.1, deadline - time.monotonic())
        try:
            h = await asyncio.wait_for(self.leader.health.remote(left), left + 5)
        except (asyncio.TimeoutError, RayActorError) as e:
            return Health(False, f"rank 0 did not answer: {type(e).__name__}")
        return Health(h["healthy"], h["reason"], h.get("rtt_s"))

    # -- teardown --------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop serving (pending requests end as cancelled), end every worker, free the
        placement group if this group created it. Never hangs past `timeout_s` + kill time."""
        if self.workers:
            try:
                ray.get(self.workers[0].stop.remote(), timeout=timeout_s)
            except Exception:  # a dead or stuck leader: the kills below end it
                pass
            for w in self.workers:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:
                    pass
            self.workers = []
        if self._own_pg and self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self._own_pg = False


class GenerationStream:
    """One request's TokenEvents as rank 0 produces them (text deltas; the last carries the
    finish reason and stats): an async iterator that raises RequestFailed when the request
    failed alone and GroupError when the group broke. `aclose` cancels an unfinished request
    (its slot is freed at the next step), whether or not it was ever iterated."""

    def __init__(self, group: TPGroup, gen) -> None:
        self.group, self.gen, self.done = group, gen, False

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self.done:
            raise StopAsyncIteration
        try:
            ev = await self.group._next(self.gen)
        except asyncio.CancelledError:  # the caller's: the request runs on until aclose
            raise
        except BaseException:  # rank 0 ended it
            self.done = True
            raise
        self.done = ev.finish_reason is not None
        return ev

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            ray.cancel(self.gen)


def link_label(nodes: list[dict]) -> str:
    """The interconnect of ranks on different nodes: the launcher's link profile when their
    nodes carry one (profiles joined by + when they differ), else `network`."""
    profiles = {n["labels"].get(LINK_LABEL, "") for n in nodes}
    if "" in profiles:
        return "network"
    return "+".join(sorted(profiles))


def _cause(e: BaseException) -> str:
    inner = getattr(e, "cause", None)
    return f"{type(inner).__name__}: {inner}" if inner is not None else str(e).splitlines()[0]


def _translate(e: BaseException, name: str) -> BaseException:
    """A Ray error from rank 0 as the API's own: RequestError (the request, not the group),
    RequestFailed (that request alone failed), or GroupError."""
    inner = getattr(e, "cause", None)
    if isinstance(inner, (RequestError, ValueError)):
        return RequestError(str(inner))
    if isinstance(inner, RequestFailed):
        return inner
    if isinstance(inner, GroupError):
        return GroupError(f"{name}: {inner}")
    if isinstance(e, RayActorError):
        return GroupError(f"{name}: rank 0 died ({type(e).__name__})")
    return GroupError(f"{name}: {_cause(e)}")
