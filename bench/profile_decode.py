"""Where a decode step's time goes: the engine's profile at TP=1 on SmolLM2.

`--batch B` decodes B copies of the prompt together (B slots), as the 16-stream benchmark does;
the per-token columns are then per decode step (B output tokens).

Runs the engine in this process (no group processes: a TP=1 shard with no communicator, as a
rank builds it), greedy, N new tokens forced, after a warm-up, and prints
- torch.profiler's operator table (self CPU time, sorted; the one prefill step is in it too,
  small beside the N - 1 decode steps), and the decode weight matmuls by shape with the
  bandwidth each reaches;
- cProfile's top Python functions by own time (the interpreter overhead around the operators);
- the engine's decode time per token and its share of the wall time per token.
Ends with one JSON line: the top operators' share of decode time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import torch

from bench.table import table
from bench.timed import OtherLoad, log
from ladder.engine.build import build_engine
from ladder.engine.leader import Leader
from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import Request
from ladder.links.base import NoComm
from ladder.options import GroupOptions

PROMPT = ("Explain in two sentences why overlapping communication with compute speeds up "
          "tensor-parallel inference.")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "q8_0", "q4_1"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--batch", type=int, default=1,
                   help="requests decoded together (one slot each), as the 16-stream benchmark")


def generate(scheduler, prompt: list[int], n: int, batch: int = 1) -> None:
    """`batch` requests of `n` tokens, stepped on this thread (the profiler sees the steps)."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        scheduler.add(Request(prompt=list(prompt), params=params))
    while scheduler.has_work():
        scheduler.step()


def native_products(model, rows: int, elsize: int) -> list[dict]:
    """The weight products that ladder.native computes (C calls, invisible to the torch
    profiler), timed outside decode: every layer's copy of each weight once per pass, as a
    decode step reads them, with `rows` rows of input."""
    from ladder.native.layouts import FastLinear
    by_shape: dict[tuple[int, int], list] = {}
    for m in model.modules():
        if isinstance(m, FastLinear) and m.mode == "native":
            by_shape.setdefault((m.in_features, m.out_features), []).append(m)
    out = []
    for (in_f, out_f), mods in by_shape.items():
        x = torch.randn(rows, in_f).to(mods[0].weight.dtype)
        for m in mods:
            m(x)
        t0, reps = time.perf_counter(), 5
        for _ in range(reps):
            for m in mods:
                m(x)
        per_call = (time.perf_counter() - t0) / (reps * len(mods))
        out.append({"weight": f"{in_f}x{out_f}", "kernel": "ladder.native",
                    "calls_per_token": len(mods), "us_per_token": per_call * len(mods) * 1e6,
                    "gb_s": in_f * out_f * elsize / per_call / 1e9})
    return out


def torch_profile(engine, decode, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The torch operators by self CPU time; the weight matmuls with the bandwidth each reaches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    elsize = torch.tensor([], dtype=engine.dtype).element_size()
    mms = []  # the weight matmuls by shape, with the bandwidth each reaches
    for e in prof.key_averages(group_by_input_shape=True):
        shapes = e.input_shapes
        if (e.key not in ("aten::mm", "mkldnn::_linear_pointwise") or len(shapes) < 2
                or len(shapes[1]) != 2 or shapes[0][0] != args.batch):
            continue  # decode only: one row per request in
        in_f, out_f = shapes[1] if e.key == "aten::mm" else shapes[1][::-1]  # packed: [out, in]
        nbytes = in_f * out_f * elsize
        mms.append({"weight": f"{in_f}x{out_f}", "kernel": e.key.split("::")[1],
                    "calls_per_token": e.count / args.tokens,
                    "us_per_token": e.self_cpu_time_total / args.tokens,
                    "gb_s": nbytes * e.count / (e.self_cpu_time_total * 1e-6) / 1e9})
    mms += native_products(engine.model, args.batch, elsize)
    mms.sort(key=lambda m: m["us_per_token"], reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "calls_per_token": e.count / args.tokens,
            "self_us_per_token": e.self_cpu_time_total / args.tokens,
            "share": e.self_cpu_time_total / total_us} for e in events[:args.top]]
    return ops, mms


def python_profile(decode, args: argparse.Namespace) -> list[dict]:
    """The Python functions by own time (cProfile)."""
    pr = cProfile.Profile()
    pr.enable()
    decode()
    pr.disable()
    stats = pstats.Stats(pr, stream=io.StringIO())
    funcs = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:args.top]
    return [{"function": f"{fn[0].rsplit('/', 1)[-1]}:{fn[1]}({fn[2]})",
             "calls_per_token": st[1] / args.tokens, "own_us_per_token": 1e6 * st[2] / args.tokens}
            for fn, st in funcs]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    other = OtherLoad()
    opts = GroupOptions(model="smollm2", tp=1, dtype=args.dtype, n_slots=args.batch, max_seq=512)
    ckpt, engine = build_engine(opts, 0, NoComm())
    leader = Leader.for_checkpoint(ckpt, engine)  # not started: its scheduler runs here
    prompt = leader.encode_chat([{"role": "user", "content": PROMPT}])
    log(f"SmolLM2 TP=1 {args.dtype}, {args.threads} threads, {args.tokens} tokens, batch {args.batch}")
    generate(leader.scheduler, prompt, 8, args.batch)  # warm-up

    def decode() -> None:
        generate(leader.scheduler, prompt, args.tokens, args.batch)

    engine.timing = type(engine.timing)()
    t0 = time.perf_counter()
    decode()
    wall = time.perf_counter() - t0
    tm = engine.timing
    per_token = tm.decode_s / tm.decode_tokens
    ops, mms = torch_profile(engine, decode, args)
    py = python_profile(decode, args)

    print(table(f"torch operators by self CPU time ({args.tokens} tokens, {args.dtype})",
                ["operator", "calls/token", "self us/token", "share"],
                [[o["op"], o["calls_per_token"], o["self_us_per_token"], o["share"]]
                 for o in ops]))
    print()
    print(table("weight matmuls (one row per request in) by weight shape [in x out]; "
                "ladder.native's timed apart (not torch operators)",
                ["weight", "kernel", "calls/token", "us/token", "GB/s"],
                [[m["weight"], m["kernel"], m["calls_per_token"], m["us_per_token"], m["gb_s"]]
                 for m in mms]))
    print()
    print(table("Python functions by own time (cProfile; its overhead inflates small calls)",
                ["function", "calls/token", "own us/token"],
                [[p["function"], p["calls_per_token"], p["own_us_per_token"]] for p in py]))
    print()
    result = {"bench": "profile_decode", "dtype": args.dtype, "threads": args.threads,
              "tokens": args.tokens, "batch": args.batch, "decode_ms_per_token": 1e3 * per_token,
              "wall_ms_per_token": 1e3 * wall / args.tokens, "ops": ops, "weight_matmuls": mms, "python": py,
              "other_processes_cores": other.cores()}
    print(f"engine decode {1e3 * per_token * args.batch:.2f} ms/step of {args.batch} rows "
          f"({1 / per_token:.1f} tokens/s), wall {1e3 * wall / args.tokens:.2f} ms/step; "
          f"other processes used {result['other_processes_cores']:.2f} cores\n")
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
