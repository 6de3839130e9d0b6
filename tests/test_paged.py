"""The paged KV cache (ladder.model.layers.KVCache, ladder.engine.blocks, the scheduler):
blocks handed out and taken back, prefix caching, preemption, and concurrency bounded by blocks
rather than slots; every one of them gives the tokens a roomy cache gives, on the torch path
and the native kernels, at TP 1 and 2 (through the API: `usage.prompt_tokens_details`).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from ladder.engine.blocks import BlockPool, block_keys
from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import Request, RequestError, Scheduler
from ladder.engine.step import ShardEngine
from ladder.links.base import NoComm
from ladder.loaders import load_shard, open_checkpoint
from ladder.model.tp import ShardSpec
from ladder.model.transformer import build_model
from ladder.options import GroupOptions

SYSTEM = [(7 * i + 3) % 250 + 3 for i in range(21)]  # a shared start of 21 tokens
PROMPTS = [SYSTEM + [11, 12, 13], SYSTEM + [40, 41], [5, 6, 7, 8, 9], SYSTEM[:9] + [77]]


# -- the pool -----------------------------------------------------------------------------------
def test_block_keys_chain_the_whole_prefix():
    a, b = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4), block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a == b  # full blocks only
    assert block_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]  # the same block after another
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 2)[:2] == block_keys([1, 2, 3, 4], 2)


def test_pool_shares_caches_and_evicts_least_recently_used_tail_first():
    pool = BlockPool(6, 2)
    seq = pool.allocate(3)
    keys = block_keys([1, 2, 3, 4, 5, 6], 2)
    pool.register(seq, keys)
    other = pool.allocate(3)
    assert pool.allocate(1) is None and pool.available() == 0
    assert pool.lookup(keys[:2] + [b"x" * 16]) == seq[:2]
    hit = pool.lookup(keys)
    pool.hold(hit)  # a second sequence shares them: the refs, not copies
    pool.release(seq)
    assert pool.available() == 0  # still held by the second
    pool.release(hit)
    assert pool.available() == 3 and pool.used() == 3  # cached, idle: available
    pool.release(other)  # never cached: free, taken before any cached block
    assert sorted(pool.allocate(3)) == other and pool.stats.evicted_blocks == 0
    # released last to first: the tail is evicted first, the shared start stays findable
    got = pool.allocate(1)
    assert got == [seq[2]] and pool.stats.evicted_blocks == 1
    assert pool.lookup(keys) == seq[:2]
    assert BlockPool(4, 2, caching=False).lookup(keys) == []


# -- the scheduler on one process ---------------------------------------------------------------
def _engine(path, *, n_slots=4, n_blocks=None, block=4, native=False, prefix_caching=True):
    ckpt = open_checkpoint(path)
    spec = ShardSpec.make(ckpt.config, 0, 1)
    model = build_model(ckpt.config, spec, ckpt.plan("ladder:1-2"), load_shard(ckpt, spec))
    if native:
        from ladder.native.layouts import decode_layout
        model = decode_layout(model)
    return ShardEngine(model, NoComm(), n_slots=n_slots, max_seq=64, n_blocks=n_blocks,
                       block=block, prefix_caching=prefix_caching)


PARAMS = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=11, temperature=0.9, seed=5, ignore_eos=True),
          SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=2, ignore_eos=True,
                         frequency_penalty=0.7, presence_penalty=0.3),
          SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                         repetition_penalty=1.3)]


def _run(engine, prompts, params, *, one_by_one=False):
    sched = Scheduler(engine, prefix_caching=engine.prefix_caching)
    reqs, most = [], 0
    for p, sp in zip(prompts, params):
        reqs.append(sched.add(Request(prompt=list(p), params=sp)))
        while one_by_one and sched.has_work():
            sched.step()
    while sched.has_work():
        sched.step()
        most = max(most, len(sched.running))
    assert sched.pool.used() == 0 and sched.pool.available() == engine.n_blocks  # all returned
    return [r.output for r in reqs], reqs, sched, most


@pytest.fixture(scope="module")
def roomy(tiny_llama):
    """Each request alone in a cache of fixed full-length runs (today's layout: one block of 64
    tokens a slot)."""
    eng = _engine(tiny_llama, block=64)
    return [_run(eng, [p], [sp])[0][0] for p, sp in zip(PROMPTS, PARAMS)]


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_blocks_of_four_give_the_same_tokens(tiny_llama, roomy, native):
    out, reqs, sched, _ = _run(_engine(tiny_llama, native=native, prefix_caching=False),
                               PROMPTS, PARAMS)
    assert out == roomy
    assert sched.pool.stats.hit_tokens == 0


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_prefix_caching_shares_blocks_and_changes_no_token(tiny_llama, roomy, native):
    out, reqs, sched, _ = _run(_engine(tiny_llama, native=native), PROMPTS, PARAMS,
                               one_by_one=True)
    assert out == roomy
    # the second shares the first's 5 full blocks of the 21-token start (20 tokens); the third
    # and fourth ask penalties (their prompts are run whole, not looked up)
    assert [r.stats.cached_tokens for r in reqs] == [0, 20, 0, 0]
    c = sched.pool.stats
    assert c.hit_tokens == 20 and c.queried_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    # the same prompt again: all but its last block's worth (one token at least is run)
    again, reqs2, _, _ = _run_in(sched, [PROMPTS[0]] * 2, [PARAMS[0]] * 2)
    assert again == [roomy[0]] * 2 and [r.stats.cached_tokens for r in reqs2] == [20, 20]


def _run_in(sched, prompts, params):
    reqs = []
    for p, sp in zip(prompts, params):
        reqs.append(sched.add(Request(prompt=list(p), params=sp)))
        while sched.has_work():
            sched.step()
    return [r.output for r in reqs], reqs, sched, 0


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_preemption_when_blocks_run_out_recomputes_the_same_tokens(tiny_llama, roomy, native):
    """11 blocks of 4 for four sequences of 15-38 tokens: the youngest is preempted and
    recomputed (penalties' history and seeds carry on) until all finish."""
    out, reqs, sched, _ = _run(_engine(tiny_llama, n_blocks=11, native=native), PROMPTS, PARAMS)
    assert out == roomy
    assert sched.pool.stats.preemptions > 0
    assert sum(r.stats.preempted for r in reqs) == sched.pool.stats.preemptions
    assert all(r.stats.generated_tokens == sp.max_tokens for r, sp in zip(reqs, PARAMS))


def test_concurrency_is_bounded_by_blocks_not_by_full_length_slots(tiny_llama):
    """The memory of 2 full-length sequences (2 x 16 blocks of 4) runs 12 short ones at once."""
    eng = _engine(tiny_llama, n_slots=12, n_blocks=32)
    prompts = [[3 + i, 9, 27, 81 % 50] for i in range(12)]
    params = [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)] * 12  # 2 blocks
    out, reqs, sched, most = _run(eng, prompts, params)
    assert most == 12 and sched.pool.stats.preemptions == 0
    alone = _run(_engine(tiny_llama, block=64), [prompts[5]], [params[5]])[0]
    assert out[5] == alone[0]


def test_a_prompt_the_cache_cannot_hold_is_refused(tiny_llama):
    sched = Scheduler(_engine(tiny_llama, n_blocks=3))
    sched.check(Request(prompt=[1] * 11, params=SamplingParams()))  # 12 tokens: 3 blocks
    with pytest.raises(RequestError, match="the KV cache holds 12"):
        sched.check(Request(prompt=[1] * 12, params=SamplingParams()))


# -- a TP group ---------------------------------------------------------------------------------
def test_tp2_paged_with_prefix_caching_and_preemption_equals_tp1(tiny_llama, roomy):
    """TP=2, each rank's cache 11 blocks of 4 (kv_cache_bytes), steps of 6 tokens while others
    decode, requests sharing a start: the tokens of TP=1's roomy cache, blocks cached, prompts
    chunked and sequences preempted on the way."""
    from ladder.engine.step import block_bytes
    cfg = open_checkpoint(tiny_llama).config
    opts = GroupOptions(model=str(tiny_llama), tp=2, residual="ladder:1-2", n_slots=4,
                        max_seq=64, block_size=4, max_num_batched_tokens=6,
                        kv_cache_bytes=11 * block_bytes(cfg, 2, 4, torch.float32))
    with LocalTPGroup(opts) as g:
        first = g.generate([PROMPTS[0]], [PARAMS[0]])
        out = g.generate(PROMPTS, PARAMS)
        st = asyncio.run(g.stats())
    kv = st["kv_cache"]
    assert {"prefill", "mixed", "decode"} <= {s["kind"] for s in st["steps"]}
    assert [first[0]["tokens"]] + [o["tokens"] for o in out] == [roomy[0]] + roomy
    assert kv["blocks"] == 11 and kv["block_size"] == 4 and kv["blocks_used"] == 0
    assert kv["hit_tokens"] >= 20 and kv["preemptions"] > 0
    assert out[1]["stats"].cached_tokens == 20


# -- chunked prefill -----------------------------------------------------------------------------
def test_a_packed_step_equals_its_rows_run_apart(tiny_llama):
    """Decode rows beside prompt chunks run as one sequence of their tokens (no padding): each
    row's logits equal its own step's, on the torch path and the native kernels."""
    from ladder.engine.step import StepBatch
    for native in (False, True):
        eng = _engine(tiny_llama, native=native)
        tables = {s: eng.fixed_table(s) for s in range(4)}

        def run(rows):
            return eng.step(StepBatch(tokens=[t for _, t, _ in rows], slots=[s for s, _, _ in rows],
                                      starts=[st for _, _, st in rows],
                                      tables=[tables[s] for s, _, _ in rows]))

        run([(0, PROMPTS[0], 0)])  # two sequences under way
        run([(1, PROMPTS[1], 0)])
        rows = [(0, [9], len(PROMPTS[0])), (2, PROMPTS[2] + PROMPTS[3], 0),
                (1, [4], len(PROMPTS[1])), (3, SYSTEM[:7], 0)]
        together = run(rows)
        apart = torch.cat([run([row]) for row in rows])  # the same positions written again
        torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_chunked_prefill_keeps_the_others_decoding(tiny_llama, roomy, native):
    """A step budget of 6 tokens: prompts arriving while two sequences decode are prefilled in
    chunks beside their tokens (never a step without them), and every request ends with the
    tokens it gets alone."""
    eng = _engine(tiny_llama, native=native)
    sched = Scheduler(eng, max_batched_tokens=6)
    first = [sched.add(Request(prompt=list(p), params=sp)) for p, sp in
             zip(PROMPTS[2:], PARAMS[2:])]
    sched.step()  # their prompts, whole: nothing decodes yet
    late = [sched.add(Request(prompt=list(p), params=sp)) for p, sp in
            zip(PROMPTS[:2], PARAMS[:2])]
    kinds = []
    while sched.has_work():
        decoding = [r for r in first if r.slot >= 0 and not r.prefilling]
        done = sched.step()
        kinds.append(done.kind)
        if done.kind == "mixed":
            assert done.tokens <= 6 and done.rows > len(decoding)
            assert all(r.output for r in decoding)  # their token came
    # 16 tokens of the first late prompt (8 cached from PROMPTS[3]'s blocks) over 4 steps, the
    # second's 3 (20 cached from the first's) in a 5th; no step ran a prompt alone
    assert kinds[:5] == ["mixed"] * 5 and "prefill" not in kinds
    assert [r.stats.cached_tokens for r in late] == [8, 20]
    assert [r.output for r in late + first] == roomy


def test_the_cache_is_sized_by_memory(tiny_llama):
    """kv_cache_bytes per rank, or a fraction of the free memory, over a block's bytes on the
    rank with the most KV heads; too little for one block is an error that says so."""
    from ladder.engine.build import available_memory, kv_blocks
    from ladder.engine.step import block_bytes
    cfg = open_checkpoint(tiny_llama).config
    cpu = torch.device("cpu")

    def blocks(**kw):
        return kv_blocks(GroupOptions(model=str(tiny_llama), n_slots=3, **kw), cfg, NoComm(),
                         cpu, 64)

    assert blocks() == 3 * 4  # n_slots full sequences of 64 tokens, blocks of 16
    per = block_bytes(cfg, 3, 16, torch.float32)  # TP=1: all 3 KV heads
    assert blocks(kv_cache_bytes=10 * per + 5) == 10
    # at TP=2 a rank holds 2 or 1 of the 3 KV heads: the blocks are sized for 2
    assert blocks(kv_cache_bytes=10 * per, tp=2) == 15
    got = blocks(kv_cache_fraction=0.001)
    assert abs(got - available_memory() * 0.001 // per) <= 0.05 * got + 2
    with pytest.raises(ValueError, match="hold no block of 16 tokens"):
        blocks(kv_cache_bytes=per - 1)
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        GroupOptions(kv_cache_fraction=1.5)


def test_metrics_record_the_cache_and_never_end_the_serving(tiny_llama):
    """The cache's series take what a request reports (Ray's counters refuse an increment of 0:
    a prompt looked up and not found once took the group down); and a metrics backend that
    fails is logged while the group serves on."""
    import threading

    from actors.metrics import GroupMetrics
    from ladder.engine.leader import Leader
    from ladder.engine.scheduler import RequestStats
    m = GroupMetrics("tiny", "standard", 1, "loopback")
    m.on_finish(RequestStats(arrival=1.0, admitted=1.1, first_token=1.2, finished=1.5,
                             prompt_tokens=5, generated_tokens=3, cached_query=True), "stop")
    m.on_finish(RequestStats(arrival=1.0, prompt_tokens=5, cached_query=True, cached_tokens=4,
                             preempted=2), "length")
    m.set_load(1, 0, 4, 0.25)

    class Broken:
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("the metrics backend is down")
            return fail

    leader = Leader(_engine(tiny_llama), None, eos_token_ids=(), metrics=Broken(),
                    heartbeat_s=0.05)
    leader.start()
    try:
        done, got = threading.Event(), []

        def sink(ev):
            got.append(ev)
            if isinstance(ev, BaseException) or ev.finish_reason:
                done.set()

        leader.submit([Request(prompt=PROMPTS[2], params=PARAMS[0], id="a")], [sink])
        assert done.wait(60)
        assert [e.finish_reason for e in got][-1] == "length" and len(got) == 14
        assert leader.error is None
    finally:
        leader.stop()


def test_the_next_turn_finds_the_answers_blocks(tiny_llama):
    """Blocks filled by the output are cached too: a prompt that repeats the last prompt and its
    answer (a chat's next turn) finds both, and decodes as it would from scratch."""
    out, reqs, sched, _ = _run(_engine(tiny_llama), [PROMPTS[2]], [PARAMS[0]])
    turn = PROMPTS[2] + out[0] + [12, 13]  # 5 + 14 + 2 tokens; 18 of them were run (written)
    again, reqs2, _, _ = _run_in(sched, [turn], [PARAMS[0]])
    assert reqs2[0].stats.cached_tokens == 16  # 4 full blocks of 4
    assert again == _run(_engine(tiny_llama, prefix_caching=False), [turn], [PARAMS[0]])[0]
