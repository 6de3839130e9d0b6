"""TP groups of Ray actors on a real three-node Ray cluster (token authentication on).

SmolLM2 across two nodes gives the plain multi-process runner's greedy tokens; 16 concurrent
requests of different lengths give the tokens each gives alone; cancellation frees the slot; a
killed rank fails its group's requests with a clear error within 30 s and a new group serves;
teardown leaves no placement group or actor (and the cluster fixture checks its processes).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import ray

from actors.group import GroupError, TPGroup
from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import RequestError
from ladder.options import GroupOptions

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def placement_groups_alive() -> list[str]:
    return [pg["name"] for pg in ray.util.placement_group_table().values()
            if pg["state"] != "REMOVED"]


def actors_alive(group: str, tp: int = 2) -> list[str]:
    """The group's rank actors that Ray still knows as live (named actors: get_actor)."""
    alive = []
    for r in range(tp):
        try:
            ray.get_actor(f"{group}-rank{r}")
            alive.append(f"{group}-rank{r}")
        except ValueError:
            pass
    return alive


def test_spread_group_matches_the_local_runner(ray_cluster, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("The three primary colours are")
    opts = GroupOptions(model="smollm2", tp=2, residual="ladder:24-29", max_seq=256)
    with LocalTPGroup(opts) as local:
        want = local.generate([ids], [GREEDY])[0]["tokens"]
    with TPGroup(opts, strategy="STRICT_SPREAD", name="spread") as g:
        assert len({n["node_id"] for n in g.nodes}) == 2  # the ranks sit on different nodes
        assert g.info.interconnect == "network" and g.opts.comm == "gloo"
        out = g.generate([ids], GREEDY)[0]
        assert out["tokens"] == want
        assert out["finish_reason"] == "length" and out["text"]
        st = out["stats"]
        assert st.generated_tokens == 24 and st.ttft_s > 0 and st.tpot_s > 0
        h = asyncio.run(g.health())
        assert h.healthy and h.rtt_s > 0
        stats = asyncio.run(g.stats())
        decode = [s for s in stats["steps"] if s["kind"] == "decode"]
        assert len(decode) == 23 and all(s["ops"] > 0 and s["bytes"] > 0 for s in decode)
    assert "spread" not in placement_groups_alive()
    assert actors_alive("spread") == []


def test_spread_group_over_tcp_gives_the_same_tokens(ray_cluster, tiny_llama):
    """comm: tcp across two Ray nodes: each rank listens on its node's address; the greedy
    tokens equal gloo's, and a health round trip passes through it."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    want = {}
    for comm in ("gloo", "tcp"):
        opts = GroupOptions(model=str(tiny_llama), tp=2, comm=comm, n_slots=2, max_seq=128)
        with TPGroup(opts, strategy="STRICT_SPREAD", name=f"spread{comm}") as g:
            assert len({n["node_id"] for n in g.nodes}) == 2 and g.opts.comm == comm
            want[comm] = [r["tokens"] for r in g.generate(prompts, GREEDY)]
            assert asyncio.run(g.health()).healthy
            assert asyncio.run(g.stats())["steps"][-1]["bytes"] > 0
    assert want["tcp"] == want["gloo"] and all(len(t) == 24 for t in want["tcp"])


@pytest.fixture(scope="module")
def packed(ray_cluster, tiny_llama):
    """A PACK group (both ranks on one node: shared memory) of the tiny model, 8 slots."""
    with TPGroup(GroupOptions(model=str(tiny_llama), tp=2, n_slots=8, max_seq=512),
                 strategy="PACK", name="packed") as g:
        yield g


def test_pack_uses_shared_memory(packed):
    assert len({n["node_id"] for n in packed.nodes}) == 1
    assert packed.info.interconnect == "shm"


def test_sixteen_concurrent_requests_match_alone(packed):
    prompts = [[(7 * i + j) % 250 + 3 for j in range(3 + 5 * i)] for i in range(16)]
    params = [SamplingParams(max_tokens=6 + (i % 5) * 4, temperature=0, ignore_eos=True)
              for i in range(16)]
    alone = [packed.generate([p], sp)[0]["tokens"] for p, sp in zip(prompts, params)]
    together = packed.generate(prompts, params)  # 16 requests, 8 slots: some queue
    assert [o["tokens"] for o in together] == alone
    assert all(o["finish_reason"] == "length" for o in together)
    assert max(o["stats"].queue_s for o in together) > 0


def test_cancel_frees_the_slot(ray_cluster, tiny_llama):
    with TPGroup(GroupOptions(model=str(tiny_llama), tp=2, n_slots=1, max_seq=512),
                 strategy="PACK", name="oneslot") as g:
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

        async def scenario():
            events = []
            async for ev in g.stream([5, 6, 7], long, request_id="long"):
                events.append(ev)
                if len(events) == 3:
                    await g.cancel("long")
            # the only slot is free again: a new request completes
            short = [ev async for ev in g.stream([9, 10], SamplingParams(max_tokens=4,
                                                                       temperature=0))]
            # closing a stream early cancels its request too
            agen = g.stream([11, 12], long)
            await agen.__anext__()
            await agen.aclose()
            after = [ev async for ev in g.stream([13], SamplingParams(max_tokens=2,
                                                                    temperature=0))]
            return events, short, after

        events, short, after = asyncio.run(scenario())
        assert events[-1].finish_reason == "cancelled" and len(events) < 400
        assert short[-1].finish_reason == "length" and len(short) == 4
        assert after[-1].finish_reason == "length"
        assert asyncio.run(g.stats())["running"] == 0


def test_bad_requests_are_refused_and_the_group_serves_on(packed):
    too_long = list(range(3, 515))
    for prompt, match in ((too_long, "context holds"), ([], "empty"), ([5, 9999], "vocabulary")):
        with pytest.raises(RequestError, match=match):
            packed.generate([prompt], GREEDY)
    three = SamplingParams(max_tokens=3, ignore_eos=True)
    assert packed.generate([[5, 6]], three)[0]["finish_reason"] == "length"
    assert asyncio.run(packed.health()).healthy


def test_a_request_that_breaks_its_step_fails_alone_on_the_ray_group(packed):
    """Defence in depth: a request past validation that breaks the leader's step (a seed past
    64 bits) ends alone with RequestFailed; the others finish as alone, the group stays up."""
    from ladder.engine.scheduler import RequestFailed
    bad = SamplingParams(max_tokens=4, temperature=0.7, seed=1)
    bad.seed = 2**70
    alone = packed.generate([[5, 6, 7]], GREEDY)[0]["tokens"]
    out = packed.generate([[5, 6, 7], [8, 9]], [GREEDY, bad])
    assert out[0]["tokens"] == alone and out[1]["finish_reason"] == "error"
    assert "Overflow" in out[1]["error"]

    async def streamed():
        with pytest.raises(RequestFailed, match="Overflow"):
            async for _ in packed.stream([3, 4], bad):
                pass

    asyncio.run(streamed())
    assert asyncio.run(packed.health()).healthy


@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_rank_fails_its_requests_and_a_new_group_serves(ray_cluster, tiny_llama, victim):
    opts = GroupOptions(model=str(tiny_llama), tp=2, n_slots=1, max_seq=512)
    g = TPGroup(opts, strategy="STRICT_SPREAD", name=f"doomed{victim}")
    try:
        long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

        killed = []

        async def scenario():
            async def drain(rid):
                n = 0
                async for _ in g.stream([5, 6, 7], long, request_id=rid):
                    n += 1
                    # whichever request got the one slot (an async actor need not take them in
                    # the order sent): the rank dies under it, the other waits in the queue
                    if n == 2 and not killed:
                        killed.append(rid)
                        ray.kill(g.workers[victim], no_restart=True)
                return n

            t0 = time.monotonic()
            results = await asyncio.gather(drain("a"), drain("b"), return_exceptions=True)
            return results, time.monotonic() - t0

        results, elapsed = asyncio.run(scenario())
        running, queued = results if killed == ["a"] else results[::-1]
        assert isinstance(running, GroupError), running
        assert isinstance(queued, GroupError), queued  # queued behind the one slot: fails too
        assert elapsed < 30
        h = asyncio.run(g.health())
        assert not h.healthy and h.reason
    finally:
        g.shutdown()
    assert f"doomed{victim}" not in placement_groups_alive()
    with TPGroup(opts, strategy="STRICT_SPREAD", name=f"fresh{victim}") as fresh:
        three = SamplingParams(max_tokens=3, ignore_eos=True)
        assert fresh.generate([[5, 6]], three)[0]["finish_reason"] == "length"


def test_token_authentication_is_on(ray_cluster):
    """A driver with the wrong token is refused; ours (the right one) is in."""
    code = "import ray; ray.init(address=%r); print('connected')" % ray_cluster.address
    env = {**os.environ, "RAY_AUTH_TOKEN": "not-the-token"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "connected" not in r.stdout
    assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 6


def test_an_unplaceable_group_fails_clearly_and_frees_its_placement_group(ray_cluster,
                                                                          tiny_llama):
    with pytest.raises(GroupError, match="lacks the resources"):
        TPGroup(GroupOptions(model=str(tiny_llama), tp=2), cpus_per_worker=8,
                startup_timeout_s=3, name="toobig")
    assert "toobig" not in placement_groups_alive()
