"""Ray actor groups against the plain multi-process runner, and concurrency scaling.

(a) latency   per-token decode latency of a TP=2 group of Ray actors (`actors.TPGroup`, PACK:
              both ranks on this node, shared-memory link) against the plain multi-process
              runner (`ladder.engine.local.LocalTPGroup`, same link), same model, prompt and greedy
              128 tokens: the wall time between streamed tokens as the caller sees them, medians
              of interleaved repetitions (A B, B A, ...). Target: Ray <= 1.15x the runner.
(b) scaling   aggregate tokens/s of the Ray group with 1, 4 and 16 concurrent requests (64 new
              tokens each, greedy, 16 slots): all generated tokens over the wall time from the
              first submission to the last finish (prefills included). Target: 16 >= 5x one.

Starts its own local Ray instance with token authentication on, and stops it at the end. One
JSON line at the end; `--out DIR` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time

from bench.table import table
from bench.timed import OtherLoad, bench_main, emit, log, median

TARGETS = {"ray_vs_runner": 1.15, "scaling_16_vs_1": 5.0}
PROMPT = ("Explain in two sentences why overlapping communication with compute speeds up "
          "tensor-parallel inference.")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--residual", default="ladder:24-29")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per latency run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--scaling-tokens", type=int, default=64)
    p.add_argument("--out", help="also write the JSON line to DIR/actors-<time>.json")


def stream_gaps(events) -> tuple[float, list[int]]:
    """(seconds per token between the first and last streamed token, the tokens)."""
    stamps, toks = [], []
    for t, ev in events:
        if ev.token_id is not None:
            stamps.append(t)
            toks.append(ev.token_id)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), toks


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported: it reads it once
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import ray

    from actors.group import TPGroup
    from ladder.engine.local import LocalTPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.options import GroupOptions
    opts = GroupOptions(model=args.model, tp=2, residual=args.residual, dtype=args.dtype,
                        comm="shm", threads=1, n_slots=16, max_seq=512)
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    other = OtherLoad()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        log("starting the Ray actor group and the plain runner")
        group = TPGroup(opts, strategy="PACK", name="bench")
        local = LocalTPGroup(opts)
        try:
            prompt = local.encode(PROMPT, chat=True)
            ray_s, local_s, same = latency(group, local, prompt, greedy, args.reps)
            local.close()
            scaling = throughput(group, prompt, levels, args.scaling_tokens)
        finally:
            local.close()
            group.shutdown()
    finally:
        ray.shutdown()
    out = report(args, ray_s, local_s, same, scaling, other.cores())
    emit(out, args.out, "actors")
    return 0


def latency(group, local, prompt: list[int], greedy, reps: int
            ) -> tuple[list[float], list[float], bool]:
    """Part (a): seconds per token of the Ray group and of the runner, one per interleaved rep
    (after a warm-up of each), and whether every rep streamed the same tokens from both."""
    def ray_run():
        async def go():
            return [(time.perf_counter(), ev) async for ev in group.stream(prompt, greedy)]
        return stream_gaps(asyncio.run(go()))

    def local_run():
        seen = []
        local.generate([prompt], [greedy],
                       on_event=lambda _, ev: seen.append((time.perf_counter(), ev)))
        return stream_gaps(seen)

    ray_run(), local_run()  # warm-up
    ray_s, local_s, same = [], [], True
    for rep in range(reps):
        order = (ray_run, local_run) if rep % 2 == 0 else (local_run, ray_run)
        got = {}
        for f in order:
            got[f] = f()
        ray_s.append(got[ray_run][0])
        local_s.append(got[local_run][0])
        same = same and got[ray_run][1] == got[local_run][1]
    log(f"latency: ray {median(ray_s) * 1e3:.1f} ms/token, runner {median(local_s) * 1e3:.1f}")
    return ray_s, local_s, same


def throughput(group, prompt: list[int], levels: list[int], tokens: int) -> dict[int, dict]:
    """Part (b): per concurrency level, a burst of that many requests of `tokens` new tokens on
    the Ray group (the first level warmed up once): tokens, wall seconds and tokens/s."""
    from ladder.engine.sampling import SamplingParams
    scaling = {}
    for n in levels:
        sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

        async def burst():
            async def one():
                return sum([1 async for ev in group.stream(prompt, sp)
                            if ev.token_id is not None])
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one() for _ in range(n)))
            return sum(counts), time.perf_counter() - t0

        if n == levels[0]:
            asyncio.run(burst())  # warm-up
        toks, wall = asyncio.run(burst())
        scaling[n] = {"tokens": toks, "wall_s": wall, "tok_s": toks / wall}
        log(f"{n} concurrent: {toks / wall:.1f} tok/s")
    return scaling


def report(args: argparse.Namespace, ray_s: list[float], local_s: list[float], same: bool,
           scaling: dict[int, dict], busy: float) -> dict:
    """Prints both parts' tables; returns the JSON line's content."""
    r = median(ray_s) / median(local_s)
    base = next(iter(scaling.values()))["tok_s"]  # the first level's
    out = {"bench": "actors", "model": args.model, "residual": args.residual, "tp": 2,
           "link": "shm", "dtype": args.dtype, "tokens": args.tokens, "reps": args.reps,
           "ray_ms_per_token": 1e3 * median(ray_s), "runner_ms_per_token": 1e3 * median(local_s),
           "ray_vs_runner": r, "same_tokens": same,
           "scaling": {str(n): {**v, "vs_one": v["tok_s"] / base} for n, v in scaling.items()},
           "targets": TARGETS, "other_processes_cores": busy}
    print(table(
        f"(a) TP=2 decode latency, {args.model} {args.dtype} {args.residual}, shm link, greedy "
        f"{args.tokens} tokens, {args.reps} interleaved reps, medians (wall between streamed "
        "tokens at the caller)",
        ["group", "ms/token", "vs runner", f"<= {TARGETS['ray_vs_runner']}", "same tokens"],
        [["plain multi-process runner", 1e3 * median(local_s), 1.0, None, None],
         ["Ray actors (PACK)", 1e3 * median(ray_s), r, r <= TARGETS["ray_vs_runner"], same]]))
    print()
    print(table(
        f"(b) Ray group aggregate decode throughput, {args.scaling_tokens} new tokens per request",
        ["concurrent requests", "tokens", "wall s", "tok/s", "vs one"],
        [[n, v["tokens"], v["wall_s"], v["tok_s"], v["tok_s"] / base]
         for n, v in scaling.items()]))
    print(f"\nCPU outside this process: {busy:.2f} cores on average (this benchmark's own Ray "
          "workers and runner ranks included: only a figure far above 1 means a busy machine)")
    return out


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    sys.exit(main())
