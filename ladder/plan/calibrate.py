"""`ladder plan --calibrate`: this machine measured into the measured.json `measured` reads.

Compute. One process per rank of the TP split, all running at once with one thread each (as a
local group's ranks run, sharing the memory bus), each builds its shard as a serving rank does
(`ladder.engine.build.build_engine`: the checkpoint's slices, the CPU decode layouts, a KV
cache) with no communicator (`NoComm`). At every batch x context of the grid each times, layer
after layer, the attention and the MLP with their norms as the model calls them, so that the
weights stream from memory as in a decode step, and the LM head's slice with the local part of
the token pick; medians over `reps` passes, the ranks starting each point together. The cache
is written first: pages never written read as the kernel's one zero page, from cache. What a
step costs beyond its modules (residual adds, the scheduler, each row's text) is a real decode
step of rank 0's scheduler (`Leader.for_checkpoint`, NoComm, the other ranks idle) less its
modules timed alike, fitted as `step_overhead_s` + `row_overhead_s` x rows. For cases outside
the grid, the roofline's terms are a line through the batch-1 samples, seconds against bytes
read (`mem_bw` its slope, `module_overhead_s` its intercept, efficiency 1).

Links. The layer that can make a link times it (`provide_link_timer`): shared memory and
loopback need nothing beyond this package, a shaped veth pair needs the cluster's network
plumbing, so `bench.plan_check` provides the timer, and the `ladder` command, which loads every
layer's commands, has it. A timer returns, per link, the all-reduce's seconds and overlap cost
by message size, as they cost a chain of modules (`link_section` fits latency and bandwidth
through them for sizes beyond).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ladder.model.config import ConfigError
from ladder.plan import costs
from ladder.plan.hardware import DTYPE_BYTES
from ladder.plan.links import LINKS
from ladder.plan.measured import FORMAT

# timer(link names, TP size, message sizes in bytes, model width, log) -> {name: {"rows":
# [{"bytes", "seconds", "overlap_cost"}, ...], "step_overhead_s"}}; raises ConfigError for a
# link it cannot make
LinkTimer = Callable[[list[str], int, list[int], int, Callable[[str], None]], dict[str, dict]]
_link_timer: LinkTimer | None = None
DEFAULT_LINKS = "shm,tcp-loopback,tcp-high-end,tcp-cheap"
DEFAULT_CONTEXTS = "64,512,2048"


def provide_link_timer(timer: LinkTimer) -> None:
    """Register the function that times links (`bench.plan_check` does, on import)."""
    global _link_timer
    _link_timer = timer


@dataclass(frozen=True, kw_only=True)
class Grid:
    """What to measure: a checkpoint at a TP size, its modules at every batch x context."""

    model: str
    tp: int
    dtype: str
    splits: tuple[str, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    reps: int = 5
    threads: int = 1


def log(msg: str) -> None:
    print(f"[calibrate] {msg}", file=sys.stderr, flush=True)


# -- compute, in each rank's process ------------------------------------------------------------
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
    from ladder.options import GroupOptions
    torch.set_num_threads(grid.threads)
    opts = GroupOptions(model=grid.model, tp=grid.tp, dtype=grid.dtype, head_split=split,
                        n_slots=max(grid.batches), max_seq=max(*grid.contexts, 24) + 1,
                        threads=grid.threads)
    ckpt, engine = build_engine(opts, rank, NoComm(rank, grid.tp))
    engine.cache.k.fill_(0.01)  # written: see the module's docstring
    engine.cache.v.fill_(0.01)
    times = {}
    for b in grid.batches:
        for c in grid.contexts:
            barrier.wait()
            times[(b, c)] = module_times(engine, b, c, grid.reps)
    leader = Leader.for_checkpoint(ckpt, engine) if rank == 0 else None  # runs here
    over = {}
    for b in grid.batches:  # rank 0's, the others idle (its modules are timed alike)
        barrier.wait()
        if leader is not None:
            over[b] = step_overhead(leader.scheduler, engine, b, grid.reps)
    return {"times": times, "overhead": over, "config": engine.model.config}


def module_times(engine, batch: int, context: int, reps: int) -> dict[str, float]:
    """Median seconds of one layer's attention and MLP (each after its norm) and of the LM
    head's slice with its row maxima, for `batch` rows at `context` cached positions."""
    import torch

    from ladder.engine.step import StepBatch
    model = engine.model
    ctx, _, _ = engine._context(StepBatch(tokens=[[1]] * batch, slots=list(range(batch)),
                                          starts=[context - 1] * batch))
    x = torch.randn(batch, 1, model.config.dim).to(engine.dtype)
    got: dict[str, list[float]] = {"attention": [], "mlp": [], "lm_head": []}
    clock = time.perf_counter
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first pass warms up
            for layer in model.layers:
                t0 = clock()
                layer.attention(layer.attn_norm(x), ctx)
                t1 = clock()
                layer.mlp(layer.mlp_norm(x))
                t2 = clock()
                if rep:
                    got["attention"].append(t1 - t0)
                    got["mlp"].append(t2 - t1)
            t0 = clock()
            model.logits(model.norm(x[:, 0])).float().max(-1)
            if rep:
                got["lm_head"].append(clock() - t0)
    return {k: statistics.median(v) for k, v in got.items()}


def step_overhead(scheduler, engine, batch: int, reps: int, plen: int = 16,
                  tokens: int = 8) -> float:  # plen + tokens: within the cache (24)
    """A full-batch decode step of the scheduler (greedy, text on) less its modules."""
    from ladder.engine.sampling import SamplingParams
    from ladder.engine.scheduler import Request
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    steps = []
    for _ in range(max(2, reps // 2)):
        for i in range(batch):
            scheduler.add(Request(prompt=[3 + (i + j) % 1000 for j in range(plen)],
                                  params=params))
        while scheduler.has_work():
            t0 = time.perf_counter()
            done = scheduler.step()
            if done is not None and done.kind == "decode" and done.rows == batch:
                steps.append(time.perf_counter() - t0)
    m = module_times(engine, batch, plen + tokens // 2, 2)
    return statistics.median(steps) - engine.model.config.n_layers * (m["attention"] + m["mlp"]) \
        - m["lm_head"]


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


# -- the file --------------------------------------------------------------------------------
def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through `points` (slope 0 for one x)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def hardware_section(grid: Grid, by_split: dict[str, list[dict]]) -> dict:
    """The "hardware" section: every rank's module times, the step overhead (rank 0's), the
    roofline's terms through the batch-1 samples."""
    config = next(iter(by_split.values()))[0]["config"]
    shape, compute, bytes_s, over = costs.shape_key(config), [], [], []
    for split, ranks in by_split.items():
        specs = costs.shards(config, grid.tp, split)
        for rank, res in enumerate(ranks):
            for (b, c), times in sorted(res["times"].items()):
                for module, sec in times.items():
                    compute.append({"shape": shape, "tp": grid.tp, "dtype": grid.dtype,
                                    "module": module, "batch": b, "context": c,
                                    "seconds": round(sec, 9), "rank": rank, "split": split})
                    if b == 1:
                        w = costs.module_work(config, specs[rank], module, b, c, grid.dtype)
                        bytes_s.append((w.bytes, sec))
        over += list(ranks[0]["overhead"].items())
    sec: dict = {"name": "this-cpu", "base": "this-cpu", "dtype": grid.dtype, "efficiency": 1.0,
                 "threads_per_rank": grid.threads, "compute": compute}
    fixed, per_byte = fit_line(bytes_s)
    if per_byte > 0:
        sec.update(mem_bw=round(1 / per_byte), module_overhead_s=round(max(fixed, 0.0), 9))
    fixed, per_row = fit_line([(float(b), o) for b, o in over])
    sec.update(step_overhead_s=round(max(fixed, 0.0), 9),
               row_overhead_s=round(max(per_row, 0.0), 9))
    return sec


def link_section(name: str, timed: dict, tp: int, module_bytes: set[int]) -> dict:
    """A "links" entry from the timer's: the timings as they are, and for sizes beyond them
    `direct`'s formula with a latency and a bandwidth through the smallest and largest;
    `overlap_cost` the median over the module messages' sizes."""
    base = name if name in LINKS else "tcp-high-end"
    rows = sorted(timed["rows"], key=lambda r: r["bytes"])
    lo, hi = rows[0], rows[-1]
    slope = (hi["seconds"] - lo["seconds"]) / max(hi["bytes"] - lo["bytes"], 1)
    bw = (tp - 1) / slope if slope > 0 else LINKS[base].bandwidth
    overlap = [r["overlap_cost"] for r in rows if r["bytes"] in module_bytes] or \
        [r["overlap_cost"] for r in rows]
    return {"name": name, "base": base, "fabric": "direct", "efficiency": 1.0,
            "bandwidth": round(bw), "overhead_s": 0.0,
            "step_overhead_s": timed.get("step_overhead_s", 0.0),
            "latency_s": round(max(lo["seconds"] - (tp - 1) * lo["bytes"] / bw, 0.0), 9),
            "overlap_cost": round(min(max(statistics.median(overlap), 0.0), 1.0), 4),
            "allreduce": [{"ranks": tp, **{k: r[k] for k in r if k != "ranks"}} for r in rows]}


def message_sizes(dim: int, grid: Grid) -> tuple[list[int], set[int]]:
    """(every size to time, the module messages' sizes): a module's [batch, dim] partial sums
    and the token pick's [tp, 2, batch] float32 table, at every batch of the grid."""
    module = {b * dim * DTYPE_BYTES[grid.dtype] for b in grid.batches}
    return sorted(module | {8 * grid.tp * b for b in grid.batches}), module


def write(path: Path, hardware: dict | None, links: dict[str, dict]) -> None:
    """Merge into the file at `path` (if it is one): new samples replace those of the same
    shape, TP size, dtype and split; new links replace those of the same name."""
    old: dict = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) and old.get("format") == FORMAT else {}
    data = {**old, "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{platform.node()}"}
    if hardware is not None:
        def key(s: dict) -> tuple:
            return (s.get("shape"), s.get("tp"), s.get("dtype"), s.get("split"))
        new = {key(s) for s in hardware["compute"]}
        kept = [s for s in (old.get("hardware") or {}).get("compute", []) if key(s) not in new]
        data["hardware"] = {**hardware, "compute": kept + hardware["compute"]}
    data["links"] = {**(old.get("links") or {}), **links}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# -- the whole run ---------------------------------------------------------------------------
def calibrate(grid: Grid, links: list[str], out: Path, timer: LinkTimer | None = None) -> dict:
    """Time the grid under each head split, then `links` (with `timer`, else the one
    provided); merge both into `out`. Returns what was written: {"hardware": section,
    "links": {name: section}}."""
    timer = timer or _link_timer
    if links and timer is None:
        raise ConfigError(f"timing links ({', '.join(links)}) needs the link timer of the "
                          "bench layer, which makes shaped links: run `ladder plan "
                          "--calibrate` (the `ladder` command loads it), or pass "
                          "--calibrate-links '' for compute only")
    if len(grid.splits) > 1:  # those the TP size allows
        from ladder.loaders import open_checkpoint
        config, ok = open_checkpoint(grid.model).config, []
        for split in grid.splits:
            try:
                costs.shards(config, grid.tp, split)
            except ConfigError as e:
                log(f"heads split {split}: {e}; skipped")
                continue
            ok.append(split)
        grid = dataclasses.replace(grid, splits=tuple(ok))
    by_split = {}
    for split in grid.splits:
        log(f"compute: {grid.model} TP={grid.tp} {grid.dtype}, heads split {split}, batches "
            f"{list(grid.batches)} x contexts {list(grid.contexts)}, {grid.reps} passes")
        by_split[split] = time_compute(grid, split)
    hardware = hardware_section(grid, by_split)
    dim = by_split[grid.splits[0]][0]["config"].dim
    sizes, module = message_sizes(dim, grid)
    sections = {}
    if links:
        timed = timer(links, grid.tp, sizes, dim, log)
        sections = {n: link_section(n, t, grid.tp, module) for n, t in timed.items()}
    write(out, hardware, sections)
    return {"hardware": hardware, "links": sections}


def summary(result: dict) -> str:
    """A few lines on what was measured: module times at the smallest batch and context, the
    step overhead, each link's all-reduce by size."""
    hw, lines = result["hardware"], []
    first = min((s["batch"], s["context"]) for s in hw["compute"])
    for s in hw["compute"]:
        if (s["batch"], s["context"]) == first:
            lines.append(f"{s['split']:>6} rank {s['rank']}  {s['module']:<9} batch {first[0]} "
                         f"context {first[1]}: {s['seconds'] * 1e6:8.1f} us")
    lines.append(f"step overhead {hw['step_overhead_s'] * 1e3:.3f} ms + "
                 f"{hw['row_overhead_s'] * 1e6:.1f} us a row; roofline "
                 f"{hw.get('mem_bw', 0) / 1e9:.1f} GB/s + "
                 f"{hw.get('module_overhead_s', 0) * 1e6:.1f} us a module")
    for name, sec in result["links"].items():
        sizes = ", ".join(f"{r['bytes']} B {r['seconds'] * 1e6:.1f} us"
                          for r in sec["allreduce"])
        lines.append(f"link {name}: {sizes}; overlap cost {sec['overlap_cost']:.2f}; the "
                     f"step plan {sec['step_overhead_s'] * 1e6:.0f} us")
    return "\n".join(lines)
