"""One rank's engine, built in order: open the checkpoint, load this rank's slices, build the
plain model, apply the CPU decode layout (an explicit step: the model does not know it), wrap
it in the engine with its KV cache."""

from __future__ import annotations

import torch

from ladder.engine.step import ShardEngine, block_bytes
from ladder.links.base import Communicator
from ladder.model.tp import ShardSpec
from ladder.model.transformer import build_model
from ladder.options import QUANT_DTYPES, GroupOptions, torch_dtype


def build_engine(opts: GroupOptions, rank: int, comm: Communicator):
    """Load this rank's shard and wrap it in an engine; returns (checkpoint, engine)."""
    from ladder.loaders import load_shard, open_checkpoint
    ckpt = open_checkpoint(opts.model)
    cfg = ckpt.config
    spec = ShardSpec.make(cfg, rank, opts.tp, opts.head_split)
    state = load_shard(ckpt, spec, torch_dtype(opts.dtype))
    device = opts.cuda_device(rank) if opts.device == "cuda" else torch.device("cpu")
    model = build_model(cfg, spec, ckpt.plan(opts.residual), state, comm, device=device)
    if opts.fast_kernels and device.type == "cpu":
        from ladder.native.layouts import decode_layout
        model = decode_layout(
            model, quant=opts.dtype if opts.dtype in QUANT_DTYPES else None)
    max_seq = min(opts.max_seq, cfg.max_seq_len)
    engine = ShardEngine(model, comm, n_slots=opts.n_slots, max_seq=max_seq,
                         n_blocks=kv_blocks(opts, cfg, comm, device, max_seq),
                         block=opts.block_size, prefix_caching=opts.prefix_caching)
    engine.max_batched_tokens = opts.max_num_batched_tokens  # the leader's scheduler's policy
    return ckpt, engine


def kv_block_bytes(opts: GroupOptions, cfg) -> int:
    """Bytes of a KV-cache block on the group's rank with the most KV heads."""
    heads = max(ShardSpec.make(cfg, r, opts.tp, opts.head_split).n_kv_heads
                for r in range(opts.tp))
    return block_bytes(cfg, heads, opts.block_size, torch_dtype(opts.dtype))


def kv_blocks(opts: GroupOptions, cfg, comm: Communicator, device: torch.device,
              max_seq: int) -> int:
    """The KV cache's blocks, the same on every rank: its bytes (`kv_cache_bytes`, or the
    fraction `kv_cache_fraction` of the memory free now, or room for n_slots full sequences)
    over the bytes of a block on the rank with the most KV heads; a fraction is the leader's
    figure, broadcast."""
    bs = opts.block_size
    if not (opts.kv_cache_bytes or opts.kv_cache_fraction):
        return opts.n_slots * -(-max_seq // bs)
    per_block = kv_block_bytes(opts, cfg)
    if opts.kv_cache_bytes:
        budget = opts.kv_cache_bytes
    elif device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * opts.kv_cache_fraction)
    else:  # the machine's memory, shared by the group's ranks on it
        budget = int(available_memory() * opts.kv_cache_fraction / opts.tp)
    n = torch.tensor([budget // per_block], dtype=torch.int64)
    if opts.kv_cache_fraction and not opts.kv_cache_bytes and comm.world_size > 1:
        comm.broadcast(n)
    if int(n[0]) < 1:
        raise ValueError(f"the KV cache's {budget} bytes hold no block of {bs} tokens "
                         f"({per_block} bytes a block)")
    return int(n[0])


def available_memory() -> int:
    """Bytes the kernel says this machine can give without swapping (MemAvailable)."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")
