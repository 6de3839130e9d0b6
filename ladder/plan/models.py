"""Model presets (their published config.json shapes) and reading a user's model.

Only shapes matter here: hidden size, layers, heads, KV heads, head size, MLP width, vocabulary,
tied embeddings. A Hugging Face folder or config.json of any Llama-shaped decoder (llama,
mistral, qwen2: biases and norms are noise beside the matmuls) reads as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ladder.model.config import ConfigError, ModelConfig

# name: (hidden, layers, heads, KV heads, head dim, MLP width, vocabulary, tied, context),
# each from the model's config.json on the Hugging Face Hub (meta-llama/Llama-3.1-8B, -70B,
# -405B, meta-llama/Llama-3.2-1B, -3B, HuggingFaceTB/SmolLM2-135M, -1.7B, Qwen/Qwen2.5-7B).
_SHAPES: dict[str, tuple[int, int, int, int, int, int, int, bool, int]] = {
    "llama-3.1-8b": (4096, 32, 32, 8, 128, 14336, 128256, False, 131072),
    "llama-3.1-70b": (8192, 80, 64, 8, 128, 28672, 128256, False, 131072),
    "llama-3.1-405b": (16384, 126, 128, 8, 128, 53248, 128256, False, 131072),
    "llama-3.2-1b": (2048, 16, 32, 8, 64, 8192, 128256, True, 131072),
    "llama-3.2-3b": (3072, 28, 24, 8, 128, 8192, 128256, True, 131072),
    "smollm2-135m": (576, 30, 9, 3, 64, 1536, 49152, True, 8192),
    "smollm2-1.7b": (2048, 24, 32, 32, 64, 8192, 49152, True, 8192),
    "qwen2.5-7b": (3584, 28, 28, 4, 128, 18944, 152064, False, 131072),
}
ALIASES = {"smollm2": "smollm2-135m"}  # `ladder generate --model smollm2` is the 135M GGUF
_HF_TYPES = ("llama", "mistral", "qwen2")


def preset_model(name: str) -> ModelConfig:
    key = ALIASES.get(name, name)
    dim, layers, heads, kv, head_dim, ffn, vocab, tied, ctx = _SHAPES[key]
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, head_dim=head_dim, intermediate_size=ffn,
                       tie_embeddings=tied, max_seq_len=ctx, name=key)


def model_names() -> list[str]:
    return [*_SHAPES, *ALIASES]


def load_model(spec: str) -> ModelConfig:
    """A preset name, a Hugging Face model folder, or a config.json file."""
    if ALIASES.get(spec, spec) in _SHAPES:
        return preset_model(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"--model {spec!r}: not a preset ({', '.join(model_names())}), a model "
                          "folder with a config.json, or a config.json file")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model {path}: cannot read it as JSON ({e})") from None
    return from_hf_shape(cfg, source=str(path))


def from_hf_shape(cfg: Any, *, source: str) -> ModelConfig:
    """The shape of a Llama-shaped Hugging Face config.json dict."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: a config.json holds an object, not {type(cfg).__name__}")
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder here
    kind = cfg.get("model_type")
    if kind not in _HF_TYPES:
        raise ConfigError(f"{source}: model_type {kind!r} is not a Llama-shaped decoder "
                          f"({', '.join(_HF_TYPES)})")
    try:
        heads = cfg["num_attention_heads"]
        return ModelConfig(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
                           n_layers=cfg["num_hidden_layers"], n_heads=heads,
                           n_kv_heads=cfg.get("num_key_value_heads") or heads,
                           head_dim=cfg.get("head_dim") or 0,
                           intermediate_size=cfg["intermediate_size"],
                           tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                           max_seq_len=cfg.get("max_position_embeddings", 2048),
                           name=cfg.get("_name_or_path") or Path(source).parent.name or kind)
    except KeyError as e:
        raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def shape_key(config: ModelConfig) -> str:
    """What a measured module time is keyed by: the shape, not the name."""
    c = config
    return (f"d{c.dim}-l{c.n_layers}-h{c.n_heads}-kv{c.n_kv_heads}-e{c.head_dim}"
            f"-f{c.intermediate_size}-v{c.vocab_size}")
