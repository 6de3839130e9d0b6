"""`ladder generate`: text from a model on a local TP group, no Ray.

Prints the generated text to stdout as it is produced and a one-line timing summary to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from ladder.engine.group import GroupError
from ladder.engine.scheduler import RequestError
from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.model.tp import HEAD_SPLITS
from ladder.options import COMMS, DTYPES, QUANT_DTYPES, GroupOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on a local tensor-parallel group",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--min-tokens", type=int, default=0)
    p.set_defaults(func=run)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2, a Hugging Face checkpoint folder, or a .gguf file")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (processes)")
    p.add_argument("--residual", default=None,
                   help="standard | ladder | ladder:A-B[,C] | parallel | desync (default: the "
                   "checkpoint's own plan where it records one, else standard)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES) + list(QUANT_DTYPES))
    p.add_argument("--comm", default="auto", choices=COMMS,
                   help="how ranks all-reduce (auto: none at TP=1, nccl on CUDA, else shm; tcp: "
                   "TCP progressed by the ranks; gloo: torch.distributed's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--latency-us", type=float, default=0.0,
                   help="emulated link latency per all-reduce, microseconds (emulation)")
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores/tp)")
    p.add_argument("--head-split", default="groups", choices=HEAD_SPLITS,
                   help="groups: attention heads split by KV-head groups; even: query heads split "
                   "evenly, a KV head shared by two ranks held by both (faster where the KV "
                   "heads do not divide evenly, e.g. SmolLM2 at TP=2)")


def group_options(args: argparse.Namespace, **kw) -> GroupOptions:
    return GroupOptions(model=args.model, tp=args.tp, residual=args.residual, dtype=args.dtype,
                        comm=args.comm, device=args.device, latency_s=args.latency_us * 1e-6, max_seq=args.max_seq,
                        threads=args.threads, head_split=args.head_split, **kw)


def run(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                stop=tuple(args.stop), min_tokens=args.min_tokens)
        opts = group_options(args, n_slots=1)
    except ValueError as e:
        print(f"ladder generate: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        with LocalTPGroup(opts) as group:
            prompt = group.encode(args.prompt, chat=args.chat)
            seen: dict[str, float] = {}

            def show(_, ev) -> None:
                seen.setdefault("first", time.perf_counter())
                sys.stdout.write(ev.text)
                sys.stdout.flush()

            n = len(group.generate([prompt], [params], on_event=show)[0]["tokens"])
            first = seen.get("first", time.perf_counter())
            sys.stdout.write("\n")
            tm = group.timing()
            info = group.info
    except (GroupError, RequestError) as e:
        print(f"ladder generate: {e}", file=sys.stderr)
        return 1
    dec = tm.decode_tokens / tm.decode_s if tm.decode_s else 0.0
    exposed = tm.decode_exposed_s / tm.decode_s if tm.decode_s else 0.0
    link = info.interconnect + (" (emulated latency)" if info.emulated else "")
    print(f"[ladder] {n} tokens | first token {first - t0:.1f} s after start | decode "
          f"{dec:.1f} tok/s | exposed communication {100 * exposed:.1f}% of decode | "
          f"tp={info.tp} link={link} residual={info.residual_plan} ({info.residual}) "
          f"dtype={args.dtype} prompt={len(prompt)} tokens", file=sys.stderr)
    return 0
