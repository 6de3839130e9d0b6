"""The paper's own checkpoint format: dolomite-engine's `ladder_residual` models (Zhang et al.
trained their 1B and 3B ladder models with it), its `gpt_ladder` predecessor, and the standard
baseline `gpt_dolomite`, read as the Llama-family model they are.

As read from IBM/dolomite-engine at 31c3c09 (the config of the paper's runs, before the 2025
renames; `dolomite_engine/hf_models/config.py`, `model_conversion/llama.py`):

- config.json: flat keys `n_embd`, `n_layer`, `n_head`, `num_key_value_heads`, `n_inner`
  (default 4 x n_embd), `n_positions`, `attention_head_type` (mha / gqa / mqa; default mqa),
  `tie_word_embeddings` (default true, so usually absent). Served only as a Llama: rmsnorm,
  rope, swiglu, no biases, no muP multipliers; anything else is an error naming the key.
- tensors (`transformer.` prefix, nn.Linear [out, in]): `wte`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`
  (q, k and v fused per KV group: [KV, G + 2, D, E] rows, G = heads / KV heads; mqa a plain
  [q; k; v]), `h.{i}.attn.c_proj`, `h.{i}.ln_2`, `h.{i}.mlp.c_fc` (up rows, then gate rows),
  `h.{i}.mlp.c_proj`, `ln_f`, `lm_head` when untied. Later checkpoints name the modules
  `sequence_mixer` and `mlp_block`: both are read. Rotary embeddings in Hugging Face's layout.
- a `ladder_residual` model runs every layer ladder (no per-layer switch): attention i reads the
  stream through attention i-1, the MLP i the stream through MLP i-1, and the last two outputs
  join before the final norm, which is our `ladder` plan; the checkpoint records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ladder.loaders.base import CheckpointError, Range, check_range
from ladder.loaders.hf import SafetensorsCheckpoint
from ladder.model.config import ConfigError, ModelConfig, ResidualPlan

PLANS = {"ladder_residual": "ladder", "gpt_ladder": "ladder", "gpt_dolomite": "standard"}
# what a Llama is made of, and the value each key must have to be one
AS_LLAMA = {"activation_function": "swiglu", "normalization_function": "rmsnorm",
            "position_embedding_type": "rope", "add_bias": False, "rope_scaling": None,
            "m_emb": None, "m_width": None, "m_residual": None, "attention_multiplier": None,
            "scale_attn_weights": True}
DEFAULTS = {"activation_function": "gelu_pytorch_tanh", "normalization_function": "layernorm",
            "position_embedding_type": "learned_absolute", "add_bias": True,
            "scale_attn_weights": True}


def is_dolomite(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") in PLANS


def dolomite_config(hf: dict[str, Any], source: str) -> ModelConfig:
    """A dolomite config.json as our ModelConfig; ConfigError naming the key otherwise."""
    if "sequence_mixer_blocks" in hf or "mlp_blocks" in hf:
        raise ConfigError(f"{source}: per-layer sequence_mixer_blocks / mlp_blocks (dolomite's "
                          "2025 format) are not read; the paper's flat format is")
    for key, want in AS_LLAMA.items():
        got = hf.get(key, DEFAULTS.get(key))
        if got != want:
            raise ConfigError(f"{source}: {key}={got!r} is not served (a Llama-family model "
                              f"has {want!r})")

    def get(*names: str, default: Any = KeyError) -> Any:
        for n in names:
            if hf.get(n) is not None:
                return hf[n]
        if default is KeyError:
            raise ConfigError(f"{source}: missing required key {names[0]!r}")
        return default

    dim, heads = get("n_embd", "hidden_size"), get("n_head", "num_attention_heads")
    kind = hf.get("attention_head_type", "mqa")
    kv = {"mha": heads, "mqa": 1}.get(kind) if kind != "gqa" else get("num_key_value_heads")
    if kv is None:
        raise ConfigError(f"{source}: attention_head_type={kind!r} is not mha, gqa or mqa")
    eos = hf.get("eos_token_id")
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), dim=dim, n_layers=get("n_layer", "num_layers"),
            n_heads=heads, n_kv_heads=kv, intermediate_size=get("n_inner", "intermediate_size",
                                                                default=4 * dim),
            norm_eps=get("layer_norm_epsilon", default=1e-5),
            rope_theta=float(get("rope_theta", default=10000.0)),
            max_seq_len=get("n_positions", "max_position_embeddings", default=1024),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            name=hf.get("_name_or_path") or hf["model_type"])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


class DolomiteCheckpoint(SafetensorsCheckpoint):
    """A dolomite folder read under Hugging Face Llama names: q, k and v cut out of the fused
    `c_attn`, gate and up out of `c_fc` (each fused tensor read whole, then sliced)."""

    def _read_config(self, hf: dict[str, Any], source: Path) -> ModelConfig:
        return dolomite_config(hf, str(source))

    def _read_plan(self, hf: dict[str, Any], source: Path) -> ResidualPlan | None:
        plan = PLANS[hf["model_type"]]
        return None if plan == "standard" else ResidualPlan.parse(plan, self.config.n_layers)

    def _name(self, name: str) -> tuple[str, str | None]:
        """(the stored tensor holding `name`, which part of it: q/k/v, up/gate or None)."""
        fixed = {"model.embed_tokens.weight": "transformer.wte.weight",
                 "model.norm.weight": "transformer.ln_f.weight", "lm_head.weight": "lm_head.weight"}
        if name in fixed:
            return fixed[name], None
        parts = name.split(".")  # model.layers.{i}.{module}.{proj}.weight
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return name, None
        i, rest = parts[2], ".".join(parts[3:])
        h = f"transformer.h.{i}."
        attn = h + ("attn" if self.has_stored(h + "attn.c_attn.weight") else "sequence_mixer")
        mlp = h + ("mlp" if self.has_stored(h + "mlp.c_fc.weight") else "mlp_block")
        return {"input_layernorm.weight": (h + "ln_1.weight", None),
                "post_attention_layernorm.weight": (h + "ln_2.weight", None),
                "self_attn.q_proj.weight": (attn + ".c_attn.weight", "q"),
                "self_attn.k_proj.weight": (attn + ".c_attn.weight", "k"),
                "self_attn.v_proj.weight": (attn + ".c_attn.weight", "v"),
                "self_attn.o_proj.weight": (attn + ".c_proj.weight", None),
                "mlp.up_proj.weight": (mlp + ".c_fc.weight", "up"),
                "mlp.gate_proj.weight": (mlp + ".c_fc.weight", "gate"),
                "mlp.down_proj.weight": (mlp + ".c_proj.weight", None)}.get(rest, (name, None))

    def has_stored(self, stored: str) -> bool:
        return super().has(stored)

    def has(self, name: str) -> bool:
        return self.has_stored(self._name(name)[0])

    def location(self, name: str) -> Path:
        return super().location(self._name(name)[0])

    def shape(self, name: str) -> tuple[int, ...]:
        stored, part = self._name(name)
        shape = super().shape(stored)
        if part is None:
            return shape
        c = self.config
        rows = {"q": c.n_heads, "k": c.n_kv_heads, "v": c.n_kv_heads}.get(part)
        return (rows * c.head_dim if rows else c.intermediate_size, shape[1])

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        stored, part = self._name(name)
        if part is None:
            return super().read(stored, rows, cols)
        whole = self._part(super().read(stored), part)
        where = self.location(name)
        r0, r1 = check_range(where, name, rows, whole.shape[0], "rows")
        c0, c1 = check_range(where, name, cols, whole.shape[1], "cols")
        return whole[r0:r1, c0:c1].contiguous()

    def _part(self, w: torch.Tensor, part: str) -> torch.Tensor:
        c = self.config
        if part in ("up", "gate"):
            up, gate = w.chunk(2)
            return up if part == "up" else gate
        d, kv = c.head_dim, c.n_kv_heads
        want = (c.n_heads + 2 * kv) * d
        if w.shape[0] != want:
            raise CheckpointError(f"{self.path}: c_attn has {w.shape[0]} rows; the config "
                                  f"implies {want}")
        if kv == 1 and c.n_heads > 1:  # mqa: a plain [q; k; v]
            q, k, v = w.split((c.n_heads * d, d, d))
        else:  # per KV group: its G query heads, then its k head, then its v head
            g = c.n_heads // kv
            grouped = w.view(kv, g + 2, d, w.shape[1])
            q = grouped[:, :g].reshape(-1, w.shape[1])
            k, v = grouped[:, g].reshape(-1, w.shape[1]), grouped[:, g + 1].reshape(-1, w.shape[1])
        return {"q": q, "k": k, "v": v}[part]
