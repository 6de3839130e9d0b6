"""The overlap bench's model and the condition it is sized by: a random-weight Llama written to a
folder (`Shape`, `write_random_llama`), one module's compute on a rank of its TP=2 shard
(`module_seconds`) and one isolated all-reduce of [1, dim] float32, over gloo on loopback
(`allreduce_seconds`) or over a namespaced group's own link (`link_allreduce_seconds`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.timed import median, probe_pair
from ladder.links.netns import Namespaces
from ladder.loaders import load_shard, open_checkpoint
from ladder.model.config import ResidualPlan
from ladder.model.tp import ShardSpec
from ladder.model.transformer import build_model
from ladder.options import GroupOptions


@dataclass(frozen=True)
class Shape:
    """The random Llama."""

    dim: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # small: only the leader computes the LM head, which the other rank waits for


def write_random_llama(folder: Path, shape: Shape, seed: int = 0) -> None:
    """A Llama with N(0, 0.02) weights, unit norms, tied embeddings, via save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.dim,
                      intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      max_position_embeddings=1024, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):  # skip transformers' init: the values are ours
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {n: torch.randn(p.shape, generator=g) * 0.02 if p.dim() == 2 else torch.ones(p.shape)
             for n, p in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.save_pretrained(folder)


def _allreduce_probe(rank: int, init: str, dim: int, iters: int, out) -> None:
    """One rank of the isolated all-reduce probe: gloo, one thread, [1, dim] float32."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    x = torch.randn(1, dim)
    for _ in range(10):
        dist.all_reduce(x)
    times = []
    for _ in range(iters):
        dist.barrier()  # both ranks start together: the figure is the reduce, not the skew
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(median(times))
    dist.barrier()
    dist.destroy_process_group()


def _link_probe(rank: int, init: str, opts: GroupOptions, spaces: Namespaces, dim: int,
                iters: int, out) -> None:
    """One rank of an isolated all-reduce on a group's own link (`make_comm`), in its namespace."""
    from ladder.links.factory import make_comm
    opts = spaces.enter(opts, rank)
    torch.set_num_threads(1)
    comm = make_comm(opts, rank, init)
    x = torch.randn(1, dim)
    for _ in range(10):
        comm.all_reduce(x).wait()
    times = []
    for _ in range(iters):
        comm.barrier()
        t0 = time.perf_counter()
        comm.all_reduce(x).wait()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(median(times))
    comm.barrier()
    comm.close()


def link_allreduce_seconds(opts: GroupOptions, spaces: Namespaces, dim: int, iters: int
                           ) -> float:
    """The median isolated all-reduce of [1, dim] float32 over a namespaced group's link."""
    return probe_pair(_link_probe, spaces.hosts[0], opts, spaces, dim, iters)


def allreduce_seconds(dim: int, iters: int) -> float:
    return probe_pair(_allreduce_probe, "127.0.0.1", dim, iters)


def module_seconds(folder: Path, reps: int = 5) -> dict[str, float]:
    """Median compute time of one attention and one MLP module of rank 0's TP=2 shard, one
    thread, one decode token (attention over that token alone)."""
    ckpt = open_checkpoint(folder)
    cfg = ckpt.config
    spec = ShardSpec.make(cfg, 0, 2)
    model = build_model(cfg, spec, ResidualPlan("standard"), load_shard(ckpt, spec))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, 1, cfg.dim)
    ctx = model.causal_context(torch.zeros(1, 1, dtype=torch.int64))
    attn, mlp = [], []
    try:
        with torch.inference_mode():
            for _ in range(reps + 1):  # the first pass warms up
                for layer in model.layers:
                    t0 = time.perf_counter()
                    layer.attention(layer.attn_norm(x), ctx)
                    t1 = time.perf_counter()
                    layer.mlp(layer.mlp_norm(x))
                    attn.append(t1 - t0)
                    mlp.append(time.perf_counter() - t1)
    finally:
        torch.set_num_threads(threads)
    n = len(model.layers)
    return {"attention_s": median(attn[n:]), "mlp_s": median(mlp[n:])}
