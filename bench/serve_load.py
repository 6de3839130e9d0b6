"""Serving load test of our OpenAI-compatible Serve app, and HTTP overhead per token.

(a) overhead  one stream: time per output token through HTTP (Serve proxy, replica, SSE, the
              official openai client) against the same TP group options called directly
              (`actors.TPGroup.stream` from the driver), interleaved reps, medians; the ratio is
              the serving layer's cost per token. Target: HTTP <= 1.10x the group's own.
(b) load      N concurrent streaming clients issue R requests in all (each client takes the next
              request when its last one ends), like the serving benchmarks users run against
              vLLM: TTFT and TPOT percentiles (p50/p90/p99), request and token throughput,
              failed requests (must be 0). With `--shared-prefix K` every request starts with
              the same system prompt of about K tokens (a shared-prefix workload): the share of
              prompt tokens served from the prefix cache, as the responses' usage reports it.
              `--load-only` skips (a).

Starts its own local Ray instance (token authentication on) and Serve on a free local port;
SmolLM2, TP=2, `ladder:24-29`, shared memory, one replica. With `--url` it starts nothing and
drives a server already running there instead, `ladder serve deploy/smollm2.yaml` for one (the
load part only; `--model`, and `--api-key` or $OPENAI_API_KEY where the server wants a key).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import sys
import time

from bench.openai_stream import PROMPT, forced_length, one_stream, run_streams
from bench.table import table
from bench.timed import bench_main, emit, log, median

TARGETS = {"http_vs_group": 1.10}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (forced)")
    p.add_argument("--overhead-tokens", type=int, default=96)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="a system prompt of about this many tokens, the same for every request")
    p.add_argument("--load-only", action="store_true", help="skip (a), the HTTP overhead")
    p.add_argument("--url", help="drive the server at this base URL (e.g. "
                   "http://127.0.0.1:8000/v1) instead of starting one; (b) only")
    p.add_argument("--model", default="smollm2", help="the model name the server serves")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    p.add_argument("--out", help="also write the JSON line to DIR/serve_load-<time>.json")


def pct(xs: list[float], q: float) -> float:
    if not xs:  # every request failed
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def system_prompt(tokens: int) -> str | None:
    """About `tokens` tokens of a plausible system prompt (SmolLM2's tokenizer: ~1.2 a word)."""
    if not tokens:
        return None
    words = ("You are the support assistant of a bicycle shop. Answer politely, briefly and "
             "only about bicycles, their parts, repairs, prices and opening hours. ").split()
    return " ".join(words[i % len(words)] for i in range(int(tokens / 1.2)))


async def load(base_url: str, model: str, clients: int, requests: int, tokens: int,
               system: str | None = None, api_key: str = "EMPTY") -> dict:
    from openai import AsyncOpenAI
    todo = list(range(requests))
    done, failures = [], []
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=600,
                           max_retries=0) as client:
        async def worker():
            while todo:
                i = todo.pop()
                try:
                    done.append(await one_stream(client, model, f"{PROMPT} ({i})", tokens,
                                                 forced_length(tokens), system=system))
                except Exception as e:  # counted, never hidden
                    failures.append(repr(e))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [s.stamps[0] - s.sent for s in done if s.stamps]
    tpot = [(s.stamps[-1] - s.stamps[0]) / (s.tokens - 1) for s in done if s.tokens > 1]
    toks = sum(s.tokens for s in done)
    prompt = sum(s.prompt_tokens for s in done)
    return {"clients": clients, "requests": requests, "completed": len(done),
            "prompt_tokens": prompt, "cached_tokens": sum(s.cached_tokens for s in done),
            "cached_share": sum(s.cached_tokens for s in done) / prompt if prompt else 0.0,
            "failed": len(failures), "failures": failures[:5], "wall_s": wall,
            "req_s": len(done) / wall, "tok_s": toks / wall, "tokens": toks,
            **{f"ttft_p{q}_s": pct(ttft, q) for q in (50, 90, 99)},
            **{f"tpot_p{q}_s": pct(tpot, q) for q in (50, 90, 99)}}


def stream_overhead(base: str, opts, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds per output token of one stream, over HTTP and from a TP group with the same options
    called directly, `args.reps` times each, interleaved."""
    from actors.group import TPGroup
    from ladder.engine.sampling import SamplingParams
    group = TPGroup(opts, name="direct")
    try:
        n = args.overhead_tokens
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        prompt = group.encode(PROMPT, chat=True)

        def direct() -> float:
            async def go():
                return [time.perf_counter() async for ev in group.stream(prompt, sp)
                        if ev.token_id is not None]
            st = asyncio.run(go())
            return (st[-1] - st[0]) / (len(st) - 1)

        def http() -> float:
            return run_streams(base, "smollm2", n=1, max_tokens=n,
                               extra_body=forced_length(n)).tpot_s

        direct(), http()  # warm-up
        d, h = [], []
        for rep in range(args.reps):
            for f in ((http, direct) if rep % 2 == 0 else (direct, http)):
                (h if f is http else d).append(f())
        log(f"one stream: HTTP {median(h) * 1e3:.1f} ms/token, group {median(d) * 1e3:.1f}")
        return h, d
    finally:
        group.shutdown()


def run(args: argparse.Namespace) -> int:
    if args.url:
        log(f"load on {args.url}: {args.clients} clients, {args.requests} requests x "
            f"{args.tokens} tokens")
        res = asyncio.run(load(args.url, args.model, args.clients, args.requests, args.tokens,
                               system_prompt(args.shared_prefix), args.api_key))
        return report({"bench": "serve_load", "url": args.url, "model": args.model,
                       "shared_prefix": args.shared_prefix, "load": res, "targets": TARGETS},
                      res, args)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import ray
    from ray import serve

    from deploy.server import ServerConfig, build_app
    cfg = {"model": "smollm2", "model_name": "smollm2", "tp": 2, "residual": "ladder:24-29",
           "n_slots": 16, "max_seq": 2048 if args.shared_prefix else 512, "threads": 1}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        log("deploying the Serve app and a TP group with the same options beside it")
        serve.run(build_app({**cfg, "num_replicas": 1}), name="ladder", route_prefix="/")
        h, d = ([], []) if args.load_only else stream_overhead(
            base, ServerConfig.from_dict(cfg).group_options(), args)
        log(f"load: {args.clients} clients, {args.requests} requests x {args.tokens} tokens")
        res = asyncio.run(load(base, "smollm2", args.clients, args.requests, args.tokens,
                               system_prompt(args.shared_prefix)))
    finally:
        serve.shutdown()
        ray.shutdown()
    n = args.overhead_tokens
    out = {"bench": "serve_load", **cfg, "shared_prefix": args.shared_prefix, "load": res,
           "targets": TARGETS}
    if h:
        ratio = median(h) / median(d)
        out.update(overhead_tokens=n, http_ms_per_token=1e3 * median(h),
                   group_ms_per_token=1e3 * median(d), http_vs_group=ratio)
        print(table("(a) One stream, time per output token: HTTP (Serve + SSE + openai client) vs "
                f"the TP group called directly, {n} tokens, {args.reps} interleaved reps",
                ["path", "ms/token", "ratio", f"<= {TARGETS['http_vs_group']}"],
                    [["TP group direct", 1e3 * median(d), 1.0, None],
                     ["HTTP streaming", 1e3 * median(h), ratio,
                      ratio <= TARGETS["http_vs_group"]]]))
        print()
    return report(out, res, args)


def report(out: dict, res: dict, args: argparse.Namespace) -> int:
    """Print (b)'s table and the JSON line; 1 where a request failed."""
    shared = f", a shared {args.shared_prefix}-token system prompt" if args.shared_prefix else ""
    print(table(f"(b) Load: {res['clients']} concurrent streaming clients, {res['requests']} "
                f"requests x {args.tokens} tokens{shared}",
                ["completed", "failed", "req/s", "tok/s", "TTFT p50 ms", "p90", "p99",
                 "TPOT p50 ms", "p90", "p99", "cached"],
                [[res["completed"], res["failed"], res["req_s"], res["tok_s"],
                  1e3 * res["ttft_p50_s"], 1e3 * res["ttft_p90_s"], 1e3 * res["ttft_p99_s"],
                  1e3 * res["tpot_p50_s"], 1e3 * res["tpot_p90_s"], 1e3 * res["tpot_p99_s"],
                  f"{res['cached_share']:.2f}"]]))
    emit(out, args.out, "serve_load")
    return 0 if res["failed"] == 0 else 1


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    sys.exit(main())
