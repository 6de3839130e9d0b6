"""One tensor-parallel rank's state dict, read slice by slice from a checkpoint.

Column-parallel weights (q/k/v, gate/up) are cut by rows, row-parallel ones (o, down) by columns,
as `ShardSpec` says, and fused the gpt-fast way: `wqkv` = this rank's q rows, then its k rows, then
its v rows; `w13` = gate rows, then up rows. Every shape is checked against the config before any
byte is read, so a mismatched checkpoint fails naming the tensor rather than deep in a matmul.
"""

from __future__ import annotations

import torch

from ladder.loaders.base import Checkpoint, CheckpointError
from ladder.model.tp import ShardSpec


def expected_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape the config implies, for every tensor `load_shard` needs."""
    c = ckpt.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.dim), "model.norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.dim,), p + "post_attention_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (q, c.dim), p + "self_attn.k_proj.weight": (kv, c.dim),
            p + "self_attn.v_proj.weight": (kv, c.dim), p + "self_attn.o_proj.weight": (c.dim, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.dim),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.intermediate_size),
        })
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def check_shapes(ckpt: Checkpoint) -> None:
    """Raise CheckpointError for the first tensor that is missing or disagrees with the config."""
    for name, want in expected_shapes(ckpt).items():
        got = ckpt.shape(name)  # raises the checkpoint's own "missing tensor" error
        if got != want:
            raise CheckpointError(f"{ckpt.location(name)}: tensor {name!r} has shape {list(got)}, "
                                  f"but the config implies {list(want)}")


def load_shard(ckpt: Checkpoint, spec: ShardSpec,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """This rank's weights under our parameter names, cast to `dtype`.

    `output.weight` holds this rank's vocabulary rows of an untied LM head (the logits are
    vocabulary-parallel); a tied model's ranks slice `tok_embeddings.weight` instead.
    """
    check_shapes(ckpt)
    c = ckpt.config
    hd = c.head_dim
    q_rows = (spec.q_heads[0] * hd, spec.q_heads[1] * hd)
    kv_rows = (spec.kv_heads[0] * hd, spec.kv_heads[1] * hd)
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        sd[key] = t.to(dtype)

    put("tok_embeddings.weight", ckpt.read("model.embed_tokens.weight"))
    for i in range(c.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        put(o + "attn_norm.weight", ckpt.read(p + "input_layernorm.weight"))
        put(o + "mlp_norm.weight", ckpt.read(p + "post_attention_layernorm.weight"))
        put(o + "attention.wqkv.weight", torch.cat([
            ckpt.read(p + "self_attn.q_proj.weight", rows=q_rows),  # [nq_r*hd, dim]
            ckpt.read(p + "self_attn.k_proj.weight", rows=kv_rows),  # [nkv_r*hd, dim]
            ckpt.read(p + "self_attn.v_proj.weight", rows=kv_rows),  # [nkv_r*hd, dim]
        ]))
        if c.qkv_bias:  # sliced with their rows
            put(o + "attention.wqkv.bias", torch.cat([
                ckpt.read(p + "self_attn.q_proj.bias", rows=q_rows),
                ckpt.read(p + "self_attn.k_proj.bias", rows=kv_rows),
                ckpt.read(p + "self_attn.v_proj.bias", rows=kv_rows)]))
        put(o + "attention.wo.weight", ckpt.read(p + "self_attn.o_proj.weight", cols=q_rows))
        put(o + "mlp.w13.weight", torch.cat([
            ckpt.read(p + "mlp.gate_proj.weight", rows=spec.ffn),  # [ffn_r, dim]
            ckpt.read(p + "mlp.up_proj.weight", rows=spec.ffn),  # [ffn_r, dim]
        ]))
        put(o + "mlp.w2.weight", ckpt.read(p + "mlp.down_proj.weight", cols=spec.ffn))
    put("norm.weight", ckpt.read("model.norm.weight"))
    if not c.tie_embeddings:
        put("output.weight", ckpt.read("lm_head.weight", rows=spec.vocab))
    return sd


def unshard(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Hugging Face names -> tensors from a whole model's state dict (one rank of a TP=1 group):
    the inverse of `load_shard`, for writing a checkpoint (fused `wqkv` and `w13` split again)."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(c.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        wq, wk, wv = state[o + "attention.wqkv.weight"].split((q, kv, kv))
        gate, up = state[o + "mlp.w13.weight"].split(c.intermediate_size)
        out.update({
            p + "input_layernorm.weight": state[o + "attn_norm.weight"],
            p + "post_attention_layernorm.weight": state[o + "mlp_norm.weight"],
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": state[o + "attention.wo.weight"],
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": state[o + "mlp.w2.weight"],
        })
        if c.qkv_bias:
            bq, bk, bv = state[o + "attention.wqkv.bias"].split((q, kv, kv))
            out.update({p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk,
                        p + "self_attn.v_proj.bias": bv})
    return out
