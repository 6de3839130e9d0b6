"""The links `bench.plan_check` runs its groups over, and `ladder plan --calibrate`'s link timer.

Links: `shm`, `tcp-loopback`, and `tcp-<profile>` for a launcher profile (`high-end`: the veth
as it is; `cheap`: tbf 1 Gbit/s) at the launcher's MTU (a veth pair between two namespaces, as
in `bench.sampling`: root only). Importing this module (the `ladder` command does, through
`bench.cli`) gives `ladder plan --calibrate` its link timer (`time_links`): each link's
all-reduce by message size, on the engine's own communicator, in a chain of weight products
shaped like a decode step's modules (shm's reduces from C, as NativeLayers issues them), timed
`bench.linkcost`'s three ways (none, standard, overlapped as ladder overlaps). A lone reduce
between idle ranks says little: in a chain it also costs the ranks' drift apart and the
exchange's CPU (here, 2026-12-03: shm 12 us alone, 45-180 us in a chain from Python; session
17: 6-35 us from C, 16 B - 16 KiB; linkcost's in-cache compute, one reduce an iteration, hid
none of it, where the engine's ladder hides some).
"""

from __future__ import annotations

import os
import statistics
from contextlib import ExitStack, contextmanager

from bench.linkcost import MODES, _time_ways
from bench.timed import log, probe_pair
from ladder.model.config import ConfigError
from ladder.plan import calibrate


@contextmanager
def link_place(name: str, index: int = 0):
    """(comm, Namespaces or None, rank 0's address) for ranks talking over link `name`; a
    shaped link's veth pair lives as long as the context."""
    if name == "shm":
        yield "shm", None, "127.0.0.1"
    elif name == "tcp-loopback":
        yield "tcp", None, "127.0.0.1"
    elif name.startswith("tcp-"):
        from cluster.links import DEFAULT_MTU, parse_link
        from cluster.network import veth_pair
        from cluster.state import ClusterError
        from ladder.links.netns import Namespaces
        with ExitStack() as stack:
            try:
                ns, hosts = stack.enter_context(veth_pair(
                    parse_link(name.removeprefix("tcp-")),
                    f"pk{index % 10}{os.getpid() % 1000}", DEFAULT_MTU))
            except (ClusterError, ValueError) as e:
                raise ConfigError(f"link {name}: {e}") from None
            yield "tcp", Namespaces(ns, hosts), hosts[0]
    else:
        raise ConfigError(f"link {name!r}: not shm, tcp-loopback or tcp-<launcher profile>")


class _Chain:
    """A decode step's shape for `bench.linkcost`'s ways: `modules` weight products in a row
    (each its own [3 x dim, dim] float32 weight, so that they stream from memory as a decode
    step's do), each followed by an all-reduce of `buf`: none, standard (each waited for at
    once) or overlapped (ladder's: each waited for after the next product)."""

    def __init__(self, comm, buf, dim: int, modules: int) -> None:
        import torch

        from ladder import native
        from ladder.links.shm import ShmComm
        from ladder.native.layouts import FastLinear
        self.comm, self.buf, self.modules = comm, buf, modules
        lib = native.load()
        self.x = torch.randn(max(1, buf.numel() // dim), dim)
        # the products as the engine's modules run them (ladder.native's kernels where the CPU
        # has them): with torch's, whose time varies more from call to call, the ranks drift
        # apart between reduces and each standard wait took up to twice the engine's
        self.w = [FastLinear(torch.randn(3 * dim, dim), lib) for _ in range(min(modules, 30))]
        # shared memory: the reduces in C, as a decode step's layers issue them (NativeLayers)
        self.lib = lib if type(comm) is ShmComm and buf.numel() * 4 <= comm.slot_bytes else None

    def sync(self) -> None:
        self.comm.barrier()

    def one(self, mode: str) -> None:
        if self.lib is None:
            self._walk(mode, lambda: self.comm.all_reduce(self.buf), lambda w, _kind: w.wait())
        else:
            self.comm.run_native(lambda g: self._native(g, mode), self.buf.numel() * 4)

    def _walk(self, mode: str, issue, wait) -> None:
        """The products, each but under `none` followed by its reduce: `issue()` starts one,
        `wait(it, kind)` waits for it (kind 0: at once, standard; 1: after the next product,
        overlapped)."""
        pending = None
        for i in range(self.modules):
            self.w[i % len(self.w)](self.x)
            if mode == "none":
                continue
            work = issue()
            if mode == "standard":
                wait(work, 0)
                continue
            if pending is not None:
                wait(pending, 1)
            pending = work
        if pending is not None:
            wait(pending, 1)

    def _native(self, g: int, mode: str) -> int:
        """`_walk` with the reduces through native.c (ShmComm.run_native's fn): 0, or -1 when a
        wait gave up."""
        lib, buf, n = self.lib, self.buf.data_ptr(), self.buf.numel()

        def issue() -> int:
            seq = lib.ladder_shm_publish(g, buf, n * 4)
            if seq < 0:
                raise _GaveUp
            return seq

        def wait(seq: int, kind: int) -> None:
            if lib.ladder_shm_wait(g, seq, 0, buf, n, kind):
                raise _GaveUp
        try:
            self._walk(mode, issue, wait)
        except _GaveUp:
            return -1
        return 0


class _GaveUp(Exception):
    """A native wait gave up: run_native raises the communicator's own error."""


def _link_rank(rank: int, init: str, opts, spaces, sizes: list[int], dim: int, modules: int,
               iters: int, out) -> None:
    """One rank: into its namespace, the group's own communicator, each size's ways timed
    (`bench.linkcost._time_ways`: interleaved rounds after a warm-up), then the step plan's
    broadcasts; rank 0 reports."""
    import torch

    from ladder.links.factory import close_comm, make_comm
    if spaces is not None:
        opts = spaces.enter(opts, rank)
    torch.set_num_threads(1)
    comm = make_comm(opts, rank, init)
    rows = []
    for nbytes in sizes:
        chain = _Chain(comm, torch.zeros(max(1, nbytes // 4)), dim, modules)
        rows.append(_row(nbytes, modules, _time_ways(chain, 7 * iters, 1)))
    plan_s = _plan_seconds(comm, 20 * iters * modules)
    comm.barrier()
    close_comm(comm)
    if rank == 0:
        out.put({"rows": rows, "step_overhead_s": round(plan_s, 9)})


def _row(nbytes: int, n: int, ways: dict[str, list[tuple[float, float]]]) -> dict:
    """What `ladder.plan.step` needs of one size, from each round's way times (medians over
    the rounds of the differences within a round): the reduce's cost to a module chain r =
    (standard - none) / n, and the share of it an overlapped reduce still costs, k: the
    ladder schedule pays (n - 1) k r + r (the last reduce is drained whole)."""
    def extra(mode: str) -> float:
        return statistics.median(w - none for (w, _), (none, _) in zip(ways[mode],
                                                                        ways["none"]))
    r = extra("standard") / n
    k = (extra("overlapped") / r - 1) / (n - 1) if r > 0 else 1.0
    return {"bytes": nbytes, "seconds": round(max(r, 1e-7), 9), "overlap_cost": round(k, 4),
            **{f"{m}_s": round(statistics.median(w for w, _ in ways[m]), 6) for m in MODES}}


def _plan_seconds(comm, iters: int) -> float:
    """The step plan's two broadcasts (`ShardEngine.step`: a header, then 32 rows' body), each
    lined up and closed by a one-float all-reduce, less such an all-reduce alone."""
    import time

    import torch
    one, head = torch.zeros(1), torch.zeros(4, dtype=torch.int64)
    body = torch.zeros(32 * 4, dtype=torch.int64)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(iters):
        comm.all_reduce(one).wait()
        t0 = time.perf_counter()
        if i % 2:
            comm.broadcast(head)
            comm.broadcast(body)
        comm.all_reduce(one).wait()
        times[bool(i % 2)].append(time.perf_counter() - t0)
    return max(statistics.median(times[True]) - statistics.median(times[False]), 0.0)


def time_links(names: list[str], tp: int, sizes: list[int], dim: int, say=log,
               iters: int = 5, modules: int = 60) -> dict[str, dict]:
    """`ladder plan --calibrate`'s link timer: per link, {"rows": a row per message size
    (`_row`), from chains of `modules` products `dim` wide, one a way in each of 7 x `iters`
    rounds (the finer the interleaving, the less a burst of other load lands on one way
    alone); "step_overhead_s": the step plan's broadcasts}."""
    from ladder.options import GroupOptions
    if tp != 2:
        raise ConfigError(f"links are timed between two ranks, not {tp}")
    out = {}
    for i, name in enumerate(names):
        say(f"link {name}: all-reduce of {', '.join(map(str, sizes))} bytes")
        with link_place(name, i) as (comm, spaces, host):
            opts = GroupOptions(tp=tp, comm=comm, threads=1)
            out[name] = probe_pair(_link_rank, host, opts, spaces, sizes, dim, modules, iters,
                                   timeout_s=1800)
            say(f"link {name}: the step plan's broadcasts "
                f"{out[name]['step_overhead_s'] * 1e6:.0f} us")
    return out


calibrate.provide_link_timer(time_links)
