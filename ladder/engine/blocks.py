"""The leader's KV-cache blocks (`BlockPool`): which are free, which sequences hold which, and
which full blocks are cached for a later request that shares their prefix.

Every rank's cache has the same blocks (`ladder.model.layers.KVCache`); only the leader decides
who holds which, and each step carries the rows' block tables (`StepBatch.tables`).

Prefix caching, as vLLM's: a full block is keyed by a hash of its tokens and of every token
before it (a chain: each key hashes the previous key and the block's tokens), so two prompts
that start alike share the blocks of their common start, copy-free. A block stays cached after
its last user lets go of it, and is evicted, least recently used first, only when a new block
is wanted and none is free; a sequence lets go of its blocks last to first, so that its tail
goes before the start that others are likelier to share.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass


def blocks_behind(position: int, window: int | None, block: int) -> int:
    """How many of a sequence's blocks lie wholly before the sliding window of its token at
    `position` (0 without a window): nothing reads them from that token on."""
    return 0 if window is None else max(0, position - window + 1) // block


def block_keys(tokens: list[int], block: int, keys: list[bytes] | None = None) -> list[bytes]:
    """The keys of the full blocks of `tokens` (a chain of 128-bit hashes); given `keys`, those
    of its first blocks already, the chain goes on from them."""
    keys = list(keys or [])
    prev = keys[-1] if keys else b""
    for i in range(len(keys), len(tokens) // block):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(",".join(map(str, tokens[i * block:(i + 1) * block])).encode())
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass(slots=True)
class CacheStats:
    """Prefix caching since the start: prompt tokens looked up and found, blocks evicted,
    sequences preempted."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    preemptions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockPool:
    def __init__(self, n_blocks: int, block: int, *, caching: bool = True) -> None:
        self.n_blocks, self.block, self.caching = n_blocks, block, caching
        self.free: deque[int] = deque(range(n_blocks))  # holding nothing anyone may want
        self.refs = [0] * n_blocks
        self.key_of: dict[int, bytes] = {}  # cached block -> its key
        self.by_key: dict[bytes, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, unused: evicted first-in
        self.stats = CacheStats()

    def available(self) -> int:
        """Blocks a sequence can get now: free ones and cached ones nobody uses."""
        return len(self.free) + len(self.idle)

    def used(self) -> int:
        return self.n_blocks - self.available()

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached start of `keys` (not yet held)."""
        out = []
        if self.caching:
            for k in keys:
                b = self.by_key.get(k)
                if b is None:
                    break
                out.append(b)
        return out

    def hold(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (`lookup`'s)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self.idle[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks for one sequence, or None (and nothing taken) if fewer are available."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:  # the least recently used cached block
                b, _ = self.idle.popitem(last=False)
                del self.by_key[self.key_of.pop(b)]
                self.stats.evicted_blocks += 1
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Let go of a sequence's blocks, last first (its tail is evicted before its start)."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None
                else:
                    self.free.append(b)

    def register(self, blocks: list[int], keys: list[bytes]) -> None:
        """Cache full blocks whose keys and values are now computed (block i holds the tokens
        of key i). A key cached already keeps its block; this one stays private."""
        if not self.caching:
            return
        for b, k in zip(blocks, keys):
            if b not in self.key_of and k not in self.by_key:
                self.key_of[b], self.by_key[k] = k, b
