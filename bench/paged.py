"""The paged KV cache against the fixed slots it replaced, side by side in one run.

SmolLM2 at TP=2 as `deploy/smollm2.yaml` serves it (ladder:24-29, the even head split, one
thread a rank), float32. Parts (all when none is named):

  layout       decode tokens/s with blocks of 16 against one block of max_seq a sequence (the
               fixed slot layout of before, read by the same kernel), one stream and 16
               streams (`--streams-16`), interleaved `--reps` times: paged / fixed, target >= 0.95
  concurrency  the served default's KV memory (16 sequences of 2048 tokens) with 200-token
               chats (`--chat-prompt` prompt tokens + the rest generated): how many run at once
               (the most rows of one decode step with prompts admitted whole; before: 16
               slots, target >= 4x; and with the served chunked prefill, whose step budget
               paces admission), and the aggregate decode tokens/s of 64 streams against 16
               (target >= 1.5x)
  prefix       a 1,000-token system prompt: the time to first token of a request after another
               with the same system prompt, against the first's (target >= 5x), and the hit rate
  chunked      8 streams decode; a `--long`-token prompt arrives: the longest gap between two
               tokens of a stream against their median gap while no prompt is prefilled beside
               them (their own pace; target <= 3x), per setting of
               max_num_batched_tokens in `--budgets` (0: chunked prefill off, the whole prompt
               in one step), and the long prompt's time to first token

Prints a table per part and one JSON line (`--out DIR` also writes it there).
"""

from __future__ import annotations

import asyncio
import time

from bench.table import table
from bench.timed import OtherLoad, emit, log, median
from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.options import GroupOptions

SERVED = dict(model="smollm2", tp=2, residual="ladder:24-29", head_split="even", threads=1,
              dtype="float32", max_seq=2048)
TARGETS = {"layout": 0.95, "concurrency": 4.0, "throughput_64_over_16": 1.5, "prefix_ttft": 5.0,
           "chunked_gap": 3.0}


def add_args(p) -> None:
    p.add_argument("--parts", default="layout,concurrency,prefix,chunked")
    p.add_argument("--budgets", default="0,16,24,32", help="max_num_batched_tokens (chunked)")
    p.add_argument("--long", type=int, default=1500, help="the late prompt's tokens (chunked)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=24, help="new tokens a stream (layout)")
    p.add_argument("--chat-prompt", type=int, default=40, help="prompt tokens of a 200-token chat")
    p.add_argument("--chats", type=int, default=80, help="chats submitted at once")
    p.add_argument("--system", type=int, default=1000, help="system prompt tokens (prefix)")
    p.add_argument("--out", default=None)


def served_kv_bytes() -> int:
    """The KV bytes a rank of the served default holds: 16 slots of 2048 tokens."""
    from ladder.engine.build import kv_block_bytes
    from ladder.loaders import open_checkpoint
    opts = GroupOptions(**SERVED)
    return 16 * 2048 // opts.block_size * kv_block_bytes(opts, open_checkpoint("smollm2").config)


def prompt(i: int, n: int) -> list[int]:
    return [(37 * i + 11 * j) % 40000 + 100 for j in range(n)]


def decode_tok_s(g: LocalTPGroup, prompts, n: int) -> float:
    """Aggregate tokens/s of the decode steps that ran every prompt's row at once."""
    t0 = time.time()
    g.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)]
               * len(prompts))
    steps = [s["step_s"] for s in asyncio.run(g.stats(since=t0))["steps"]
             if s["kind"] == "decode" and s["rows"] == len(prompts)]
    return len(prompts) / median(steps)


def layout(a) -> dict:
    # every prompt in before the first decode step (no chunked prefill): steps of all rows
    groups = {"paged": dict(block_size=16, max_num_batched_tokens=0),
              "fixed": dict(block_size=2048, max_num_batched_tokens=0)}
    got = {(k, s): [] for k in groups for s in (1, 16)}
    opened = {k: LocalTPGroup(GroupOptions(**SERVED, n_slots=16, **v)) for k, v in groups.items()}
    try:
        for rep in range(a.reps):
            order = list(groups) if rep % 2 == 0 else list(groups)[::-1]
            for k in order:
                for s in (1, 16):
                    got[(k, s)].append(decode_tok_s(opened[k], [prompt(i, 32) for i in range(s)],
                                                    a.tokens))
            log(f"layout rep {rep + 1}/{a.reps}")
    finally:
        for g in opened.values():
            g.shutdown()
    out = {f"{k}_{s}": median(v) for (k, s), v in got.items()}
    for s in (1, 16):
        out[f"ratio_{s}"] = out[f"paged_{s}"] / out[f"fixed_{s}"]
    return out


def concurrency(a) -> dict:
    kv = served_kv_bytes()
    new = 200 - a.chat_prompt
    most, wall = {}, {}
    # twice: prompts admitted whole (what the memory holds), then in the served default's
    # chunks (its step budget admits a few prompts a step, so the first chats finish before the
    # last start: the faster the decode steps, the fewer are seen at once)
    for budget in (0, None):
        extra = {} if budget is None else {"max_num_batched_tokens": budget}
        with LocalTPGroup(GroupOptions(**SERVED, n_slots=a.chats, kv_cache_bytes=kv,
                                       **extra)) as g:
            asyncio.run(g.stats())
            t0 = time.perf_counter()
            g.generate([prompt(i, a.chat_prompt) for i in range(a.chats)],
                       [SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)]
                       * a.chats)
            key = "whole" if budget == 0 else "chunked"
            wall[key] = time.perf_counter() - t0
            st = asyncio.run(g.stats())
            most[key] = max((s["rows"] for s in st["steps"] if s["kind"] == "decode"),
                            default=0)
            if budget == 0:
                kvs = st["kv_cache"]
    tput = {}
    with LocalTPGroup(GroupOptions(**SERVED, n_slots=64, kv_cache_bytes=kv,
                                   max_num_batched_tokens=0)) as g:
        for rep in range(a.reps):
            for s in ((64, 16) if rep % 2 == 0 else (16, 64)):
                tput.setdefault(s, []).append(
                    decode_tok_s(g, [prompt(1000 + i, 32) for i in range(s)], a.tokens))
            log(f"throughput rep {rep + 1}/{a.reps}")
    return {"kv_bytes_per_rank": kv, "blocks": kvs["blocks"], "chats": a.chats,
            "chat_tokens": 200, "most_at_once": most["whole"],
            "over_16_slots": most["whole"] / 16, "most_at_once_chunked": most["chunked"],
            "preemptions": kvs["preemptions"], "wall_s": wall,
            "tok_s_64": median(tput[64]), "tok_s_16": median(tput[16]),
            "throughput_64_over_16": median(tput[64]) / median(tput[16])}


def prefix(a) -> dict:
    system = prompt(7, a.system)
    ttft = {"first": [], "second": []}
    with LocalTPGroup(GroupOptions(**SERVED, n_slots=16)) as g:
        for rep in range(a.reps):
            sys_r = [t + rep for t in system]  # a new system prompt each rep: a cold first
            for k, q in (("first", [5, 6, 7, 8]), ("second", [9, 10, 11])):
                r = g.generate([sys_r + q], [SamplingParams(max_tokens=2, temperature=0)])[0]
                ttft[k].append(r["stats"].ttft_s)
            log(f"prefix rep {rep + 1}/{a.reps}")
        kv = asyncio.run(g.stats())["kv_cache"]
    return {"system_tokens": a.system, "ttft_first_s": median(ttft["first"]),
            "ttft_second_s": median(ttft["second"]),
            "speedup": median(ttft["first"]) / median(ttft["second"]),
            "hit_rate": kv["hit_rate"], "hit_tokens": kv["hit_tokens"]}


async def _gaps(g: LocalTPGroup, a, rep: int = 0) -> dict:
    n_streams, warm = 8, 16
    left = a.long // 8 + 40  # tokens a stream still makes after the long prompt arrives
    streams = await g.open_many(
        [prompt(i, 32) for i in range(n_streams)],
        [SamplingParams(max_tokens=warm + left, temperature=0, ignore_eos=True)] * n_streams)
    stamps: list[list[float]] = [[] for _ in streams]

    async def follow(i, s) -> None:
        async for ev in s:
            if ev.token_id is not None:
                stamps[i].append(time.perf_counter())

    tasks = [asyncio.create_task(follow(i, s)) for i, s in enumerate(streams)]
    while min(map(len, stamps)) < warm:
        await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    first = None
    long = prompt(999 + rep, a.long)  # a new one each rep: nothing of it cached
    async for ev in await g.open(long, SamplingParams(max_tokens=2, temperature=0)):
        first = first or time.perf_counter()
    await asyncio.gather(*tasks)
    pairs = [(x, b) for st in stamps for x, b in zip(st, st[1:])]
    gaps = [b - x for x, b in pairs]
    # the streams' own pace: gaps while no prompt is being prefilled beside them
    alone = [b - x for x, b in pairs if b <= t0 or x >= first]
    return {"max_gap_s": max(gaps), "median_gap_s": median(alone),
            "gap_ratio": max(gaps) / median(alone), "median_all_gaps_s": median(gaps),
            "long_ttft_s": first - t0}


def chunked(a) -> dict:
    out = {}
    for budget in [int(x) for x in a.budgets.split(",")]:
        with LocalTPGroup(GroupOptions(**SERVED, n_slots=16,
                                       max_num_batched_tokens=budget)) as g:
            runs = [asyncio.run(_gaps(g, a, rep)) for rep in range(a.reps)]
        out[str(budget)] = {k: median([r[k] for r in runs]) for k in runs[0]}
        log(f"chunked budget {budget}: {out[str(budget)]}")
    return {"long_tokens": a.long, "streams": 8, "by_budget": out}


def run(a) -> int:
    parts = a.parts.split(",")
    other = OtherLoad(tree=True)
    result = {"bench": "paged", "targets": TARGETS}
    if "layout" in parts:
        r = result["layout"] = layout(a)
        print(table("Decode tokens/s: blocks of 16 against one block a sequence (before)",
                    ["streams", "paged", "fixed", "paged / fixed"],
                    [[s, f"{r[f'paged_{s}']:.1f}", f"{r[f'fixed_{s}']:.1f}",
                      f"{r[f'ratio_{s}']:.3f}"] for s in (1, 16)]))
    if "concurrency" in parts:
        r = result["concurrency"] = concurrency(a)
        print(table("Concurrency in the served default's KV memory (16 x 2048 tokens a rank)",
                    ["chats", "blocks", "most at once", "over 16 slots", "chunked: at once",
                     "preemptions", "tok/s 64 streams", "tok/s 16", "64 / 16"],
                    [[r["chats"], r["blocks"], r["most_at_once"], f"{r['over_16_slots']:.1f}",
                      r["most_at_once_chunked"], r["preemptions"], f"{r['tok_s_64']:.1f}",
                      f"{r['tok_s_16']:.1f}", f"{r['throughput_64_over_16']:.2f}"]]))
    if "prefix" in parts:
        r = result["prefix"] = prefix(a)
        print(table(f"Prefix caching: a {r['system_tokens']}-token system prompt",
                    ["TTFT first s", "TTFT second s", "first / second", "hit rate"],
                    [[f"{r['ttft_first_s']:.3f}", f"{r['ttft_second_s']:.3f}",
                      f"{r['speedup']:.1f}", f"{r['hit_rate']:.2f}"]]))
    if "chunked" in parts:
        r = result["chunked"] = chunked(a)
        print(table(f"Chunked prefill: 8 streams decode, a {r['long_tokens']}-token prompt "
                    "arrives", ["max_num_batched_tokens", "median gap ms", "longest gap ms",
                                "longest / median", "its TTFT s"],
                    [[b, f"{x['median_gap_s'] * 1e3:.1f}", f"{x['max_gap_s'] * 1e3:.1f}",
                      f"{x['gap_ratio']:.1f}", f"{x['long_ttft_s']:.2f}"]
                     for b, x in r["by_budget"].items()]))
    result["other_processes_cores"] = other.cores()
    emit(result, a.out, "paged")
    return 0


if __name__ == "__main__":
    from bench.timed import bench_main
    raise SystemExit(bench_main(__doc__, add_args, run))
