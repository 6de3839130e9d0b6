"""The leader's scheduler: continuous batching over a paged KV cache.

Each `step()` is one engine step on every rank: either a prefill of newly admitted requests
(queued requests join between decode steps while a sequence slot and the blocks their prompts
need are free, the blocks of a cached prefix shared rather than recomputed) or one decode token
for every running request. A sequence takes another block when its last one fills; when none is
left, the youngest running request is preempted (its blocks freed, its prompt and output
recomputed when it is admitted again) rather than failing or waiting forever. Finished and
cancelled requests free their slot and blocks at once; the next step reuses them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ladder.engine.blocks import BlockPool, block_keys, blocks_behind
from ladder.engine.logprobs import Scored, scored
from ladder.engine.penalties import Penalties
from ladder.engine.sampling import Sampler, SamplingParams, SamplingRows
from ladder.engine.step import ShardEngine, StepBatch

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot be served as asked (e.g. longer than the context)."""


class RequestFailed(RuntimeError):
    """The server failed one request while building or finishing its part of a step (a fault of
    ours, not the client's): that request ends with this error, the group and every other
    request go on."""


@dataclass(slots=True)
class RequestStats:
    arrival: float
    admitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    cached_query: bool = False  # whether its prompt was looked up there
    preempted: int = 0  # times its blocks were taken back (and its tokens recomputed)

    @property
    def queue_s(self) -> float:
        return self.admitted - self.arrival

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first."""
        n = self.generated_tokens - 1
        return (self.finished - self.first_token) / n if n > 0 else 0.0


@dataclass(slots=True)
class Request:
    prompt: list[int]
    params: SamplingParams
    id: object = None
    stats: RequestStats = field(default_factory=lambda: RequestStats(time.perf_counter()))
    # filled while running
    slot: int = -1
    blocks: list[int] = field(default_factory=list)  # its KV-cache blocks, in position order
    output: list[int] = field(default_factory=list)
    text: str = ""
    held: str = ""  # decoded text not yet emitted: it may be the start of a stop string
    decoder: object = None
    matcher: object = None  # with params.grammar: its matcher (ladder.engine.guided)
    keys: list = field(default_factory=list)  # its full blocks' prefix-cache keys
    computed: int = 0  # tokens whose keys and values its blocks hold
    target: int = 0  # tokens to prefill before it decodes: its prompt (and recomputed output)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target


@dataclass(slots=True)
class TokenEvent:
    request_id: object
    token_id: int | None  # None for a finish without a new token (cancel)
    text: str  # text delta ("" when the tokenizer is absent)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    stats: RequestStats | None = None  # on the final event
    error: str | None = None  # what failed, with finish_reason "error" (RequestFailed)
    # with SamplingParams.logprobs: the token's log-prob and its alternatives, most likely first
    logprob: Scored | None = None
    top_logprobs: tuple[Scored, ...] = ()
    # with SamplingParams.prompt_logprobs, on a request's first event: each prompt token's
    # after the first, (Scored, alternatives)
    prompt_logprobs: list | None = None


@dataclass(slots=True)
class Scheduled:
    """What one `Scheduler.step` decided and what came of it (the leader's step record)."""

    kind: str  # "prefill" (admitted requests' prompts), "decode" (a token for every row) or
    # "mixed" (decoding rows' tokens and prompt chunks: chunked prefill)
    rows: int  # rows the engine ran (a request that failed its part is not among them)
    tokens: int  # new tokens fed to the model
    events: list[TokenEvent]


def new_result(logprobs: bool = False) -> dict:
    """A request's outcome as `add_event` builds it: tokens, text, finish_reason, stats, the
    error of a request that failed, and (with `logprobs`) each token's (Scored, alternatives)."""
    return {"tokens": [], "text": "", "finish_reason": None, "stats": None, "error": None,
            "logprobs": [] if logprobs else None, "prompt_logprobs": None}


def add_event(result: dict, ev: TokenEvent) -> None:
    if ev.token_id is not None:
        result["tokens"].append(ev.token_id)
    if ev.logprob is not None and result.get("logprobs") is not None:
        result["logprobs"].append((ev.logprob, ev.top_logprobs))
    if ev.prompt_logprobs is not None:
        result["prompt_logprobs"] = ev.prompt_logprobs
    result["text"] += ev.text
    if ev.finish_reason:
        result["finish_reason"], result["stats"] = ev.finish_reason, ev.stats
        result["error"] = ev.error


class Scheduler:
    def __init__(self, engine: ShardEngine, *, eos_token_ids: tuple[int, ...] = (),
                 decoder_factory=None, token_text=None, token_bytes=None,
                 max_prefill_rows: int = 4,
                 guide=None, prefix_caching: bool = True, max_batched_tokens: int = 0) -> None:
        self.engine = engine
        self.guide = guide  # ladder.engine.guided.Guide: structured output (needs a tokenizer)
        self.eos = tuple(eos_token_ids)
        self.decoder_factory = decoder_factory  # -> object with .feed(token_id) -> str
        # a token's text alone (for log-probs); without a tokenizer, vLLM's "token_id:<id>"
        self.token_text = token_text or (lambda i: f"token_id:{i}")
        # a token's own bytes (for log-probs); None: its text's
        self.token_bytes = token_bytes or (lambda i: None)
        self.max_prefill_rows = max_prefill_rows
        # chunked prefill: while sequences decode, a step runs at most this many tokens (their
        # one each, and prompt chunks in the rest); 0: whole prompts in steps of their own
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        # a heap of free sequence slots, the lowest first (a slot indexes the penalties'
        # history; the KV lives in the pool's blocks)
        self.free = list(range(engine.n_slots))
        self.pool = BlockPool(engine.n_blocks, engine.block, caching=prefix_caching)
        # a sliding window (Mistral): the blocks a sequence's next token no longer sees go
        # back to the pool, their places in its table naming the engine's scratch block
        self.window = engine.model.config.sliding_window
        self.scratch = engine.cache.scratch
        # blocks a prefill leaves for the running sequences' next blocks (vLLM's watermark)
        self.watermark = engine.n_blocks // 100
        self.sampler = Sampler()
        self._ids = itertools.count()

    def check(self, req: Request) -> None:
        """Raise RequestError if `req` cannot be served (touches no state: any thread may call)."""
        n = len(req.prompt)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.engine.max_seq:
            raise RequestError(f"the prompt has {n} tokens; the context holds "
                               f"{self.engine.max_seq} (prompt plus at least one new token)")
        need = -(-(n + 1) // self.engine.block)
        if need > self.engine.n_blocks:
            raise RequestError(f"the prompt has {n} tokens; the KV cache holds "
                               f"{self.engine.n_blocks * self.engine.block} (prompt plus at least "
                               "one new token)")
        vocab = self.engine.model.config.vocab_size
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if req.params.grammar is not None and self.guide is None:
            raise RequestError("structured output needs the model's tokenizer, and this "
                               "checkpoint has none")

    def prepare(self, req: Request) -> None:
        """Build what a request needs before it joins (its grammar's matcher), in the caller's
        thread, not the loop's: RequestError if its grammar cannot be used."""
        self.check(req)
        if req.params.grammar is not None and req.matcher is None:
            from ladder.engine.guided import GrammarError
            try:
                req.matcher = self.guide.matcher(req.params.grammar)
            except GrammarError as e:
                raise RequestError(str(e)) from None

    def add(self, req: Request) -> Request:
        self.check(req)
        if req.id is None:
            req.id = next(self._ids)
        req.stats.prompt_tokens = len(req.prompt)
        self.waiting.append(req)
        return req

    def cancel(self, request_id) -> TokenEvent | None:
        for r in list(self.waiting):
            if r.id == request_id:
                self.waiting.remove(r)
                return self._finish(r, None, "cancelled", "")
        for r in self.running.values():
            if r.id == request_id:
                return self._finish(r, None, "cancelled", "")
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def load(self) -> tuple[int, int, int]:
        """(running, waiting, slots)."""
        return len(self.running), len(self.waiting), self.engine.n_slots

    def step(self) -> Scheduled | None:
        """One engine step: with chunked prefill and sequences decoding, their tokens and prompt
        chunks in the step's token budget; else a prefill when requests wait and a slot and
        their blocks are free (or a prefill is under way), else a decode of every running
        request; None when there is nothing to run."""
        prefilling = sum(r.prefilling for r in self.running.values())
        pending = prefilling or (self.waiting and self.free)
        if self.max_batched_tokens and pending and len(self.running) > prefilling:
            return self._mixed()  # with sequences decoding
        if pending:
            done = self._prefill()
            if done is not None:
                return done
        if self.running:
            return self._decode()
        return None

    def _grow(self, rows: list[Request]) -> list[Request]:
        """A block for each decoding row whose last one is full, taken back from the youngest
        running request while short; the rows still running."""
        needy = [r for r in rows if len(r.prompt) + len(r.output) - 1 >= len(r.blocks)
                 * self.engine.block]
        while needy and self.pool.available() < len(needy):
            victim = max(self.running.values(), key=lambda r: (r.stats.admitted, r.slot))
            self._preempt(victim)
            needy = [r for r in needy if r is not victim]
        for r in needy:
            r.blocks += self.pool.allocate(1)
        return [r for r in rows if self.running.get(r.slot) is r]

    def _decode(self) -> Scheduled:
        rows = self._grow(sorted(self.running.values(), key=lambda r: r.slot))
        return self._step("decode", rows, [[r.output[-1]] for r in rows],
                          [len(r.prompt) + len(r.output) - 1 for r in rows])

    def _mixed(self) -> Scheduled:
        """Every decoding row's next token and, in the rest of the step's token budget, the next
        chunks of the prompts being prefilled (then of newly admitted ones): a long prompt
        takes several steps while the others keep decoding. A prompt whose log-probs are asked
        goes whole."""
        decoding = self._grow(sorted((r for r in self.running.values() if not r.prefilling),
                                     key=lambda r: r.slot))
        # the prompts get half the budget at least, however many rows decode
        budget = max(self.max_batched_tokens - len(decoding), -(-self.max_batched_tokens // 2))
        chunks: list[tuple[Request, int]] = []
        for r in sorted((r for r in self.running.values() if r.prefilling),
                        key=lambda r: (r.stats.admitted, r.slot)):
            if budget <= 0:
                break
            n = self._chunk(r, budget)
            chunks.append((r, n))
            budget -= n
        failed = []
        while budget > 0:
            r, ev = self._admit_next(first=False)
            if r is None and ev is None:
                break
            if r is not None:
                n = self._chunk(r, budget)
                chunks.append((r, n))
                budget -= n
            failed += [ev] if ev else []
        seqs = [r.prompt + r.output for r, _ in chunks]
        done = self._step(
            "mixed", decoding + [r for r, _ in chunks],
            [[r.output[-1]] for r in decoding] + [q[r.computed:r.computed + n]
                                                  for (r, n), q in zip(chunks, seqs)],
            [len(r.prompt) + len(r.output) - 1 for r in decoding] + [r.computed
                                                                     for r, _ in chunks],
            final=[True] * len(decoding) + [r.computed + n >= len(q)
                                            for (r, n), q in zip(chunks, seqs)])
        done.events[:0] = failed
        return done

    @staticmethod
    def _chunk(r: Request, budget: int) -> int:
        left = r.target - r.computed
        return left if r.params.prompt_logprobs is not None else min(left, budget)

    def _preempt(self, r: Request) -> None:
        """Free `r`'s slot and blocks; it waits first in line, to be recomputed (its prompt
        and output as one prefill) when it is admitted again."""
        log.info("preempting request %s (%d tokens): the KV cache is full", r.id,
                 len(r.prompt) + len(r.output))
        self._release(r)
        r.slot = -1
        r.stats.preempted += 1
        self.pool.stats.preemptions += 1
        self.waiting.appendleft(r)

    @staticmethod
    def _cacheable(r: Request) -> bool:
        """Whether `r` may start from cached blocks: not with prompt log-probs (every prompt
        token's are computed) nor penalties (each rank learns the prompt from the rows)."""
        return r.params.prompt_logprobs is None and not r.params.penalized

    def _admit(self, r: Request, first: bool) -> bool:
        """Give waiting `r` its blocks (a cached prefix's shared, the rest new): False if they
        are not free now."""
        seq = r.prompt + r.output  # after a preemption its output is recomputed too
        bs = self.engine.block
        keys = block_keys(seq, bs)
        hit = self.pool.lookup(keys) if self._cacheable(r) else []
        if len(hit) * bs >= len(seq):  # at least one token to run, for its logits
            hit = hit[:-1]
        need = -(-len(seq) // bs) - len(hit)
        self.pool.hold(hit)  # first: allocating must not evict them
        spare = self.pool.available() - need
        new = self.pool.allocate(need) if spare >= self.watermark or (
            first and not self.running and spare >= 0) else None
        if new is None:
            self.pool.release(hit)
            return False
        r.blocks = hit + new
        r.keys = keys
        r.computed, r.target = len(hit) * bs, len(seq)
        if not r.output:
            r.stats.cached_tokens = r.computed
            if self._cacheable(r) and self.pool.caching:
                r.stats.cached_query = True
                self.pool.stats.queried_tokens += len(r.prompt)
                self.pool.stats.hit_tokens += r.computed
        return True

    def _admit_next(self, first: bool) -> tuple[Request | None, TokenEvent | None]:
        """Admit the first waiting request if a slot and its blocks are free: (it, None); (None,
        its error event) if it failed to start; (None, None) if it cannot be admitted now."""
        if not (self.waiting and self.free):
            return None, None
        r = self.waiting[0]
        if not self._admit(r, first=first):
            return None, None
        self.waiting.popleft()
        r.slot = heapq.heappop(self.free)
        self.running[r.slot] = r
        if r.stats.preempted:
            return r, None  # its decoder, sampler and matcher carry on
        r.stats.admitted = time.perf_counter()
        try:
            r.decoder = self.decoder_factory() if self.decoder_factory else None
            self.sampler.add(r.id, r.params)
        except Exception as e:  # noqa: BLE001 - this request's fault stays its own
            return None, self._fail(r, e)
        return r, None

    def _prefill(self) -> Scheduled | None:
        """The rest of every prompt under way, and newly admitted ones, whole."""
        going = sorted((r for r in self.running.values() if r.prefilling),
                       key=lambda r: (r.stats.admitted, r.slot))
        rows, failed = list(going), []
        while len(rows) < self.max_prefill_rows:
            r, ev = self._admit_next(first=not rows)
            if r is None and ev is None:
                break
            rows += [r] if r else []
            failed += [ev] if ev else []
        if not rows and not failed:
            return None
        done = self._step("prefill", rows, [(r.prompt + r.output)[r.computed:r.target]
                                            for r in rows], [r.computed for r in rows])
        done.events[:0] = failed
        return done

    def _step(self, kind: str, rows: list[Request], tokens: list[list[int]],
              starts: list[int], final: list[bool] | None = None) -> Scheduled:
        """One engine step for `rows`, then a token each: the step's own token ids, greedy or
        sampled on the ranks under each row's parameters (ladder.engine.vocab). A row not
        `final` (a prompt chunk with more to come) takes no token: it draws no seed, asks no
        mask or log-probs, and its step's token is dropped.

        Each row's part of the step (its tokens and sampling row as int64s) is built before
        anything is broadcast, under its own guard: a row that cannot be built fails alone and
        the step runs without it."""
        final = final or [True] * len(rows)
        penalized = any(r.params.penalized for r in rows)
        greedy = all(r.params.greedy or not f for r, f in zip(rows, final)) and not penalized
        kept, toks, kept_starts, kept_final, table, failed = [], [], [], [], [], []
        for r, t, start, f in zip(rows, tokens, starts, final):
            try:
                row_toks = _int64s(t)
                if not greedy:
                    table.append(self.sampler.row(r.id, r.params) if f else _NO_DRAW)
            except Exception as e:  # noqa: BLE001
                failed.append(self._fail(r, e))
                continue
            kept.append(r)
            toks.append(row_toks)
            kept_starts.append(start)
            kept_final.append(f)
        if not kept:
            return Scheduled(kind, 0, 0, failed)
        guided = [r.matcher if f else None for r, f in zip(kept, kept_final)]
        # the prompt tokens among each row's (a recomputed output's are not; penalties' history)
        prompt_lens = [max(0, min(len(t), len(r.prompt) - st))
                       for r, t, st in zip(kept, toks, kept_starts)]
        # the masks are computed in their own thread while the step runs (ladder.engine.guided)
        masks = self.guide.masks(guided) if any(m is not None for m in guided) else None
        asks = [-1 if r.params.logprobs is None or not f else r.params.logprobs
                for r, f in zip(kept, kept_final)]
        prompt_asks = [-1 if r.params.prompt_logprobs is None or kind == "decode" or r.output
                       or st else r.params.prompt_logprobs for r, st in zip(kept, kept_starts)]
        out = self.engine.step(StepBatch(
            tokens=toks, slots=[r.slot for r in kept], starts=kept_starts, greedy=greedy,
            tables=[r.blocks for r in kept],
            sampling=None if greedy else SamplingRows.of(table),
            logprobs=asks if max(asks) >= 0 else None,
            prompt_logprobs=prompt_asks if max(prompt_asks) >= 0 else None,
            penalties=_penalties(kept, prompt_lens) if penalized else None, masks=masks))
        bs = self.engine.block
        for r, t, st in zip(kept, toks, kept_starts):
            r.computed = st + len(t)
            n = r.computed // bs
            if n > len(r.keys) and not r.prefilling:  # a block of its output filled up
                r.keys = block_keys((r.prompt + r.output)[:n * bs], bs, r.keys)
            # the blocks this step filled (a prompt's, or the output's): cached for later
            # prompts that repeat them (the next turn of a chat)
            self.pool.register(r.blocks[st // bs:n], r.keys[st // bs:n])
            if self.window is not None:
                self._slide(r)
        n_rows = len(kept)
        lps = self.engine.last_logprobs if max(asks) >= 0 else [None] * n_rows
        plps = self.engine.last_prompt_logprobs if max(prompt_asks) >= 0 else [None] * n_rows
        toks_out = out.tolist()
        if not all(kept_final):  # the chunks with more to come take no token
            kept, toks_out, lps, plps = ([x for x, f in zip(xs, kept_final) if f]
                                         for xs in (kept, toks_out, lps, plps))
        events = self._emit(kept, toks_out, lps)
        if max(prompt_asks) >= 0:
            for r, ev, plp in zip(kept, events, plps):
                if plp is not None:  # the first token has no log-prob: nothing precedes it
                    t0 = r.prompt[0]
                    first = Scored(t0, self.token_text(t0), None, self.token_bytes(t0))
                    ev.prompt_logprobs = [(first, None)] + [
                        scored(lp, t, self.token_text, self.token_bytes)
                        for lp, t in zip(plp, r.prompt[1:])]
        return Scheduled(kind, n_rows, sum(map(len, toks)), failed + events)

    def _emit(self, rows: list[Request], toks: list[int], lps: list) -> list[TokenEvent]:
        now = time.perf_counter()
        events = []
        for r, tok, lp in zip(rows, toks, lps):
            try:
                ev = self._advance(r, tok, now)
                if lp is not None:
                    ev.logprob, ev.top_logprobs = scored(lp, tok, self.token_text,
                                                         self.token_bytes)
                events.append(ev)
            except Exception as e:  # noqa: BLE001 - e.g. a token the detokenizer refuses
                events.append(self._fail(r, e))
        return events

    def _advance(self, r: Request, tok: int, now: float) -> TokenEvent:
        """Append `tok` to `r`: its text delta, held back where it may start a stop string, and
        whether it finishes the request."""
        if not r.output:
            r.stats.first_token = now
        r.output.append(tok)
        p = r.params
        delta = r.decoder.feed(tok) if r.decoder else ""
        n = len(r.output)
        may_stop = n >= p.min_tokens
        reason = None
        if may_stop and (tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos)):
            reason, delta = "stop", r.held
        elif p.stop:
            buf = r.held + delta
            hit = min((i for i in map(buf.find, p.stop) if i >= 0), default=-1)
            if may_stop and hit >= 0:
                reason, delta, r.held = "stop", buf[:hit], ""
            else:  # hold back a tail that may grow into a stop string
                keep = _stop_prefix_len(buf, p.stop)
                delta, r.held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        if reason is None and r.matcher is not None and self._grammar_ends(r, tok):
            tail = r.decoder.flush() if r.decoder else ""
            reason, delta, r.held = "stop", delta + r.held + tail, ""
        if reason is None and (n >= p.max_tokens or len(r.prompt) + n >= self.engine.max_seq):
            tail = r.decoder.flush() if r.decoder else ""
            reason, delta, r.held = "length", delta + r.held + tail, ""
        r.text += delta
        if reason:
            return self._finish(r, tok, reason, delta)
        return TokenEvent(r.id, tok, delta)

    @staticmethod
    def _grammar_ends(r: Request, tok: int) -> bool:
        """Advance `r`'s matcher by `tok`: whether the grammar is complete (nothing but the end
        may follow). A token the mask forbade is a fault of ours: RequestFailed."""
        if not r.matcher.consume_token(tok):
            raise RequestFailed(f"token {tok} broke the grammar: {r.matcher.get_error()}")
        return r.matcher.is_stopped()

    def _release(self, r: Request) -> None:
        """Running `r` gives back its slot and blocks."""
        del self.running[r.slot]
        heapq.heappush(self.free, r.slot)
        self.pool.release([b for b in r.blocks if b != self.scratch])
        r.blocks = []

    def _slide(self, r: Request) -> None:
        """Give back `r`'s blocks wholly before the sliding window of its next token (at
        position r.computed): its KV holds a window's blocks at most, however long it runs.
        Cached ones stay findable for prompts that start alike until evicted."""
        gone = blocks_behind(r.computed, self.window, self.engine.block)
        old = [b for b in r.blocks[:gone] if b != self.scratch]
        if old:
            self.pool.release(old)
            r.blocks[:gone] = [self.scratch] * gone

    def _fail(self, r: Request, e: BaseException) -> TokenEvent:
        """End `r` alone with an error event (finish_reason "error"), its slot freed."""
        log.exception("request %s failed in its part of a step", r.id, exc_info=e)
        ev = self._finish(r, None, "error", "")
        ev.error = f"{type(e).__name__}: {e}"
        return ev

    def _finish(self, r: Request, tok: int | None, reason: str, delta: str) -> TokenEvent:
        r.stats.finished = time.perf_counter()
        r.stats.generated_tokens = len(r.output)
        if r.slot >= 0 and self.running.get(r.slot) is r:
            self._release(r)
        self.sampler.remove(r.id)
        return TokenEvent(r.id, tok, delta, reason, r.stats)


_NO_DRAW = (0.0, 0, 1.0, 0, 0.0)  # a sampling row that draws nothing: temperature 0


def _penalties(rows: list[Request], prompt_lens: list[int]) -> Penalties:
    ps = [r.params for r in rows]
    return Penalties([p.presence_penalty for p in ps], [p.frequency_penalty for p in ps],
                     [p.repetition_penalty for p in ps],
                     [(i, t, b) for i, p in enumerate(ps) for t, b in p.logit_bias],
                     prompt_lens)


def _int64s(tokens: list[int]) -> list[int]:
    """`tokens` as ints that an int64 tensor holds, or ValueError."""
    out = [int(t) for t in tokens]
    if any(not -2**63 <= t < 2**63 for t in out):
        raise ValueError(f"a token id does not fit in 64 bits: {tokens}")
    return out


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
