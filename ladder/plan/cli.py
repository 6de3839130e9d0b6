"""`ladder plan`: predict what ladder buys on a model, a TP size, a device and a link.

    ladder plan --model llama-3.1-70b --tp 8 --hardware h100-sxm --link nvlink4
    ladder plan --model path/to/hf-folder --tp 2 --hardware l4 --link pcie4 --batch 1,8 --json
    ladder plan --calibrate        # this machine, into the measured.json `this-cpu` reads

Prints, per plan x batch x context, the predicted ms a token, tokens/s, speedup over standard,
the all-reduce share of a step and the share of it the schedule hides (`ladder.plan.sweep`);
`--json` prints one object whose `rows` carry exactly those fields. Presets and their sources:
`ladder.plan.models`, `.hardware`, `.links`; measured.json: `ladder.plan.measured`.

`--calibrate` measures this machine instead (`ladder.plan.calibrate`): every rank's module times
for `--model` (default smollm2) at `--tp` (default 2) over `--batch` x `--context`, each head
split (or `--head-split`), and the all-reduce over `--calibrate-links`, merged into `--out`
(default: $LADDER_MEASURED, else ~/.cache/ladder-serve/measured.json, which `--hardware
this-cpu` and `--link shm` / `tcp-...` then read). `--device cuda` measures the GPUs instead,
each rank on its own (`--hardware` then takes the file it writes, measured-cuda.json beside
that one); the GPUs' link comes from a preset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from ladder.model.config import ConfigError
from ladder.model.tp import HEAD_SPLITS
from ladder.plan import calibrate, measured, plot, quality
from ladder.plan.hardware import HARDWARE, PLAN_DTYPES, measured_gpu_path, measured_path
from ladder.plan.links import LINKS
from ladder.plan.models import load_model, model_names
from ladder.plan.sweep import Setup, memory_notes, parse_plans, rows, table

DEFAULT_PLANS = "standard,ladder,upper-half,parallel"
_RANGE = re.compile(r"\s*\d+\s*(-\s*\d+\s*)?")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict ladder's decode speedup on given hardware",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=run)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model",
                   help=f"a preset ({', '.join(model_names())}), a Hugging Face model folder "
                   "or a config.json (required but with --calibrate: a checkpoint, smollm2)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (required; --calibrate: 2)")
    p.add_argument("--hardware",
                   help=f"a preset ({', '.join([*HARDWARE, 'this-cpu'])}) or a measured.json")
    p.add_argument("--link",
                   help=f"a preset ({', '.join(LINKS)}), a measured.json, or FILE#NAME: the "
                   "link NAME of a measured.json's \"links\"")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--context", default=None,
                   help="comma-separated cached positions a row attends to (default 512,4096; "
                   f"--calibrate: {calibrate.DEFAULT_CONTEXTS})")
    p.add_argument("--plans", default=DEFAULT_PLANS,
                   help="comma-separated: standard, ladder, upper-half, ladder:A-B[,C...], "
                   "parallel, desync")
    p.add_argument("--head-split", choices=HEAD_SPLITS, default=None,
                   help="attention heads by KV-head groups or evenly, as `ladder generate "
                   "--head-split` (default: groups where the TP size allows, else even)")
    p.add_argument("--dtype", choices=PLAN_DTYPES, default=None,
                   help="weights and KV cache (default: the hardware's: bfloat16 on GPUs, "
                   "float32 on this CPU); q8_0/q4_0/q4_1: weights kept quantized (CPU), "
                   "activations and KV cache float32")
    p.add_argument("--json", action="store_true", help="one JSON object with the rows")
    p.add_argument("--png", metavar="FILE", help="speedup against link bandwidth")
    p.add_argument("--quality", metavar="FILE",
                   help="a bench.adapt_curve result (or {\"plans\": {...}}): quality per plan")
    c = p.add_argument_group("calibration")
    c.add_argument("--calibrate", action="store_true",
                   help="measure this machine into a measured.json instead of predicting")
    c.add_argument("--out", metavar="FILE", help="--calibrate's file (default: this-cpu's)")
    c.add_argument("--calibrate-links", default=None,
                   help="links to time: shm, tcp-loopback, tcp-<profile> (a shaped veth pair: "
                   f"high-end, cheap, a rate; needs root); '' for none (default: "
                   f"{calibrate.DEFAULT_LINKS}; with --device cuda none)")
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="--calibrate's ranks: CPU processes, or each on a GPU of its own "
                   "(module times from CUDA events; default dtype bfloat16, default --out "
                   "measured-cuda.json beside this-cpu's)")
    c.add_argument("--reps", type=int, default=7, help="--calibrate's passes a point")


def split_plans(text: str) -> list[str]:
    """`--plans` entries split at commas, where a bare layer or range continues the partial
    plan before it: `standard,ladder:0,3,5-7,parallel` is three plans."""
    out: list[str] = []
    for part in text.split(","):
        if out and out[-1].startswith("ladder:") and _RANGE.fullmatch(part):
            out[-1] += "," + part.strip()
        else:
            out.append(part)
    return out


def positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated positive integers")
    return values


def run(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args) if args.calibrate else _run(args)
    except ConfigError as e:
        print(f"ladder plan: error: {e}", file=sys.stderr)
        return 2


def _calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path
    tp = args.tp or 2
    batches = positive_ints(args.batch, "--batch")
    contexts = positive_ints(args.context or calibrate.DEFAULT_CONTEXTS, "--context")
    if tp < 1 or args.reps < 1:
        raise ConfigError("--tp and --reps must be at least 1")
    splits = (args.head_split,) if args.head_split else HEAD_SPLITS
    gpu = args.device == "cuda"
    grid = calibrate.Grid(model=args.model or "smollm2", tp=tp,
                          dtype=args.dtype or ("bfloat16" if gpu else "float32"),
                          splits=splits, batches=tuple(batches), contexts=tuple(contexts),
                          reps=args.reps, threads=max(1, (os.cpu_count() or 1) // tp),
                          device=args.device)
    out = Path(args.out) if args.out else measured_gpu_path() if gpu else measured_path()
    links = args.calibrate_links
    if links is None:
        links = "" if gpu else calibrate.DEFAULT_LINKS
    result = calibrate.calibrate(grid, [x.strip() for x in links.split(",") if x.strip()], out)
    print(calibrate.summary(result))
    print(f"wrote {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("model", "tp", "hardware", "link") if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or --calibrate)")
    config = load_model(args.model)
    hw = measured.resolve_hardware(args.hardware)
    setup = Setup(config=config, tp=args.tp, hardware=hw, link=measured.resolve_link(args.link),
                  dtype=args.dtype or hw.dtype, head_split=args.head_split)
    batches = positive_ints(args.batch, "--batch")
    contexts = positive_ints(args.context or "512,4096", "--context")
    plans = parse_plans(split_plans(args.plans), config.n_layers)
    result = rows(setup, plans, batches, contexts)  # checks the contexts too
    if args.quality:
        known = quality.by_plan(quality.load(args.quality), config.n_layers, args.quality)
        quality.attach(result, dict(plans), known)
    if args.png:
        plot.write_png(setup, plans, batches, contexts[0], args.png)
        print(f"plot: {args.png}", file=sys.stderr)
    for note in memory_notes(setup, batches, contexts):
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({"model": config.name, "tp": setup.tp, "hardware": hw.name,
                          "link": setup.link.name, "dtype": setup.dtype, "rows": result}))
    else:
        print(table(setup, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ladder plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))
