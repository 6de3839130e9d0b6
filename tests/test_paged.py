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
    """TP=2, each rank's cache 11 blocks of 4 (kv_cache_bytes), requests sharing a start:
    the tokens of TP=1's roomy cache, blocks cached and sequences preempted on the way."""
    from ladder.engine.step import block_bytes
    cfg = open_checkpoint(tiny_llama).config
    opts = GroupOptions(model=str(tiny_llama), tp=2, residual="ladder:1-2", n_slots=4,
                        max_seq=64, block_size=4,
                        kv_cache_bytes=11 * block_bytes(cfg, 2, 4, torch.float32))
    with LocalTPGroup(opts) as g:
        first = g.generate([PROMPTS[0]], [PARAMS[0]])
        out = g.generate(PROMPTS, PARAMS)
        kv = asyncio.run(g.stats())["kv_cache"]
    assert [first[0]["tokens"]] + [o["tokens"] for o in out] == [roomy[0]] + roomy
    assert kv["blocks"] == 11 and kv["block_size"] == 4 and kv["blocks_used"] == 0
    assert kv["hit_tokens"] >= 20 and kv["preemptions"] > 0
    assert out[1]["stats"].cached_tokens == 20
