"""The TCP communicator against gloo, in real processes (spawned, one per rank).

Integer-valued sums must equal gloo's bit for bit at any TP size, random ones at TP=2 (one
addition) and within rounding at TP=3; every rank must hold bit-identical sums. Tensors past
the socket buffers (8 M floats) make both ranks write and read in turns; two operations are in
flight, waited in either order. During set-up, connections that do not greet with the group's
token and an expected rank are refused without breaking the group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import time

import pytest
import torch
import torch.distributed as dist
from test_shm import DTYPES, SIZES, Ranks, _gloo, compare_with_gloo, make_comm_ranks

from ladder.links import tcp
from ladder.links.base import CommTimeout
from ladder.links.tcp import TcpComm

BIG = 8 * 1024 * 1024  # float32 elements: 32 MiB, far past the sockets' buffers


def _versus_gloo(rank, world, port, q):
    _gloo(rank, world, port)
    comm = TcpComm(rank, world, cpu_group=dist.group.WORLD, timeout_s=30.0)
    try:
        cases = [(n, d) for n in SIZES for d in DTYPES] + [(BIG, torch.float32)]
        compare_with_gloo(comm, rank, world, cases)
        assert comm.stats.ops == 2 * 2 * len(cases) and comm.stats.exposed_s > 0
        head = torch.tensor([1, 5, 77]) if rank == 0 else torch.zeros(3, dtype=torch.int64)
        assert comm.broadcast(head, 0).tolist() == [1, 5, 77]
        comm.barrier()
    finally:
        comm.close()
        dist.destroy_process_group()
    return comm.stats.bytes


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_equals_gloo(world):
    with Ranks(_versus_gloo, world) as ranks:
        got = ranks.results(timeout=240)
    assert len(set(got.values())) == 1


def test_make_comm_builds_tcp_when_asked():
    with Ranks(make_comm_ranks, 2, {"comm": "tcp"}) as ranks:
        got = ranks.results()
    assert got == {0: ("loopback", "TcpComm", None), 1: ("loopback", "TcpComm", None)}


def _waits_on_a_lost_peer(rank, world, port, q):
    _gloo(rank, world, port)
    comm = TcpComm(rank, world, timeout_s=2.0)
    q.put(("ready", rank, os.getpid()))
    if rank == 1:
        time.sleep(60)  # killed or stalled: never sends
        return None
    work = comm.all_reduce(torch.ones(10))
    t0 = time.monotonic()
    try:
        work.wait()
    except CommTimeout as e:
        msg = str(e)
        try:  # the communicator stays failed, with the first error
            comm.all_reduce(torch.ones(1))
        except CommTimeout as again:
            msg2 = str(again)
        return type(e).__name__, msg, msg2, time.monotonic() - t0
    return "no error", "", "", time.monotonic() - t0


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_lost_peer_raises_within_timeout(how):
    with Ranks(_waits_on_a_lost_peer, 2) as ranks:
        pids = {}
        while len(pids) < 2:
            kind, rank, val = ranks.get()
            assert kind == "ready", val
            pids[rank] = val
        if how == "killed":
            time.sleep(0.3)  # rank 0 is waiting by now
            os.kill(pids[1], signal.SIGKILL)
        kind, rank, val = ranks.get(timeout=10)
        assert (kind, rank) == ("ok", 0), val
        cls, msg, again, waited = val
        assert cls == "CommTimeout", msg
        assert again.startswith("tcp communicator failed earlier: ")
        if how == "killed":
            assert ("rank 1 closed its connection" in msg or "receiving from rank 1" in msg) \
                and waited < 2.0, (msg, waited)
        else:
            assert "no progress for 2 s with rank(s) [1]" in msg and 2.0 <= waited < 3.0, \
                (msg, waited)


def _strays_first(rank, world, port, q):
    """Before each real connection a rank makes, strays connect to the same listening port: one
    claiming the rank with a wrong token, one with the group's token but a rank nobody waits
    for, one that closes without a word. Returns (the refusals this rank logged, sums ok)."""
    _gloo(rank, world, port)
    refused, token = [], []
    handler = logging.Handler()
    handler.emit = lambda rec: refused.append(rec.args[-1])  # the reason
    logging.getLogger("ladder.links.tcp").addHandler(handler)
    gather, connect = dist.all_gather_object, socket.create_connection

    def gather_and_keep_token(out, obj, group=None):
        gather(out, obj, group=group)
        token.append(out[0][2])

    def strays_then_connect(addr, *args, **kw):
        for hello in (struct.pack("!I16s", rank, bytes(16)), struct.pack("!I16s", 99, token[0]),
                      b""):
            with connect(addr) as s:
                s.sendall(hello)
        return connect(addr, *args, **kw)

    tcp.dist.all_gather_object = gather_and_keep_token
    tcp.socket.create_connection = strays_then_connect
    comm = TcpComm(rank, world, cpu_group=dist.group.WORLD, timeout_s=10.0)
    try:
        compare_with_gloo(comm, rank, world, [(1025, torch.float32)])
    finally:
        comm.close()
        dist.destroy_process_group()
    return sorted(refused)


def test_set_up_refuses_strays_and_the_group_still_forms():
    with Ranks(_strays_first, 3) as ranks:
        got = ranks.results(timeout=120)
    strays = ["a wrong token", "no greeting (tcp: a peer closed its connection during set-up)",
              "rank 99, which this rank does not wait for"]
    # rank 0 is connected to by ranks 1 and 2, rank 1 by rank 2, rank 2 by nobody
    assert got == {0: sorted(strays * 2), 1: strays, 2: []}, got
