"""Sampled decode against greedy at TP=2: what drawing tokens costs, per link and batch size.

SmolLM2 float32 at TP=2 over `tcp`, on loopback and (as root) between two network namespaces
joined by a veth pair shaped like each other link named (`cheap`: 1 Gbit/s, MTU 9000, as
`ladder cluster up` makes them). Per link and batch size in `--batches`, the same prompts decode
`--tokens` new tokens a row in three ways, interleaved `--reps` times (the order reversed every
other rep), medians:

  greedy    temperature 0: each rank's best (value, id) per row crosses the link
  sampled   temperature 1, nothing cut (the OpenAI API's defaults)
  top-p     temperature 0.7, top_p 0.9
  penalized temperature 1 with presence 0.5, frequency 0.5, repetition 1.2 and a logit_bias of
            eight tokens (ladder.engine.penalties): its time over sampled's is the penalties'
            cost (target <= 1.1)
  json      temperature 1 under a JSON schema (ladder.engine.guided: an array of at least 64
            objects of a string, an integer, an enum and a boolean, so that no row ends early):
            its time over sampled's is structured output's cost (target <= 1.3)

Reported: the leader's decode step, whole (what a token costs a request: the plan's broadcast,
the forward, the choice, and the scheduler's own work on the rows, where a grammar's matcher
advances), per step (a step decodes one token of every row), the
all-reduce bytes a step beyond greedy's, and each sampled way's time over greedy's. Sampling runs on the ranks
(`ladder.engine.vocab.sample`): a step moves each rank's logsumexp and largest values, not
the logits (V x 4 bytes a row, 192 KiB for SmolLM2).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from contextlib import ExitStack

from bench.table import table
from bench.timed import csv, csv_ints, emit, log, median
from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.links.netns import Namespaces
from ladder.options import GroupOptions

WAYS = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=1.0),
    "top-p": dict(temperature=0.7, top_p=0.9),
    "penalized": dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5,
                      repetition_penalty=1.2, logit_bias=tuple((t, 1.0) for t in range(8))),
    "json": dict(temperature=1.0),  # and SCHEMA's grammar (`_params`)
}
PENALTY_TARGET = 1.1  # penalized over sampled
JSON_TARGET = 1.3  # json over sampled
SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "additionalProperties": False,
    "required": ["name", "count", "kind", "ok"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "count": {"type": "integer"},
                   "kind": {"enum": ["robot", "painter", "canvas"]}, "ok": {"type": "boolean"}}}}
PROMPT = "Write a short story about a robot who learns to paint."


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--links", default="loopback,cheap",
                   help="loopback and/or a profile for a shaped veth pair (needs root)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--tokens", type=int, default=16, help="new tokens a row")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", help="write the JSON line here")


@functools.cache
def _grammar() -> str:
    from deploy.structured import grammar
    return grammar(SCHEMA, "bench")


def _params(way: str, n: int, tokens: int) -> list[SamplingParams]:
    extra = {"grammar": _grammar()} if way == "json" else {}
    return [SamplingParams(max_tokens=tokens, ignore_eos=True, seed=1000 + i, **WAYS[way],
                           **extra) for i in range(n)]


def _one(g: LocalTPGroup, ids: list[int], way: str, n: int, tokens: int) -> tuple[float, float]:
    """(the leader's decode seconds per step, all-reduce bytes per step) of one run of `n`
    rows."""
    g.reset_timing()
    t0 = time.time()
    res = g.generate([ids] * n, _params(way, n, tokens))
    if [len(r["tokens"]) for r in res] != [tokens] * n:
        raise RuntimeError(f"{way}: expected {tokens} tokens a row, got "
                           f"{[len(r['tokens']) for r in res]}")
    steps = [s["step_s"] for s in asyncio.run(g.stats(since=t0))["steps"]
             if s["kind"] == "decode" and s["rows"] == n]
    t = g.timing()
    return sum(steps) / len(steps), t.bytes / t.steps


def run(a: argparse.Namespace) -> int:
    try:
        batches, links = csv_ints("--batches", a.batches), csv(a.links)
        if not links or a.tokens < 2 or a.reps < 1:
            raise ValueError("need a link, --tokens >= 2 and --reps >= 1")
    except ValueError as e:
        print(f"bench sampling: {e}", file=sys.stderr)
        return 2
    rows, skipped = [], {}
    for link in links:
        with ExitStack() as stack:
            spaces, label = None, ""
            if link != "loopback":
                from cluster.links import DEFAULT_MTU, parse_link
                from cluster.network import veth_pair
                from cluster.state import ClusterError
                try:
                    spec = parse_link(link)
                    ns, hosts = stack.enter_context(veth_pair(spec, f"sa{os.getpid() % 10000}",
                                                              DEFAULT_MTU))
                except (ClusterError, ValueError) as e:  # said, not hidden
                    print(f"bench sampling: link {link}: {e}", file=sys.stderr)
                    skipped[link] = str(e)
                    continue
                spaces, label = Namespaces(ns, hosts), f"veth {link}"
            # every way prefills its prompts whole, none from the prefix cache: the steps
            # compared differ only in how they choose tokens
            opts = GroupOptions(model=a.model, tp=2, comm="tcp", threads=1, n_slots=max(batches),
                                max_seq=128 + a.tokens, interconnect=label,
                                prefix_caching=False, max_num_batched_tokens=0)
            g = stack.enter_context(LocalTPGroup(opts, namespaces=spaces))
            ids = g.encode(PROMPT, chat=True)
            for n in batches:
                log(f"{link}, batch {n}: {a.reps} x {len(WAYS)} runs of {a.tokens} tokens")
                for way in WAYS:  # warm-up
                    _one(g, ids, way, n, 2)
                got: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
                for rep in range(a.reps):
                    for way in list(WAYS) if rep % 2 == 0 else list(WAYS)[::-1]:
                        got[way].append(_one(g, ids, way, n, a.tokens))
                ms = {w: 1e3 * median(x[0] for x in v) for w, v in got.items()}
                rows.append({"link": link, "batch": n,
                             "ms_per_step": ms,
                             "range_ms": {w: 1e3 * (max(x[0] for x in v) - min(x[0] for x in v))
                                          for w, v in got.items()},
                             # over greedy's: the same prompts and module all-reduces
                             "extra_bytes_per_step": {
                                 w: median(x[1] for x in v) - median(x[1] for x in got["greedy"])
                                 for w, v in got.items()},
                             "over_greedy": {w: ms[w] / ms["greedy"] for w in WAYS},
                             "penalized_over_sampled": ms["penalized"] / ms["sampled"],
                             "json_over_sampled": ms["json"] / ms["sampled"]})
    print(table(f"TP=2 {a.model} float32 over tcp, {a.tokens} new tokens a row: decode ms per "
                f"step (medians of {a.reps} interleaved reps); all-reduce KiB a step more than "
                "greedy's",
                ["link", "batch", "way", "ms/step", "range ms", "+KiB/step", "over greedy"],
                [[r["link"], r["batch"], w, r["ms_per_step"][w], r["range_ms"][w],
                  r["extra_bytes_per_step"][w] / 1024, f"{r['over_greedy'][w]:.2f}"]
                 for r in rows for w in WAYS], digits=2))
    for r in rows:
        print(f"{r['link']}, batch {r['batch']}: penalized over sampled "
              f"{r['penalized_over_sampled']:.3f} (target <= {PENALTY_TARGET}); json over "
              f"sampled {r['json_over_sampled']:.3f} (target <= {JSON_TARGET})")
    emit({"bench": "sampling", "penalty_target": PENALTY_TARGET, "json_target": JSON_TARGET,
          "model": a.model, "tokens": a.tokens, "reps": a.reps,
          "rows": rows, "skipped": skipped}, a.out, "sampling")
    return 0 if rows else 1


def main() -> int:
    from bench.timed import bench_main
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
