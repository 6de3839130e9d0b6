"""Model configuration and the residual plan: one dataclass each, validating themselves.

`ModelConfig` describes a Llama-family transformer (GQA, RoPE with optional Llama-3 scaling,
RMSNorm, SwiGLU, tied or untied embeddings), with the two departures of its most served cousins:
biases on q/k/v (Qwen2 / Qwen2.5) and a sliding attention window (Mistral). `ResidualPlan` says which layers run the ladder
schedule, or whether the model is `parallel` (GPT-J style) or `desync` (no communication: the
speed upper bound, wrong by design).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing or inconsistent; the message names the field."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    # each position attends to itself and the sliding_window - 1 before it (Mistral); None: all
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                  "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"ModelConfig.{f} must be a positive integer, got {v!r}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"ModelConfig.dim={self.dim} is not divisible by "
                                  f"n_heads={self.n_heads}; set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"ModelConfig.n_heads={self.n_heads} is not a multiple of "
                              f"n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "llama3"))
            if kind != "llama3":
                raise ConfigError(f"ModelConfig.rope_scaling: unsupported rope_type {kind!r} "
                                  "(only 'llama3')")
            for k in ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings"):
                if k not in self.rope_scaling:
                    raise ConfigError(f"ModelConfig.rope_scaling is missing {k!r}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            raise ConfigError(f"ModelConfig.sliding_window must be a positive integer or None, "
                              f"got {self.sliding_window!r}")

    @property
    def family(self) -> str:
        """The Hugging Face model type these weights are: llama, qwen2 or mistral."""
        return "qwen2" if self.qkv_bias else "mistral" if self.sliding_window else "llama"

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """From a Hugging Face `config.json` dict; `source` names the file in errors."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        family = model_type if model_type in FAMILIES else next(
            (FAMILIES_BY_ARCH[a] for a in archs if a in FAMILIES_BY_ARCH), None)
        if family is None:
            raise ConfigError(f"{source}: unsupported architecture {archs or model_type!r} "
                              f"(the Llama family: model_type one of {', '.join(FAMILIES)})")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")
        window = cfg.get("sliding_window") if family == "mistral" else None
        if family == "qwen2" and cfg.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true (Qwen2's windows on the layers "
                              "past max_window_layers) is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (silu only)")
        try:
            eos = cfg.get("eos_token_id")
            eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
            n_heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                intermediate_size=cfg["intermediate_size"],
                head_dim=cfg.get("head_dim") or 0,
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=cfg.get("rope_theta")
                or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                rope_scaling=_hf_rope_scaling(cfg),
                max_seq_len=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
                name=cfg.get("_name_or_path") or model_type or "llama",
                qkv_bias=family == "qwen2", sliding_window=window,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Hugging Face model types read, and the architectures that name them
FAMILIES = ("llama", "mistral", "qwen2")
FAMILIES_BY_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                    "Qwen2ForCausalLM": "qwen2"}


def _hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    return dict(rs)


RESIDUAL_KINDS = ("standard", "ladder", "parallel", "desync")


@dataclass(frozen=True, slots=True)
class ResidualPlan:
    """How the residual stream is scheduled.

    - standard: every module adds its all-reduced output before the next module reads.
    - ladder: modules of the layers in `ladder_layers` read the stream without their immediate
      predecessor's output, so that predecessor's all-reduce overlaps with their compute. All
      layers for plain "ladder", a subset for a partial ladder ("ladder:24-29").
    - parallel: GPT-J style, attention and MLP read the same input, one all-reduce per layer.
    - desync: the standard schedule with no communication at all (benchmarks only).
    """

    kind: str = "standard"
    ladder_layers: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.kind not in RESIDUAL_KINDS:
            raise ConfigError(f"residual kind {self.kind!r} is not one of {RESIDUAL_KINDS}")
        if self.kind != "ladder" and self.ladder_layers:
            raise ConfigError(f"residual {self.kind!r} takes no ladder layers")

    @classmethod
    def parse(cls, spec: str, n_layers: int) -> "ResidualPlan":
        """`standard`, `parallel`, `desync`, `ladder` (all layers), `ladder:24-29`,
        `ladder:0,2,5-7`, or `ladder:upper-half`."""
        spec = spec.strip()
        if spec in ("standard", "parallel", "desync"):
            return cls(spec)
        if spec == "ladder":
            return cls("ladder", frozenset(range(n_layers)))
        m = re.fullmatch(r"ladder:(.+)", spec)
        if not m:
            raise ConfigError(f"residual {spec!r}: expected standard, ladder, ladder:A-B[,C...], "
                              "parallel or desync")
        body = m.group(1)
        if body == "upper-half":
            return cls("ladder", frozenset(range(n_layers // 2, n_layers)))
        layers: set[int] = set()
        for part in body.split(","):
            r = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not r:
                raise ConfigError(f"residual {spec!r}: bad layer range {part!r}")
            lo = int(r.group(1))
            hi = int(r.group(2)) if r.group(2) is not None else lo
            if lo > hi:
                raise ConfigError(f"residual {spec!r}: empty range {part!r}")
            if hi >= n_layers:
                raise ConfigError(f"residual {spec!r}: layer {hi} out of range "
                                  f"(the model has {n_layers} layers, 0..{n_layers - 1})")
            layers.update(range(lo, hi + 1))
        return cls("ladder", frozenset(layers))

    def label_for(self, n_layers: int) -> str:
        """Metrics label: standard / ladder / partial / parallel / desync."""
        if self.kind == "ladder" and len(self.ladder_layers) < n_layers:
            return "partial"
        return self.kind

    def spec(self, n_layers: int) -> str:
        """Inverse of `parse`: a compact string (`ladder:24-29`)."""
        if self.kind != "ladder":
            return self.kind
        if len(self.ladder_layers) == n_layers:
            return "ladder"
        runs, layers = [], sorted(self.ladder_layers)
        start = prev = layers[0]
        for x in layers[1:] + [None]:
            if x is not None and x == prev + 1:
                prev = x
                continue
            runs.append(f"{start}-{prev}" if prev > start else f"{start}")
            if x is not None:
                start = prev = x
        return "ladder:" + ",".join(runs)

    def is_ladder(self, layer: int) -> bool:
        return layer in self.ladder_layers
