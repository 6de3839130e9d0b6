"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

SEED_SPACE = 2**64  # a seed is any integer in [0, 2**64); the HTTP API reduces others modulo it
INT64_MAX = 2**63 - 1


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the match
    ignore_eos: bool = False
    min_tokens: int = 0  # no stop (eos, ids or strings) before this many tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < SEED_SPACE:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        """The one definition of a greedy row: below MIN_TEMPERATURE, logit / temperature
        would overflow, so such a row takes its most likely token."""
        return self.temperature < MIN_TEMPERATURE


# each rank's largest values (and their ids) per top-p row that cross the link: they decide the
# nucleus unless it reaches below them (a flat distribution), when the row's logits cross instead
CANDIDATES = 128
TOPK_IN_TABLE = 512  # a larger top_k gathers its row: the k-th largest needs k values a rank
MIN_TEMPERATURE = 1e-4  # below it a row is greedy (logit / temperature would overflow)


class Sampler:
    """Each sampled request owns a torch.Generator seeded from its seed; every step draws 62
    random bits per row from it (the step's `uniform`), and the ranks sample by inverse CDF in
    vocabulary order. So a request's tokens depend on neither the rest of the batch nor the TP
    size."""

    def __init__(self) -> None:
        self._gens: dict[object, torch.Generator] = {}

    def add(self, key: object, params: SamplingParams) -> None:
        if not params.greedy:
            g = torch.Generator()
            g.manual_seed(params.seed if params.seed is not None
                          else int(torch.randint(0, 2**62, ()).item()))
            self._gens[key] = g

    def remove(self, key: object) -> None:
        self._gens.pop(key, None)

    def row(self, key: object, params: SamplingParams) -> tuple[int, int, int, int]:
        """One request's row of a step's sampling table (`encode_row`), with this step's seed."""
        seed = 0 if params.greedy else int(torch.randint(0, 2**62, (),
                                                         generator=self._gens[key]))
        return encode_row(params.temperature, params.top_k, params.top_p, seed)

    def rows(self, keys: list, params: list[SamplingParams]) -> torch.Tensor:
        """A step's sampling table: int64 [B, 4] of `row`s."""
        return torch.tensor([self.row(k, p) for k, p in zip(keys, params)], dtype=torch.int64)


def encode_row(temperature: float, top_k: int, top_p: float, seed: int
               ) -> tuple[int, int, int, int]:
    """A row of int64s (it travels in the step's int64 broadcast): temperature and top_p as
    float64 bits, top_k, the step's seed. Raises struct.error for a value int64 cannot hold."""
    t, p = struct.unpack("<qq", struct.pack("<dd", temperature, top_p))
    return struct.unpack("<qqqq", struct.pack("<qqqq", t, top_k, p, seed))


def encode_rows(temperature, top_k, top_p, seeds) -> torch.Tensor:
    """int64 [B, 4] of `encode_row`s."""
    return torch.tensor([encode_row(*r) for r in zip(temperature, top_k, top_p, seeds)],
                        dtype=torch.int64)


def decode_rows(rows: torch.Tensor) -> tuple[list[float], list[int], list[float], list[int]]:
    r = rows.t().contiguous()
    return (r[0].view(torch.float64).tolist(), r[1].tolist(), r[2].view(torch.float64).tolist(),
            r[3].tolist())


def uniform(seed: int) -> float:
    """The step's draw in [0, 1) from a row's seed (62 random bits; the top 52 make a double
    that is never 1)."""
    return (seed >> 10) / 2.0**52


def picks(values: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws, one per row of values [R, N] (weights exp(values); -inf weighs
    nothing) over the tokens ids [R, N] (any order): the first token in vocabulary order whose
    cumulative probability exceeds u [R] (float64). The same rule as a vocabulary-parallel draw
    (`ladder.model.Transformer.sample`), so a seed draws the same token however the vocabulary
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
