"""One rank's engine: its model shard, its KV cache, and the step every rank runs together.

Leader-driven SPMD: the leader (rank 0) decides each step's batch and broadcasts it to the other
ranks through the communicator's CPU group (`StepBatch.encode` -> one int64 header broadcast,
one body broadcast); every rank then runs the same forward and its slice of the LM head; the
leader gets the rows' tokens (greedy, or sampled under each row's parameters, without gathering
the logits), or the full logits where the batch asks for them.
Followers sit in `follow()` until the leader sends STOP. `ping()` is a health check that crosses
every rank: a broadcast, then an all-reduce of ones that must sum to the group's size; an idle
leader also pings as a heartbeat, so that no follower's wait runs into the link's timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ladder.engine import guided, vocab
from ladder.engine.blocks import blocks_behind
from ladder.engine.logprobs import token_logprobs
from ladder.engine.penalties import History, Penalties
from ladder.engine.sampling import COLUMNS, SamplingRows
from ladder.links.base import Communicator
from ladder.model.layers import KVCache, Packed, StepContext, attention_mask
from ladder.model.transformer import Transformer

OP_STEP, OP_STOP, OP_PING = 1, 2, 3
_HEADER = 5  # op, rows, tokens per row (padded), flags, block-table width
BLOCK = 16  # tokens per KV-cache block, by default


@dataclass(slots=True)
class StepBatch:
    """Rows of new tokens: row b appends `tokens[b]` to its sequence at position `starts[b]`,
    in the KV-cache blocks `tables[b]` lists (position p in its p // block-th); `slots[b]` is
    the sequence's index among the engine's `n_slots` (the penalties' history is kept by it).
    Without `tables` each slot owns a fixed run of blocks, enough for `max_seq`
    (`ShardEngine.fixed_table`)."""

    tokens: list[list[int]]
    slots: list[int]
    starts: list[int]
    tables: list[list[int]] | None = None
    all_logits: bool = False  # logits for every position (reference checks), not only the last
    greedy: bool = False  # every row takes its most likely token: the step returns token ids
    # each row's sampling: the step returns token ids (sampled on the ranks, ladder.engine.vocab)
    sampling: SamplingRows | None = None
    # per row: the most likely alternatives to report with its token's log-prob (-1: none);
    # the engine leaves them in `last_logprobs` (ladder.engine.logprobs)
    logprobs: list[int] | None = None
    # per row of a prefill: the same for each prompt token after the first (-1: none), left in
    # `last_prompt_logprobs`
    prompt_logprobs: list[int] | None = None
    # penalties and biases (ladder.engine.penalties): sent in two more broadcasts, as their
    # length varies with the biases
    penalties: Penalties | None = None
    # grammar masks (ladder.engine.guided): on the leader, a Future of int32 [B, words] being
    # computed while the step runs, broadcast after the forward; on a follower, True
    masks: object = None

    def body_len(self) -> int:
        return self.body_size(len(self.tokens), max(len(r) for r in self.tokens),
                              self.sampling is not None, self.asks_logprobs, self.width)

    @property
    def width(self) -> int:
        return 0 if self.tables is None else max(map(len, self.tables))

    @property
    def asks_logprobs(self) -> bool:
        return self.logprobs is not None or self.prompt_logprobs is not None

    @staticmethod
    def body_size(b: int, t: int, sampled: bool, logprobs: bool = False, width: int = 0) -> int:
        return (b * (t + 3) + (COLUMNS * b if sampled else 0) + (2 * b if logprobs else 0)
                + b * width)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(len(r) for r in self.tokens)
        w = self.width
        head = torch.tensor([OP_STEP, len(self.tokens), t,
                             int(self.all_logits) | int(self.greedy) << 1
                             | int(self.sampling is not None) << 2
                             | int(self.asks_logprobs) << 3
                             | int(self.penalties is not None) << 4
                             | int(self.masks is not None) << 5, w])
        body = torch.zeros(self.body_len(), dtype=torch.int64)
        b = len(self.tokens)
        for i, row in enumerate(self.tokens):
            body[i * t:i * t + len(row)] = torch.tensor(row)
        base = b * t
        body[base:base + b] = torch.tensor(self.slots)
        body[base + b:base + 2 * b] = torch.tensor(self.starts)
        body[base + 2 * b:base + 3 * b] = torch.tensor([len(r) for r in self.tokens])
        if self.sampling is not None:
            body[base + 3 * b:base + (3 + COLUMNS) * b] = self.sampling.encode().reshape(-1)
        end = len(body)
        if w:
            end -= b * w
            table = body[end:].view(b, w)
            table.fill_(-1)
            for i, row in enumerate(self.tables):
                table[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        if self.asks_logprobs:
            body[end - 2 * b:end - b] = torch.tensor(self.logprobs or [-1] * b)
            body[end - b:end] = torch.tensor(self.prompt_logprobs or [-1] * b)
        return head, body

    @classmethod
    def decode(cls, head: torch.Tensor, body: torch.Tensor) -> "StepBatch":
        _, b, t, flags, w = head.tolist()
        base = b * t
        lens = body[base + 2 * b:base + 3 * b].tolist()
        toks = body[:base].view(b, t)
        end = len(body) - b * w
        tables = None
        if w:
            tables = [[x for x in row if x >= 0] for row in body[end:].view(b, w).tolist()]
        return cls(tokens=[toks[i, :lens[i]].tolist() for i in range(b)],
                   slots=body[base:base + b].tolist(), starts=body[base + b:base + 2 * b].tolist(),
                   all_logits=bool(flags & 1), greedy=bool(flags & 2),
                   sampling=SamplingRows.decode(
                       body[base + 3 * b:base + (3 + COLUMNS) * b].view(b, COLUMNS))
                   if flags & 4 else None,
                   logprobs=body[end - 2 * b:end - b].tolist() if flags & 8 else None,
                   prompt_logprobs=body[end - b:end].tolist() if flags & 8 else None,
                   masks=True if flags & 32 else None, tables=tables)


@dataclass(frozen=True, slots=True)
class StepComm:
    """The last step's communication on this rank."""

    exposed_s: float = 0.0  # blocked in all-reduce waits
    bytes: int = 0  # all-reduced
    ops: int = 0  # all-reduces
    overlap: float | None = None  # CommStats.overlap_estimate(): the share of waits ladder hid


@dataclass(slots=True)
class StepTiming:
    """Totals since the last reset, split into prefill and decode steps."""

    steps: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    exposed_s: float = 0.0  # exposed all-reduce wait, all steps
    decode_exposed_s: float = 0.0
    bytes: int = 0


def block_bytes(config, n_kv_heads: int, block: int, dtype: torch.dtype) -> int:
    """Bytes of one KV-cache block on a rank holding `n_kv_heads` KV heads: keys and values of
    every layer."""
    return (2 * config.n_layers * n_kv_heads * block * config.head_dim
            * torch.empty(0, dtype=dtype).element_size())


class ShardEngine:
    """`n_slots` sequences at most at once (vLLM's max_num_seqs), each up to `max_seq` tokens,
    their KV in `n_blocks` blocks of `block` tokens (default: `n_slots` full-length sequences'
    worth, each slot its fixed run of blocks unless the step gives block tables)."""

    def __init__(self, model: Transformer, comm: Communicator, *, n_slots: int, max_seq: int,
                 n_blocks: int | None = None, block: int = BLOCK,
                 prefix_caching: bool = True) -> None:
        cfg, spec = model.config, model.spec
        if max_seq > cfg.max_seq_len:
            raise ValueError(f"max_seq={max_seq} exceeds the model's context {cfg.max_seq_len}")
        self.model, self.comm = model, comm
        self.rank, self.is_leader = comm.rank, comm.rank == 0
        w = model.tok_embeddings.weight
        self.dtype, self.device = w.dtype, w.device
        self.per_seq = -(-max_seq // block)  # blocks of a full-length sequence
        if n_blocks is None:
            n_blocks = n_slots * self.per_seq
        if n_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block of {block} tokens")
        self.cache = KVCache(cfg.n_layers, n_blocks, spec.n_kv_heads, block, cfg.head_dim,
                             self.dtype, self.device, max_seq=max_seq)
        self.n_slots, self.max_seq, self.n_blocks, self.block = n_slots, max_seq, n_blocks, block
        self.prefix_caching = prefix_caching  # the leader's scheduler's policies
        self.max_batched_tokens = 0  # chunked prefill's step budget (0: off)
        self.shard = vocab.Shard.of(model)
        self.timing = StepTiming()
        self.last = StepComm()
        self.last_logprobs: list = []  # the last step's, per row (leader; see StepBatch)
        self.last_prompt_logprobs: list = []
        self.history: History | None = None  # penalties' per-slot history, on first use

    # -- SPMD ----------------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> torch.Tensor | None:
        """Leader: broadcast `batch`, run it, return logits [B, V] (or [B, T, V] with all_logits),
        or with `greedy` each row's most likely token id [B] (int64), or with `sampling` each
        row's sampled token id [B]: then only each rank's best (value, id) per row crosses the
        link, not the logits (ladder.engine.vocab)."""
        if self.comm.world_size > 1:
            head, body = batch.encode()
            self.comm.broadcast(head)
            self.comm.broadcast(body)
            if batch.penalties is not None:
                flat = batch.penalties.encode()
                self.comm.broadcast(torch.tensor([flat.numel()]))
                self.comm.broadcast(flat)
        return self._run(batch)

    def ping(self) -> float:
        """Leader: a collective round trip through every rank; returns its seconds.

        Raises RuntimeError when the sum is wrong (the link's own errors propagate as they are).
        """
        t0 = time.perf_counter()
        if self.comm.world_size > 1:
            self.comm.broadcast(torch.tensor([OP_PING, 0, 0, 0, 0]))
            got = self._ping_reduce()
            if got != self.comm.world_size:
                raise RuntimeError(f"health all-reduce summed to {got}, expected "
                                   f"{self.comm.world_size}")
        return time.perf_counter() - t0

    def _ping_reduce(self) -> int:
        one = torch.ones(1, dtype=self.dtype, device=self.device)
        return round(float(self.comm.all_reduce(one).wait()[0]))

    def stop_followers(self) -> None:
        if self.comm.world_size > 1:
            self.comm.broadcast(torch.tensor([OP_STOP, 0, 0, 0, 0]))

    def follow(self) -> None:
        """Follower loop: run the leader's steps until it says STOP."""
        head = torch.zeros(_HEADER, dtype=torch.int64)
        while True:
            self.comm.broadcast(head)
            op, b, t, flags, w = head.tolist()
            if op == OP_STOP:
                return
            if op == OP_PING:
                self._ping_reduce()
                continue
            body = torch.zeros(StepBatch.body_size(b, t, bool(flags & 4), bool(flags & 8), w),
                               dtype=torch.int64)
            self.comm.broadcast(body)
            batch = StepBatch.decode(head, body)
            if flags & 16:
                n = torch.zeros(1, dtype=torch.int64)
                self.comm.broadcast(n)
                flat = torch.zeros(int(n[0]), dtype=torch.int64)
                self.comm.broadcast(flat)
                batch.penalties = Penalties.decode(flat, b)
            self._run(batch)

    # -- one forward ---------------------------------------------------------------------------
    def _run(self, batch: StepBatch) -> torch.Tensor | None:
        t0 = time.perf_counter()
        stats = self.comm.stats
        stats.reset()
        ctx, tokens, lens = self._context(batch)
        with torch.inference_mode():
            h = self.model.hidden(tokens, ctx)
            if batch.prompt_logprobs is not None and max(batch.prompt_logprobs) >= 0:
                if ctx.packed is not None:  # [1, N, D]: the rows' own
                    at = list(zip(ctx.packed.offsets, lens))
                    rows, toks = [h[0, o:o + n] for o, n in at], [tokens[0, o:o + n]
                                                                  for o, n in at]
                else:
                    rows = [h[b, :n] for b, n in enumerate(lens)]
                    toks = [tokens[b, :n] for b, n in enumerate(lens)]
                self.last_prompt_logprobs = self._prompt_logprobs(rows, toks, batch)
            if ctx.packed is not None:
                h = h[0, torch.tensor(ctx.packed.ends, device=h.device)]
            elif not batch.all_logits:
                h = h[torch.arange(h.shape[0]), torch.tensor(lens, device=h.device) - 1]
            # every rank: the LM head is vocabulary-parallel, and so are the decisions
            local = self.model.logits(h)
            chosen_from = (local if batch.penalties is None or batch.all_logits
                           else self._penalized(local, batch))
            if batch.masks is not None and not batch.all_logits:
                chosen_from = self._masked(local, chosen_from, batch)
            if batch.sampling is not None and not batch.all_logits:
                out = vocab.sample(chosen_from, batch.sampling, self.shard)
            elif batch.greedy and not batch.all_logits:
                out = vocab.greedy(chosen_from, self.shard)
            else:
                out = vocab.gather(local, self.shard)
            # the same test on every rank (a follower's -1s stand for the leader's None)
            asked = batch.logprobs is not None and max(batch.logprobs) >= 0
            if asked and not batch.all_logits:
                self.last_logprobs = token_logprobs(
                    local, self._on_every_rank(out, batch), batch.logprobs, self.shard)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.collect()
        dt = time.perf_counter() - t0
        self.last = StepComm(stats.exposed_s, stats.bytes, stats.ops, stats.overlap_estimate())
        tm = self.timing
        tm.steps += 1
        tm.exposed_s += stats.exposed_s
        tm.bytes += stats.bytes
        decode = tokens.shape[1] == 1  # a packed step (decode rows and prompt chunks): prefill
        if decode:
            tm.decode_steps += 1
            tm.decode_tokens += tokens.shape[0]
            tm.decode_s += dt
            tm.decode_exposed_s += stats.exposed_s
        else:
            tm.prefill_s += dt
        return out if self.is_leader else None

    def _penalized(self, local: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """A float copy of the last positions' logits with the rows' penalties and biases
        (log-probs stay the model's own: they read `local`)."""
        if self.history is None:
            self.history = History(self.n_slots, self.shard, self.device)
        self.history.update(batch.tokens, batch.slots, batch.starts, batch.penalties.prompt_lens)
        return self.history.apply(local.float().clone(), batch.slots, batch.penalties)

    def _masked(self, local: torch.Tensor, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """`x` with each constrained row's forbidden tokens at -inf: the leader's masks (its
        Future resolved now, after the forward it ran beside) broadcast to every rank
        (log-probs stay the model's own)."""
        if self.is_leader:
            masks = batch.masks.result() if hasattr(batch.masks, "result") else batch.masks
        else:
            masks = torch.zeros(len(batch.tokens), guided.words(self.model.config.vocab_size),
                                dtype=torch.int32)
        if self.comm.world_size > 1:
            self.comm.broadcast(masks)
        x = x.float().clone() if x is local else x
        return guided.apply(x, masks, self.shard)

    def _prompt_logprobs(self, rows: list[torch.Tensor], toks: list[torch.Tensor],
                         batch: StepBatch) -> list:
        """Per row: None, or the log-probs of its prompt tokens after the first (each from the
        position before it), every row in batch order on every rank. `rows`: each row's hidden
        states [n, D], `toks` its tokens [n]."""
        out: list = []
        for h, t, k in zip(rows, toks, batch.prompt_logprobs):
            n = len(t)
            if k < 0 or n < 2:
                out.append(None if k < 0 else [])
                continue
            local = self.model.logits(h[:n - 1])
            out.append(token_logprobs(local, t[1:], [k] * (n - 1), self.shard))
        return out

    def _on_every_rank(self, tokens: torch.Tensor | None, batch: StepBatch) -> torch.Tensor:
        """The step's chosen tokens on every rank: a greedy step has them already; a sampled
        step's are the leader's, sent in the exchange accounted as "gather"."""
        if batch.sampling is None or self.shard.world == 1:
            return tokens
        # float32, as vocab's tables: token ids are exact below 2**24
        table = torch.zeros(len(batch.tokens), dtype=torch.float32, device=self.device)
        if self.is_leader:
            table[:] = tokens.to(table)
        return self.shard.gather(table).long()

    def fixed_table(self, slot: int) -> list[int]:
        """Slot `slot`'s own run of blocks, for steps without block tables."""
        if (slot + 1) * self.per_seq > self.n_blocks:
            raise ValueError(f"slot {slot}: a step without block tables needs {self.per_seq} "
                             f"blocks a slot, and the cache has {self.n_blocks}")
        return list(range(slot * self.per_seq, (slot + 1) * self.per_seq))

    def _context(self, batch: StepBatch):
        b = len(batch.tokens)
        lens = [len(r) for r in batch.tokens]
        t = max(lens)
        tables = batch.tables or [self.fixed_table(s) for s in batch.slots]
        bs = self.block
        window = self.model.config.sliding_window
        for s, st, n, tb in zip(batch.slots, batch.starts, lens, tables):
            if not 0 <= s < self.n_slots:
                raise ValueError(f"slot {s} outside 0..{self.n_slots - 1}")
            if st + n > self.max_seq:
                raise ValueError(f"slot {s}: {st + n} tokens exceed the cache's {self.max_seq}")
            # the blocks wholly before the row's sliding window may name the scratch block
            gone = blocks_behind(st, window, bs)
            if len(tb) * bs < st + n or not all(0 <= x < self.n_blocks for x in tb[gone:]) \
                    or not all(0 <= x <= self.n_blocks for x in tb[:gone]):
                raise ValueError(f"slot {s}: block table {tb} does not hold positions "
                                 f"{gone * bs}..{st + n - 1} in 0..{self.n_blocks - 1}")
        if b > 1 and 1 in lens and t > 1 and not batch.all_logits:
            return self._packed_context(batch, tables, lens)
        tokens = torch.zeros(b, t, dtype=torch.int64)
        for i, row in enumerate(batch.tokens):
            tokens[i, :len(row)] = torch.tensor(row)
        starts = torch.tensor(batch.starts)
        positions = starts[:, None] + torch.arange(t)[None, :]
        kv_len = max(st + n for st, n in zip(batch.starts, lens))
        # padded to the padding's last position; the padding writes into the scratch block
        table = self._table(tables, max(batch.starts) + t)
        mask = None
        causal = False
        if window is not None and kv_len > window:  # some position sees only its window
            mask = attention_mask(positions, kv_len, window)
        elif b == 1 and t == 1:
            pass  # the single new token sees every cached position
        elif b == 1 and batch.starts[0] == 0:
            causal = True  # fresh prefill: plain causal attention over its own tokens
        else:
            mask = attention_mask(positions, kv_len)  # [B, 1, T, L]
        positions = positions.to(self.device)
        cos, sin = self.model.rope(positions, self.dtype)
        ctx = StepContext(cos=cos, sin=sin, positions=positions, cache=self.cache,
                          tables=table, kv_len=kv_len, causal=causal,
                          mask=None if mask is None else mask.to(self.device))
        return ctx, tokens.to(self.device), lens

    def _packed_context(self, batch: StepBatch, tables: list[list[int]], lens: list[int]):
        """Decode rows beside longer ones (prompt chunks): one sequence of all their tokens
        (ladder.model.layers.Packed)."""
        tokens = torch.tensor([x for row in batch.tokens for x in row], dtype=torch.int64)
        positions = torch.cat([torch.arange(st, st + n) for st, n in zip(batch.starts, lens)])
        kv_len = max(st + n for st, n in zip(batch.starts, lens))
        table = self._table(tables, kv_len)
        positions = positions[None].to(self.device)
        cos, sin = self.model.rope(positions, self.dtype)
        ctx = StepContext(cos=cos, sin=sin, positions=positions, cache=self.cache,
                          tables=table, kv_len=kv_len,
                          packed=Packed.of(lens, batch.starts, self.device))
        return ctx, tokens[None].to(self.device), lens

    def _table(self, tables: list[list[int]], n: int) -> torch.Tensor:
        """The rows' block tables as int64 [B, W] on the device, W blocks enough for positions
        0..n-1; entries past a row's own blocks name the scratch block."""
        width = -(-n // self.block)
        table = torch.full((len(tables), width), self.cache.scratch, dtype=torch.int64)
        for i, tb in enumerate(tables):
            table[i, :min(len(tb), width)] = torch.tensor(tb[:width], dtype=torch.int64)
        return table.to(self.device)
