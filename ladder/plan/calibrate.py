"""`ladder plan --calibrate`: this machine measured into the measured.json `measured` reads.

Compute (`ladder.plan.rank_timing`). One process per rank of the TP split, all running at once
with one thread each (as a local group's ranks run, sharing the memory bus), each builds its
shard as a serving rank does (`ladder.engine.build.build_engine`: the checkpoint's slices, the
CPU decode layouts, a KV cache) with no communicator (`NoComm`). At every batch x context of
the grid each times, layer after layer, the attention and the MLP with their norms as the model
calls them, so that the weights stream from memory as in a decode step, and the LM head's slice
with the local part of the token pick; medians over `reps` passes (`rank_timing.module_times`:
the machine, not its load), the ranks starting each point together. The cache is written
first: pages never written read as the kernel's one zero page, from cache. What a step costs
beyond its modules (residual adds, the scheduler, each row's text) is rank 0's, the other ranks
idle (the scheduler's part of its real decode steps, and an engine step less a pass over its
modules), fitted as `step_overhead_s` + `row_overhead_s` x rows. For cases outside the grid,
the roofline's terms are a line through the smallest batch's samples (batch 1 by default, the
most memory-bound), seconds against bytes read (`mem_bw` its slope, `module_overhead_s` its
intercept, efficiency 1).

Links. The layer that can make a link times it (`provide_link_timer`): shared memory and
loopback need nothing beyond this package, a shaped veth pair needs the cluster's network
plumbing, so `bench.plan_links` provides the timer, and the `ladder` command, which loads every
layer's commands, has it; a link it cannot make (no root for a veth pair) is left out, with a
line saying so. A timer returns, per link, the all-reduce's seconds and overlap cost by
message size, as they cost a chain of modules, and what the step plan's broadcasts cost
(`link_section` fits a latency and a bandwidth through the sizes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from ladder.model.config import ConfigError
from ladder.plan import costs
from ladder.plan.hardware import act_bytes, gpu_preset
from ladder.plan.links import LINKS
from ladder.plan.measured import FORMAT
from ladder.plan.rank_timing import Grid, rank_options, time_compute

# timer(link names, TP size, message sizes in bytes, model width, log) -> {name: {"rows":
# [{"bytes", "seconds", "overlap_cost"}, ...], "step_overhead_s"}}; raises ConfigError for a
# link it cannot make
LinkTimer = Callable[[list[str], int, list[int], int, Callable[[str], None]], dict[str, dict]]
_link_timer: LinkTimer | None = None
DEFAULT_LINKS = "shm,tcp-loopback,tcp-high-end,tcp-cheap"
DEFAULT_CONTEXTS = "64,512,2048"


def provide_link_timer(timer: LinkTimer) -> None:
    """Register the function that times links (`bench.plan_links` does, on import)."""
    global _link_timer
    _link_timer = timer


def log(msg: str) -> None:
    print(f"[calibrate] {msg}", file=sys.stderr, flush=True)


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
    roofline's terms through the smallest batch's samples."""
    config = next(iter(by_split.values()))[0]["config"]
    shape, compute, bytes_s, over = costs.shape_key(config), [], [], []
    smallest = min(grid.batches)
    for split, ranks in by_split.items():
        specs = costs.shards(config, grid.tp, split)
        for rank, res in enumerate(ranks):
            for (b, c), times in sorted(res["times"].items()):
                for module, sec in times.items():
                    compute.append({"shape": shape, "tp": grid.tp, "dtype": grid.dtype,
                                    "module": module, "batch": b, "context": c,
                                    "seconds": round(sec, 9), "rank": rank, "split": split})
                    if b == smallest:
                        w = costs.module_work(config, specs[rank], module, b, c, grid.dtype)
                        bytes_s.append((w.bytes, sec))
        over += list(ranks[0]["overhead"].items())
    gpu = next(iter(by_split.values()))[0].get("gpu")
    sec: dict = {"name": "this-cpu", "base": "this-cpu", "dtype": grid.dtype, "efficiency": 1.0,
                 "threads_per_rank": grid.threads, "compute": compute}
    if gpu is not None:  # the peaks a roofline falls back on: the GPU's preset, if it has one
        base = gpu_preset(gpu)
        if base is None:
            log(f"no preset for the GPU {gpu!r}: the roofline's peaks are h100-sxm's")
        sec.update(name=gpu, base=base or "h100-sxm", device="cuda")
    fixed, per_byte = fit_line(bytes_s)
    if per_byte > 0:
        sec.update(mem_bw=round(1 / per_byte), module_overhead_s=round(max(fixed, 0.0), 9))
    fixed, per_row = fit_line([(float(b), o) for b, o in over])
    sec.update(step_overhead_s=round(max(fixed, 0.0), 9),
               row_overhead_s=round(max(per_row, 0.0), 9))
    return sec


def fit_robust(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of a Theil-Sen line through `points`: the median of the pairwise
    slopes, each pair weighted by how far apart its sizes are, then the median intercept. A few
    wild points (a size timed while the machine was busy) do not drag it as they drag least
    squares; the weights keep the slope that of the sizes far apart: the pairs of small sizes,
    microseconds apart in time and bytes apart in size, outnumber them (unweighted, the shm
    link's six sizes put a 73,728-byte reduce at 260 us, timed at 150)."""
    pairs = sorted(((y1 - y0) / (x1 - x0), abs(x1 - x0))
                   for i, (x0, y0) in enumerate(points) for x1, y1 in points[i + 1:] if x1 != x0)
    slope, half, seen = 0.0, sum(w for _, w in pairs) / 2, 0.0
    for slope, w in pairs:  # the weighted median
        seen += w
        if seen >= half:
            break
    return statistics.median(y - slope * x for x, y in points), slope


def link_section(name: str, timed: dict, tp: int) -> dict:
    """A "links" entry from the timer's: `direct`'s formula, latency + (tp - 1) x bytes /
    bandwidth, through the timed sizes (`fit_robust`; each size's time alone is noisier than
    the line: the timings stay beside it, under "timed", unused), and `overlap_cost` pooled
    over every size, each weighted by its reduce's time (the longer, the better resolved; one
    size's alone is mostly noise)."""
    base = name if name in LINKS else "tcp-high-end"
    rows = sorted(timed["rows"], key=lambda r: r["bytes"])
    fixed, per_byte = fit_robust([(r["bytes"], r["seconds"]) for r in rows])
    bw = (tp - 1) / per_byte if per_byte > 0 else LINKS[base].bandwidth
    weight = sum(r["seconds"] for r in rows)
    overlap = sum(r["overlap_cost"] * r["seconds"] for r in rows) / weight if weight else 1.0
    return {"name": name, "base": base, "fabric": "direct", "efficiency": 1.0,
            "bandwidth": round(bw), "latency_s": round(max(fixed, 0.0), 9), "overhead_s": 0.0,
            "step_overhead_s": timed.get("step_overhead_s", 0.0),
            "overlap_cost": round(min(max(overlap, 0.0), 1.0), 4),
            "timed": [{"ranks": tp, **r} for r in rows]}


def message_sizes(dim: int, grid: Grid) -> list[int]:
    """The sizes to time: a module's [batch, dim] partial sums and the token pick's
    [tp, 2, batch] float32 table, at every batch of the grid."""
    return sorted({b * dim * act_bytes(grid.dtype) for b in grid.batches}
                  | {8 * grid.tp * b for b in grid.batches})


def write(path: Path, hardware: dict | None, links: dict[str, dict],
          calibration: dict | None = None) -> None:
    """Merge into the file at `path` (if it is one): new samples replace those of the same
    shape, TP size, dtype and split; new links replace those of the same name; `calibration`
    (what was measured) joins the file's "calibrations", newest last."""
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
    if calibration is not None:
        data["calibrations"] = [*(old.get("calibrations") or []),
                                {"created": data["created"], **calibration}]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# -- the whole run ---------------------------------------------------------------------------
def allowed_splits(grid: Grid) -> Grid:
    """`grid` with only the head splits its TP size allows (each other one logged)."""
    if len(grid.splits) == 1:
        return grid
    from ladder.loaders import open_checkpoint
    config, ok = open_checkpoint(grid.model).config, []
    for split in grid.splits:
        try:
            costs.shards(config, grid.tp, split)
        except ConfigError as e:
            log(f"heads split {split}: {e}; skipped")
            continue
        ok.append(split)
    return dataclasses.replace(grid, splits=tuple(ok))


def time_links(timer: LinkTimer, links: list[str], grid: Grid, dim: int) -> dict[str, dict]:
    """A "links" section per link the timer can make (each other one logged)."""
    sizes, sections = message_sizes(dim, grid), {}
    for name in links:
        try:
            timed = timer([name], grid.tp, sizes, dim, log)[name]
        except ConfigError as e:
            log(f"link {name}: not timed: {e}")
            continue
        sections[name] = link_section(name, timed, grid.tp)
    return sections


def cuda_ranks(tp: int, links: list[str]) -> None:
    """Refuse a GPU calibration this machine cannot run: each rank needs a GPU of its own (as
    a local group's ranks have), and the links timed are this CPU's, not the GPUs'."""
    import torch
    if links:
        raise ConfigError(f"the links --calibrate times ({', '.join(links)}) are the CPU "
                          "ranks' (shared memory, TCP); with --device cuda pass "
                          "--calibrate-links '' and take the GPUs' link from a preset")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    if torch.cuda.device_count() < tp:
        raise ConfigError(f"--device cuda --tp {tp}: each rank needs a GPU of its own, this "
                          f"machine has {torch.cuda.device_count()}")


def calibrate(grid: Grid, links: list[str], out: Path, timer: LinkTimer | None = None) -> dict:
    """Time the grid under each head split, then `links` (with `timer`, else the one
    provided); merge both into `out`, with what was measured ("calibrations"). Returns what
    was written: {"hardware": section, "links": {name: section}, "calibration": {...}}."""
    timer = timer or _link_timer
    if links and timer is None:
        raise ConfigError(f"timing links ({', '.join(links)}) needs the link timer of the "
                          "bench layer, which makes shaped links: run `ladder plan "
                          "--calibrate` (the `ladder` command loads it), or pass "
                          "--calibrate-links '' for compute only")
    try:
        rank_options(grid, grid.splits[0])  # what GroupOptions refuses, before any rank starts
    except ValueError as e:
        raise ConfigError(f"--calibrate: {e}") from None
    if grid.device == "cuda":
        cuda_ranks(grid.tp, links)
    grid, by_split = allowed_splits(grid), {}
    for split in grid.splits:
        log(f"compute: {grid.model} TP={grid.tp} {grid.dtype}, heads split {split}, batches "
            f"{list(grid.batches)} x contexts {list(grid.contexts)}, {grid.reps} passes")
        by_split[split] = time_compute(grid, split)
    hardware = hardware_section(grid, by_split)
    sections = time_links(timer, links, grid, by_split[grid.splits[0]][0]["config"].dim) \
        if links else {}
    done = {"model": str(grid.model), "tp": grid.tp, "dtype": grid.dtype,
            "head_splits": list(grid.splits), "batches": list(grid.batches),
            "contexts": list(grid.contexts), "reps": grid.reps, "device": grid.device,
            "threads_per_rank": grid.threads, "links": list(sections),
            "links_not_timed": [n for n in links if n not in sections]}
    write(out, hardware, sections, done)
    return {"hardware": hardware, "links": sections, "calibration": done}


def summary(result: dict) -> str:
    """A few lines on what was measured: module times at the smallest batch and context, the
    step overhead, each link's all-reduce by size."""
    hw, c = result["hardware"], result["calibration"]
    lines = [f"calibrated {c['model']} TP={c['tp']} {c['dtype']}, heads split "
             f"{', '.join(c['head_splits'])}, batches {c['batches']} x contexts {c['contexts']};"
             f" links timed: {', '.join(c['links']) or 'none'}"
             + (f" (not: {', '.join(c['links_not_timed'])})" if c["links_not_timed"] else "")]
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
        sizes = ", ".join(f"{r['bytes']} B {r['seconds'] * 1e6:.1f} us" for r in sec["timed"])
        lines.append(f"link {name}: {sizes} (fitted: {sec['latency_s'] * 1e6:.1f} us + "
                     f"{sec['bandwidth'] / 1e9:.2f} GB/s); overlap cost "
                     f"{sec['overlap_cost']:.2f}; the step plan "
                     f"{sec['step_overhead_s'] * 1e6:.0f} us")
    return "\n".join(lines)
