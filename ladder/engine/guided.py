"""Structured output: a grammar matcher per constrained request on the leader, and the token
masks its rows carry into a step, applied by every rank to its own slice of the logits.

The grammar engine is llguidance (1.9.1): a CPU wheel with no dependencies (xgrammar's pulls
triton, gigabytes we do not need; outlines-core compiles a schema into a regex index over the
whole vocabulary before the first token, a cost that grows with the schema), that computes each
step's mask lazily from an Earley parser over a token trie, for a batch's rows in parallel in
Rust threads with the GIL released: 8 rows' masks in 0.2 ms here, against a 34 ms sampled
SmolLM2 step at TP=2 (bench/results/2026-12-03-session13.md). A request's grammar is compiled from its JSON schema by the API
(`grammar_from_json_schema`), checked there (a 400 names what is wrong), and its matcher built
here off the loop's thread (`Guide.matcher`).

A step's masks: the leader starts them in a thread of their own before the step (`Guide.masks`,
each row's matcher in the state its last token left it), while the step's plan is broadcast and
the forward runs; after the forward, the leader broadcasts them (int32 [B, ceil(V / 32)], one bit
a token; an unconstrained row all ones) and each rank sets its slice's forbidden logits to -inf
before the choice (`apply`), so the draw stays vocabulary-parallel (ladder.engine.vocab). The
model's end-of-text ids are the matcher's end: allowed only where the grammar may end.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ladder.engine.vocab import Shard

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A grammar the matcher cannot use (the message says why)."""


def words(vocab_size: int) -> int:
    """int32 words of a row's mask: one bit a token."""
    return (vocab_size + 31) // 32


class Guide:
    """The leader's grammar side: the llguidance tokenizer (built on first use: ~1 s for a 49k
    vocabulary) and the thread that computes masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, tuple(eos_token_ids)
        self._ll = None
        self._no_bytes: str | None = None  # why token_bytes gave up, once it has
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._executor = None

    def _ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance
                self._ll = self._tokenizer.grammar_tokenizer(self.vocab_size, self.eos)
                self._executor = llguidance.LLExecutor()
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ladder-masks")
            return self._ll

    def token_bytes(self, token: int) -> bytes | None:
        """A token's own bytes, as the tokenizer maps them (a byte-level BPE's characters, a
        SentencePiece byte token): the llguidance tokenizer's, built on first use; None (the
        caller takes the text's) where llguidance cannot take the tokenizer."""
        if self._no_bytes is not None:
            return None
        try:
            return self._ll_tokenizer().decode_bytes([token])
        except Exception as e:  # noqa: BLE001 - log-probs lose their bytes, not the request
            self._no_bytes = f"{type(e).__name__}: {e}"
            log.warning("token bytes unavailable, log-probs report the text's: %s",
                        self._no_bytes)
            return None

    def matcher(self, grammar: str):
        """A fresh matcher of `grammar` (llguidance's grammar text); GrammarError if unusable."""
        import llguidance
        m = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"the grammar cannot be used: {m.get_error()}")
        return m

    def masks(self, matchers: list) -> Future:
        """Each row's mask from its matcher (None: unconstrained, all ones), computed in the
        mask thread; the Future resolves to int32 [B, words]."""
        self._ll_tokenizer()
        return self._pool.submit(self._fill, matchers)

    def _fill(self, matchers: list) -> torch.Tensor:
        out = torch.full((len(matchers), words(self.vocab_size)), -1, dtype=torch.int32)
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if rows:
            self._executor.unsafe_compute_mask_ptr(rows, out.data_ptr(), out.shape[1] * 4,
                                                   out.shape[0])
        return out


def apply(local: torch.Tensor, masks: torch.Tensor, shard: Shard) -> torch.Tensor:
    """local [B, V_local] (float, changed in place) with each constrained row's tokens that its
    mask (int32 [B, words]) forbids at -inf; only this rank's slice of the bits is read."""
    rows = (masks != -1).any(1).nonzero()[:, 0]
    if len(rows) == 0:
        return local
    ids = torch.arange(shard.lo, shard.hi)
    bits = (masks[rows][:, ids // 32] >> (ids % 32)) & 1  # [R, V_local]
    rows = rows.to(local.device)
    local[rows] = local[rows].masked_fill(bits.to(local.device) == 0, float("-inf"))
    return local
