"""`ladder bench`: the benchmarks of `bench/`, one subcommand each.

Each benchmark module offers `add_args(parser)` and `run(args) -> int` beside its own `main()`
(so `python -m bench.<name>` and `ladder bench <name>` take the same flags); a new benchmark is
one more line in `BENCHES`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "decode": "bench.decode",  # ladder overlap at TP=2, engine vs transformers, bandwidth
    "profile": "bench.profile_decode",  # where a TP=1 decode token's time goes
    "vllm_compare": "bench.vllm_compare",  # our engine vs vLLM's CPU build, 1 and 16 streams
    "serve_load": "bench.serve_load",  # HTTP load test; HTTP vs the TP group per token
    "metrics_cost": "bench.metrics_cost",  # Prometheus metrics on vs off, per token
    "actors": "bench.actors",  # Ray actor groups vs the plain runner; 1/4/16 concurrent streams
    "interconnects": "bench.interconnects",  # ladder vs standard per link on a launched cluster
    "linkcost": "bench.linkcost",  # what a link costs the computing cores, by MTU and size
    "sampling": "bench.sampling",  # sampled decode against greedy at TP=2, per link and batch
    "adapt_curve": "bench.adapt_curve",  # ladder adaptation: perplexity recovery vs tokens
    "adapted_serve": "bench.adapted_serve",  # an adapted folder served: README prompt, TP2 = TP1
    "soak": "bench.soak",  # clients, hostile requests and killed ranks: every request counted
    "plan_check": "bench.plan_check",  # ladder plan's predictions against fresh measurements
    "plan_gpu": "bench.plan_gpu",  # ladder plan --calibrate --device cuda, checked on the GPU
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (prints tables and one JSON line)",
                       description=__doc__.splitlines()[0])
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        b = benches.add_parser(name, help=mod.__doc__.splitlines()[0], description=mod.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(b)
        b.set_defaults(func=mod.run)
