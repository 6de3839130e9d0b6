"""Which slice of the model a tensor-parallel rank owns.

Column-parallel q/k/v and gate/up (rows of the weight), row-parallel o and down (columns), the
gpt-fast way: the weights are sliced at load time, so each rank reads only its own slices and the
model code stays single-device. Attention heads are split one of two ways (`HEAD_SPLITS`):

    groups  by KV-head groups, unevenly where the TP size does not divide the KV-head count
            (SmolLM2's 3 KV heads over TP=2 give ranks 2 and 1 groups, i.e. 6 and 3 query heads):
            no KV head is held twice. The default.
    even    query heads as evenly as the count allows (SmolLM2 at TP=2: 5 and 4); a KV head whose
            group straddles two ranks is held, projected and cached by both (SmolLM2: 2 and 2 KV
            heads, 4/3 of the KV cache). The MLP is split evenly too, so each module costs every
            rank about the same, which the standard schedule needs: it waits for the slowest
            rank after every module.

With `groups`, the MLP's intermediate dimension is split so that every rank reads about the same
weight bytes per layer (a rank with fewer heads gets more of the MLP: a decode step waits for the
slowest rank). Either way in chunks aligned to quantized GGUF blocks. The LM head is split by
vocabulary rows (each rank computes its slice of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from ladder.model.config import ConfigError, ModelConfig


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


HEAD_SPLITS = ("groups", "even")
FFN_ALIGN = 32  # intermediate-dimension slices in multiples of this (quantized GGUF blocks)


def balanced_ffn(config: ModelConfig, heads: list[tuple[int, int]],
                 align: int = FFN_ALIGN) -> list[int]:
    """Intermediate sizes per rank that even out attention + MLP weights per layer.

    `heads`: each rank's (query heads, KV heads). Attention reads q + 2k heads' rows of wqkv
    and q heads' columns of wo (E each); each intermediate unit costs 3 rows/columns of D
    (gate, up, down).
    """
    e, n = config.head_dim, config.intermediate_size
    attn = [(2 * q + 2 * k) * e for q, k in heads]  # per-rank attention cost in units of D
    target = (sum(attn) + 3 * n) / len(heads)
    want = [max(0.0, (target - a) / 3) for a in attn]
    units, scale = n // align, n / max(sum(want), 1e-9)
    sizes = [int(round(w * scale / align)) for w in want]
    sizes[-1] = units - sum(sizes[:-1])
    if min(sizes) < 1:  # too small to balance: plain split
        return split_sizes(n, len(heads), align)
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
    kv_map: tuple[int, ...] = ()  # the local KV head of each local query head

    @classmethod
    def make(cls, config: ModelConfig, rank: int, world: int,
             head_split: str = "groups") -> "ShardSpec":
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"tp rank {rank} is outside a group of size {world}")
        if head_split not in HEAD_SPLITS:
            raise ConfigError(f"head split {head_split!r} is not one of {HEAD_SPLITS}")
        g = config.group_size
        if head_split == "groups":
            if world > config.n_kv_heads:
                raise ConfigError(f"tp={world} exceeds the model's n_kv_heads="
                                  f"{config.n_kv_heads}: heads are split by KV-head groups "
                                  "(head split 'even' holds a KV head on several ranks)")
            kv_sizes = split_sizes(config.n_kv_heads, world)
            q = [(a * g, b * g) for a, b in (_offsets(kv_sizes, r) for r in range(world))]
        else:
            if world > config.n_heads:
                raise ConfigError(f"tp={world} exceeds the model's n_heads={config.n_heads}")
            q_sizes = split_sizes(config.n_heads, world)
            q = [_offsets(q_sizes, r) for r in range(world)]
        kv = [(lo // g, -(-hi // g)) for lo, hi in q]  # the groups each rank's queries touch
        heads = [(b - a, d - c) for (a, b), (c, d) in zip(q, kv)]
        ffn_sizes = balanced_ffn(config, heads) if head_split == "groups" else \
            split_sizes(config.intermediate_size, world, FFN_ALIGN)
        ffn = _offsets(ffn_sizes, rank)
        vocab = _offsets(split_sizes(config.vocab_size, world), rank)
        (q_lo, q_hi), (kv_lo, _) = q[rank], kv[rank]
        return cls(rank=rank, world=world, kv_heads=kv[rank], q_heads=q[rank], ffn=ffn,
                   vocab=vocab, kv_map=tuple(h // g - kv_lo for h in range(q_lo, q_hi)))

    @property
    def grouped(self) -> bool:
        """Whether the local query heads form whole, equal groups per local KV head (the layout
        grouped-query attention kernels take as it is)."""
        h, k = self.n_heads, self.n_kv_heads
        return h % k == 0 and self.kv_map == tuple(j // (h // k) for j in range(h))

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
