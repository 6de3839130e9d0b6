"""Communicators, sampling, stop handling, request checks and the `ladder generate` command."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from ladder.comm import EmulatedLatency, NoComm
from ladder.config import ConfigError, ModelConfig, ResidualPlan
from ladder.runner import GroupOptions, LocalTPGroup
from ladder.sampling import Sampler, SamplingParams
from ladder.tp import ShardSpec, split_sizes


def test_emulated_latency_delays_and_is_labelled():
    comm = EmulatedLatency(NoComm(interconnect="loopback"), 0.02)
    assert comm.emulated and comm.interconnect == "loopback+emu20000us"
    x = torch.ones(4)
    t0 = time.perf_counter()
    w = comm.all_reduce(x)
    time.sleep(0.015)  # compute that overlaps most of the latency
    assert w.wait() is x
    assert time.perf_counter() - t0 >= 0.02
    assert 0.0 < comm.stats.exposed_s < 0.02  # only the part not hidden by the compute
    assert comm.stats.bytes == 16 and comm.stats.ops == 1


def test_residual_plan_parsing():
    assert ResidualPlan.parse("ladder:24-29", 30).ladder_layers == frozenset(range(24, 30))
    p = ResidualPlan.parse("ladder:0,3,5-7", 30)
    assert p.spec(30) == "ladder:0,3,5-7" and p.label_for(30) == "partial"
    assert ResidualPlan.parse("ladder", 30).label_for(30) == "ladder"
    assert ResidualPlan.parse("ladder:upper-half", 30).ladder_layers == frozenset(range(15, 30))
    for bad, msg in [("ladder:28-31", "out of range"), ("ladder:5-2", "empty range"),
                     ("rungs", "expected standard")]:
        with pytest.raises(ConfigError, match=msg):
            ResidualPlan.parse(bad, 30)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="n_heads=9 is not a multiple of n_kv_heads=4"):
        ModelConfig(vocab_size=10, dim=576, n_layers=1, n_heads=9, n_kv_heads=4,
                    intermediate_size=8)
    cfg = ModelConfig(vocab_size=10, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                      intermediate_size=1536)
    with pytest.raises(ConfigError, match="tp=4 exceeds the model's n_kv_heads=3"):
        ShardSpec.make(cfg, 0, 4)
    assert [ShardSpec.make(cfg, r, 2).q_heads for r in range(2)] == [(0, 6), (6, 9)]
    with pytest.raises(ConfigError, match="head split 'odd' is not one of"):
        ShardSpec.make(cfg, 0, 2, "odd")
    with pytest.raises(ConfigError, match="tp=10 exceeds the model's n_heads=9"):
        ShardSpec.make(cfg, 0, 10, "even")
    with pytest.raises(ValueError, match="head_split 'odd' is not one of"):
        GroupOptions(head_split="odd")


def test_even_head_split():
    """SmolLM2's shape at TP=2: query heads 5 and 4, KV head 1 on both ranks, the MLP halved
    (the 'groups' split gives 6 and 3 query heads and a larger MLP to the rank with fewer)."""
    cfg = ModelConfig(vocab_size=10, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                      intermediate_size=1536)
    a, b = (ShardSpec.make(cfg, r, 2, "even") for r in range(2))
    assert (a.q_heads, a.kv_heads, a.kv_map) == ((0, 5), (0, 2), (0, 0, 0, 1, 1))
    assert (b.q_heads, b.kv_heads, b.kv_map) == ((5, 9), (1, 3), (0, 1, 1, 1))
    assert (a.ffn, b.ffn) == ((0, 768), (768, 1536))
    assert not a.grouped and not b.grouped
    g = [ShardSpec.make(cfg, r, 2) for r in range(2)]
    assert all(s.grouped for s in g) and g[0].ffn_size < g[1].ffn_size
    # more ranks than KV heads: each rank holds the KV heads its query heads read
    four = [ShardSpec.make(cfg, r, 4, "even") for r in range(4)]
    assert [s.q_heads for s in four] == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert [s.kv_heads for s in four] == [(0, 1), (1, 2), (1, 3), (2, 3)]
    assert four[2].kv_map == (0, 1) and all(s.grouped for s in four)
    # where the groups divide evenly, both splits agree
    assert ShardSpec.make(cfg, 1, 3, "even") == ShardSpec.make(cfg, 1, 3)
    assert split_sizes(1536, 3, 256) == [512, 512, 512]
    assert split_sizes(100, 3, 32) == [32, 32, 36]


def test_sampling():
    logits = torch.randn(3, 50)
    s = Sampler()
    greedy = SamplingParams(temperature=0)
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=1)
    tiny_p = SamplingParams(temperature=1.0, top_p=1e-6, seed=2)
    for k, p in enumerate([greedy, top1, tiny_p]):
        s.add(k, p)
    assert s.sample(logits, [0, 1, 2], [greedy, top1, tiny_p]) == logits.argmax(-1).tolist()

    def draws(seed):
        s2 = Sampler()
        p = SamplingParams(temperature=1.0, top_k=10, seed=seed)
        s2.add("r", p)
        return [s2.sample(logits[:1], ["r"], [p])[0] for _ in range(20)]
    assert draws(5) == draws(5)
    assert set(draws(5)) <= set(torch.topk(logits[0], 10).indices.tolist())
    for kw, msg in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -1}, "top_k")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)


@pytest.fixture(scope="module")
def smol():
    with LocalTPGroup(GroupOptions(model="smollm2", tp=1, max_seq=128, n_slots=4)) as g:
        yield g


def test_stop_strings_and_ids(smol):
    ids = smol.encode("List the days of the week:", chat=True)
    base = smol.generate([ids], [SamplingParams(max_tokens=24, temperature=0,
                                                ignore_eos=True)])[0]
    text = base["text"]
    assert base["finish_reason"] == "length" and len(base["tokens"]) == 24
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = smol.generate([ids], [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                               stop=(stop,))])[0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[:text.index(stop)]
    t5 = base["tokens"][5]
    by_id = smol.generate([ids], [SamplingParams(max_tokens=24, temperature=0,
                                                 stop_token_ids=(t5,))])[0]
    assert by_id["finish_reason"] == "stop" and by_id["tokens"] == base["tokens"][:6]


def test_request_past_the_context_is_refused(smol):
    from ladder.runner import GroupError
    with pytest.raises(GroupError, match="the prompt has 200 tokens; the context holds 128"):
        smol.generate([[5] * 200], [SamplingParams(max_tokens=4)])
    # the group keeps serving
    assert smol.generate([[5, 6, 7]], [SamplingParams(max_tokens=2, temperature=0)])[0]["tokens"]


def test_generate_command():
    r = subprocess.run([sys.executable, "-m", "ladder.cli", "generate", "--model", "smollm2",
                        "--tp", "2", "--residual", "ladder:24-29", "--max-tokens", "8",
                        "--temperature", "0", "--chat", "--prompt", "What is 2+2?"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "exposed communication" in r.stderr
    assert "tp=2" in r.stderr and "(partial)" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "ladder.cli", "generate", "--model", "smollm2",
                          "--residual", "ladder:40-50", "--prompt", "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "layer 50 out of range" in bad.stderr


def test_gpu_link_label_from_uuids():
    """The CUDA interconnect label: decided on (host, GPU UUID) pairs every rank reports, NVML
    asked by UUID (not by index: a Ray worker sees its one GPU as cuda:0)."""
    from ladder.runner import gpu_link
    nvlinked = {frozenset(("GPU-a", "GPU-b"))}
    asked = []

    def nvlink(a, b):
        asked.append((a, b))
        return frozenset((a, b)) in nvlinked

    assert gpu_link([("h", "GPU-a")], nvlink) == "none"
    assert gpu_link([("h", "GPU-a"), ("h", "GPU-b")], nvlink) == "nvlink"
    assert asked == [("GPU-a", "GPU-b")]
    assert gpu_link([("h", "GPU-a"), ("h", "GPU-c")], nvlink) == "pcie"
    assert gpu_link([("h", "GPU-a"), ("h", "GPU-b"), ("h", "GPU-c")], nvlink) == "pcie"
    assert gpu_link([("h1", "GPU-a"), ("h2", "GPU-b")], nvlink) == "network"

    def no_nvml(a, b):
        raise OSError("NVML Shared Library Not Found")
    assert gpu_link([("h", "GPU-a"), ("h", "GPU-b")], no_nvml) == "pcie"
