"""What a link costs the cores that compute, by profile, frame size and message size.

Two ranks in two network namespaces joined by one veth pair shaped like each of `--links`
(`cluster.network.veth_pair`), once per MTU in `--mtus` (`ladder cluster up --mtu`) and message
size in `--bytes`. Each iteration a rank computes for about `--compute-us` (a matmul that stays in
cache) and exchanges a message with its peer over TCP (a TP all-reduce's traffic: 2.3 / 18 / 74 KiB
are SmolLM2's at batch 1 / 8 / 32, float32), three ways:

  none        compute only (the speed bound)
  standard    compute, then send and wait for the peer's message
  overlapped  send, compute, then wait (ladder's schedule)

A wait polls the socket, yielding the core, as `ladder.links.tcp` does. Reported per iteration, medians
over `--reps` interleaved rounds: wall and CPU time of each way, the exchange's CPU cost
(overlapped - none, CPU time: what no schedule can hide on a core that computes) and the overlap
efficiency (standard - overlapped) / (standard - none): the most any schedule can hide of this
link's cost on these cores, since the loop does nothing else. On a real NIC the frames are cut,
paced and merged in hardware; tbf does it in software, a timer tick per frame, on these cores, so
the exchange's CPU cost falls as frames grow, while the bucket (one frame) lets a message's first
frame through early. An unshaped veth (`high-end`) has no wire time at all: the sending system
call carries the message into the peer's socket, so its cost is CPU and overlaps with nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

from bench.table import table
from bench.timed import bench_main, csv, csv_ints, emit, log, probe_pair

MODES = ("none", "standard", "overlapped")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--links", default="high-end,cheap",
                   help="comma-separated profiles; a pair's two ends are shaped alike")
    p.add_argument("--mtus", default="1500,9000,16000")
    p.add_argument("--bytes", default="73728",
                   help="comma-separated message sizes, per rank per iteration")
    p.add_argument("--compute-us", type=float, default=600.0)
    p.add_argument("--iters", type=int, default=150, help="iterations per way per round")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    p.add_argument("--out", help="write the JSON line here")


# -- a rank, inside its namespace ----------------------------------------------------------------
def _rank(rank: int, init: str, ns: tuple[str, str], a: argparse.Namespace, out) -> None:
    """One rank: into its namespace, meet the peer at `init` (rank 0 listens), run every way."""
    import torch

    from ladder.links.netns import enter_netns
    enter_netns(ns[rank])
    torch.set_num_threads(1)
    s = _meet(rank, init)
    peer = _Peer(s, a.nbytes, a.compute_us)
    runs = _time_ways(peer, a.reps, a.iters)
    peer.sync()
    s.close()
    if rank == 0:
        out.put({m: {"wall_us": 1e6 * statistics.median(r[0] for r in v),
                     "cpu_us": 1e6 * statistics.median(r[1] for r in v)}
                 for m, v in runs.items()})


def _meet(rank: int, init: str) -> socket.socket:
    """The TCP connection between the two ranks (rank 0 listens at `init`, rank 1 retries for a
    minute), blocking, without Nagle's delay, with 4 MiB socket buffers."""
    host, port = init.removeprefix("tcp://").rsplit(":", 1)
    if rank == 0:
        srv = socket.create_server((host, int(port)))
        srv.settimeout(60)
        s, _ = srv.accept()
        srv.close()
    else:
        deadline = time.monotonic() + 60
        while True:
            try:
                s = socket.create_connection((host, int(port)), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    return s


class _Peer:
    """A rank's side of one iteration: compute (`k` in-cache matmuls, about `compute_us`) and
    one `nbytes` message each way over `s`, in the order of a way (`one`)."""

    def __init__(self, s: socket.socket, nbytes: int, compute_us: float) -> None:
        import torch
        self.s, self.nbytes, self.mm = s, nbytes, torch.mm
        self.x, self.y = torch.randn(200, 200), torch.randn(200, 200)
        rounds = []
        for _ in range(5):  # the median of 5 rounds: one round lands on a burst of load too often
            t0 = time.perf_counter()
            for _ in range(20):
                self.mm(self.x, self.y)
            rounds.append((time.perf_counter() - t0) / 20)
        self.k = max(1, round(compute_us * 1e-6 / statistics.median(rounds)))
        self.msg, self.view = bytearray(nbytes), memoryview(bytearray(nbytes))

    def compute(self) -> None:
        for _ in range(self.k):
            self.mm(self.x, self.y)

    def receive(self, n: int) -> None:
        got = 0
        while got < n:
            try:
                r = self.s.recv_into(self.view[got:n], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                os.sched_yield()
                continue
            if r == 0:
                raise ConnectionError("the peer closed the connection")
            got += r

    def sync(self) -> None:  # both ranks start a way together
        self.s.sendall(b"s")
        self.receive(1)

    def one(self, mode: str) -> None:
        if mode == "none":
            self.compute()
        elif mode == "standard":
            self.compute()
            self.s.sendall(self.msg)
            self.receive(self.nbytes)
        else:
            self.s.sendall(self.msg)
            self.compute()
            self.receive(self.nbytes)


def _time_ways(peer: _Peer, reps: int, iters: int) -> dict[str, list[tuple[float, float]]]:
    """Per way, (wall, CPU) seconds an iteration of each of `reps` rounds of `iters`, the ways
    interleaved (reversed every other round) after a warm-up of each."""
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for m in MODES:  # warm-up
        peer.sync()
        for _ in range(10):
            peer.one(m)
    for rep in range(reps):
        for m in MODES if rep % 2 == 0 else MODES[::-1]:
            peer.sync()
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                peer.one(m)
            runs[m].append(((time.perf_counter() - w0) / iters,
                            (time.process_time() - c0) / iters))
    return runs


# -- the driver ------------------------------------------------------------------------------------
def run(a: argparse.Namespace) -> int:
    from cluster.links import check_mtu, parse_link
    from cluster.network import veth_pair
    from cluster.state import ClusterError
    try:
        links = [parse_link(x) for x in csv(a.links)]
        if not links:
            raise ValueError(f"--links {a.links!r}: give at least one profile")
        for link in links:
            if link.latency_s:
                raise ValueError(f"--links: {link.spec} adds emulated latency, which lives in "
                                 "the communicator, not on the link this bench measures")
        mtus = [check_mtu(m) for m in csv_ints("--mtus", a.mtus)]
        sizes = csv_ints("--bytes", a.bytes)
    except ValueError as e:
        print(f"bench linkcost: {e}", file=sys.stderr)
        return 2
    rows = []
    for link in links:
        for mtu in mtus:
            for nbytes in sizes:
                log(f"{link.spec}, MTU {mtu}, {nbytes} bytes: {a.reps} x {a.iters} iterations "
                    "a way")
                try:
                    with veth_pair(link, f"lc{os.getpid() % 10000}", mtu) as (ns, ips):
                        r = probe_pair(_rank, ips[0], ns, argparse.Namespace(**vars(a),
                                                                             nbytes=nbytes),
                                       timeout_s=900)
                except ClusterError as e:
                    print(f"bench linkcost: {e}", file=sys.stderr)
                    return 2
                none, std, ovl = (r[m] for m in MODES)
                gap = std["wall_us"] - none["wall_us"]
                rows.append({"link": link.spec, "mtu": mtu, "bytes": nbytes,
                             **{f"{m}_{k}": r[m][k] for m in MODES
                                for k in ("wall_us", "cpu_us")},
                             "exchange_cpu_us": ovl["cpu_us"] - none["cpu_us"],
                             "efficiency": (std["wall_us"] - ovl["wall_us"]) / gap
                             if gap > 0 else None})
    print(table(f"one message each way per iteration over a veth pair, ~{a.compute_us:.0f} us "
                f"compute; us per iteration (medians of {a.reps}); cost = standard - none",
                ["link", "MTU", "bytes", "none", "standard", "overlapped", "cost",
                 "exchange CPU", "efficiency"],
                [[r["link"], r["mtu"], r["bytes"], r["none_wall_us"], r["standard_wall_us"],
                  r["overlapped_wall_us"], r["standard_wall_us"] - r["none_wall_us"],
                  r["exchange_cpu_us"],
                  "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"] for r in rows],
                digits=1))
    emit({"bench": "linkcost", "links": [x.spec for x in links], "mtus": mtus, "bytes": sizes,
          "compute_us": a.compute_us, "iters": a.iters, "reps": a.reps, "rows": rows},
         a.out, "linkcost")
    return 0


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
