"""Which slice of the model a tensor-parallel rank owns.

Column-parallel q/k/v and gate/up (rows of the weight), row-parallel o and down (columns), the
gpt-fast way: the weights are sliced at load time, so each rank reads only its own slices and the
model code stays single-device. Attention heads are split by KV-head groups, unevenly where the
TP size does not divide the KV-head count (SmolLM2's 3 KV heads over TP=2 give ranks 2 and 1
groups, i.e. 6 and 3 query heads). The MLP's intermediate dimension is split so that every rank
reads about the same weight bytes per token (a rank with fewer heads gets more of the MLP: a
decode step waits for the slowest rank), in chunks aligned to quantized GGUF blocks. The LM head
is split by vocabulary rows (each rank computes its slice of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from ladder.config import ConfigError, ModelConfig


def split_sizes(n: int, parts: int, align: int = 1) -> list[int]:
    """Split n into `parts` near-equal sizes, each a multiple of `align` (the last takes the rest)."""
    units, rest = divmod(n, align)
    if units < parts:
        align, units, rest = 1, n, 0
    base, extra = divmod(units, parts)
    sizes = [(base + (1 if i < extra else 0)) * align for i in range(parts)]
    sizes[-1] += rest
    return sizes


def _offsets(sizes: list[int], i: int) -> tuple[int, int]:
    lo = sum(sizes[:i])
    return lo, lo + sizes[i]


def balanced_ffn(config: ModelConfig, kv_sizes: list[int], align: int = 32) -> list[int]:
    """Intermediate sizes per rank that even out attention + MLP weights per layer.

    Attention weights per KV group: (group_size + 2) * E rows of wqkv plus group_size * E
    columns of wo; each intermediate unit costs 3 rows/columns of D (gate, up, down).
    """
    e, g, n = config.head_dim, config.group_size, config.intermediate_size
    attn = [k * (2 * g + 2) * e for k in kv_sizes]  # per-rank attention cost in units of D
    target = (sum(attn) + 3 * n) / len(kv_sizes)
    want = [max(0.0, (target - a) / 3) for a in attn]
    units, scale = n // align, n / max(sum(want), 1e-9)
    sizes = [int(round(w * scale / align)) for w in want]
    sizes[-1] = units - sum(sizes[:-1])
    if min(sizes) < 1:  # too small to balance: plain split
        return split_sizes(n, len(kv_sizes), align)
    sizes = [s * align for s in sizes]
    sizes[-1] += n - sum(sizes)
    return sizes


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """The slices owned by `rank` of a group of `world` ranks."""

    rank: int
    world: int
    kv_heads: tuple[int, int]  # [lo, hi) KV heads of this rank
    q_heads: tuple[int, int]  # [lo, hi) query heads
    ffn: tuple[int, int]  # [lo, hi) of the intermediate dimension
    vocab: tuple[int, int]  # [lo, hi) of the LM head's rows (logits)

    @classmethod
    def make(cls, config: ModelConfig, rank: int, world: int) -> "ShardSpec":
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"tp rank {rank} is outside a group of size {world}")
        if world > config.n_kv_heads:
            raise ConfigError(f"tp={world} exceeds the model's n_kv_heads={config.n_kv_heads}: "
                              "heads are split by KV-head groups")
        kv_sizes = split_sizes(config.n_kv_heads, world)
        kv = _offsets(kv_sizes, rank)
        g = config.group_size
        ffn = _offsets(balanced_ffn(config, kv_sizes), rank)
        vocab = _offsets(split_sizes(config.vocab_size, world), rank)
        return cls(rank=rank, world=world, kv_heads=kv, q_heads=(kv[0] * g, kv[1] * g), ffn=ffn,
                   vocab=vocab)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def ffn_size(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def vocab_size(self) -> int:
        return self.vocab[1] - self.vocab[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == 0
