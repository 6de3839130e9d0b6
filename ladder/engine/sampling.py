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
    min_p: float = 0.0  # keep tokens at least this times as likely as the likeliest (0: off)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the match
    ignore_eos: bool = False
    min_tokens: int = 0  # no stop (eos, ids or strings) before this many tokens
    logprobs: int | None = None  # each token's log-prob and this many alternatives (0-20)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (after the first)
    presence_penalty: float = 0.0  # subtracted from a generated token's logit (OpenAI's)
    frequency_penalty: float = 0.0  # ... times the times it was generated (OpenAI's)
    repetition_penalty: float = 1.0  # divides a seen token's positive logit (vLLM's)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # llguidance's grammar text: the output follows it (guided.py)

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
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < SEED_SPACE:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {k}")
        if not (math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty)
                and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError("penalties must be finite, repetition_penalty above 0")
        self.logit_bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if any(not math.isfinite(b) for _, b in self.logit_bias):
            raise ValueError("a logit bias must be finite")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1 or self.logit_bias)


def is_greedy(temperature: float) -> bool:
    """The one definition of a greedy row: below MIN_TEMPERATURE, logit / temperature would
    overflow, so such a row takes its most likely token (NaN, which no request passes, too)."""
    return not temperature >= MIN_TEMPERATURE


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

    def row(self, key: object, params: SamplingParams
            ) -> tuple[float, int, float, int, float]:
        """One request's row of a step's `SamplingRows`, with this step's seed. Raises
        ValueError for a value the step's int64 wire format cannot hold."""
        seed = 0 if params.greedy else int(torch.randint(0, 2**62, (),
                                                         generator=self._gens[key]))
        row = (params.temperature, params.top_k, params.top_p, seed, params.min_p)
        try:
            struct.pack("<dqdqd", *row)
        except struct.error as e:
            raise ValueError(f"a sampling parameter does not fit its 64 bits: {row}: {e}") \
                from None
        return row


@dataclass(slots=True)
class SamplingRows:
    """A step's sampling, one entry a row: temperature, top_k, top_p, the step's seed and min_p
    (the vocabulary-parallel draw's input, `ladder.engine.vocab.sample`)."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    seed: list[int]
    min_p: list[float] | None = None  # None: 0 for every row

    @classmethod
    def of(cls, rows: list[tuple]) -> "SamplingRows":
        """From (temperature, top_k, top_p, seed[, min_p]) rows."""
        return cls(*(list(col) for col in zip(*rows)))

    def __len__(self) -> int:
        return len(self.temperature)

    def greedy_rows(self) -> list[int]:
        return [i for i, t in enumerate(self.temperature) if is_greedy(t)]

    def encode(self) -> torch.Tensor:
        """int64 [B, COLUMNS] for the step's int64 broadcast: floats as their float64 bits."""
        t = torch.tensor(self.temperature, dtype=torch.float64).view(torch.int64)
        p = torch.tensor(self.top_p, dtype=torch.float64).view(torch.int64)
        m = torch.tensor(self.min_p or [0.0] * len(self), dtype=torch.float64).view(torch.int64)
        return torch.stack([t, torch.tensor(self.top_k), p, torch.tensor(self.seed), m], 1)

    @classmethod
    def decode(cls, table: torch.Tensor) -> "SamplingRows":
        r = table.t().contiguous()
        return cls(r[0].view(torch.float64).tolist(), r[1].tolist(),
                   r[2].view(torch.float64).tolist(), r[3].tolist(),
                   r[4].view(torch.float64).tolist())


COLUMNS = 5  # int64s a row of SamplingRows takes in a step's body
