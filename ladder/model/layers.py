"""The layers of a Llama-family model, single-device code: RMSNorm, rotary embedding, grouped
attention over a paged KV cache, SwiGLU. A rank's layers hold its heads and its slice of
the MLP (`ladder.model.tp.ShardSpec`); their outputs are partial sums the model all-reduces.

Shapes: B batch rows, T tokens per row, D model dim, H / K local query / KV heads, E head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ladder.model.config import ModelConfig
from ladder.model.tp import ShardSpec


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [E/2], with Llama-3 scaling when the config has it (as in HF).
    Computed on the CPU whatever the default device: on the meta device (`build_model`) these
    ops would import sympy (1.5 s of every rank's start)."""
    e = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, e, 2, dtype=torch.int64, device="cpu")
                                       .float() / e))
    rs = config.rope_scaling
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, then cast back before the weight, as transformers' Llama does
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, E]; cos/sin [B, 1, T, E] (HF's rotate-half layout)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


@dataclass(slots=True)
class StepContext:
    """What attention needs to know about this forward, beyond the hidden states.

    `positions` [B, T] are absolute token positions. With a KV cache, row b writes its keys and
    values at `positions[b]` of the blocks its block table `tables[b]` lists (position p in block
    `tables[b, p // block]`, at `p % block`) and attends to everything before them; `kv_len` is
    how many cached positions the longest row needs. `causal`: a fresh prefill (one row from
    position 0) that attends to its own new keys only. Without a cache (training, reference
    forwards) attention is causal within the given tokens.
    """

    cos: torch.Tensor  # [B, 1, T, E]
    sin: torch.Tensor
    positions: torch.Tensor  # [B, T]
    cache: "KVCache | None" = None
    tables: torch.Tensor | None = None  # int64 [B, W]: each row's blocks, in position order
    kv_len: int = 0
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] bool, None when causal or unmasked
    causal: bool = False
    packed: "Packed | None" = None  # rows of different lengths as one sequence (see Packed)


@dataclass(slots=True)
class Packed:
    """A step whose rows differ in length (decode rows beside prompt chunks) runs as one
    sequence of all their tokens, [1, N] with N the sum of the rows' lengths, not as rows
    padded to the longest: the weight products see N tokens. Row b's tokens are
    `offsets[b]:offsets[b] + lens[b]`, at positions `starts[b]...`; attention runs per row:
    the one-token rows (`decode_idx`, their rows `decode_rows`) as one decode batch, each
    longer row (`spans`) on its own."""

    offsets: list[int]
    lens: list[int]
    starts: list[int]
    decode_idx: torch.Tensor  # int64 [Bd]
    decode_rows: torch.Tensor  # int64 [Bd]
    spans: list[int]

    @classmethod
    def of(cls, lens: list[int], starts: list[int], device) -> "Packed":
        offsets = [0]
        for n in lens[:-1]:
            offsets.append(offsets[-1] + n)
        one = [b for b, n in enumerate(lens) if n == 1]
        return cls(offsets, lens, starts,
                   torch.tensor([offsets[b] for b in one], dtype=torch.int64, device=device),
                   torch.tensor(one, dtype=torch.int64, device=device),
                   [b for b, n in enumerate(lens) if n > 1])

    @property
    def ends(self) -> list[int]:
        """Each row's last token."""
        return [o + n - 1 for o, n in zip(self.offsets, self.lens)]


def attention_mask(positions: torch.Tensor, kv_len: int,
                   window: int | None = None) -> torch.Tensor:
    """[B, 1, T, kv_len] bool: which cached positions each query position sees (those up to
    itself; with a sliding `window`, only the last `window` of them, itself included)."""
    keys = torch.arange(kv_len, device=positions.device)
    mask = keys[None, None, :] <= positions[:, :, None]
    if window is not None:
        mask &= keys[None, None, :] > positions[:, :, None] - window
    return mask[:, None]


class KVCache:
    """Paged cache: keys and values [layers, blocks + 1, K, block, E], allocated once.

    A sequence's positions live in the blocks its block table lists, in order (the leader's
    `ladder.engine.blocks.BlockPool` hands them out); the extra last block is scratch, where the
    padding of a batch's shorter rows writes and nothing reads. `max_seq` is the longest
    sequence the engine admits.
    """

    def __init__(self, n_layers: int, n_blocks: int, n_kv_heads: int, block: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 max_seq: int | None = None) -> None:
        shape = (n_layers, n_blocks + 1, n_kv_heads, block, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_blocks, self.block = n_blocks, block
        self.scratch = n_blocks  # the padding's block
        self.max_seq = block if max_seq is None else max_seq

    def write(self, layer: int, tables: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, K, T, E] at `positions` [B, T] of the rows' blocks."""
        bs = self.block
        blk = tables.gather(1, positions // bs)
        off = positions % bs
        self.k[layer][blk, :, off] = k.transpose(1, 2)
        self.v[layer][blk, :, off] = v.transpose(1, 2)

    def read(self, layer: int, tables: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' first `n` positions, gathered: k, v [B, K, n, E] (copies)."""
        w = -(-n // self.block)
        idx = tables[:, :w]
        b = idx.shape[0]

        def gather(c: torch.Tensor) -> torch.Tensor:
            x = c[layer][idx]  # [B, w, K, block, E]
            return x.transpose(1, 2).reshape(b, x.shape[2], w * self.block, -1)[:, :, :n]

        return gather(self.k), gather(self.v)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: ShardSpec, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id  # its index in the KV cache
        self.window = config.sliding_window  # the step's mask applies it (StepContext.mask)
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, config.head_dim
        e = config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_heads + 2 * self.n_kv) * e,
                              bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * e, config.dim, bias=False)
        # the KV head each query head reads; not j // (H / K) under the 'even' head split
        self.kv_map, self.grouped = spec.kv_map, spec.grouped
        self._kv_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Partial output [B, T, D] of this rank's heads; the caller all-reduces it."""
        if ctx.packed is not None:
            return self.wo(self.packed(self.wqkv(x), ctx))
        b, t, _ = x.shape
        h, k_, e = self.n_heads, self.n_kv, self.head_dim
        qk, v = self.wqkv(x).split(((h + k_) * e, k_ * e), dim=-1)
        # q and k heads sit side by side in wqkv's output: one rotation for both
        q, k = apply_rope(qk.view(b, t, h + k_, e).transpose(1, 2), ctx.cos, ctx.sin).split(
            (h, k_), dim=1)
        v = v.view(b, t, k_, e).transpose(1, 2)
        if ctx.cache is not None:
            ctx.cache.write(self.layer_id, ctx.tables, ctx.positions, k, v)
            if not ctx.causal:  # a fresh prefill's keys are all its own: no need to read back
                k, v = ctx.cache.read(self.layer_id, ctx.tables, ctx.kv_len)
        k, v = self._by_query_head(k, v)
        if t == 1:
            y = _decode_attention(q, k, v, ctx.mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask,
                                               is_causal=ctx.causal and ctx.mask is None,
                                               enable_gqa=h != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(b, t, h * e))

    def _by_query_head(self, k: torch.Tensor, v: torch.Tensor):
        if self.grouped:
            return k, v
        # one KV head per query head, in the query heads' order
        idx = self._kv_index
        if idx is None or idx.device != k.device:
            idx = self._kv_index = torch.tensor(self.kv_map, device=k.device)
        return k.index_select(1, idx), v.index_select(1, idx)

    def _rows(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              pos: torch.Tensor, tables: torch.Tensor, cache: "KVCache"):
        """n tokens' projections [n, (H + 2K) E] rotated, their keys and values written at
        `pos` [n] of the blocks `tables` [n, W] lists: q [n, H, 1, E], k and v [n, K, 1, E]."""
        n = qkv.shape[0]
        h, k_, e = self.n_heads, self.n_kv, self.head_dim
        qk, v = qkv.split(((h + k_) * e, k_ * e), dim=-1)
        q, k = apply_rope(qk.reshape(n, h + k_, 1, e), cos.view(n, 1, 1, e),
                          sin.view(n, 1, 1, e)).split((h, k_), dim=1)
        v = v.reshape(n, k_, 1, e)
        cache.write(self.layer_id, tables, pos[:, None], k, v)
        return q, k, v

    def packed(self, qkv: torch.Tensor, ctx: StepContext, decode=None,
               chunk=None) -> torch.Tensor:
        """A packed step's attention (`Packed`): qkv [1, N, (H + 2K) E] -> [1, N, H E], before
        `wo`. `decode(qkv, cos, sin, tables, pos)` may run the one-token rows and
        `chunk(qkv, cos, sin, table, start)` each longer one (the native kernels: rotation,
        cache write and attention at once); else they run here."""
        pk, cache = ctx.packed, ctx.cache
        h, e = self.n_heads, self.head_dim
        y = qkv.new_empty(1, qkv.shape[1], h * e)
        cos, sin, pos = ctx.cos[0, 0], ctx.sin[0, 0], ctx.positions[0]  # [N, E], [N]
        i = pk.decode_idx
        if len(i):
            tables = ctx.tables[pk.decode_rows]
            if decode is not None:
                y[0, i] = decode(qkv[0, i].contiguous(), cos[i].contiguous(),
                                 sin[i].contiguous(), tables.contiguous(), pos[i].contiguous())
            else:
                q, _, _ = self._rows(qkv[0, i], cos[i], sin[i], pos[i], tables, cache)
                n = int(pos[i].max()) + 1
                k, v = self._by_query_head(*cache.read(self.layer_id, tables, n))
                mask = attention_mask(pos[i][:, None], n, self.window)
                y[0, i] = _decode_attention(q, k, v, mask).reshape(len(i), h * e)
        for r in pk.spans:
            o, t, start = pk.offsets[r], pk.lens[r], pk.starts[r]
            sl = slice(o, o + t)
            if chunk is not None:
                y[0, sl] = chunk(qkv[0, sl].contiguous(), cos[sl].contiguous(),
                                 sin[sl].contiguous(), ctx.tables[r].contiguous(), start)
                continue
            q, k, v = self._rows(qkv[0, sl], cos[sl], sin[sl], pos[sl],
                                 ctx.tables[r:r + 1].expand(t, -1), cache)
            q = q.transpose(0, 2)  # [1, H, t, E]
            if start == 0:  # its own new keys are all it sees
                k, v = k.transpose(0, 2), v.transpose(0, 2)
            else:
                k, v = cache.read(self.layer_id, ctx.tables[r:r + 1], start + t)
            mask = None
            if start or (self.window is not None and t > self.window):
                mask = attention_mask(pos[sl][None], start + t, self.window)
            k, v = self._by_query_head(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=h != k.shape[1])
            y[0, sl] = out.transpose(1, 2).reshape(t, h * e)
        return y


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row: q [B, H, 1, E], k/v [B, K, L, E] -> [B, H, 1, E].

    Two small matmuls over the query heads grouped by KV head (no repeat of K/V). CPU SDPA's
    flash kernel costs ~3 ms per call at T=1, more than the layer's weights take to read.
    """
    b, h, _, e = q.shape
    kv = k.shape[1]
    dtype = q.dtype
    # float32 math: small bf16 batched matmuls have no fast CPU kernel, and the cast is cheap
    qg = q.reshape(b, kv, h // kv, e).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * (e ** -0.5)  # [B, K, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(dtype).view(b, h, 1, e)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, spec: ShardSpec) -> None:
        super().__init__()
        self.ffn = spec.ffn_size
        self.w13 = nn.Linear(config.dim, 2 * self.ffn, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(self.ffn, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.ffn, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, spec: ShardSpec, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, spec, layer_id)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, spec)

    def modules_in_order(self, ctx: StepContext):
        """The block's two residual modules, attention first, each a function of the residual
        stream h (its norm included) to the module's partial output, which the caller
        all-reduces. (A layout step may replace the block with one whose functions are faster
        for some steps: `ladder.native.layouts.NativeBlock`.)"""
        return (lambda h: self.attention(self.attn_norm(h), ctx),
                lambda h: self.mlp(self.mlp_norm(h)))
