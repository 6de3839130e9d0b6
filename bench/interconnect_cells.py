"""One cell of `bench.interconnects`: a batch of concurrent requests of one prompt length, timed
on a TP group driven from the bench (`direct_cell`) or through the Serve app's HTTP endpoint
(`serve_cell`). Every request is forced to the same number of new tokens."""

from __future__ import annotations

import asyncio
import json
import statistics
import time


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random
    rnd = random.Random(seed)
    return [rnd.randrange(3, vocab) for _ in range(n)]


async def direct_cell(group, batch: int, plen: int, tokens: int, vocab: int) -> dict:
    from ladder.engine.sampling import SamplingParams
    sp = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0.0)
    since = time.time()
    t0 = time.perf_counter()

    async def one(i: int) -> tuple[float, int]:
        first, n = None, 0
        async for ev in group.stream(prompt_ids(plen, vocab, i), sp):
            if ev.token_id is not None:
                n += 1
                first = first or time.perf_counter()
        return first - t0, n

    res = await asyncio.gather(*(one(i) for i in range(batch)))
    wall = time.perf_counter() - t0
    steps = [s for s in (await group.stats(since))["steps"] if s["kind"] == "decode"]
    full = [s for s in steps if s["rows"] == batch]
    if not full:  # e.g. admitted in chunks: the first ended before the last began
        raise RuntimeError(f"no decode step ran all {batch} rows: run the group with whole-"
                           "prompt admission (max_num_batched_tokens=0) and that many slots")
    return {"ms_per_token": 1e3 * statistics.median(s["step_s"] for s in full),
            "exposed_ms": 1e3 * statistics.median(s["exposed_s"] for s in full),
            "ttft_ms": 1e3 * statistics.median(r[0] for r in res),
            "tok_s": sum(r[1] for r in res) / wall}


def serve_cell(base: str, model: str, batch: int, plen: int, tokens: int, vocab: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import requests

    def one(i: int) -> tuple[float, list[float], int]:
        body = {"model": model, "prompt": prompt_ids(plen, vocab, i), "max_tokens": tokens,
                "min_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        stamps, usage = [], None
        # a stalled stream fails the cell within the read timeout instead of hanging the run
        with requests.post(f"{base}/v1/completions", json=body, stream=True,
                           timeout=(10, 120)) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        stamps.append(time.perf_counter())
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
        # a chunk carries one token's text, or more when a token ends mid-character: the
        # server's token count (usage) divides the streaming time
        return sent, stamps, usage or len(stamps)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        res = list(pool.map(one, range(batch)))
    if any(len(s) < 2 or n < 2 for _, s, n in res):
        raise RuntimeError("a stream ended with fewer than two tokens: nothing to time")
    wall = max(s[-1] for _, s, _ in res) - t0
    return {"ms_per_token": 1e3 * statistics.median((s[-1] - s[0]) / (n - 1)
                                                    for _, s, n in res),
            "ttft_ms": 1e3 * statistics.median(s[0] - sent for sent, s, _ in res),
            "tok_s": sum(n for _, _, n in res) / wall}
