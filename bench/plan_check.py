"""`ladder plan` against our own measurements: calibrate, predict, measure, compare.

Calibrates this machine (`ladder.plan.calibrate`, into `--out` or a temporary folder; this
machine's own measured.json is left alone) or reads `--measured FILE`, predicts each cell's
decode ms/token with `ladder plan`'s model, then measures the cells fresh on the engine:
SmolLM2 TP=2, each of `--residuals` over each of `--links` at each batch size, a local group
per residual and link (a link's groups up at once, as `bench.interconnects`' direct sweep
keeps them; a shaped link is a veth pair between two namespaces, as in `bench.sampling`),
their cells in turn `--reps` times (reversed every other rep), each the median engine step of
the full-batch decode steps (`bench.interconnect_cells.direct_cell`). Reported: per cell
predicted, measured (and its range over reps) and the error; the median absolute error (the
issue's target: 15%); per link and batch the ladder speedup both ways and whether its sign
matches; per batch whether the links' order by speedup does. One JSON line (`--out DIR` too).

Links: `bench.plan_links` (shm, tcp-loopback, tcp-<launcher profile>), which also gives `ladder
plan --calibrate` its link timer.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.interconnect_cells import direct_cell
from bench.plan_links import link_place, time_links
from bench.table import table
from bench.timed import OtherLoad, bench_main, csv, csv_ints, emit, log
from ladder.model.config import ConfigError, ResidualPlan
from ladder.plan import calibrate, measured
from ladder.plan.sweep import Setup

# desync: no all-reduce at all, the compute side of the model checked apart from the links
RESIDUALS = {"standard": "standard", "ladder": "ladder", "partial": "ladder:24-29",
             "desync": "desync"}
TARGET_MAE = 0.15


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--measured", help="a measured.json to predict from (default: calibrate)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--head-split", default="even", choices=["groups", "even"],
                   help="as deploy/smollm2.yaml serves (and bench interconnects runs)")
    p.add_argument("--links", default="shm,tcp-high-end,tcp-cheap")
    p.add_argument("--residuals", default="standard,ladder",
                   help=f"among {', '.join(RESIDUALS)} (partial: {RESIDUALS['partial']})")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=24, help="new tokens a request (forced)")
    p.add_argument("--reps", type=int, default=5, help="interleaved runs of every cell")
    p.add_argument("--contexts", default="",
                   help="calibration contexts (default: the prompt length and prompt + tokens)")
    p.add_argument("--link-iters", type=int, default=5,
                   help="calibration: 7 x this many rounds of one 60-module chain a way, "
                   "per message size")
    p.add_argument("--out", help="write the JSON line and the measured.json here")


# -- predicted ----------------------------------------------------------------------------------
def predict(path: Path, config, a, links: list[str], residuals: list[str],
            batches: list[int]) -> dict[tuple, float]:
    """ms/token of every (link, residual, batch) at the cells' mean context."""
    data = measured.read(path, "--measured")
    hw = measured.hardware_from(data, path)
    context = a.prompt_len + a.tokens // 2
    out = {}
    for link in links:
        log(f"predicted as `ladder plan --model {a.model} --tp 2 --hardware {path} --link "
            f"{path}#{link} --head-split {a.head_split} --dtype {a.dtype} --batch "
            f"{','.join(map(str, batches))} --context {context} --plans "
            f"{','.join(RESIDUALS[r] for r in residuals)}`")
        setup = Setup(config=config, tp=2, hardware=hw, dtype=a.dtype, head_split=a.head_split,
                      link=measured.link_from(data, path, link))
        for res in residuals:
            plan = ResidualPlan.parse(RESIDUALS[res], config.n_layers)
            for b in batches:
                out[(link, res, b)] = 1e3 * setup.step(plan, b, context).seconds
    return out


# -- measured -----------------------------------------------------------------------------------
def measure(a, links: list[str], residuals: list[str], batches: list[int]
            ) -> tuple[dict[tuple, list[float]], dict[tuple, list[float]]]:
    """ms/token of every (link, residual, batch), one per rep, and the cores the rest of the
    machine used meanwhile: link after link, its residuals' groups up at once and their cells
    run in turn (reversed every other rep), after a warm-up cell each. Only one link's groups
    at a time: an idle group's heartbeat (its ranks poll for a while after each) slows the
    running one, the more so the more groups idle."""
    from ladder.engine.local import LocalTPGroup
    from ladder.options import GroupOptions
    runs: dict[tuple, list[float]] = {}
    loads: dict[tuple, list[float]] = {}
    for i, link in enumerate(links):
        with ExitStack() as stack:
            comm, spaces, _ = stack.enter_context(link_place(link, i))
            groups = {}
            for res in residuals:
                log(f"measure: starting {res} over {link}")
                groups[res] = g = stack.enter_context(LocalTPGroup(GroupOptions(
                    model=a.model, tp=2, residual=RESIDUALS[res], dtype=a.dtype, comm=comm,
                    threads=1, n_slots=max(batches), max_seq=a.prompt_len + a.tokens + 8,
                    head_split=a.head_split, interconnect=link,
                    max_num_batched_tokens=0),  # whole prompts: a batch decodes together
                    namespaces=spaces))
                asyncio.run(direct_cell(g, 1, a.prompt_len, 4, g.info.vocab_size))
            for rep in range(a.reps):
                for b in batches:
                    log(f"measure: {link}, rep {rep + 1}/{a.reps}, batch {b}")
                    for res in residuals if rep % 2 == 0 else residuals[::-1]:
                        g, other = groups[res], OtherLoad(tree=True)
                        c = asyncio.run(direct_cell(g, b, a.prompt_len, a.tokens,
                                                    g.info.vocab_size))
                        runs.setdefault((link, res, b), []).append(c["ms_per_token"])
                        loads.setdefault((link, res, b), []).append(other.cores())
    return runs, loads


# -- compared -----------------------------------------------------------------------------------
def cells(pred: dict[tuple, float], runs: dict[tuple, list[float]],
          loads: dict[tuple, list[float]]) -> list[dict]:
    """Each cell: predicted, measured (median over reps, and their range), the error, and the
    cores the rest of the machine used meanwhile (median over reps)."""
    out = []
    for k, v in runs.items():
        ms = statistics.median(v)
        out.append({"link": k[0], "residual": k[1], "batch": k[2],
                    "predicted_ms": round(pred[k], 3), "measured_ms": round(ms, 3),
                    "range_ms": round(max(v) - min(v), 3), "error": round(pred[k] / ms - 1, 4),
                    "other_cores": round(statistics.median(loads[k]), 3)})
    return out


def compare(pred: dict[tuple, float], runs: dict[tuple, list[float]],
            loads: dict[tuple, list[float]], links: list[str], batches: list[int]) -> dict:
    """The cells, the median absolute error, the ladder speedups (each rep's range: a measured
    sign inside it is noise) and the links' order by speedup per batch."""
    got = cells(pred, runs, loads)
    out = {"cells": got, "mae": statistics.median(abs(c["error"]) for c in got),
           "speedups": [], "orders": []}
    if not all((li, r, b) in runs for li in links for r in ("standard", "ladder")
               for b in batches):
        return out
    for b in batches:
        for li in links:
            std, lad = runs[(li, "standard", b)], runs[(li, "ladder", b)]
            per_rep = [s / x for s, x in zip(std, lad)]
            p, m = pred[(li, "standard", b)] / pred[(li, "ladder", b)], \
                statistics.median(std) / statistics.median(lad)
            out["speedups"].append({"link": li, "batch": b, "predicted": round(p, 4),
                                    "measured": round(m, 4), "rep_min": round(min(per_rep), 4),
                                    "rep_max": round(max(per_rep), 4),
                                    "sign_ok": (p > 1) == (m > 1),
                                    "noise": min(per_rep) <= 1 <= max(per_rep)})
        rows = [s for s in out["speedups"] if s["batch"] == b]
        by_p = [s["link"] for s in sorted(rows, key=lambda s: -s["predicted"])]
        by_m = [s["link"] for s in sorted(rows, key=lambda s: -s["measured"])]
        out["orders"].append({"batch": b, "predicted": by_p, "measured": by_m,
                              "ok": by_p == by_m})
    out["signs_ok"] = all(s["sign_ok"] for s in out["speedups"])
    resolved = [s for s in out["speedups"] if not s["noise"]]  # every rep on one side of 1
    out["signs_resolved"] = [len(resolved), sum(s["sign_ok"] for s in resolved)]
    out["orders_ok"] = all(o["ok"] for o in out["orders"])
    return out


def report(r: dict, reps: int) -> str:
    parts = [table(f"decode ms/token, predicted by `ladder plan` and measured (median of {reps} "
                   "interleaved reps; range over them); error = predicted / measured - 1; other "
                   "cores: what the rest of the machine used meanwhile (median over reps)",
                   ["link", "residual", "batch", "predicted", "measured", "range", "error %",
                    "other cores"],
                   [[c["link"], c["residual"], c["batch"], c["predicted_ms"], c["measured_ms"],
                     c["range_ms"], 100 * c["error"], c["other_cores"]] for c in r["cells"]],
                   digits=2)]
    if r["speedups"]:
        parts.append(table("ladder speedup (standard / ladder), predicted and measured; reps: "
                           "each rep's range",
                           ["link", "batch", "predicted", "measured", "reps", "sign ok"],
                           [[s["link"], s["batch"], s["predicted"], s["measured"],
                             f"{s['rep_min']:.3f}-{s['rep_max']:.3f}", s["sign_ok"]]
                            for s in r["speedups"]], digits=3))
        parts.append(table("links by speedup, largest first", ["batch", "predicted",
                                                               "measured", "same"],
                           [[o["batch"], " > ".join(o["predicted"]),
                             " > ".join(o["measured"]), o["ok"]] for o in r["orders"]]))
    line = f"median absolute error {100 * r['mae']:.1f}% (target <= {100 * TARGET_MAE:.0f}%)"
    if r["speedups"]:
        n, ok = r["signs_resolved"]
        line += (f"; speedup sign right in every cell: {'yes' if r['signs_ok'] else 'no'} "
                 f"(right in {ok} of the {n} cells whose reps all fall on one side of 1); "
                 f"order across links right in every batch: {'yes' if r['orders_ok'] else 'no'}")
    return "\n\n".join(parts + [line])


def run(a: argparse.Namespace) -> int:
    try:
        links, residuals = csv(a.links), csv(a.residuals)
        batches = csv_ints("--batches", a.batches)
        bad = sorted(set(residuals) - set(RESIDUALS))
        if bad or not links or a.reps < 1 or a.tokens < 4:
            raise ValueError(f"residuals {bad} unknown, or no link, --reps < 1, --tokens < 4")
        contexts = csv_ints("--contexts", a.contexts or
                            f"{a.prompt_len},{a.prompt_len + a.tokens}")
    except ValueError as e:
        print(f"bench plan_check: {e}", file=sys.stderr)
        return 2
    load: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="plan_check") as tmp:
        path = Path(a.measured) if a.measured else Path(a.out or tmp) / "measured.json"
        try:
            if not a.measured:
                other = OtherLoad()
                grid = calibrate.Grid(model=a.model, tp=2, dtype=a.dtype,
                                      splits=(a.head_split,), batches=tuple(batches),
                                      contexts=tuple(contexts), threads=1)
                calibrate.calibrate(grid, links, path,
                                    functools.partial(time_links, iters=a.link_iters))
                load["calibrate"] = round(other.cores(), 3)
                log(f"calibrated: {path}")
            from ladder.loaders import open_checkpoint
            pred = predict(path, open_checkpoint(a.model).config, a, links, residuals, batches)
            other = OtherLoad()
            runs, loads = measure(a, links, residuals, batches)
            load["measure"] = round(other.cores(), 3)
        except ConfigError as e:
            print(f"bench plan_check: {e}", file=sys.stderr)
            return 2
    r = compare(pred, runs, loads, links, batches)
    print(report(r, a.reps))
    print("the rest of the machine used " + ", ".join(f"{v:.2f} cores while this run's {k} "
                                                      "phase ran" for k, v in load.items()))
    emit({"bench": "plan_check", "model": a.model, "dtype": a.dtype, "tp": 2,
          "head_split": a.head_split, "prompt_len": a.prompt_len, "tokens": a.tokens,
          "reps": a.reps, "context": a.prompt_len + a.tokens // 2, "measured_json": str(path),
          **r, "target_mae": TARGET_MAE, "other_load_cores": load}, a.out, "plan_check")
    return 0


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
