"""A Hugging Face model folder written from one of our checkpoints, for peers that load only HF
folders (vLLM): config.json (LlamaForCausalLM), model.safetensors (float32, the tensors our
loader reads, so both sides run the very same weights) and the tokenizer files (tokenizer.json,
tokenizer_config.json with the chat template). Nothing is fetched from a model hub.

    python -m bench.hf_export [--model smollm2] [--dest bench/out/smollm2-hf]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ladder.loaders import open_checkpoint

DEFAULT_DEST = Path(__file__).resolve().parent / "out" / "smollm2-hf"
LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
MARKER = "ladder_export.json"  # what the folder was made from, so a rerun can reuse it


def hf_names(n_layers: int, tied: bool) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{t}" for i in range(n_layers) for t in LAYER_TENSORS]
    if not tied:
        names.append("lm_head.weight")
    return names


def llama_config(cfg, dest: Path) -> None:
    from transformers import LlamaConfig
    eos = list(cfg.eos_token_ids)
    LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], torch_dtype="float32",
    ).to_json_file(str(dest / "config.json"))
    # the peer's transformers may be older (4.x): give it the keys it reads as well
    conf = json.loads((dest / "config.json").read_text())
    conf.setdefault("torch_dtype", "float32")
    conf.setdefault("rope_theta", cfg.rope_theta)
    (dest / "config.json").write_text(json.dumps(conf, indent=2))


def export(model: str = "smollm2", dest: Path = DEFAULT_DEST) -> Path:
    """Write (or reuse, when already made from the same source) the folder; returns it."""
    dest = Path(dest)
    ck = open_checkpoint(model)
    source = {"model": str(model), "checkpoint": repr(ck)}
    marker = dest / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    cfg = ck.config
    tensors = {n: ck.read(n).to(torch.float32).contiguous()
               for n in hf_names(cfg.n_layers, cfg.tie_embeddings)}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    llama_config(cfg, dest)
    tok = ck.tokenizer()
    tok.save(dest)
    # transformers 5 writes the template to chat_template.jinja and names its own tokenizer
    # class; an older transformers beside vLLM reads the template from tokenizer_config.json and
    # knows the fast tokenizer by its 4.x name
    tc = json.loads((dest / "tokenizer_config.json").read_text())
    tc["chat_template"] = tok.chat_template
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    marker.write_text(json.dumps(source))
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    a = ap.parse_args()
    out = export(a.model, a.dest)
    print(out)
    for f in sorted(out.iterdir()):
        print(f"  {f.name}  {f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
