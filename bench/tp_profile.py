"""Where a TP=2 decode step's time goes beside TP=1's: SmolLM2, one stream, per module.

For each weight type, on this machine's cores (TP=1: one process of `cores` threads; TP=2: two
processes of `cores / 2`, as the served default runs):

  - per module, each rank timed alone on its own engine (ladder.plan.rank_timing, the
    measurements of `ladder plan --calibrate`: medians of single calls, the ranks starting each
    pass together): the 30 layers' attention (norm, q/k/v, rotary + cache + attention, o) and
    MLP (norm, gate/up, SwiGLU, down), the LM head's slice, and a step's cost beyond its modules
    (scheduler, embedding, sampling); the slower rank's figure at TP=2;
  - a real group's decode step (LocalTPGroup, the served plan `ladder:24-29` over shared
    memory at TP=2): its time a token and, of that, the all-reduce wait the schedule left
    exposed; what remains beyond modules + overhead + exposed wait is lock-step and messaging
    (the leader's step plan, the ranks' results).

    python -m bench.tp_profile [--dtypes float32,bfloat16,q4_1] [--tokens 64] [--out DIR]
"""

from __future__ import annotations

import os

from bench.openai_stream import PROMPT
from bench.table import table
from bench.timed import OtherLoad, emit, log
from bench.vllm_compare import _engine_streams

CONTEXT = 64  # cached positions of the timed decode step (the prompt's ~46 and some output)


def add_args(p) -> None:
    p.add_argument("--dtypes", default="float32,bfloat16,q4_1")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default=None)


def modules(dtype: str, tp: int, reps: int) -> dict[str, float]:
    """Seconds a token: attention and MLP over all layers, LM head, step overhead (the slowest
    rank's each)."""
    from ladder.plan.rank_timing import Grid, time_compute
    cores = os.cpu_count() or 1
    grid = Grid(model="smollm2", tp=tp, dtype=dtype, splits=("even",), batches=(1,),
                contexts=(CONTEXT,), reps=reps, threads=max(1, cores // tp))
    ranks = time_compute(grid, "even")
    n = ranks[0]["config"].n_layers
    got = {k: max(r["times"][(1, CONTEXT)][k] for r in ranks) * (n if k != "lm_head" else 1)
           for k in ("attention", "mlp", "lm_head")}
    got["overhead"] = ranks[0]["overhead"][1]
    return got


def decode(dtype: str, tp: int, prompt: list[int], tokens: int) -> dict[str, float]:
    """A real group's decode: seconds a token, and the exposed all-reduce wait of them."""
    from ladder.engine.local import LocalTPGroup
    from ladder.options import GroupOptions
    opts = GroupOptions(model="smollm2", tp=tp, dtype=dtype, residual="ladder:24-29",
                        head_split="even", comm="shm" if tp > 1 else "auto", max_seq=512)
    with LocalTPGroup(opts) as g:
        _engine_streams(g, prompt, 1, 8)
        single, t = _engine_streams(g, prompt, 1, tokens)
    return {"tpot": single.tpot_s, "exposed": t.decode_exposed_s / max(t.decode_steps, 1),
            "engine": t.decode_s / max(t.decode_steps, 1)}


def run(a) -> int:
    from ladder.engine.local import LocalTPGroup
    from ladder.options import GroupOptions
    other = OtherLoad(tree=True)
    with LocalTPGroup(GroupOptions(model="smollm2", tp=1, max_seq=512)) as g:
        prompt = g.encode(PROMPT, chat=True)
    rows, lines = [], []
    for dtype in a.dtypes.split(","):
        per = {}
        for tp in (1, 2):
            log(f"{dtype} TP={tp}: modules, then a group's decode")
            m = modules(dtype, tp, a.reps)
            d = decode(dtype, tp, prompt, a.tokens)
            summed = sum(m.values())
            rest = d["tpot"] - summed - d["exposed"]
            per[tp] = {"dtype": dtype, "tp": tp, **{k: v * 1e3 for k, v in m.items()},
                       "modules_ms": summed * 1e3, "tpot_ms": d["tpot"] * 1e3,
                       "engine_ms": d["engine"] * 1e3, "exposed_ms": d["exposed"] * 1e3,
                       "rest_ms": rest * 1e3}
        for tp in (1, 2):
            r = per[tp]
            r["tp2_over_tp1"] = per[1]["tpot_ms"] / per[2]["tpot_ms"] if tp == 2 else None
            rows.append(r)
            lines.append([dtype, tp, r["attention"], r["mlp"], r["lm_head"], r["overhead"],
                          r["modules_ms"], r["exposed_ms"], r["rest_ms"], r["tpot_ms"],
                          r["tp2_over_tp1"]])
    print(table(f"SmolLM2 decode, one stream, ms a token ({os.cpu_count()} cores; TP=2: the "
                f"slower rank's modules)",
                ["weights", "TP", "attention x30", "MLP x30", "LM head", "step overhead",
                 "sum", "exposed all-reduce", "lock-step + messaging", "measured",
                 "TP2 speed-up"], lines))
    emit({"bench": "tp_profile", "context": CONTEXT, "tokens": a.tokens, "rows": rows,
          "other_processes_cores": other.cores()}, a.out, "tp_profile")
    return 0


if __name__ == "__main__":
    from bench.timed import bench_main
    raise SystemExit(bench_main(__doc__, add_args, run))
