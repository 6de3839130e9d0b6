"""Vocabulary-parallel decisions: which token each row takes, decided across the ranks' slices
of the logits without gathering them.

Every rank holds the logits of its own vocabulary rows ([B, V_local], `Transformer.logits`); a
decision is one small all-reduce of a table in which each rank fills its own part (zeros
elsewhere), accounted as a "gather" wait. Every rank must call the same decision; only the
leader's result means anything.

- `greedy`: each rank's best (value, token id) per row, 8 bytes a row and rank instead of the
  row's V logits; the first maximum wins, as argmax over the gathered row would.
- `sample`: each sampled row is drawn by inverse CDF in vocabulary order (`picks`), so a seed
  draws the same token however the vocabulary is split. One table carries each rank's
  logsumexp of logit / temperature over its slice and, for rows that top-k or top-p cut, its
  `CANDIDATES` largest values with their ids. The leader draws a cut row from the candidates
  when every token it keeps is among them (`thresholds`); a row that cuts nothing is drawn in
  the slice its draw falls in, that rank's token crossing in the greedy exchange; a top-p row
  whose nucleus reaches below the candidates (or a top_k past `TOPK_IN_TABLE`) gathers its row.
- `gather`: the full logits on every rank (reference checks only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladder.engine.sampling import SamplingRows
from ladder.links.base import Communicator

# each rank's largest values (and their ids) per top-p row that cross the link: they decide the
# nucleus unless it reaches below them (a flat distribution), when the row's logits cross instead
CANDIDATES = 128
TOPK_IN_TABLE = 512  # a larger top_k gathers its row: the k-th largest needs k values a rank
LOCAL, FROM_TABLE, WHOLE = 0, 1, 2  # how a sampled row is drawn
F64 = torch.float64


@dataclass(frozen=True, slots=True)
class Shard:
    """This rank's part of the vocabulary and the group that decides with it."""

    rank: int
    world: int
    lo: int  # this rank's rows of the vocabulary: lo .. hi - 1
    hi: int
    vocab_size: int
    comm: Communicator  # the model's reduce (NoComm for `desync`)

    @classmethod
    def of(cls, model) -> "Shard":
        lo, hi = model.spec.vocab
        return cls(model.spec.rank, model.spec.world, lo, hi, model.config.vocab_size,
                   model.reduce)

    def gather(self, table: torch.Tensor) -> torch.Tensor:
        """All-reduce a table that each rank fills in its own part (zeros elsewhere)."""
        if self.world == 1:
            return table
        return self.comm.all_reduce(table, "gather").wait()


def gather(local: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Full logits [..., V] on every rank from each rank's slice [..., V_local]."""
    if shard.world == 1:
        return local
    full = local.new_zeros(*local.shape[:-1], shard.vocab_size)
    full[..., shard.lo:shard.hi] = local
    return shard.gather(full)


def greedy(local: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The most likely token of each row of local [B, V_local]: int64 [B], on every rank."""
    local = local.float()
    if shard.world == 1:
        return local.argmax(-1)
    best = local.new_zeros(shard.world, 2, local.shape[0])
    _fill_best(best, local, slice(None), shard)
    return best_over_ranks(shard.gather(best))


def _fill_best(best: torch.Tensor, local: torch.Tensor, rows, shard: Shard) -> None:
    """This rank's (largest value, its token id) of local[rows] into best[rank, :, rows]."""
    idx = local[rows].argmax(-1)
    best[shard.rank, 0, rows] = local[rows].gather(-1, idx[:, None])[:, 0]
    best[shard.rank, 1, rows] = (idx + shard.lo).float()  # exact below 2**24


def best_over_ranks(best: torch.Tensor) -> torch.Tensor:
    """best [world, 2, B]: each rank's (best value, its token id) per row -> token ids [B]; of
    equal values the lowest rank's (argmax keeps the first maximum)."""
    rank = best[:, 0].argmax(0)  # [B]
    return best[:, 1].gather(0, rank[None])[0].long()


@dataclass(slots=True)
class _Sampled:
    """The sampled rows of a step on this rank: their scaled slice and its exchange."""

    index: list[int]  # the rows' places in the batch
    x: torch.Tensor  # [n, V_local] logit / temperature
    e: torch.Tensor  # [n, V_local] exp(x - peak): the slice's weights
    top_k: list[int]
    top_p: list[float]
    u: list[float]  # each row's draw in [0, 1)
    cut: list[int]  # rows (of these) that top-k or top-p cut
    c: int  # candidates a rank sends per cut row
    lse: torch.Tensor | None = None  # [world, n] each slice's logsumexp
    log_z: torch.Tensor | None = None  # [n]


def sample(local: torch.Tensor, rows: SamplingRows, shard: Shard) -> torch.Tensor:
    """A token per row of local [B, V_local] under each row's sampling (a greedy row takes its
    most likely token): int64 [B] on the leader (every rank must call this)."""
    local = local.float()
    greedy_rows = rows.greedy_rows()
    if len(greedy_rows) == len(rows):
        return greedy(local, shard)
    s = _scaled(local, rows, set(greedy_rows), shard)
    table = shard.gather(_candidates(s, shard)).cpu()
    modes, vals, ids, tau = _modes(s, table, shard)
    out = torch.zeros(local.shape[0], dtype=torch.int64)  # filled in on the leader
    lead = shard.rank == 0
    if lead:
        _from_table(s, modes, vals, ids, tau, out)
    _whole(s, modes, shard, lead, out)
    drawn = [j for j, m in enumerate(modes) if m == LOCAL]
    if drawn or greedy_rows:
        _in_slices(local, s, drawn, greedy_rows, shard, out)
    return out


def _scaled(local: torch.Tensor, rows: SamplingRows, greedy_rows: set[int],
            shard: Shard) -> _Sampled:
    index = [i for i in range(len(rows)) if i not in greedy_rows]
    temp = torch.tensor([rows.temperature[i] for i in index], dtype=torch.float32,
                        device=local.device)
    x = local[index] / temp[:, None]
    mins = [rows.min_p[i] if rows.min_p else 0.0 for i in index]
    if max(mins, default=0.0) > 0:
        x = _min_p(x, mins, shard)
    ks = [k if k < shard.vocab_size else 0 for k in (rows.top_k[i] for i in index)]
    ps = [rows.top_p[i] for i in index]
    cut = [j for j in range(len(index)) if ks[j] or ps[j] < 1]
    c = max(1, *(k for k in ks if k <= TOPK_IN_TABLE),
            CANDIDATES if min(ps) < 1 else 0) if cut else 1
    peak = x.max(-1).values
    # a slice a grammar forbids whole (ladder.engine.guided) weighs nothing, not NaN
    e = (x - peak.masked_fill(peak == float("-inf"), 0.0)[:, None]).exp_()
    return _Sampled(index, x, e, ks, ps, [uniform(rows.seed[i]) for i in index], cut, c)


def _min_p(x: torch.Tensor, mins: list[float], shard: Shard) -> torch.Tensor:
    """x [n, V_local] (logit / temperature) with the tokens less likely than min_p times the
    row's likeliest at -inf (vLLM's min_p, before top-k and top-p): the likeliest's value is
    the largest of the ranks' maxima, one small exchange."""
    peaks = x.new_zeros(shard.world, x.shape[0])
    peaks[shard.rank] = x.max(-1).values
    peak = shard.gather(peaks).max(0).values if shard.world > 1 else peaks[0]
    m = torch.tensor(mins, dtype=torch.float32, device=x.device)
    floor = torch.where(m > 0, peak + m.log(), torch.full_like(peak, float("-inf")))
    return x.masked_fill(x < floor[:, None], float("-inf"))


def _candidates(s: _Sampled, shard: Shard) -> torch.Tensor:
    """This rank's part of the exchange, per sampled row: c values and their ids (rows that
    cut), the slice's logsumexp, and whether tokens stayed home: [world, n, 2c + 2]."""
    c, n = s.c, len(s.index)
    table = s.x.new_zeros(shard.world, n, 2 * c + 2)
    table[shard.rank, :, :c] = float("-inf")
    if s.cut:
        top = s.x[s.cut].topk(min(c, shard.hi - shard.lo), -1)
        w = top.values.shape[1]
        table[shard.rank, s.cut, :w] = top.values
        table[shard.rank, s.cut, c:c + w] = (top.indices + shard.lo).float()  # exact < 2**24
    peak = s.x.max(-1).values
    table[shard.rank, :, 2 * c] = peak + s.e.sum(-1).log()
    table[shard.rank, :, 2 * c + 1] = float(shard.hi - shard.lo > c)
    return table


def _modes(s: _Sampled, table: torch.Tensor, shard: Shard):
    """How each sampled row is drawn (LOCAL, FROM_TABLE or WHOLE), and for cut rows their
    candidates (values, ids, in the ranks' order) and thresholds."""
    c = s.c
    s.lse = table[:, :, 2 * c]
    s.log_z = torch.logsumexp(s.lse, 0)
    modes = [LOCAL] * len(s.index)
    if not s.cut:
        return modes, None, None, None
    last = table[:, :, c - 1].masked_fill(table[:, :, 2 * c + 1] == 0, float("-inf"))
    bound = last.max(0).values[s.cut]  # every token that stayed home is at most this
    vals = table[:, s.cut, :c].permute(1, 0, 2).reshape(len(s.cut), -1)
    ids = table[:, s.cut, c:2 * c].permute(1, 0, 2).reshape(len(s.cut), -1)
    tau, ok = thresholds(vals.sort(-1, descending=True).values,
                         torch.tensor([s.top_k[j] for j in s.cut]),
                         torch.tensor([s.top_p[j] for j in s.cut], dtype=F64),
                         s.log_z[s.cut], bound)
    from_table = ok & (bound.double() < tau)  # every kept token is a candidate
    for f, j in enumerate(s.cut):
        modes[j] = FROM_TABLE if from_table[f] and s.top_k[j] <= TOPK_IN_TABLE else WHOLE
    if shard.world > 1 and min(s.top_p) < 1:
        # the branches differ in collectives: the leader's reading decides for every rank
        agreed = s.x.new_zeros(len(modes))
        if shard.rank == 0:
            agreed[:] = torch.tensor(modes, dtype=torch.float32, device=agreed.device)
        modes = [int(m) for m in shard.gather(agreed).tolist()]
    return modes, vals, ids, tau


def _from_table(s: _Sampled, modes, vals, ids, tau, out: torch.Tensor) -> None:
    """Leader: the cut rows whose kept tokens are all candidates, drawn from the table."""
    rows = [f for f, j in enumerate(s.cut) if modes[j] == FROM_TABLE]
    if not rows:
        return
    keep = vals[rows].double() >= tau[rows, None]
    got = picks(vals[rows].masked_fill(~keep, float("-inf")), ids[rows].long(),
                torch.tensor([s.u[s.cut[f]] for f in rows], dtype=F64))
    for f, t in zip(rows, got.tolist()):
        out[s.index[s.cut[f]]] = t


def _whole(s: _Sampled, modes, shard: Shard, lead: bool, out: torch.Tensor) -> None:
    """Rows whose nucleus reaches below the candidates: their logits gathered, drawn whole."""
    whole = [j for j, m in enumerate(modes) if m == WHOLE]
    if not whole:
        return
    full = s.x.new_zeros(len(whole), shard.vocab_size)
    full[:, shard.lo:shard.hi] = s.x[whole]
    full = shard.gather(full)
    if not lead:
        return
    full = full.cpu()
    n, v = len(whole), shard.vocab_size
    tau, _ = thresholds(full.sort(-1, descending=True).values,
                        torch.tensor([s.top_k[j] for j in whole]),
                        torch.tensor([s.top_p[j] for j in whole], dtype=F64),
                        torch.logsumexp(full, -1), torch.full((n,), float("-inf"), dtype=F64))
    got = picks(full.masked_fill(full.double() < tau[:, None], float("-inf")),
                torch.arange(v).expand(n, v), torch.tensor([s.u[j] for j in whole], dtype=F64))
    for j, t in zip(whole, got.tolist()):
        out[s.index[j]] = t


def _in_slices(local: torch.Tensor, s: _Sampled, drawn: list[int], greedy_rows: list[int],
               shard: Shard, out: torch.Tensor) -> None:
    """Rows that cut nothing, drawn in the slice of the rank their draw falls in (each rank
    draws in its own slice; the slices' masses say whose counts), and greedy rows, in one
    (value, id) exchange."""
    mass = (s.lse.double() - s.log_z.double()).exp()  # [world, n]: each slice's share
    before = mass.cumsum(0) - mass
    best = local.new_zeros(shard.world, 2, local.shape[0])
    if drawn:
        d = torch.tensor(drawn)
        u = torch.tensor(s.u, dtype=F64)[d]
        share = (u - before[shard.rank, d]) / mass[shard.rank, d].clamp_min(1e-300)
        best[shard.rank, 1, [s.index[j] for j in drawn]] = \
            (_draw(s.e[d.to(s.e.device)], share.to(s.e.device)) + shard.lo).float()
    if greedy_rows:
        _fill_best(best, local, greedy_rows, shard)
    best = shard.gather(best).cpu()
    if shard.rank != 0:
        return
    if greedy_rows:
        out[greedy_rows] = best_over_ranks(best[:, :, greedy_rows])
    for j in drawn:  # the slice the draw falls in (the last with mass, at the edge)
        ends = (before[:, j] + mass[:, j]).tolist()
        r = next((r for r in range(shard.world) if s.u[j] < ends[r]),
                 max(r for r in range(shard.world) if mass[r, j] > 0))
        out[s.index[j]] = int(best[r, 1, s.index[j]])


def _draw(e: torch.Tensor, share: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Inverse CDF per row of weights e [R, V] (float32): the first index whose cumulative
    weight exceeds share [R] (float64, in [0, 1)) of the row's total; out of range, the first or
    last index that weighs anything. Sums of `block` weights in float32, accumulated in
    float64: one pass over e, then one block."""
    r, v = e.shape
    nb = -(-v // block)
    if v % block:
        e = torch.cat([e, e.new_zeros(r, nb * block - v)], 1)
    blocks = e.view(r, nb, block)
    ends = blocks.sum(-1).double().cumsum(-1)  # [R, nb]
    target = share.clamp(min=0.0) * ends[:, -1]
    # rounding at the top edge must not land on a weightless token: at most the last that weighs
    b = torch.minimum(torch.searchsorted(ends, target[:, None], right=True)[:, 0],
                      (ends < ends[:, -1:]).sum(-1))
    prev = torch.where(b > 0, ends.gather(1, (b - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(r, device=e.device), b].double().cumsum(-1)  # [R, block]
    k = torch.minimum(torch.searchsorted(inner, (target - prev)[:, None], right=True)[:, 0],
                      (inner < inner[:, -1:]).sum(-1))
    return b * block + k


def uniform(seed: int) -> float:
    """The step's draw in [0, 1) from a row's seed (62 random bits; the top 52 make a double
    that is never 1)."""
    return (seed >> 10) / 2.0**52


def picks(values: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws, one per row of values [R, N] (weights exp(values); -inf weighs
    nothing) over the tokens ids [R, N] (any order): the first token in vocabulary order whose
    cumulative probability exceeds u [R] (float64). The same rule as a vocabulary-parallel draw
    (`sample`), so a seed draws the same token however the vocabulary
    is split. Returns token ids [R] (int64)."""
    order = ids.argsort(1)
    v = values.gather(1, order).double()
    cdf = (v - v.max(1, keepdim=True).values).exp().cumsum(1)
    k = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    last = (cdf < cdf[:, -1:]).sum(1, keepdim=True)  # the last token that weighs anything
    return ids.gather(1, order).gather(1, torch.minimum(k, last))[:, 0].long()


def pick(values: torch.Tensor, ids: torch.Tensor, u: float) -> int:
    """`picks` for one row."""
    return int(picks(values[None], ids[None], torch.tensor([u], dtype=torch.float64))[0])


def thresholds(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               log_z: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least value (logit / temperature) a token needs to stay in play after top-k, then
    top-p (-inf: nothing cut), per row, and whether `values` decide it.

    values [R, N]: candidates in descending order (-inf pads allowed), holding every token above
    bound [R] and, where top_k [R] (0: off) is on, at least the top_k largest overall; top_p [R]
    (1: off); log_z [R]: logsumexp over the whole vocabulary. Top-k keeps the tokens at least as
    large as the k-th largest; top-p then keeps, of those, the largest in order until the ones
    before reach `top_p` of their (renormalized) mass, and every token equal to the last one
    kept. Returns (thresholds [R] float64, decided [R] bool): undecided where a token that is
    not among the candidates may be kept by top-p, or weighs in its normalization.
    """
    r, n = values.shape
    v = values.double()
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    kth = v.gather(1, (top_k - 1).clamp(0, n - 1)[:, None])[:, 0]
    k_on = (top_k > 0) & (top_k <= n) & (kth > ninf)
    tau = torch.where(k_on, kth, ninf)
    kept = (v >= tau[:, None]) & (v > ninf)  # a prefix of each row
    lz = torch.where(k_on, torch.logsumexp(v.masked_fill(~kept, ninf), 1), log_z.double())
    probs = (v - lz[:, None]).exp().masked_fill(~kept, 0.0)
    before = probs.cumsum(1) - probs
    count = ((before < top_p.double()[:, None]) & kept).sum(1).clamp_(min=1)
    cut = v.gather(1, (count - 1)[:, None])[:, 0]
    p_on = top_p < 1
    b = bound.double()
    decided = ~p_on | ((b < cut) & (~k_on | (b < tau)))
    return torch.where(p_on, torch.maximum(tau, cut), tau), decided


def threshold(values: torch.Tensor, top_k: int, top_p: float, log_z: float,
              bound: float = float("-inf")) -> float | None:
    """`thresholds` for one row; None where the candidates do not decide it."""
    f64 = torch.float64
    tau, ok = thresholds(values[None], torch.tensor([top_k]), torch.tensor([top_p], dtype=f64),
                         torch.tensor([log_z], dtype=f64), torch.tensor([bound], dtype=f64))
    return float(tau[0]) if bool(ok[0]) else None
