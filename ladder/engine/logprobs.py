"""Log-probabilities of the chosen tokens and of each row's most likely ones, computed on the
vocabulary slices without gathering the logits (ladder.engine.vocab's way).

Each rank fills its part of one table per asking row: its slice's logsumexp, the chosen token's
logit where the token is in its slice (zero elsewhere), and its k largest logits with their ids;
one all-reduce ("gather") sums the parts. The leader takes logsumexp over the slices' logsumexps
(the row's log-partition), the chosen token's log-probability, and the k best of the ranks'
candidates. The distribution is the model's own (the raw logits: no temperature, top-k or
top-p), as OpenAI's and transformers' log_softmax report it. 20 alternatives at most (OpenAI's
limit): a rank sends 2 + 2k floats a row, never its V/TP logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladder.engine.vocab import Shard

MAX_TOP = 20


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One generated (or prompt) token: its log-probability and the row's `top` most likely
    (token id, log-probability), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Scored:
    """A token as the API reports it: its id, its text alone, its log-probability, and its own
    bytes where the tokenizer gives them (a token that ends inside a character: its text alone
    is a replacement character, its bytes the character's first ones)."""

    id: int
    text: str
    logprob: float | None  # None: a prompt's first token (nothing precedes it)
    raw: bytes | None = None  # None: the text's UTF-8


def scored(lp: TokenLogprobs, token: int, text_of,
           bytes_of=lambda i: None) -> tuple[Scored, tuple[Scored, ...]]:
    """`lp` of `token` with the tokens' texts (`text_of(id)`) and bytes (`bytes_of(id)`; None:
    the text's): the token and its alternatives."""
    return (Scored(token, text_of(token), lp.logprob, bytes_of(token)),
            tuple(Scored(i, text_of(i), v, bytes_of(i)) for i, v in lp.top))


def token_logprobs(local: torch.Tensor, tokens: torch.Tensor, ks: list[int],
                   shard: Shard) -> list[TokenLogprobs | None]:
    """For each row of local [B, V_local] (raw logits) whose k in `ks` is >= 0: the log-prob of
    its token in `tokens` [B] (the same on every rank) and its k most likely tokens; None for
    rows with k < 0. Every rank must call this; only the leader's result means anything."""
    rows = [i for i, k in enumerate(ks) if k >= 0]
    out: list[TokenLogprobs | None] = [None] * len(ks)
    if not rows:
        return out
    x = local[rows].float()
    tok = tokens[rows].to(device=x.device, dtype=torch.int64)
    kmax = max(ks[i] for i in rows)
    c = min(kmax, shard.hi - shard.lo)
    # float32 on the logits' device, as vocab's tables (a GPU group all-reduces over NCCL); ids
    # are exact below 2**24
    table = x.new_zeros(shard.world, len(rows), 2 + 2 * kmax)
    table[shard.rank, :, 0] = torch.logsumexp(x, -1)
    owned = (tok >= shard.lo) & (tok < shard.hi)
    chosen = x.gather(1, (tok - shard.lo).clamp(0, shard.hi - shard.lo - 1)[:, None])[:, 0]
    table[shard.rank, :, 1] = torch.where(owned, chosen, torch.zeros_like(chosen))
    if kmax:
        table[shard.rank, :, 2:2 + kmax] = float("-inf")
        top = x.topk(c, -1)
        table[shard.rank, :, 2:2 + c] = top.values
        table[shard.rank, :, 2 + kmax:2 + kmax + c] = (top.indices + shard.lo).float()
    g = shard.gather(table).double().cpu()
    if shard.rank != 0:
        return out
    log_z = torch.logsumexp(g[:, :, 0], 0)
    lp = (g[:, :, 1].sum(0) - log_z).tolist()
    if kmax:
        vals = g[:, :, 2:2 + kmax].permute(1, 0, 2).reshape(len(rows), -1)
        ids = g[:, :, 2 + kmax:].permute(1, 0, 2).reshape(len(rows), -1)
        best = vals.topk(kmax, -1)
        top_ids = ids.gather(1, best.indices).long().tolist()
        top_lps = (best.values - log_z[:, None]).tolist()
    for j, i in enumerate(rows):
        k = ks[i]
        out[i] = TokenLogprobs(lp[j], tuple(zip(top_ids[j][:k], top_lps[j][:k])) if k else ())
    return out
