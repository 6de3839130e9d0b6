"""What recording the Prometheus metrics costs per decode token.

Two TP=2 groups of Ray actors with the same options (SmolLM2, `ladder:24-29`, shared memory,
one thread per rank), one recording the group's metrics through Ray's metrics API and one not,
decode the same greedy 128 tokens; the wall time between streamed tokens at the caller, medians
of interleaved repetitions (A B, B A, ...). Target: metrics on <= 1.02x metrics off. The groups
run one at a time (the idle one only heartbeats). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time

from bench.table import table
from bench.timed import bench_main, emit, log, median

TARGET = 1.02
PROMPT = ("Explain in two sentences why overlapping communication with compute speeds up "
          "tensor-parallel inference.")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="also write the JSON line to DIR/metrics_cost-<time>.json")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import ray

    from actors.group import TPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.options import GroupOptions
    opts = GroupOptions(model="smollm2", tp=2, residual="ladder:24-29", comm="shm", threads=1,
                        n_slots=4, max_seq=512)
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        log("starting two groups: metrics on, metrics off")
        on = TPGroup(opts, name="metrics-on", metrics=True)
        off = TPGroup(opts, name="metrics-off", metrics=False)
        try:
            prompt = on.encode(PROMPT, chat=True)

            def per_token(g) -> float:
                async def go():
                    return [time.perf_counter() async for ev in g.stream(prompt, sp)
                            if ev.token_id is not None]
                st = asyncio.run(go())
                return (st[-1] - st[0]) / (len(st) - 1)

            per_token(on), per_token(off)  # warm-up
            t_on, t_off = [], []
            for rep in range(args.reps):
                for g in ((on, off) if rep % 2 == 0 else (off, on)):
                    (t_on if g is on else t_off).append(per_token(g))
        finally:
            on.shutdown()
            off.shutdown()
    finally:
        ray.shutdown()
    ratio = median(t_on) / median(t_off)
    print(table(f"Metrics cost: TP=2 SmolLM2 ladder:24-29, shm, greedy {args.tokens} tokens, "
                f"{args.reps} interleaved reps, medians",
                ["group", "ms/token", "ratio", f"<= {TARGET}"],
                [["metrics off", 1e3 * median(t_off), 1.0, None],
                 ["metrics on", 1e3 * median(t_on), ratio, ratio <= TARGET]]))
    emit({"bench": "metrics_cost", "tokens": args.tokens, "reps": args.reps,
          "on_ms_per_token": 1e3 * median(t_on), "off_ms_per_token": 1e3 * median(t_off),
          "ratio": ratio, "target": TARGET}, args.out, "metrics_cost")
    return 0


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    sys.exit(main())
