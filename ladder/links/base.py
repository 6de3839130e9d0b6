"""Communicators: how a rank's partial sums become the group's sum.

The model decides *where* a reduce happens (that is the architecture: the ladder schedule); a
communicator decides *how*. `all_reduce(x)` starts an in-place sum of `x` over the group and
returns a `Work` at once; `Work.wait()` blocks until the sum has arrived and returns `x`. The time
spent blocked in `wait()` is the *exposed* communication, the figure the ladder schedule shrinks;
every communicator accounts it, with the bytes reduced, in `CommStats`.

Backends: `NoComm` (TP=1, and `desync` runs: no communication at all), `TorchComm` (a
torch.distributed group: gloo on CPU, NCCL on CUDA), and `EmulatedLatency`, a wrapper whose Works
complete no earlier than issue time + a link latency (an emulation, and labelled as one).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist


class Work(Protocol):
    kind: str  # how its wait is accounted (`all_reduce`'s `kind`)

    def wait(self) -> torch.Tensor: ...


class CommTimeout(RuntimeError):
    """A peer did not take part in a collective in time: it died or stalled."""


@dataclass(slots=True)
class CommStats:
    """Exposed communication since the last `reset()`."""

    exposed_s: float = 0.0  # seconds blocked in Work.wait()
    bytes: int = 0  # bytes all-reduced (payload size per rank)
    ops: int = 0
    # the waits by kind (what the reduce was started as, `all_reduce`'s `kind`): "module" (a
    # residual module's reduce waited for at once), "ladder" (one that overlapped the next
    # module), "gather" (a table each rank fills its part of); seconds and counts
    wait_s: dict = field(default_factory=lambda: dict.fromkeys(WAIT_KINDS, 0.0))
    waits: dict = field(default_factory=lambda: dict.fromkeys(WAIT_KINDS, 0))
    # CUDA: (start, end, kind) around each wait on the compute stream, resolved lazily
    _cuda_events: list = field(default_factory=list)

    def reset(self) -> None:
        self.exposed_s, self.bytes, self.ops = 0.0, 0, 0
        for k in WAIT_KINDS:
            self.wait_s[k], self.waits[k] = 0.0, 0
        self._cuda_events.clear()

    def add_wait(self, seconds: float, kind: str) -> None:
        self.exposed_s += seconds
        self.wait_s[kind] += seconds
        self.waits[kind] += 1

    def collect(self) -> "CommStats":
        """Resolve pending CUDA timings (synchronizes on them); returns self."""
        if self._cuda_events:
            self._cuda_events[-1][1].synchronize()
            for a, b, kind in self._cuda_events:
                self.add_wait(a.elapsed_time(b) / 1e3, kind)
            self._cuda_events.clear()
        return self

    def overlap_estimate(self) -> float | None:
        """Live overlap efficiency of one step: 1 - (exposed wait per ladder reduce) / (exposed
        wait per module reduce waited at once), both on this link in this step; 0.0 when
        nothing overlapped (standard), None without a reference (every module laddered)."""
        lw, mw = self.waits["ladder"], self.waits["module"]
        if lw == 0:
            return 0.0 if mw else None
        if mw == 0 or self.wait_s["module"] <= 0:
            return None
        return max(0.0, 1 - (self.wait_s["ladder"] / lw) / (self.wait_s["module"] / mw))


WAIT_KINDS = ("module", "ladder", "gather")


class _Done:
    __slots__ = ("tensor", "kind")

    def __init__(self, tensor: torch.Tensor, kind: str) -> None:
        self.tensor, self.kind = tensor, kind

    def wait(self) -> torch.Tensor:
        return self.tensor


class Communicator(ABC):
    """A tensor-parallel group as the model sees it.

    `interconnect` names the link for metrics (shm / loopback / network / nvlink / pcie / none);
    `emulated` is True when any part of the link's timing is emulated.
    """

    rank: int = 0
    world_size: int = 1
    interconnect: str = "none"
    emulated: bool = False

    def __init__(self) -> None:
        self.stats = CommStats()

    @abstractmethod
    def all_reduce(self, x: torch.Tensor, kind: str = "module") -> Work:
        """Start an in-place sum of `x` over the group; the sum is in `x` once `wait()` returns.
        `kind` (one of WAIT_KINDS) says how the wait is accounted in `stats`."""

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Synchronous broadcast of a CPU tensor (step plans from the leader)."""
        return x

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class NoComm(Communicator):
    """No communication: TP=1, or `desync` (each rank keeps its partial sum, wrong by design)."""

    def __init__(self, rank: int = 0, world_size: int = 1, interconnect: str = "none") -> None:
        super().__init__()
        self.rank, self.world_size, self.interconnect = rank, world_size, interconnect

    def all_reduce(self, x: torch.Tensor, kind: str = "module") -> Work:
        return _Done(x, kind)


class _TimedWork:
    __slots__ = ("tensor", "work", "stats", "kind")

    def __init__(self, tensor: torch.Tensor, work, stats: CommStats, kind: str) -> None:
        self.tensor, self.work, self.stats, self.kind = tensor, work, stats, kind

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        self.work.wait()
        self.stats.add_wait(time.perf_counter() - t0, self.kind)
        return self.tensor


class _CudaTimedWork(_TimedWork):
    """NCCL's wait() only makes the compute stream wait; the stall is timed with CUDA events."""

    def wait(self) -> torch.Tensor:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        self.work.wait()
        end.record()
        self.stats._cuda_events.append((start, end, self.kind))
        return self.tensor


class TorchComm(Communicator):
    """A torch.distributed process group.

    All-reduces run on `group` (gloo on CPU, NCCL on CUDA, async_op=True); step plans travel on
    `cpu_group` (gloo; the same group on CPU), so the leader can broadcast them without touching
    the device stream.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 cpu_group: dist.ProcessGroup | None = None, interconnect: str = "loopback") -> None:
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.cpu_group = cpu_group if cpu_group is not None else self.group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.interconnect = interconnect
        self._work_cls = _CudaTimedWork if self.backend == "nccl" else _TimedWork

    def all_reduce(self, x: torch.Tensor, kind: str = "module") -> Work:
        self.stats.bytes += x.numel() * x.element_size()
        self.stats.ops += 1
        work = dist.all_reduce(x, group=self.group, async_op=True)
        return self._work_cls(x, work, self.stats, kind)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=dist.get_global_rank(self.cpu_group, src), group=self.cpu_group)
        return x

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)


class _DelayedWork:
    __slots__ = ("inner", "due", "stats", "kind")

    def __init__(self, inner: Work, due: float, stats: CommStats, kind: str) -> None:
        self.inner, self.due, self.stats, self.kind = inner, due, stats, kind

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        delay = self.due - t0
        if delay > 0:
            time.sleep(delay)
        x = self.inner.wait()
        self.stats.add_wait(time.perf_counter() - t0, self.kind)
        return x


class EmulatedLatency(Communicator):
    """Wraps a communicator: each Work completes no earlier than issue time + `latency_s`.

    This is emulation (tc here has no netem to add delay), and the interconnect label says so:
    `<inner>+emu<microseconds>us`. Exposed time counts the whole wait, emulated part included.
    """

    emulated = True

    def __init__(self, inner: Communicator, latency_s: float) -> None:
        super().__init__()
        if latency_s < 0:
            raise ValueError(f"emulated latency must be >= 0, got {latency_s}")
        self.inner, self.latency_s = inner, latency_s
        self.rank, self.world_size = inner.rank, inner.world_size
        self.interconnect = f"{inner.interconnect}+emu{round(latency_s * 1e6)}us"

    def all_reduce(self, x: torch.Tensor, kind: str = "module") -> Work:
        self.stats.bytes += x.numel() * x.element_size()
        self.stats.ops += 1
        return _DelayedWork(self.inner.all_reduce(x, kind), time.perf_counter() + self.latency_s,
                            self.stats, kind)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.inner.broadcast(x, src)

    def barrier(self) -> None:
        self.inner.barrier()

    def close(self) -> None:
        self.inner.close()
