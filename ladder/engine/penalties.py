"""Penalties and biases (OpenAI's presence, frequency and logit_bias, vLLM's repetition), applied
by every rank to its own slice of the logits before the choice, so that a seed draws the same
tokens at any TP size (ladder.engine.vocab).

Each rank keeps, for its vocabulary rows, each KV slot's history (`History`): how often each
token has been generated, and which tokens the prompt holds. It learns both from the steps it
runs: a row that starts at position 0 is a new request's prompt (the slot's history starts
over), a decode row's one token is the request's last generated one. Only steps that carry
penalties update it; every step of a request with penalties does. As vLLM: repetition divides a
positive logit (multiplies a negative one) of every token seen in the prompt or the output;
presence subtracts once per generated token, frequency once per time generated; the bias adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladder.engine.vocab import Shard


@dataclass(slots=True)
class Penalties:
    """A step's penalties: one value a row, and the rows' biases as (row, token id, bias)."""

    presence: list[float]
    frequency: list[float]
    repetition: list[float]
    bias: list[tuple[int, int, float]]

    def encode(self) -> torch.Tensor:
        """int64: [3, B] floats as their float64 bits, then (row, id, bias bits) triples."""
        rows = torch.tensor([self.presence, self.frequency, self.repetition],
                            dtype=torch.float64).view(torch.int64).reshape(-1)
        if not self.bias:
            return rows
        r, i, v = zip(*self.bias)
        bias = torch.stack([torch.tensor(r), torch.tensor(i),
                            torch.tensor(v, dtype=torch.float64).view(torch.int64)], 1)
        return torch.cat([rows, bias.reshape(-1)])

    @classmethod
    def decode(cls, flat: torch.Tensor, b: int) -> "Penalties":
        rows = flat[:3 * b].view(torch.float64).view(3, b).tolist()
        t = flat[3 * b:].view(-1, 3)
        bias = list(zip(t[:, 0].tolist(), t[:, 1].tolist(),
                        t[:, 2].clone().view(torch.float64).tolist()))
        return cls(*rows, bias=bias)


class History:
    """This rank's slice of each slot's history: generated counts [S, V_local] and whether the
    prompt holds a token [S, V_local]."""

    def __init__(self, n_slots: int, shard: Shard, device: torch.device) -> None:
        self.shard = shard
        n = shard.hi - shard.lo
        self.counts = torch.zeros(n_slots, n, device=device)
        self.prompt = torch.zeros(n_slots, n, dtype=torch.bool, device=device)

    def _mine(self, tokens: list[int]) -> torch.Tensor:
        t = torch.tensor(tokens, dtype=torch.int64)
        t = t[(t >= self.shard.lo) & (t < self.shard.hi)] - self.shard.lo
        return t.to(self.counts.device)

    def update(self, tokens: list[list[int]], slots: list[int], starts: list[int]) -> None:
        decoded_slots, decoded = [], []
        for row, slot, start in zip(tokens, slots, starts):
            if start == 0:  # a new request: its prompt
                self.counts[slot] = 0
                self.prompt[slot] = False
                self.prompt[slot, self._mine(row)] = True
            else:  # its last generated token(s)
                decoded_slots += [slot] * len(row)
                decoded += row
        if decoded:  # one scatter for the step's decode rows
            t = torch.tensor(decoded, dtype=torch.int64)
            s = torch.tensor(decoded_slots, dtype=torch.int64)
            keep = (t >= self.shard.lo) & (t < self.shard.hi)
            idx = (s[keep].to(self.counts.device), (t[keep] - self.shard.lo).to(self.counts.device))
            self.counts.index_put_(idx, torch.ones(len(idx[0]), device=self.counts.device),
                                   accumulate=True)

    def apply(self, local: torch.Tensor, slots: list[int], p: Penalties) -> torch.Tensor:
        """local [B, V_local] (float) with each row's penalties and biases applied, the rows
        that have any at once."""
        rows = [i for i in range(len(slots))
                if p.repetition[i] != 1 or p.presence[i] or p.frequency[i]]
        if rows:
            dev = local.device
            idx = torch.tensor([slots[i] for i in rows], device=dev)
            col = torch.tensor([[p.repetition[i], p.presence[i], p.frequency[i]] for i in rows],
                               device=dev)
            rep, pres, freq = col[:, :1], col[:, 1:2], col[:, 2:]
            x, c = local[rows], self.counts[idx]
            seen = self.prompt[idx] | (c > 0)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            local[rows] = x - pres * (c > 0) - freq * c
        mine = [(r, t - self.shard.lo, b) for r, t, b in p.bias
                if self.shard.lo <= t < self.shard.hi]
        if mine:
            r, t, b = zip(*mine)
            local.index_put_((torch.tensor(r, device=local.device),
                              torch.tensor(t, device=local.device)),
                             torch.tensor(b, dtype=local.dtype, device=local.device),
                             accumulate=True)
        return local
