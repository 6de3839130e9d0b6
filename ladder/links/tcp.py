"""A TCP all-reduce progressed by the ranks themselves: the network link without gloo's threads.

gloo runs an all-reduce on its own threads. On a CPU node whose cores all compute (one rank per
core), those threads must wait for a core, and an 8 KiB all-reduce that takes ~0.4 ms alone
costs 1-2 ms inside decode, overlapped or not. Here every pair of ranks holds one TCP
connection (TCP_NODELAY, non-blocking); `all_reduce(x)` writes this rank's partial to every
peer at once (the kernel carries it: on a real link the NIC and the peer's kernel do the work
while this rank computes) and returns; `wait()` reads the peers' partials, writing whatever is
still unsent, until every byte of that operation is in (polling, then after 20 ms without
progress sleeping in select), then sums in rank order (so every rank holds bit-identical sums,
as with `shm`). Several operations may be in flight: bytes travel in issue order on each
connection. A peer that closes its connection fails the wait at once; one that stalls fails it
after `timeout_s`.

The connections are set up through the gloo group (which also carries step plans and
barriers): each rank listens on its node's address and tells the others through an all-gather,
in which rank 0 also hands out a random token for this group; a rank connects to every lower
rank and greets it with its rank and the token, and accepts every higher one. A connection with
a wrong token, an unexpected rank or no greeting is closed (and logged) and the wait for the
real peer goes on: anything else that can reach the port cannot join the group or break it.
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import os
import secrets
import selectors
import socket
import struct
import time
from collections import deque

import torch
import torch.distributed as dist

from ladder.links.base import CommTimeout, Communicator, TorchComm

log = logging.getLogger(__name__)
_HALF = (torch.float16, torch.bfloat16)
_BUF_BYTES = 4 << 20  # socket buffers: a decode step's partials fit with room to spare
# A wait polls the sockets (yielding the core between polls) this long before it sleeps in
# select, as `shm` does. A rank that sleeps for a 0.05-1 ms wait lets its core go idle, and on a
# VM an idle core costs more than the wait: the rank computes 0.1-0.15 ms slower after each nap
# (a memory-bound matmul here: 680 us alone, 817 us after a 50 us sleep against 792 us after a
# 50 us spin, 1165 against 1038 us after 300 us).
_POLL_S = 0.02
_HELLO = struct.Struct("!I16s")  # a connecting rank's greeting: its rank, the group's token
_HELLO_S = 5.0  # a real peer greets as it connects: a connection silent this long is dropped


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype; the caller keeps `t` alive)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


class _TcpWork:
    __slots__ = ("comm", "tensor", "src", "parts", "out", "into", "sent", "got", "kind", "done")

    def __init__(self, comm: "TcpComm", tensor: torch.Tensor, kind: str) -> None:
        self.comm, self.tensor, self.kind, self.done = comm, tensor, kind, False
        self.src = tensor if tensor.is_contiguous() else tensor.contiguous()
        self.parts = {r: torch.empty_like(self.src) for r in comm.peers}  # the peers' partials
        self.out = _bytes(self.src)  # what goes to every peer
        self.into = {r: _bytes(p) for r, p in self.parts.items()}  # where each peer's lands
        self.sent = dict.fromkeys(comm.peers, 0)
        self.got = dict.fromkeys(comm.peers, 0)

    def complete(self) -> bool:
        n = len(self.out)
        return all(v == n for v in self.sent.values()) and all(v == n for v in self.got.values())

    def wait(self) -> torch.Tensor:
        if not self.done:
            t0 = time.perf_counter()
            self.comm._finish(self)
            self.comm.stats.add_wait(time.perf_counter() - t0, self.kind)
        return self.tensor


class TcpComm(Communicator):
    """All-reduce over one TCP connection per pair of ranks; gloo (`cpu_group`) for the rest."""

    def __init__(self, rank: int, world_size: int, host: str = "127.0.0.1", *,
                 cpu_group: dist.ProcessGroup | None = None, interconnect: str = "loopback",
                 timeout_s: float = 60.0) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.interconnect, self.timeout_s = interconnect, timeout_s
        self.cpu_group = cpu_group if cpu_group is not None else dist.group.WORLD
        self.peers = [r for r in range(world_size) if r != rank]
        self._pending: deque[_TcpWork] = deque()
        self._error: str | None = None
        self._closed = False
        self.socks: dict[int, socket.socket] = {}
        self._connect(host)
        self._sel = selectors.DefaultSelector()
        for r, s in self.socks.items():
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ, r)

    # -- set-up --------------------------------------------------------------------------------
    def _connect(self, host: str) -> None:
        srv = socket.create_server((host, 0), backlog=max(1, self.world_size))
        try:
            addrs: list = [None] * self.world_size
            mine = secrets.token_bytes(16) if self.rank == 0 else None
            dist.all_gather_object(addrs, (host, srv.getsockname()[1], mine),
                                   group=self.cpu_group)
            token = addrs[0][2]
            deadline = time.monotonic() + self.timeout_s
            for r in range(self.rank):  # lower ranks: their listening sockets queue us
                s = socket.create_connection(tuple(addrs[r][:2]), timeout=self.timeout_s)
                s.sendall(_HELLO.pack(self.rank, token))
                self._add(r, s)
            while len(self.socks) < self.world_size - 1:
                self._accept(srv, token, deadline)
        except BaseException:
            for s in self.socks.values():
                s.close()
            raise
        finally:
            srv.close()

    def _accept(self, srv: socket.socket, token: bytes, deadline: float) -> None:
        """Take one connection: kept if it greets with the token and a higher rank not yet
        connected, else closed (the reason logged) while the wait for the real peers goes on."""
        srv.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            s, addr = srv.accept()
        except socket.timeout:
            raise CommTimeout(f"tcp: rank {self.rank} waited {self.timeout_s:.0f} s for "
                              "the higher ranks to connect") from None
        s.settimeout(min(_HELLO_S, max(0.1, deadline - time.monotonic())))
        peer, why = self._greeting(s, token)
        if why:
            s.close()
            log.warning("tcp: rank %d refused a connection from %s:%d: %s", self.rank, *addr[:2],
                        why)
            return
        s.settimeout(self.timeout_s)
        self._add(peer, s)

    def _greeting(self, s: socket.socket, token: bytes) -> tuple[int, str]:
        """(the rank a new connection greets with, '' or why it is refused)."""
        try:
            peer, got = _HELLO.unpack(self._recv_exact(s, _HELLO.size))
        except OSError as e:  # closed, reset or silent
            return -1, f"no greeting ({e})"
        if not hmac.compare_digest(got, token):
            return peer, "a wrong token"
        if not self.rank < peer < self.world_size or peer in self.socks:
            return peer, f"rank {peer}, which this rank does not wait for"
        return peer, ""

    def _add(self, peer: int, s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, _BUF_BYTES)
        self.socks[peer] = s

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise ConnectionError("tcp: a peer closed its connection during set-up")
            data += chunk
        return data

    # -- all-reduce ----------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor, kind: str = "module") -> _TcpWork:
        self._check()
        if x.device.type != "cpu":
            raise ValueError("tcp all-reduces CPU tensors")
        self.stats.bytes += x.numel() * x.element_size()
        self.stats.ops += 1
        work = _TcpWork(self, x, kind)
        if not self.peers:
            work.done = True
            return work
        self._pending.append(work)
        self._progress()  # out on the wire now: the peers' kernels receive it while we compute
        return work

    def _progress(self) -> bool:
        """Write and read whatever the sockets take without blocking; True if anything moved.
        Bytes go out and come in in issue order on each connection."""
        moved = False
        for r, s in self.socks.items():
            for w in self._pending:  # the oldest operation with bytes left for peer r
                if w.sent[r] < len(w.out):
                    try:
                        n = s.send(w.out[w.sent[r]:])
                    except BlockingIOError:
                        n = 0
                    except OSError as e:
                        self._fail(f"tcp all-reduce: sending to rank {r} failed: {e}")
                    w.sent[r] += n
                    moved |= n > 0
                    if w.sent[r] < len(w.out):
                        break
            for w in self._pending:
                if w.got[r] < len(w.out):
                    try:
                        n = s.recv_into(w.into[r][w.got[r]:])
                    except BlockingIOError:
                        break
                    except OSError as e:
                        self._fail(f"tcp all-reduce: receiving from rank {r} failed: {e}")
                    if n == 0:
                        self._fail(f"tcp all-reduce: rank {r} closed its connection (did it "
                                   "exit?)")
                    w.got[r] += n
                    moved = True
                    if w.got[r] < len(w.out):
                        break
        return moved

    def _finish(self, work: _TcpWork) -> None:
        """Move bytes until `work` (and every operation before it) is complete; sum it."""
        self._check()
        last = time.monotonic()
        while not work.complete():
            if self._progress():
                last = time.monotonic()
                continue
            if time.monotonic() - last < _POLL_S:
                os.sched_yield()  # see _POLL_S: polling keeps the core awake
                continue
            if time.monotonic() - last > self.timeout_s:
                lagging = [r for r in self.peers if work.got[r] < len(work.out)
                           or work.sent[r] < len(work.out)]
                self._fail(f"tcp all-reduce: no progress for {self.timeout_s:.0f} s with rank(s) "
                           f"{lagging}")
            want_write = any(w.sent[r] < len(w.out) for w in self._pending for r in self.peers)
            if want_write:
                for key in self._sel.get_map().values():
                    self._sel.modify(key.fileobj, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                     key.data)
            self._sel.select(timeout=0.05)
            if want_write:
                for key in self._sel.get_map().values():
                    self._sel.modify(key.fileobj, selectors.EVENT_READ, key.data)
        while self._pending and self._pending[0].complete():
            self._sum(self._pending.popleft())

    def _sum(self, w: _TcpWork) -> None:
        """Every rank adds the partials in rank order: bit-identical sums everywhere."""
        parts = [w.src if r == self.rank else w.parts[r] for r in range(self.world_size)]
        if len(parts) == 2:
            torch.add(parts[0], parts[1], out=w.src)
        else:  # half precision accumulates in float32, as shm does
            acc = parts[0].float() if w.src.dtype in _HALF else parts[0].clone()
            for p in parts[1:]:
                acc.add_(p)
            w.src.copy_(acc)
        if w.src is not w.tensor:
            w.tensor.copy_(w.src)
        w.done = True

    def _fail(self, msg: str) -> None:
        self._error = msg
        raise CommTimeout(msg)

    def _check(self) -> None:
        if self._error:
            raise CommTimeout(f"tcp communicator failed earlier: {self._error}")
        if self._closed:
            raise RuntimeError("tcp communicator is closed")

    # -- the rest over gloo: exactly as a torch.distributed group does it ----------------------
    broadcast = TorchComm.broadcast
    barrier = TorchComm.barrier

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sel.close()
        for s in self.socks.values():
            s.close()
