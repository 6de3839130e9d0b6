"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Samples one token per row; each request owns a torch.Generator seeded from its seed,
    so its tokens do not depend on what else is in the batch."""

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

    def sample(self, logits: torch.Tensor, keys: list, params: list[SamplingParams]) -> list[int]:
        """logits [B, V] (any float dtype) -> one token id per row."""
        logits = logits.float().cpu()
        out = logits.argmax(-1).tolist()
        for i, p in enumerate(params):
            if not p.greedy:
                out[i] = self._sample_row(logits[i], p, self._gens[keys[i]])
        return out

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, g: torch.Generator) -> int:
        row = row / p.temperature
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1:
            sorted_, idx = row.sort(descending=True)
            probs = sorted_.softmax(-1)
            # drop a token when the tokens before it already reach top_p (keeps at least one)
            drop = probs.cumsum(-1) - probs >= p.top_p
            row = row.scatter(0, idx[drop], float("-inf"))
        return int(torch.multinomial(row.softmax(-1), 1, generator=g).item())
