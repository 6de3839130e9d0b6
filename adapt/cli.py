"""`ladder adapt` and `ladder eval`: the adaptation package's subcommands.

    ladder adapt --model smollm2 --residual ladder:24-29 --steps 200 --out adapted/
    ladder eval --model adapted/
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from contextlib import contextmanager

from adapt.data import DEFAULT_DATA


def register_adapt(sub: argparse._SubParsersAction) -> None:
    from adapt.train import AdaptOptions
    d = AdaptOptions(out="")
    p = sub.add_parser("adapt", help="distil a ladder model from its standard parent (Ray Train)",
                       description=__doc__.splitlines()[0] + " See adapt/train.py.")
    p.add_argument("--model", default=d.model,
                   help="smollm2, a Hugging Face checkpoint folder, or a .gguf file")
    p.add_argument("--residual", default=d.residual, help="the ladder plan, e.g. ladder:24-29")
    p.add_argument("--out", required=True, help="the adapted model's folder")
    p.add_argument("--data", default=d.data,
                   help=f"a folder of text or JSONL files (default: {DEFAULT_DATA})")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch, help="rows per step, all workers")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine decay ends at lr x this")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient norm clipping")
    p.add_argument("--ce-weight", type=float, default=d.ce_weight,
                   help="share of the next-token loss mixed into the KL loss (0..1)")
    p.add_argument("--train", dest="trainable", choices=["ladder", "all"], default=d.trainable,
                   help="which parameters train: the laddered layers' or all")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--held-out", type=float, default=d.held_out,
                   help="fraction of documents held out")
    p.add_argument("--eval-rows", type=int, default=d.eval_rows)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--workers", type=int, default=d.workers, help="data-parallel workers")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    p.add_argument("--gpus-per-worker", type=float, default=d.gpus_per_worker,
                   help="> 0: train on GPUs (NCCL)")
    p.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="worker failures Ray Train recovers from")
    p.add_argument("--storage", default="", help="Ray Train storage path (default: OUT.train)")
    p.add_argument("--name", default=d.name, help="the run's name under the storage path")
    p.add_argument("--fresh", action="store_true",
                   help="discard an earlier run of this name instead of resuming it")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (and with --fresh, delete a run folder) that "
                        "this command did not write")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (default: start a local one)")
    p.set_defaults(func=run_adapt_cmd)


def register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="compare a ladder model with its standard parent",
                       description="Held-out perplexity, top-1 agreement and greedy agreement "
                       "with the standard parent. See adapt/evaluate.py.")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--residual", default=None,
                   help="the plan (default: an adapted folder's own, else standard)")
    p.add_argument("--parent", default=None,
                   help="the standard parent (default: the one an adapted folder records)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=16, help="held-out rows scored")
    p.add_argument("--held-out", type=float, default=0.05)
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ray", action="store_true",
                   help="run as a task on a Ray cluster (--address, or a local one)")
    p.add_argument("--address", default=None)
    p.set_defaults(func=run_eval_cmd)


@contextmanager
def ray_cluster(address: str | None, cpus: float = 0):
    """Connect to `address`, or start a local Ray (token authentication on); shut down after.
    Inside a process already connected (tests, notebooks), that connection is used."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read once, when Ray is imported
    import ray
    if ray.is_initialized():
        yield
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus + 0.999)),
                 include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def run_adapt_cmd(a: argparse.Namespace) -> int:
    from adapt.data import DataError
    from adapt.progress import ProgressError
    from adapt.train import AdaptError, AdaptOptions, check_folders, run_adapt
    from ladder.loaders import CheckpointError
    from ladder.model.config import ConfigError
    keys = set(AdaptOptions.__dataclass_fields__)
    try:
        o = AdaptOptions(**{k: v for k, v in vars(a).items() if k in keys})
        check_folders(o)  # before Ray starts: run_adapt checks again, just before it deletes
        with ray_cluster(a.address, o.workers * o.cpus_per_worker):
            summary = run_adapt(o)
    except (AdaptError, DataError, CheckpointError, ConfigError, ProgressError) as e:
        print(f"ladder adapt: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ray Train's Ctrl-C handler exits
        print(f"ladder adapt: interrupted; the same command resumes the run from its last "
              f"checkpoint in {o.run_dir}", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


def run_eval_cmd(a: argparse.Namespace) -> int:
    from adapt.data import DataError
    from adapt.evaluate import evaluate, table
    from ladder.loaders import CheckpointError
    if a.max_tokens < 1 or a.rows < 1:
        print(f"ladder eval: --max-tokens and --rows must be at least 1, got {a.max_tokens} "
              f"and {a.rows}", file=sys.stderr)
        return 2
    kw = dict(residual=a.residual, parent=a.parent, data=a.data, seq_len=a.seq_len,
              rows=a.rows, held_out=a.held_out, max_tokens=a.max_tokens, threads=a.threads)
    try:
        if a.ray or a.address:
            import ray
            with ray_cluster(a.address, a.threads):
                task = ray.remote(evaluate).options(num_cpus=max(1, a.threads))
                r = ray.get(task.remote(a.model, **kw))
        else:
            r = evaluate(a.model, **kw)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"ladder eval: {e}", file=sys.stderr)
        return 2
    print(table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    print(json.dumps({k: v for k, v in r.items() if k != "prompts"}))
    return 0
