"""What each rank's process measures for `ladder plan --calibrate` (`ladder.plan.calibrate`):
its modules' times and, on rank 0, a step's cost beyond them, on the real engine (torch,
imported in the processes), on the CPU or each rank on its own GPU (`Grid.device`; module
times then from CUDA events on the rank's stream, `_Clock`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, kw_only=True)
class Grid:
    """What to measure: a checkpoint at a TP size, its modules at every batch x context."""

    model: str
    tp: int
    dtype: str
    splits: tuple[str, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    reps: int = 7
    threads: int = 1
    device: str = "cpu"  # cpu | cuda (rank r on cuda:r, as a local group places its ranks)


def _rank_main(rank: int, grid: Grid, split: str, barrier, out) -> None:
    try:
        out.put((rank, _measure_rank(rank, grid, split, barrier)))
    except BaseException as e:  # noqa: BLE001 - the parent reports it and stops the others
        barrier.abort()
        out.put((rank, f"{type(e).__name__}: {e}"))


def _measure_rank(rank: int, grid: Grid, split: str, barrier) -> dict:
    import torch

    from ladder.engine.build import build_engine
    from ladder.engine.leader import Leader
    from ladder.links.base import NoComm
    torch.set_num_threads(grid.threads)
    if grid.device == "cuda":
        torch.cuda.set_device(rank)  # the rank's GPU, as rank_options places it
    ckpt, engine = build_engine(rank_options(grid, split), rank, NoComm(rank, grid.tp))
    engine.cache.k.fill_(0.01)  # written: see the module's docstring
    engine.cache.v.fill_(0.01)
    times = module_times(engine, [(b, c) for b in grid.batches for c in grid.contexts],
                         grid.reps, barrier.wait)
    leader = Leader.for_checkpoint(ckpt, engine) if rank == 0 else None  # runs here
    over = {}
    for b in grid.batches:  # rank 0's, the others idle (its modules are timed alike)
        barrier.wait()
        if leader is not None:
            over[b] = step_overhead(leader.scheduler, engine, b, grid.reps)
    gpu = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None
    return {"times": times, "overhead": over, "config": engine.model.config, "gpu": gpu}


def rank_options(grid: Grid, split: str):
    """A rank's engine: a slot per row of the largest batch, the cache past every context, and
    whole prompts admitted (no chunked prefill), so that a batch's rows decode together: in
    chunks, the first of a large batch end before the last is admitted (`step_overhead`)."""
    from ladder.options import GroupOptions
    return GroupOptions(model=grid.model, tp=grid.tp, dtype=grid.dtype, head_split=split,
                        n_slots=max(grid.batches), max_seq=max(*grid.contexts, 24) + 1,
                        threads=grid.threads, max_num_batched_tokens=0, device=grid.device)


def _decode_input(engine, batch: int, context: int):
    """(step, its context, hidden states) of a decode step of `batch` rows in slots 0.. at
    `context` cached positions, as the engine builds them."""
    import torch

    from ladder.engine.step import StepBatch
    step = StepBatch(tokens=[[1]] * batch, slots=list(range(batch)),
                     starts=[context - 1] * batch, greedy=True)
    ctx, _, _ = engine._context(step)
    x = torch.randn(batch, 1, engine.model.config.dim).to(engine.device, engine.dtype)
    return step, ctx, x


class _Clock:
    """Marks around a pass's calls: the CPU's clock, or on a GPU events on the device's
    current stream, so that a call's time is its kernels' and the gaps the CPU leaves between
    their launches, as a decode step spends it (a CPU clock would see the launches only)."""

    def __init__(self, device) -> None:
        import torch
        self.cuda = torch.cuda if device.type == "cuda" else None
        self.device = device

    def mark(self):
        if self.cuda is None:
            return time.perf_counter()
        event = self.cuda.Event(enable_timing=True)
        event.record(self.cuda.current_stream(self.device))
        return event

    def seconds(self, spans: dict[str, list[tuple]]) -> dict[str, list[float]]:
        """The seconds of each (start, end) pair of marks (once the GPU has passed them)."""
        if self.cuda is None:
            return {k: [b - a for a, b in v] for k, v in spans.items()}
        self.cuda.synchronize(self.device)
        return {k: [a.elapsed_time(b) / 1e3 for a, b in v] for k, v in spans.items()}


def _pass(model, ctx, x) -> dict[str, list[float]]:
    """One pass over the layers' attention and MLP (each with its norm, as the model calls
    them: `modules_in_order`), then the LM head's slice with its row maxima: each call's
    seconds."""
    clock, spans = _Clock(x.device), {"attention": [], "mlp": [], "lm_head": []}
    for layer in model.layers:
        attention, mlp = layer.modules_in_order(ctx)
        t0 = clock.mark()
        attention(x)
        t1 = clock.mark()
        mlp(x)
        spans["attention"].append((t0, t1))
        spans["mlp"].append((t1, clock.mark()))
    t0 = clock.mark()
    model.logits(model.norm(x[:, 0])).float().max(-1)
    spans["lm_head"].append((t0, clock.mark()))
    return clock.seconds(spans)


def module_times(engine, points: list[tuple[int, int]], reps: int,
                 together: Callable[[], object]) -> dict[tuple[int, int], dict[str, float]]:
    """Per (batch, context) point, the median seconds of one layer's attention and MLP and of
    the LM head over `reps` passes after a warm-up pass; each round passes over every point
    once (reversed every other round, each pass starting `together` with the other ranks), so
    that a burst of load lands on all points alike. A median of single calls: on a shared
    machine it leaves out the calls the rank was preempted in, and so measures the machine,
    not its load (a pass's mean, tried on a loaded machine, scattered 3-5x between neighbouring
    points of one grid)."""
    import torch
    inputs = {p: _decode_input(engine, *p)[1:] for p in points}
    got = {p: {"attention": [], "mlp": [], "lm_head": []} for p in points}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for p in points if rep % 2 else points[::-1]:
                together()
                one = _pass(engine.model, *inputs[p])
                for k in got[p] if rep else ():
                    got[p][k] += one[k]
    return {p: {k: statistics.median(v) for k, v in m.items()} for p, m in got.items()}


def step_overhead(scheduler, engine, batch: int, reps: int, plen: int = 16,
                  tokens: int = 8) -> float:  # plen + tokens: within the cache (24)
    """What a full-batch decode step costs beyond its modules, each part timed where it is
    exact: the scheduler's (its step's wall less the engine's own time, the same step), and
    the engine's (a decode step less a pass over its modules, the two alternated, paired).
    Needs `batch` slots and whole-prompt admission (`rank_options`)."""
    import torch

    from ladder.engine.sampling import SamplingParams
    from ladder.engine.scheduler import Request
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    sched, diffs, clock = [], [], time.perf_counter
    for _ in range(2):
        for i in range(batch):
            scheduler.add(Request(prompt=[3 + (i + j) % 1000 for j in range(plen)],
                                  params=params))
        while scheduler.has_work():
            t0, before = clock(), engine.timing.decode_s
            done = scheduler.step()
            if done is not None and done.kind == "decode" and done.rows == batch:
                sched.append(clock() - t0 - (engine.timing.decode_s - before))
    if not sched:
        raise RuntimeError(f"no decode step ran all {batch} rows: it needs {batch} slots and "
                           "whole prompts admitted (rank_options)")
    step, ctx, x = _decode_input(engine, batch, plen + tokens // 2)
    with torch.inference_mode():
        for i in range(2 * reps + 1):  # the first pair warms up
            t0 = clock()
            engine.step(step)
            t1 = clock()
            modules = sum(map(sum, _pass(engine.model, ctx, x).values()))
            if i:
                diffs.append(t1 - t0 - modules)
    return statistics.median(sched) + statistics.median(diffs)


def time_compute(grid: Grid, split: str, timeout_s: float = 1800.0) -> list[dict]:
    """Every rank's measurements under `split` (one dict per rank), its processes all at once."""
    import multiprocessing as mp
    import queue
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(grid.tp), ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, grid, split, barrier, out), daemon=True)
             for r in range(grid.tp)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < grid.tp:
            if time.monotonic() > deadline:
                raise RuntimeError(f"calibration took over {timeout_s:.0f} s")
            try:
                rank, res = out.get(timeout=5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"calibration rank {dead[0]} exited with "
                                       f"{procs[dead[0]].exitcode}") from None
                continue
            if isinstance(res, str):
                raise RuntimeError(f"calibration rank {rank}: {res}")
            got[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [got[r] for r in range(grid.tp)]
