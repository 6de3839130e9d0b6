"""One rank's engine, built in order: open the checkpoint, load this rank's slices, build the
plain model, apply the CPU decode layout (an explicit step: the model does not know it), wrap
it in the engine with its KV cache."""

from __future__ import annotations

import torch

from ladder.engine.step import ShardEngine
from ladder.links.base import Communicator
from ladder.model.tp import ShardSpec
from ladder.model.transformer import build_model
from ladder.options import DTYPES, GroupOptions


def build_engine(opts: GroupOptions, rank: int, comm: Communicator):
    """Load this rank's shard and wrap it in an engine; returns (checkpoint, engine)."""
    from ladder.loaders import load_shard, open_checkpoint
    ckpt = open_checkpoint(opts.model)
    cfg = ckpt.config
    spec = ShardSpec.make(cfg, rank, opts.tp, opts.head_split)
    state = load_shard(ckpt, spec, DTYPES[opts.dtype])
    device = opts.cuda_device(rank) if opts.device == "cuda" else torch.device("cpu")
    model = build_model(cfg, spec, ckpt.plan(opts.residual), state, comm, device=device)
    if opts.fast_kernels and device.type == "cpu":
        from ladder.native.layouts import decode_layout
        model = decode_layout(model)
    engine = ShardEngine(model, comm, n_slots=opts.n_slots,
                         max_seq=min(opts.max_seq, cfg.max_seq_len))
    return ckpt, engine
