"""Penalties and biases (OpenAI's presence, frequency and logit_bias, vLLM's repetition), applied
by every rank to its own slice of the logits before the choice, so that a seed draws the same
tokens at any TP size (ladder.engine.vocab).

Each rank keeps, for its vocabulary rows, each KV slot's history (`History`): how often each
token has been generated, and which tokens the prompt holds. It learns both from the steps it
runs: a row that starts at position 0 is a new request's (the slot's history starts over), and
each row says how many of its tokens are the prompt's (`Penalties.prompt_lens`; the rest are
generated ones: a decode row's one token, or a preempted request's output recomputed). Only steps that carry
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
    # per row, how many of its tokens are prompt tokens (None: a row from position 0 is all
    # prompt, any other row all generated)
    prompt_lens: list[int] | None = None

    def encode(self) -> torch.Tensor:
        """int64: [4, B] floats as their float64 bits (the 4th: prompt_lens, -1 for None), then
        (row, id, bias bits) triples."""
        lens = self.prompt_lens or [-1] * len(self.presence)
        rows = torch.tensor([self.presence, self.frequency, self.repetition, lens],
                            dtype=torch.float64).view(torch.int64).reshape(-1)
        if not self.bias:
            return rows
        r, i, v = zip(*self.bias)
        bias = torch.stack([torch.tensor(r), torch.tensor(i),
                            torch.tensor(v, dtype=torch.float64).view(torch.int64)], 1)
        return torch.cat([rows, bias.reshape(-1)])

    @classmethod
    def decode(cls, flat: torch.Tensor, b: int) -> "Penalties":
        rows = flat[:4 * b].view(torch.float64).view(4, b).tolist()
        t = flat[4 * b:].view(-1, 3)
        bias = list(zip(t[:, 0].tolist(), t[:, 1].tolist(),
                        t[:, 2].clone().view(torch.float64).tolist()))
        lens = None if rows[3] and rows[3][0] < 0 else [int(x) for x in rows[3]]
        return cls(*rows[:3], bias=bias, prompt_lens=lens)


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

    def update(self, tokens: list[list[int]], slots: list[int], starts: list[int],
               prompt_lens: list[int] | None = None) -> None:
        decoded_slots, decoded = [], []
        if prompt_lens is None:
            prompt_lens = [len(row) if start == 0 else 0 for row, start in zip(tokens, starts)]
        for row, slot, start, k in zip(tokens, slots, starts, prompt_lens):
            if start == 0:  # a new request (or one preempted, recomputed): it starts over
                self.counts[slot] = 0
                self.prompt[slot] = False
            if k:
                self.prompt[slot, self._mine(row[:k])] = True
            # its generated token(s)
            decoded_slots += [slot] * (len(row) - k)
            decoded += row[k:]
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
