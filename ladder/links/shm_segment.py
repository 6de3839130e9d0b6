"""The shared-memory segment of a `ShmComm` group: its layout, its creation by rank 0, the
others attaching to it, and its removal (see `ladder.links.shm` for the protocol).

Rank 0 creates `/dev/shm/ladder-<name>-<pid>` and unlinks it as soon as every rank has mapped it,
so a running group leaves nothing in /dev/shm and a crash can at worst leave a half-started
segment, whose dead creator pid lets the next group's rank 0 remove it.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import re
import time
from collections import deque

import numpy as np
import torch
import torch.distributed as dist

from ladder.links.base import CommTimeout
from ladder.procs import alive

SHM_DIR = "/dev/shm"
PREFIX = "ladder-"
_MAGIC = 0x4C41444452534D31  # "LADDRSM1": written last by the creator, once the header is whole
_LINE = 8  # int64 words per 64-byte cache line
# header words
_H_MAGIC, _H_WORLD, _H_SLOTS, _H_SLOT_BYTES, _H_BSLOTS, _H_BBYTES, _H_PID = range(7)
# per-rank line words (line 1 + rank)
_R_PID, _R_ATTACHED, _R_PUB, _R_DONE, _R_BACK = range(5)

def remove_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove `ladder-<name>-<pid>` segments whose creator is dead; returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(shm_dir, PREFIX + "*")):
        m = re.fullmatch(re.escape(PREFIX) + r"[A-Za-z0-9_.]+-(\d+)", os.path.basename(path))
        if m and not alive(int(m.group(1))):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed



class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class ShmSegment:
    """The segment's life, as a base of `ShmComm`: `_create` (rank 0) or `_attach`, then
    `_map_views` (the control words, ring and broadcast buffers as tensors), `_unlink`."""

    # -- segment -------------------------------------------------------------------------------
    @staticmethod
    def _layout(world: int, slots: int, slot_bytes: int, bslots: int, bbytes: int):
        ctrl = (2 + world + -(-world // _LINE)) * _LINE * 8
        ring = -(-ctrl // 4096) * 4096
        bcast = ring + slots * world * slot_bytes
        return ring, bcast, bcast + bslots * bbytes  # offsets of ring and bcast, total size

    def _create(self, name, geometry, shm_dir, cpu_group) -> None:
        remove_stale_segments(shm_dir)
        pid = os.getpid()
        if cpu_group is not None:
            dist.broadcast(torch.tensor([pid]), src=dist.get_global_rank(cpu_group, 0),
                           group=cpu_group)
        self.path = os.path.join(shm_dir, f"{PREFIX}{name}-{pid}")
        size = self._layout(*geometry)[2]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # no space is an error now, not a SIGBUS later
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        head = memoryview(self._mm)[:_LINE * 8].cast("q")
        for i, v in zip((_H_WORLD, _H_SLOTS, _H_SLOT_BYTES, _H_BSLOTS, _H_BBYTES), geometry):
            head[i] = v
        head[_H_PID] = pid
        head[_H_MAGIC] = _MAGIC
        head.release()

    def _attach(self, name, geometry, shm_dir, cpu_group) -> None:
        if cpu_group is not None:
            pid = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(pid, src=dist.get_global_rank(cpu_group, 0), group=cpu_group)
            pattern = os.path.join(shm_dir, f"{PREFIX}{name}-{int(pid)}")
        else:
            pattern = os.path.join(shm_dir, f"{PREFIX}{name}-*")
        deadline = time.monotonic() + self.timeout_s
        while True:
            for path in glob.glob(pattern):
                if self._try_open(path, geometry):
                    self.path = path
                    return
            if time.monotonic() > deadline:
                raise CommTimeout(f"shm: rank {self.rank} found no segment {pattern} within "
                                  f"{self.timeout_s} s (rank 0 did not start)")
            time.sleep(1e-3)

    def _try_open(self, path: str, geometry) -> bool:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            raw = os.pread(fd, _LINE * 8, 0)
            if len(raw) < _LINE * 8:
                return False  # not sized yet
            head = np.frombuffer(raw, dtype=np.int64)
            if head[_H_MAGIC] != _MAGIC or not alive(int(head[_H_PID])):
                return False  # not written yet, or a dead group's
            found = tuple(int(head[i]) for i in (_H_WORLD, _H_SLOTS, _H_SLOT_BYTES, _H_BSLOTS,
                                                 _H_BBYTES))
            if found != geometry:
                raise ValueError(f"shm segment {path} has geometry {found}, this rank expects "
                                 f"{geometry} (world, slots, slot bytes, bcast slots, bytes)")
            self._mm = mmap.mmap(fd, self._layout(*geometry)[2])
            return True
        finally:
            os.close(fd)

    def _map_views(self) -> None:
        mm = self._mm
        head = np.frombuffer(mm, dtype=np.int64, count=_LINE)
        world, slots, slot_bytes, bslots, bbytes = (int(head[i]) for i in (
            _H_WORLD, _H_SLOTS, _H_SLOT_BYTES, _H_BSLOTS, _H_BBYTES))
        self.n_slots, self.slot_bytes, self.bcast_slots, self.bcast_bytes = (
            slots, slot_bytes, bslots, bbytes)
        ring, bcast, size = self._layout(world, slots, slot_bytes, bslots, bbytes)
        lines = 2 + world + -(-world // _LINE)
        self._w = memoryview(mm)[:lines * _LINE * 8].cast("q")
        self._np = np.frombuffer(mm, dtype=np.int64, count=lines * _LINE)  # for addresses
        self._addr = self._np.ctypes.data
        line = [(1 + r) * _LINE for r in range(world)]
        self._line = line
        self._bpub = (1 + world) * _LINE
        me = line[self.rank]
        self._my_pub, self._my_done, self._my_back = me + _R_PUB, me + _R_DONE, me + _R_BACK
        self._peers = [r for r in range(world) if r != self.rank]
        sleep = (2 + world) * _LINE  # one word per rank: it may sleep in futex_wait
        self._my_sleep = sleep + self.rank
        self._peer_sleep = [sleep + r for r in self._peers]
        self._nap = _Timespec(0, 2_000_000)
        self._w[me + _R_PID] = os.getpid()
        self._w[me + _R_ATTACHED] = 1
        self._wake(me + _R_ATTACHED)
        data = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))
        self._ring = [[data[ring + (s * world + r) * slot_bytes:
                            ring + (s * world + r + 1) * slot_bytes] for r in range(world)]
                      for s in range(slots)]
        self._bbuf = [data[bcast + i * bbytes:bcast + (i + 1) * bbytes] for i in range(bslots)]
        self._views: dict = {}  # (dtype, elems) -> per slot, per rank: the first elems as dtype
        self._acc: dict = {}  # half dtype -> float32 accumulator of a slot's elements
        self._seq = self._done_seq = 0  # last sequence issued / summed by this rank
        self._min_done = 0  # a lower bound on every rank's `done`
        self._bseq = 0
        self._pending: deque = deque()  # published chunks not summed yet, in sequence order

    def _await_attached(self) -> None:
        """Rank 0: once every rank has mapped the segment, its name is no longer needed."""
        try:
            for r in self._peers:
                self._block(self._line[r] + _R_ATTACHED, 1, r, "shm: rank {r} did not attach",
                            self.timeout_s)
        finally:
            self._unlink()

    def _unlink(self) -> None:
        if self.rank == 0 and self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    # -- waiting -------------------------------------------------------------------------------
