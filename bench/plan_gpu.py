"""`ladder plan` on a GPU: calibrate the GPU, predict its decode steps, measure them, compare.

The device check of `ladder plan --calibrate --device cuda` (these machines have no GPU: run it
where one is lent). A checkpoint (default: a random Llama of SmolLM2-135M's shape, written
here: the GGUF's 270 MB need not travel, and the times depend on the shape alone) is
calibrated at TP=1 on `--device` (`ladder.plan.calibrate`, module times from CUDA events),
written as a measured.json under `--out`; its decode ms/token predicted at each batch twice,
from that file and from the GPU's preset alone (the roofline with the paper-calibrated terms,
no measurement: what `ladder plan --hardware h200` says before a calibration); then measured on
the engine, a local group of one rank on that GPU, whole prompts admitted (each cell the median
full-batch decode step, `bench.interconnect_cells.direct_cell`, over `--reps` runs). Prints
the cells with both errors, their medians, and one JSON line (`--out DIR` too).

`--device cpu` runs the same on this machine's cores (the test suite does, small).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench.interconnect_cells import direct_cell
from bench.overlap_condition import Shape, write_random_llama
from bench.table import table
from bench.timed import bench_main, csv_ints, emit, log
from ladder.model.config import ConfigError, ResidualPlan
from ladder.plan import calibrate, measured
from ladder.plan.hardware import preset_hardware
from ladder.plan.links import LINKS
from ladder.plan.sweep import Setup

SMOLLM2 = Shape(dim=576, ffn=1536, layers=30, heads=9, kv_heads=3, vocab=49152)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", help="a checkpoint (default: a random Llama of SmolLM2's shape)")
    p.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32, help="new tokens a request (forced)")
    p.add_argument("--reps", type=int, default=5, help="measured runs of every batch")
    p.add_argument("--calibrate-reps", type=int, default=7, help="calibration passes a point")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the rank")
    p.add_argument("--out", help="write the JSON line and the measured.json here")


def predict(setup: Setup, batches: list[int], context: int) -> dict[int, float]:
    plan = ResidualPlan.parse("standard", setup.config.n_layers)
    return {b: 1e3 * setup.step(plan, b, context).seconds for b in batches}


def measure(a, model: str, dtype: str, batches: list[int]) -> dict[int, list[float]]:
    """ms/token at each batch, one a rep: a group of one rank on the device."""
    from ladder.engine.local import LocalTPGroup
    from ladder.options import GroupOptions
    opts = GroupOptions(model=model, tp=1, dtype=dtype, device=a.device,
                        comm="nccl" if a.device == "cuda" else "auto", threads=a.threads,
                        n_slots=max(batches), max_seq=a.prompt_len + a.tokens + 8,
                        max_num_batched_tokens=0)  # whole prompts: a batch decodes together
    runs: dict[int, list[float]] = {}
    with LocalTPGroup(opts) as g:
        vocab = g.info.vocab_size
        asyncio.run(direct_cell(g, 1, a.prompt_len, 4, vocab))  # warm-up
        for rep in range(a.reps):
            for b in batches if rep % 2 == 0 else batches[::-1]:
                log(f"measure: rep {rep + 1}/{a.reps}, batch {b}")
                c = asyncio.run(direct_cell(g, b, a.prompt_len, a.tokens, vocab))
                runs.setdefault(b, []).append(c["ms_per_token"])
    return runs


def compare(calibrated: dict[int, float], preset: dict[int, float],
            runs: dict[int, list[float]]) -> dict:
    cells = []
    for b, v in sorted(runs.items()):
        ms = statistics.median(v)
        cells.append({"batch": b, "measured_ms": round(ms, 4),
                      "range_ms": round(max(v) - min(v), 4),
                      "calibrated_ms": round(calibrated[b], 4),
                      "calibrated_error": round(calibrated[b] / ms - 1, 4),
                      "preset_ms": round(preset[b], 4),
                      "preset_error": round(preset[b] / ms - 1, 4)})
    return {"cells": cells,
            "calibrated_mae": statistics.median(abs(c["calibrated_error"]) for c in cells),
            "preset_mae": statistics.median(abs(c["preset_error"]) for c in cells)}


def run(a: argparse.Namespace) -> int:
    try:
        batches = csv_ints("--batches", a.batches)
        if a.reps < 1 or a.tokens < 4 or a.prompt_len < 1:
            raise ValueError("--reps must be >= 1, --tokens >= 4, --prompt-len >= 1")
    except ValueError as e:
        print(f"bench plan_gpu: {e}", file=sys.stderr)
        return 2
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    context = a.prompt_len + a.tokens // 2
    with tempfile.TemporaryDirectory(prefix="plan_gpu") as tmp:
        path, model = Path(a.out or tmp) / "measured.json", a.model
        try:
            if a.device == "cuda":
                calibrate.cuda_ranks(1, [])  # before a model is written for nothing
            if model is None:
                model = str(Path(tmp) / "smollm2-shape")
                log(f"writing a random Llama of SmolLM2's shape to {model}")
                write_random_llama(Path(model), SMOLLM2)
            grid = calibrate.Grid(model=model, tp=1, dtype=dtype, splits=("groups",),
                                  batches=tuple(batches),
                                  contexts=(a.prompt_len, a.prompt_len + a.tokens),
                                  reps=a.calibrate_reps, threads=a.threads, device=a.device)
            result = calibrate.calibrate(grid, [], path)
            print(calibrate.summary(result))
            data = measured.read(path, "--out")
            hw = measured.hardware_from(data, path)
            from ladder.loaders import open_checkpoint
            config = open_checkpoint(model).config
            preset_name = data["hardware"]["base"]  # the calibration's: the GPU's, this-cpu
            setups = {name: Setup(config=config, tp=1, hardware=h, link=LINKS["nvlink4"],
                                  dtype=dtype, head_split="groups")
                      for name, h in (("calibrated", hw),
                                      ("preset", preset_hardware(preset_name)))}
            log(f"predicted as `ladder plan --model {model} --tp 1 --hardware {path} --link "
                f"nvlink4 --dtype {dtype} --batch {a.batches} --context {context} --plans "
                f"standard` (and --hardware {preset_name})")
            pred = {name: predict(s, batches, context) for name, s in setups.items()}
            runs = measure(a, model, dtype, batches)
        except ConfigError as e:
            print(f"bench plan_gpu: {e}", file=sys.stderr)
            return 2
    r = compare(pred["calibrated"], pred["preset"], runs)
    print(table(f"decode ms/token at TP=1 on {hw.name} ({dtype}, context {context}): "
                f"measured (median of {a.reps} runs; range over them), predicted from the "
                f"calibration and from the {preset_name} preset; error = predicted / "
                "measured - 1",
                ["batch", "measured", "range", "calibrated", "error %", preset_name,
                 "error %"],
                [[c["batch"], c["measured_ms"], c["range_ms"], c["calibrated_ms"],
                  100 * c["calibrated_error"], c["preset_ms"], 100 * c["preset_error"]]
                 for c in r["cells"]], digits=3))
    print(f"median absolute error: calibrated {100 * r['calibrated_mae']:.1f}%, "
          f"{preset_name} preset {100 * r['preset_mae']:.1f}%")
    emit({"bench": "plan_gpu", "device": a.device, "gpu": hw.name, "dtype": dtype,
          "model": a.model or "random llama, SmolLM2-135M's shape", "context": context,
          "reps": a.reps, "preset": preset_name, **r}, a.out, "plan_gpu")
    return 0


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
