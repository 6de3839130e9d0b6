"""Shared-memory all-reduce for CPU ranks on one node: the CPU analogue of NVLink.

One file in /dev/shm per group, mapped by every rank, holds:

    control  a header, then one cache line per rank: pid, attached, `pub` (highest all-reduce
             sequence this rank has published), `done` (highest sequence it has summed),
             `back` (highest broadcast sequence it has read); one line for `bpub` (highest
             broadcast sequence published); a `sleeping` word per rank (it may be in
             futex_wait: whoever stores a control word then wakes it)
    ring     n_slots x world_size buffers of slot_bytes: sequence s uses slot s % n_slots, one
             buffer per rank
    bcast    bcast_slots buffers of bcast_bytes, written by the broadcast's source

Every rank issues the same all-reduces in the same order (SPMD), so sequence numbers agree
without talking. `all_reduce(x)` is cheap: it copies `x` into this rank's buffer of the next
slot and publishes the sequence (data first, then the flag: x86 stores are not reordered).
`Work.wait()` waits (see `_block`) until every rank has published that sequence, then sums
the buffers in rank order into `x`: every rank does the same additions in the same order, so
all ranks hold bit-identical sums. A tensor larger than a slot takes several sequences
(chunks). A slot is written again only once every rank has summed what it held (`done` >=
s - n_slots), so several reduces may be in flight (the ladder schedule starts reduce i+1
before waiting on i); waits complete in issue order. Half-precision sums of more than two
ranks accumulate in float32 and round once.

A peer that dies (its pid is gone or a zombie) or does not publish within `timeout_s` turns
the wait into `CommTimeout`; the communicator is unusable after that. Broadcasts (the leader's
step plans) go through the bcast buffers; a follower waiting for the next plan waits as long as
the source lives (an idle leader is normal), the source waits at most `timeout_s` for readers.

A decode step's layers can all-reduce through the same segment from C (`run_native`, native.c's
ladder_shm: the same protocol, the same sums, the counters handed over before and back after),
so a change to the protocol here is one there too. The segment itself (creation, attaching,
removal) is `ladder.links.shm_segment`'s.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import time

import torch
import torch.distributed as dist

from ladder.links.base import CommStats, CommTimeout, Communicator
from ladder.links.shm_segment import _R_BACK, _R_DONE, _R_PID, _R_PUB, SHM_DIR, ShmSegment
from ladder.procs import alive

_HALF = (torch.bfloat16, torch.float16)
_POLL_S = 0.02  # a wait polls (yielding the core) this long, then sleeps in the kernel

# futex(2) on a control word's low 32 bits: a waiter sleeps in the kernel until the word changes
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # not FUTEX_PRIVATE: the words are shared between processes
if _SYS_FUTEX is not None:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long


class _ShmWork:
    __slots__ = ("comm", "tensor", "buf", "last_seq", "done", "kind")

    def __init__(self, comm: "ShmComm", tensor: torch.Tensor, buf: torch.Tensor,
                 last_seq: int, kind: str) -> None:
        self.comm, self.tensor, self.buf, self.last_seq = comm, tensor, buf, last_seq
        self.done, self.kind = False, kind

    def wait(self) -> torch.Tensor:
        if not self.done:
            comm = self.comm
            t0 = time.perf_counter()
            comm._drain(self.last_seq)
            comm.stats.add_wait(time.perf_counter() - t0, self.kind)
        return self.tensor


class ShmComm(ShmSegment, Communicator):
    """All-reduce, broadcast and barrier among `world_size` processes on one node through shared
    memory; `name` identifies the group (letters, digits, `_` and `.`), unique among the groups
    starting at the same time.

    `cpu_group` (a torch.distributed group of the same ranks, optional) only tells the ranks the
    creator's pid; without it they look the segment up by name. `timeout_s` bounds every wait on
    a peer except a follower's wait for the next broadcast. Memory: n_slots x world_size x
    buffer_bytes + bcast_slots x bcast_bytes.
    """

    interconnect = "shm"

    def __init__(self, name: str, rank: int, world_size: int, *,
                 cpu_group: dist.ProcessGroup | None = None, timeout_s: float = 30.0,
                 buffer_bytes: int = 1 << 20, n_slots: int = 8, bcast_bytes: int = 1 << 18,
                 bcast_slots: int = 2, shm_dir: str = SHM_DIR) -> None:
        super().__init__()
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise ValueError(f"name {name!r}: use letters, digits, '_' and '.'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if n_slots < 2 or bcast_slots < 1:
            raise ValueError(f"n_slots must be >= 2 and bcast_slots >= 1, got {n_slots}, "
                             f"{bcast_slots}")
        if buffer_bytes < 64 or bcast_bytes < 64:
            raise ValueError(f"buffer_bytes and bcast_bytes must be >= 64, got {buffer_bytes}, "
                             f"{bcast_bytes}")
        self.name, self.rank, self.world_size, self.timeout_s = name, rank, world_size, timeout_s
        self._native = None  # the segment described for native.c (run_native), made on first use
        self.path: str | None = None
        self._error: str | None = None
        self._closed = False
        geometry = (world_size, n_slots, buffer_bytes // 64 * 64, bcast_slots,
                    bcast_bytes // 64 * 64)
        if rank == 0:
            self._create(name, geometry, shm_dir, cpu_group)
        else:
            self._attach(name, geometry, shm_dir, cpu_group)
        self._map_views()
        if rank == 0:
            self._await_attached()

    def _block(self, idx: int, target: int, peer: int, what: str,
               timeout_s: float | None) -> None:
        """Wait until control word `idx` (written by `peer`) reaches `target`; raise
        CommTimeout when `peer` dies or `timeout_s` passes.

        Polls with sched_yield for the first _POLL_S, then sleeps in futex_wait until the word
        changes. Measured on 2 cores: yielding between polls is as fast as a pure spin when each
        rank has a core (8 us per 576-float all-reduce), and far faster when the cores are
        oversubscribed (a spinning rank burns the time slice its peer needs: 2 ms per op with a
        2 ms spin budget, 23 us yielding); futex_wait wakes 20-40 us late, fine for long waits
        (a follower waiting for the leader's next step plan) and free on the CPU.
        """
        w = self._w
        t0 = time.monotonic()
        check = t0 + 0.05  # liveness and the clock are checked every 50 ms
        while (seen := w[idx]) < target:
            now = time.monotonic()
            if now >= check:
                pid = w[self._line[peer] + _R_PID]
                if pid and not alive(pid):
                    self._fail(what.format(r=peer) + f": it died (pid {pid})")
                if timeout_s is not None and now - t0 > timeout_s:
                    self._fail(what.format(r=peer) + f" within {timeout_s} s (dead or "
                               "stalled peer)")
                check = now + 0.05
            if now - t0 < _POLL_S:
                os.sched_yield()
            elif _SYS_FUTEX is None:
                time.sleep(5e-4)
            else:
                # A wake-up lost to store-load reordering (x86 lets each side miss the other's
                # store) costs at most the nap.
                w[self._my_sleep] = 1
                if w[idx] == seen:
                    _syscall(_SYS_FUTEX, ctypes.c_void_p(self._addr + idx * 8), _FUTEX_WAIT,
                             ctypes.c_int(seen & 0xFFFFFFFF), ctypes.byref(self._nap), None, 0)
                w[self._my_sleep] = 0

    def _wake(self, idx: int) -> None:
        """After storing control word `idx`: wake the ranks sleeping on it, if any sleeps."""
        w = self._w
        for i in self._peer_sleep:
            if w[i] and _SYS_FUTEX is not None:
                _syscall(_SYS_FUTEX, ctypes.c_void_p(self._addr + idx * 8), _FUTEX_WAKE,
                         ctypes.c_int(1 << 30), None, None, 0)
                return

    def _fail(self, msg: str) -> None:
        self._error = msg
        raise CommTimeout(msg)

    def _check(self) -> None:
        if self._error is not None:
            raise CommTimeout(f"shm communicator failed earlier: {self._error}")
        if self._closed:
            raise RuntimeError("shm communicator is closed")

    # -- all-reduce ----------------------------------------------------------------------------
    def _slot_views(self, dtype: torch.dtype, elems: int) -> list:
        views = self._views.get((dtype, elems))
        if views is None:
            size = torch.empty(0, dtype=dtype).element_size()
            views = [[b[:elems * size].view(dtype) for b in bufs] for bufs in self._ring]
            if len(self._views) > 256:  # many odd shapes (prefill lengths): start over
                self._views.clear()
            self._views[(dtype, elems)] = views
        return views

    def all_reduce(self, x: torch.Tensor, kind: str = "module") -> _ShmWork:
        """Start summing `x` in place over the group: publishes x (one or more chunks) and
        returns; blocks only when every ring slot still holds an unsummed reduce."""
        self._check()
        size = x.element_size()
        n = x.numel()
        self.stats.bytes += n * size
        self.stats.ops += 1
        buf = x if x.is_contiguous() else x.contiguous()
        per = self.slot_bytes // size
        chunks = -(-n // per)
        work = _ShmWork(self, x, buf, self._seq + chunks, kind)
        if n == 0:
            work.done = True
            return work
        flat = buf.view(-1)
        w, slots, pending = self._w, self.n_slots, self._pending
        for off in range(0, n, per):
            m = min(per, n - off)
            seq = self._seq = self._seq + 1
            if seq - slots > self._min_done:
                self._free_slot(seq - slots)
            views = self._slot_views(x.dtype, m)[seq % slots]
            out = flat if m == n else flat[off:off + m]
            views[self.rank].copy_(out)
            w[self._my_pub] = seq
            self._wake(self._my_pub)
            pending.append((seq, work, out, views))
        return work

    def _free_slot(self, need: int) -> None:
        """Wait until every rank has summed sequence `need` (its slot is about to be reused)."""
        w = self._w
        low = min(w[self._line[r] + _R_DONE] for r in self._peers) if self._peers else need
        if low >= need and self._done_seq >= need:
            self._min_done = min(low, self._done_seq)
            return
        t0 = time.perf_counter()
        if self._done_seq < need:
            self._drain(need)
        for r in self._peers:
            self._block(self._line[r] + _R_DONE, need, r,
                        f"shm all-reduce: rank {{r}} did not finish sequence {need}",
                        self.timeout_s)
        self._min_done = need
        self.stats.exposed_s += time.perf_counter() - t0

    def _drain(self, upto: int) -> None:
        """Sum every published chunk up to sequence `upto`, in order."""
        self._check()
        w, pending = self._w, self._pending
        while self._done_seq < upto:
            seq, work, out, views = pending.popleft()
            for r in self._peers:
                idx = self._line[r] + _R_PUB
                if w[idx] < seq:
                    self._block(idx, seq, r, f"shm all-reduce: rank {{r}} did not publish "
                                f"sequence {seq}", self.timeout_s)
            if len(views) == 1:
                out.copy_(views[0])
            elif len(views) == 2 or out.dtype not in _HALF:
                torch.add(views[0], views[1], out=out)
                for v in views[2:]:
                    out.add_(v)
            else:
                acc = self._acc.get(out.dtype)
                if acc is None:
                    acc = self._acc[out.dtype] = torch.empty(self.slot_bytes // 2)
                acc = acc[:out.numel()]
                acc.copy_(views[0])
                for v in views[1:]:
                    acc.add_(v)
                out.copy_(acc)
            w[self._my_done] = self._done_seq = seq
            self._wake(self._my_done)
            if seq == work.last_seq:
                if work.buf is not work.tensor:
                    work.tensor.copy_(work.buf)
                work.done = True

    # -- all-reduces in C -----------------------------------------------------------------------
    def run_native(self, fn, nbytes: int) -> None:
        """Run `fn(address)`, a C loop that all-reduces through this segment by the same
        protocol, `nbytes` a reduce (native.c's ladder_decode_layers, given a ladder.native.Shm
        at `address`), returning 0, or nonzero when a wait gave up (a dead peer, the timeout):
        CommTimeout here. Reduces started before are summed first; the sequence counters go in
        and come back; the loop's reduces and waits are counted in `stats`. Until the counters
        are back the communicator counts as failed, so that an exception between (a signal's,
        raised as the call returns) leaves it refusing use, not out of step."""
        self._check()
        if self._pending:
            self._drain(self._seq)
        g = self._native_group()
        g.seq, g.done_seq, g.min_done = self._seq, self._done_seq, self._min_done
        g.timeout_s = self.timeout_s
        g.exposed_s = g.wait_s[0] = g.wait_s[1] = 0.0
        g.waits[0] = g.waits[1] = g.failed_why = 0
        seq0 = self._seq
        self._error = "shm all-reduce: a native step was interrupted"
        rc = fn(ctypes.addressof(g))
        self._seq, self._done_seq, self._min_done = g.seq, g.done_seq, g.min_done
        self._error = None
        st = self.stats
        for i, kind in enumerate(("module", "ladder")):
            st.wait_s[kind] += g.wait_s[i]
            st.waits[kind] += g.waits[i]
            st.exposed_s += g.wait_s[i]
        st.exposed_s += g.exposed_s
        st.ops += self._seq - seq0
        st.bytes += (self._seq - seq0) * nbytes
        if rc:
            peer = g.failed_peer
            if g.failed_why == 1:
                self._fail(f"shm all-reduce: rank {peer} did not finish: it died (pid "
                           f"{g.failed_pid})")
            self._fail(f"shm all-reduce: rank {peer} did not finish within {self.timeout_s} s "
                       "(dead or stalled peer)")

    def _native_group(self):
        g = self._native
        if g is None:
            from ladder import native
            g = native.Shm(w=self._addr, ring=self._ring[0][0].data_ptr(), world=self.world_size,
                           rank=self.rank, n_slots=self.n_slots, slot_bytes=self.slot_bytes)
            for r in range(self.world_size):
                line = self._line[r]
                g.pub[r], g.done[r], g.pid[r] = line + _R_PUB, line + _R_DONE, line + _R_PID
                g.sleep[r] = self._my_sleep - self.rank + r
            self._native = g
        return g

    # -- broadcast and barrier -----------------------------------------------------------------
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Synchronous broadcast of `x` from rank `src` (any dtype, any size: chunked)."""
        self._check()
        if self.world_size == 1 or x.numel() == 0:
            return x
        buf = x if x.is_contiguous() else x.contiguous()
        raw = buf.view(-1).view(torch.uint8)
        w, nb, size = self._w, self.bcast_slots, self.bcast_bytes
        for off in range(0, raw.numel(), size):
            m = min(size, raw.numel() - off)
            seq = self._bseq = self._bseq + 1
            slot = self._bbuf[seq % nb]
            if self.rank == src:
                if seq > nb:
                    for r in self._peers:
                        self._block(self._line[r] + _R_BACK, seq - nb, r,
                                    f"shm broadcast: rank {{r}} did not read sequence "
                                    f"{seq - nb}", self.timeout_s)
                slot[:m].copy_(raw[off:off + m])
                w[self._bpub] = seq
                self._wake(self._bpub)
            else:
                if w[self._bpub] < seq:  # the next step plan: wait while the source lives
                    self._block(self._bpub, seq, src, "shm broadcast: rank {r} did not send "
                                f"sequence {seq}", None)
                raw[off:off + m].copy_(slot[:m])
            w[self._my_back] = seq
            self._wake(self._my_back)
        if buf is not x and self.rank != src:
            x.copy_(buf)
        return x

    def barrier(self) -> None:
        """Every rank has reached the barrier (an all-reduce of one number)."""
        saved = CommStats(self.stats.exposed_s, self.stats.bytes, self.stats.ops)
        self.all_reduce(torch.zeros(1, dtype=torch.int64)).wait()
        self.stats.exposed_s, self.stats.bytes, self.stats.ops = (
            saved.exposed_s, saved.bytes, saved.ops)

    def close(self) -> None:
        """Unmap the segment (and unlink it if still named); later calls raise."""
        if self._closed:
            return
        self._closed = True
        self._unlink()
        self._pending.clear()
        self._views.clear()
        self._ring = self._bbuf = self._np = self._native = None
        self._w.release()
        try:
            self._mm.close()
        except BufferError:  # a view escaped: the mapping goes when it does
            pass
