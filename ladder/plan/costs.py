"""What each module of a decode step costs a rank: bytes read, FLOPs, seconds.

The slices are the engine's own (`ladder.model.tp.ShardSpec`): heads by KV-head groups where
the TP size allows (else evenly, a KV head shared by two ranks held by both; `--head-split`
chooses), the MLP balanced so each rank reads about the same bytes a layer, the LM head split
by vocabulary rows. Ranks can differ module by module (SmolLM2's 3 KV heads over 2 ranks: 2 and
1); the schedule (`step.play`) makes each all-reduce wait for the last rank to reach it.

Per rank, one decode step of `batch` rows at `context` cached positions:

    attention  weights (q + 2 kv heads) x E x D + q x E x D, KV cache 2 x kv x E x context x batch
    mlp        weights 3 x ffn x D
    lm_head    weights vocab slice x D (the whole vocabulary when replicated)

FLOPs are 2 per weight per row, and 4 x q heads x E x context per row for attention's scores and
weighted sum. Activations (batch x D) are noise beside the weights and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ladder.model.config import ModelConfig
from ladder.model.tp import ShardSpec
from ladder.plan.hardware import ComputeSample, Hardware, act_bytes, weight_bytes
from ladder.plan.models import shape_key


@dataclass(frozen=True, slots=True)
class Work:
    bytes: float
    flops: float


def default_split(config: ModelConfig, tp: int, head_split: str | None = None) -> str:
    """The head split asked, else the engine's default: `groups` where the TP size allows,
    else `even`."""
    return head_split or ("groups" if tp <= config.n_kv_heads else "even")


def shards(config: ModelConfig, tp: int, head_split: str | None = None) -> list[ShardSpec]:
    """Every rank's slices, split by `head_split` (default: `default_split`)."""
    split = default_split(config, tp, head_split)
    return [ShardSpec.make(config, r, tp, split) for r in range(tp)]


def module_work(config: ModelConfig, spec: ShardSpec, module: str, batch: int, context: int,
                dtype: str, replicated_head: bool = False) -> Work:
    """One rank's work in `module` (attention, mlp, lm_head) for one decode step."""
    wb, nb, d, e = weight_bytes(dtype), act_bytes(dtype), config.dim, config.head_dim
    if module == "attention":
        q, kv = spec.n_heads, spec.n_kv_heads
        weights = (2 * q + 2 * kv) * e * d
        cache = 2 * kv * e * context * batch
        return Work(weights * wb + cache * nb,
                    2 * batch * weights + 4 * batch * q * e * context)
    if module == "mlp":
        weights = 3 * spec.ffn_size * d
        return Work(weights * wb, 2 * batch * weights)
    if module == "lm_head":
        rows = config.vocab_size if replicated_head else spec.vocab_size
        return Work(rows * d * weight_bytes(dtype, head=True), 2 * batch * rows * d)
    raise ValueError(f"unknown module {module!r}")


def roofline_seconds(work: Work, hw: Hardware, dtype: str) -> float:
    peak = max(work.bytes / hw.mem_bw, work.flops / hw.flops(dtype))
    return peak / hw.efficiency + hw.module_overhead_s


def module_seconds(config: ModelConfig, specs: list[ShardSpec], module: str, batch: int,
                   context: int, hw: Hardware, dtype: str, replicated_head: bool = False,
                   split: str | None = None) -> list[float]:
    """Each rank's time in `module`: measured where the hardware's samples (of the head split
    `split`, when given) cover the case, else the roofline."""
    out = []
    for s in specs:
        seen = measured_module_seconds(hw.measured, shape_key(config), len(specs), dtype, module,
                                       batch, context, s.rank, split)
        out.append(seen if seen is not None else roofline_seconds(
            module_work(config, s, module, batch, context, dtype, replicated_head), hw, dtype))
    return out


def measured_module_seconds(samples: tuple[ComputeSample, ...], shape: str, tp: int,
                            dtype: str, module: str, batch: int, context: int,
                            rank: int = 0, split: str | None = None) -> float | None:
    """Linear in batch at each measured context, then linear in context between the two that
    bracket it; None when the samples do not cover (batch, context). Samples of `rank` win
    over samples for every rank; with `split`, samples of another head split are left out
    (those that name none are kept)."""
    for who in (rank, None):
        grid: dict[int, list[tuple[int, float]]] = {}
        for s in samples:
            if split is not None and s.split not in (None, split):
                continue
            if (s.shape, s.tp, s.dtype, s.module, s.rank) == (shape, tp, dtype, module, who):
                grid.setdefault(s.context, []).append((s.batch, s.seconds))
        by_ctx = [(c, _interp(sorted(pts), batch)) for c, pts in sorted(grid.items())]
        found = _interp([(c, v) for c, v in by_ctx if v is not None], context)
        if found is not None:
            return found
    return None


def _interp(pts: list[tuple[int, float]], x: float) -> float | None:
    if not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def rank_bytes(config: ModelConfig, specs: list[ShardSpec], batch: int, context: int,
               dtype: str) -> float:
    """The most any rank holds: its layers' slices with their KV cache, the whole embedding
    table (every rank looks tokens up) and, untied, its LM head rows."""
    embed = config.vocab_size * config.dim * act_bytes(dtype)
    most = 0.0
    for s in specs:
        per_layer = sum(module_work(config, s, m, batch, context, dtype).bytes
                        for m in ("attention", "mlp"))
        head = 0 if config.tie_embeddings else \
            module_work(config, s, "lm_head", batch, context, dtype).bytes
        most = max(most, config.n_layers * per_layer + embed + head)
    return most
