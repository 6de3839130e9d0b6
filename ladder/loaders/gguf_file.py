"""GGUF files (llama.cpp's format), read through the memory-mapped `gguf.GGUFReader`.

Three things differ from a Hugging Face folder, and this module hides them:
- names: `blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`, and so on;
- layout: GGUF lists dimensions innermost first (ne0 = columns), and a quantized tensor's data is
  uint8 [rows, bytes per row], so a row range is a byte-row range and a column range that starts
  and ends on quant-block boundaries is a byte-column range; only those bytes are dequantized;
- q and k rows: llama.cpp's converter permutes them within each head for its interleaved RoPE
  (`reshape(n_head, 2, hd // 2, in).swapaxes(1, 2)`); we undo that (`reshape(n_head, hd // 2, 2,
  in).swapaxes(1, 2)`), head by head, so head-range row slices stay cheap.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from ladder.loaders.base import Checkpoint, CheckpointError, Range, check_range
from ladder.model.config import ConfigError, ModelConfig
from ladder.tokenizer import Tokenizer

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ARCHS = ("llama", "qwen2")  # general.architecture values read
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Types stored element-wise (the reader gives them their numpy dtype, not bytes).
_PLAIN = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                    GGMLQuantizationType.F64})


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name for a Hugging Face Llama tensor name (None if it has none)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation of `n_head` whole heads stacked as rows of `w`."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (Hugging Face rows -> GGUF rows); for tests and writers."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFCheckpoint(Checkpoint):
    """One `.gguf` file of a `llama`- or `qwen2`-architecture model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            reader = _Reader(self.path, "r")
        except Exception as e:  # the reader parses untrusted bytes and fails in many ways
            raise CheckpointError(f"{self.path}: not a readable GGUF file "
                                  f"(truncated or corrupt?): {type(e).__name__}: {e}") from None
        self.reader = reader  # raw metadata fields and tensors, for tools that need more
        self._tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.data.nbytes != t.n_bytes:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} is truncated "
                                      f"({t.data.nbytes} of {t.n_bytes} bytes)")
        self.metadata = {k: f.contents() for k, f in reader.fields.items()
                         if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                      "tokenizer.ggml.token_type", "tokenizer.ggml.scores")}
        self.config = self._config()

    # -- config ------------------------------------------------------------------------------

    def _meta(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        if key not in self.metadata:
            if required:
                raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
            return default
        return self.metadata[key]

    def _config(self) -> ModelConfig:
        arch = self._meta("general.architecture", required=True)
        if arch not in ARCHS:
            raise CheckpointError(f"{self.path}: unsupported architecture {arch!r} "
                                  f"(general.architecture must be one of {', '.join(ARCHS)})")
        self.arch = a = arch  # its metadata keys' prefix
        dim = self._meta(f"{a}.embedding_length", required=True)
        n_heads = self._meta(f"{a}.attention.head_count", required=True)
        head_dim = self._meta(f"{a}.attention.key_length") or dim // n_heads
        rope_dim = self._meta(f"{a}.rope.dimension_count")
        if rope_dim is not None and rope_dim != head_dim:
            raise CheckpointError(f"{self.path}: partial rotary embeddings are not supported "
                                  f"({a}.rope.dimension_count={rope_dim}, head_dim={head_dim})")
        theta = float(self._meta(f"{a}.rope.freq_base", 10000.0))
        vocab = self._meta(f"{a}.vocab_size")
        if vocab is None:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            vocab = (len(tokens.data) if tokens is not None
                     else self.shape("model.embed_tokens.weight")[0])
        eos = [self._meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        try:
            return ModelConfig(
                vocab_size=vocab, dim=dim,
                n_layers=self._meta(f"{a}.block_count", required=True),
                n_heads=n_heads, n_kv_heads=self._meta(f"{a}.attention.head_count_kv", n_heads),
                intermediate_size=self._meta(f"{a}.feed_forward_length", required=True),
                head_dim=head_dim,
                norm_eps=float(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=theta, rope_scaling=self._rope_scaling(theta, head_dim),
                max_seq_len=self._meta(f"{a}.context_length", 2048),
                tie_embeddings="output.weight" not in self._tensors,
                bos_token_id=self._meta("tokenizer.ggml.bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
                name=self._meta("general.name") or self.path.stem,
                qkv_bias=arch == "qwen2",
            )
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        kind = self._meta(f"{self.arch}.rope.scaling.type", "none")
        if kind not in ("none", ""):
            raise CheckpointError(f"{self.path}: unsupported {self.arch}.rope.scaling.type "
                                  f"{kind!r}")
        t = self._tensors.get("rope_freqs.weight")
        if t is None:
            return None
        # Llama 3.1+ GGUFs store llama3 scaling as per-frequency divisors, not parameters;
        # recover the parameters by matching Meta's published defaults.
        factors = np.asarray(t.data, dtype=np.float64).reshape(-1)
        factor = float(factors.max())
        for low, high, orig in ((1.0, 4.0, 8192),):
            if np.allclose(_llama3_divisors(theta, head_dim, factor, low, high, orig), factors,
                           rtol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": orig}
        raise CheckpointError(f"{self.path}: rope_freqs.weight does not match llama3 RoPE "
                              "scaling with the usual parameters")

    # -- tensors -----------------------------------------------------------------------------

    def _tensor(self, name: str):
        g = gguf_name(name)
        if g is None or g not in self._tensors:
            raise self._missing(name, f" (GGUF name {g!r})" if g else " (no GGUF equivalent)")
        return self._tensors[g]

    def has(self, name: str) -> bool:
        return gguf_name(name) in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def _heads(self, name: str) -> int | None:
        """Heads to un-permute for q/k weights (llama's: llama.cpp's converter permutes them for
        its interleaved rotary embedding; qwen2's keep Hugging Face's rows), else None."""
        if self.config.family == "qwen2":
            return None
        if name.endswith("self_attn.q_proj.weight"):
            return self.config.n_heads
        if name.endswith("self_attn.k_proj.weight"):
            return self.config.n_kv_heads
        return None

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        t = self._tensor(name)
        shape = self.shape(name)
        r0, r1 = check_range(self.path, name, rows, shape[0], "rows")
        if len(shape) == 1:
            if cols is not None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is 1-D; no column range")
            out = self._read_2d(t, t.data.reshape(1, -1), 0, 1, r0, r1).reshape(-1)
            return torch.from_numpy(out)
        if len(shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {shape}; expected 2-D")
        c0, c1 = check_range(self.path, name, cols, shape[1], "cols")
        heads = self._heads(name)
        if heads is None:
            return torch.from_numpy(self._read_2d(t, t.data, r0, r1, c0, c1))
        hd = shape[0] // heads
        a0, a1 = r0 // hd * hd, -(-r1 // hd) * hd  # widen to whole heads, un-permute, cut back
        w = unpermute_rows(self._read_2d(t, t.data, a0, a1, c0, c1), (a1 - a0) // hd)
        return torch.from_numpy(np.ascontiguousarray(w[r0 - a0:r1 - a0]))

    def _read_2d(self, t, data: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows [r0, r1) x columns [c0, c1) of tensor `t` (data in its stored layout) as float32."""
        qtype = t.tensor_type
        if qtype in _PLAIN:
            return np.array(data[r0:r1, c0:c1], dtype=np.float32)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if c0 % block == 0 and c1 % block == 0:  # whole blocks: read only their bytes
            raw = np.array(data[r0:r1, c0 // block * type_size:c1 // block * type_size])
            c0, c1 = 0, c1 - c0
        else:
            raw = np.array(data[r0:r1])
        try:
            out = dequantize(raw, qtype)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {qtype.name}, "
                                  "which gguf cannot dequantize") from None
        return np.ascontiguousarray(out[:, c0:c1], dtype=np.float32)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.path, extra_eos_token_ids=self.config.eos_token_ids)


class _Reader(GGUFReader):
    """`GGUFReader`, its ~250k slices (SmolLM2's vocabulary: two a token and a merge) taken from
    a plain array over the memory map: a numpy memmap's slices each run Python code of its own
    (3.7 s to open SmolLM2 here; this way 1.0 s). The same fields and tensors, as views."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None):
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self._flat = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        count = int(count)
        arr = flat[offset:offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                               else override_order))


def _llama3_divisors(theta: float, head_dim: int, factor: float, low: float, high: float,
                     orig: int) -> np.ndarray:
    """What llama.cpp's converter writes to rope_freqs.weight for llama3 RoPE scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)
