"""N concurrent streaming chat completions against an OpenAI-compatible server: TTFT, time per
output token, aggregate tokens/s, measured by the client from the arrival of streamed tokens.

Usable against any such server (vLLM, our own Serve ingress):

    python -m bench.openai_stream --base-url http://127.0.0.1:8000/v1 --model M --streams 16

Per stream: TTFT = first content chunk - request sent; TPOT = (last chunk - first chunk) /
(tokens - 1), tokens counted by the server's usage report (one content chunk may carry more than
one token). Aggregate tokens/s = all completion tokens / (last chunk of any stream - all requests
sent), prefill included. The same `summarize` turns our engine's streamed-token stamps into the
same figures, so both sides are measured alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass

PROMPT = ("Explain in two sentences why overlapping communication with compute speeds up "
          "tensor-parallel inference.")


@dataclass
class Stream:
    sent: float  # perf_counter when the request was sent
    stamps: list[float]  # perf_counter of each chunk carrying content
    tokens: int  # completion tokens (usage report, else content chunks)
    prompt_tokens: int = 0  # as the usage report says (0 without one)
    cached_tokens: int = 0  # of which served from the prefix cache (usage.prompt_tokens_details)


@dataclass
class StreamStats:
    streams: int
    tokens: int  # completion tokens, all streams
    ttft_s: float  # median over streams
    tpot_s: float  # median over streams of (last - first) / (tokens - 1)
    aggregate_tok_s: float  # all tokens / (last token of any stream - start)
    wall_s: float


def summarize(start: float, streams: list[Stream]) -> StreamStats:
    if not streams or any(len(s.stamps) < 2 or s.tokens < 2 for s in streams):
        raise RuntimeError("a stream ended with fewer than two tokens: nothing to time")
    end = max(s.stamps[-1] for s in streams)
    tokens = sum(s.tokens for s in streams)
    return StreamStats(
        streams=len(streams), tokens=tokens,
        ttft_s=statistics.median(s.stamps[0] - s.sent for s in streams),
        tpot_s=statistics.median((s.stamps[-1] - s.stamps[0]) / (s.tokens - 1) for s in streams),
        aggregate_tok_s=tokens / (end - start), wall_s=end - start)


async def one_stream(client, model: str, prompt: str, max_tokens: int, extra_body: dict,
                     system: str | None = None) -> Stream:
    sent = time.perf_counter()
    stamps, chunks, usage = [], 0, None
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body=extra_body)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            chunks += 1
    if usage is None:
        return Stream(sent=sent, stamps=stamps, tokens=chunks)
    details = getattr(usage, "prompt_tokens_details", None)
    return Stream(sent=sent, stamps=stamps, tokens=usage.completion_tokens,
                  prompt_tokens=usage.prompt_tokens,
                  cached_tokens=getattr(details, "cached_tokens", 0) or 0)


async def _run(base_url: str, model: str, prompt: str, n: int, max_tokens: int,
               extra_body: dict, timeout_s: float) -> StreamStats:
    from openai import AsyncOpenAI
    async with AsyncOpenAI(base_url=base_url, api_key="EMPTY", timeout=timeout_s,
                           max_retries=0) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(client, model, prompt, max_tokens, extra_body)
                                         for _ in range(n)))
    return summarize(start, list(streams))


def run_streams(base_url: str, model: str, *, prompt: str = PROMPT, n: int = 1,
                max_tokens: int = 128, extra_body: dict | None = None,
                timeout_s: float = 600.0) -> StreamStats:
    """`n` concurrent streaming chat requests of the same prompt; greedy."""
    return asyncio.run(_run(base_url, model, prompt, n, max_tokens, extra_body or {}, timeout_s))


def forced_length(tokens: int) -> dict:
    """Extra request fields that make a vLLM-style server produce exactly `tokens` tokens."""
    return {"ignore_eos": True, "min_tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="send ignore_eos/min_tokens so every stream runs to --max-tokens")
    a = ap.parse_args()
    st = run_streams(a.base_url, a.model, prompt=a.prompt, n=a.streams, max_tokens=a.max_tokens,
                     extra_body=forced_length(a.max_tokens) if a.ignore_eos else None)
    print(f"streams {st.streams}  tokens {st.tokens}  TTFT {st.ttft_s * 1e3:.1f} ms  "
          f"TPOT {st.tpot_s * 1e3:.2f} ms  aggregate {st.aggregate_tok_s:.1f} tok/s")
    print(json.dumps(asdict(st)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
