"""Decode speed: ladder's overlap, our engine against transformers, and memory bandwidth.

Three parts (`--overlap`, `--vs-hf`, `--bandwidth`; all of them when none is named), each
measured side by side in one run. Only ratios within a run mean anything: this is a noisy,
shared 2-core CPU machine, and absolute times drift from run to run.

(a) overlap    per-token decode latency at TP=2 of the residual schedules standard, ladder,
               parallel and desync (no communication: the upper bound) on a random-weight Llama
               sized so that a module's compute outlasts an all-reduce; per link (gloo, shm when
               the runner has it, and an emulated latency labelled as emulation): exposed
               communication per token, ladder speedup T_standard / T_ladder, and overlap
               efficiency (T_standard - T_ladder) / (T_standard - T_desync).  See bench/overlap.py.
(b) vs-hf      our engine at TP=1 against transformers' generate on SmolLM2-135M, greedy, 128
               new tokens forced, float32 and bfloat16, decode tokens/s and their ratio.
(c) bandwidth  weight bytes per decode token / time per token, against a plain F.linear
               matrix-vector pass over the same matrices.  (b) and (c): bench/engine_speed.py.

Timing discipline: warm-up runs first, then repetitions interleaved across the compared
variants (A B C D, then D C B A, ...) so that drift falls on all of them alike; medians.
Prints a table per part and ends with one JSON line; `--out DIR` also writes that JSON to DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import engine_speed, overlap
from bench.overlap_condition import Shape
from bench.timed import OtherLoad, log

# dim 2048 with 8 of 16 KV heads and ffn 4096: a rank's attention shard is ~25 MB and its MLP
# shard ~50 MB of float32, ~1.5-3 ms each on one core, above an isolated gloo all-reduce
# (~0.4 ms). 8 layers: ladder can hide 15 of the 17 reduces a token makes (see schedule bound).
FULL = {
    "overlap": overlap.Settings(
        Shape(dim=2048, ffn=4096, layers=8, heads=16, kv_heads=8, vocab=1024),
        tokens=24, reps=5, probe_iters=200),
    "engine": engine_speed.Settings(tokens=128, reps=3),
}
# every code path once with as few process starts as possible (each costs seconds on 2 cores):
# tiny model, one rep, no separate real-shm link (the emulated link runs over shm), float32 only
QUICK = {
    "overlap": overlap.Settings(
        Shape(dim=512, ffn=1024, layers=2, heads=8, kv_heads=4, vocab=256),
        tokens=6, reps=1, probe_iters=20, real_shm=False),
    "engine": engine_speed.Settings(tokens=6, reps=1, dtypes=("float32",)),
}
TARGETS = {"overlap_efficiency": overlap.TARGET, **engine_speed.TARGETS}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "loadavg_start": os.getloadavg()[0]}


def finite(o):
    """JSON has no inf or nan: a non-finite figure (a zero-time division) becomes null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlap", action="store_true", help="part (a): ladder overlap at TP=2")
    p.add_argument("--vs-hf", action="store_true", help="part (b): engine vs transformers")
    p.add_argument("--bandwidth", action="store_true", help="part (c): memory-bandwidth fraction")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one rep, fewer links and dtypes (for tests)")
    p.add_argument("--reps", type=int, default=0, help="repetitions per part (0: the default)")
    p.add_argument("--latency-us", type=float, default=200.0,
                   help="emulated link latency per all-reduce in part (a), microseconds")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this folder")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = {k: replace(v, reps=args.reps) for k, v in settings.items()}
    every = not (args.overlap or args.vs_hf or args.bandwidth)
    result: dict = {"bench": "decode", "quick": args.quick,
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": machine(), "targets": TARGETS}
    reports = []
    t0, other = time.perf_counter(), OtherLoad()
    if every or args.overlap:
        result["overlap"], text = overlap.run(settings["overlap"], args.latency_us)
        reports.append(text)
    if every or args.vs_hf or args.bandwidth:
        hf_out, bw_out, text = engine_speed.run(settings["engine"], every or args.vs_hf,
                                                every or args.bandwidth)
        if hf_out:
            result["engine_vs_hf"] = hf_out
        if bw_out:
            result["bandwidth"] = bw_out
        reports.append(text)
    m = result["machine"]
    m["loadavg_end"], m["other_processes_cores"] = os.getloadavg()[0], other.cores()
    result["seconds"] = time.perf_counter() - t0
    print("\n\n".join(reports) + "\n")
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers "
          f"{m['transformers']}; other processes used {m['other_processes_cores']:.2f} cores on "
          f"average during the run (0 on a quiet machine); {result['seconds']:.0f} s\n")
    line = json.dumps(finite(result), allow_nan=False)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"decode-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        path.write_text(line + "\n")
        log(f"wrote {path}")
    print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
