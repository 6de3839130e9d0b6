"""Communicators, sampling, stop handling, request checks and the `ladder generate` command."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import MIN_TEMPERATURE, Sampler, SamplingParams, SamplingRows
from ladder.engine.vocab import CANDIDATES, pick, threshold, uniform
from ladder.links.base import EmulatedLatency, NoComm
from ladder.model.config import ConfigError, ModelConfig, ResidualPlan
from ladder.model.tp import ShardSpec, split_sizes
from ladder.options import GroupOptions


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


def _softmax_reference(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities of temperature-1 sampling from a full row after top-k, then top-p (ties at
    the cut kept), by the textbook steps."""
    row = row.double().clone()
    if top_k:
        row[row < torch.topk(row, top_k).values[-1]] = float("-inf")
    if top_p < 1:
        vals, idx = row.sort(descending=True)
        probs = vals.softmax(-1)
        keep = (probs.cumsum(-1) - probs) < top_p
        row[row < vals[keep][-1]] = float("-inf")
    return row.softmax(-1)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (8, 0.7)])
def test_threshold_matches_the_full_row(top_k, top_p):
    """`sampling.threshold` from a rank's candidates keeps what the textbook cut of the full row
    keeps; where the candidates cannot tell, it says None (and the row is gathered)."""
    torch.manual_seed(top_k)
    row = torch.randn(300) * 3
    ref = _softmax_reference(row, top_k, top_p)
    log_z = float(torch.logsumexp(row, 0))
    full = threshold(row.sort(descending=True).values, top_k, top_p, log_z)
    assert torch.equal(row >= full, ref > 0)
    # two ranks' 40 largest: enough here (the nucleus of 3x-scaled normals is small)
    halves = row[:150], row[150:]
    cands = torch.cat([h.topk(40).values for h in halves]).sort(descending=True).values
    bound = max(float(h.topk(40).values[-1]) for h in halves)
    assert threshold(cands, top_k, top_p, log_z, bound) == full
    # a flat row: a nucleus of 0.6 needs far more than 5 candidates a rank
    flat = torch.zeros(300) + torch.arange(300) * 1e-3
    few = torch.cat([h.topk(5).values for h in (flat[:150], flat[150:])]).sort(
        descending=True).values
    got = threshold(few, 0, 0.6, float(torch.logsumexp(flat, 0)),
                    max(float(flat[:150].topk(5).values[-1]), float(flat[150:].topk(5).values[-1])))
    assert got is None


def test_pick_samples_the_softmax_in_vocabulary_order():
    """`sampling.pick` draws each token with its softmax probability (4000 draws over 6 tokens,
    every frequency within 4 standard errors), and the same token whatever order the
    candidates come in."""
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = row.softmax(-1)
    ids = torch.arange(6)
    n = 4000
    gen = torch.Generator().manual_seed(0)
    us = [uniform(int(s)) for s in torch.randint(0, 2**62, (n,), generator=gen)]
    counts = torch.bincount(torch.tensor([pick(row, ids, u) for u in us]), minlength=6).double()
    se = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4 * se + 1e-3).all(), (counts / n, probs)
    perm = torch.randperm(6, generator=gen)
    assert [pick(row[perm], ids[perm], u) for u in us[:50]] == [pick(row, ids, u) for u in us[:50]]


def test_vocab_sample_equals_the_full_row_draw():
    """`vocab.sample` (one rank: the slice is the vocabulary, 600 > CANDIDATES tokens)
    draws what `pick` draws from the full row after the textbook cut, greedy rows their argmax,
    for 40 seeds of each kind of row: temperature alone (drawn in the slice), top-k, top-k with
    top-p (drawn from the candidates), a flat top-p row and a top-k beyond the table (gathered),
    a nearly uniform row, and a temperature so small that it is greedy."""
    from ladder.engine import vocab
    from ladder.model.transformer import Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=600, dim=32, intermediate_size=64, n_layers=1, n_heads=2,
                      n_kv_heads=1, max_seq_len=16)
    model = Transformer(cfg, ShardSpec.make(cfg, 0, 1), ResidualPlan.parse("standard", 1)).eval()

    kinds = [(0.0, 0, 1.0), (0.9, 0, 1.0), (0.7, 10, 1.0), (0.5, 50, 0.9), (30.0, 0, 0.97),
             (0.8, 550, 1.0), (1e6, 0, 0.5), (1e-30, 0, 1.0)]  # top_k > TOPK_IN_TABLE: gathered
    h = torch.randn(len(kinds), 32) * 4
    gen = torch.Generator().manual_seed(1)
    shard = vocab.Shard.of(model)
    with torch.no_grad():
        logits = model.logits(h).float()
        for _ in range(40):
            seeds = torch.randint(0, 2**62, (len(kinds),), generator=gen).tolist()
            rows = SamplingRows.of([(*k, seed) for k, seed in zip(kinds, seeds)])
            got = vocab.sample(logits, rows, shard).tolist()
            want = []
            for i, (temp, k, p) in enumerate(kinds):
                if temp < MIN_TEMPERATURE:  # greedy
                    want.append(int(logits[i].argmax()))
                    continue
                x = logits[i] / torch.tensor(temp, dtype=torch.float32)
                keep = _softmax_reference(x, k, p) > 0
                if i == 4:  # the flat row keeps more than CANDIDATES: its logits are gathered
                    assert keep.sum() > CANDIDATES
                want.append(pick(x[keep], torch.arange(600)[keep], uniform(seeds[i])))
            assert got == want, (got, want)


def test_min_p_keeps_what_the_full_row_keeps():
    """min_p (vLLM's: before top-k and top-p) on one rank's slice, the likeliest value from the
    ranks' maxima: `vocab.sample` draws what `pick` draws from the full row after the textbook
    cut (p >= min_p x the row's largest p), alone and with top-k / top-p; min_p 1 is greedy."""
    from ladder.engine import vocab
    from ladder.links.base import NoComm
    torch.manual_seed(2)
    logits = torch.randn(4, 600) * 3
    kinds = [(1.0, 0, 1.0, 0.05), (0.7, 0, 1.0, 0.3), (1.0, 20, 0.8, 0.02), (1.5, 0, 1.0, 1.0)]
    shard = vocab.Shard(0, 1, 0, 600, 600, NoComm())
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        seeds = torch.randint(0, 2**62, (len(kinds),), generator=gen).tolist()
        rows = SamplingRows.of([(t, k, p, seed, m) for (t, k, p, m), seed in zip(kinds, seeds)])
        got = vocab.sample(logits, rows, shard).tolist()
        want = []
        for i, (temp, k, p, m) in enumerate(kinds):
            x = logits[i] / torch.tensor(temp, dtype=torch.float32)
            probs = x.double().softmax(-1)
            x = x.masked_fill(probs < m * probs.max(), float("-inf"))
            keep = _softmax_reference(x, k, p) > 0
            want.append(pick(x[keep], torch.arange(600)[keep], uniform(seeds[i])))
        assert got == want, (got, want)
        assert got[3] == int(logits[3].argmax())


def test_draws_never_land_on_a_weightless_token():
    """At the edges of [0, 1) (rounding between the ranks' masses) a draw takes the first or
    last token that weighs anything, never one whose weight underflowed to 0."""
    from ladder.engine.vocab import _draw
    e = torch.zeros(1, 600)
    e[0, 1], e[0, 300], e[0, 301] = 1.0, 2.0, 1.0
    got = [int(_draw(e, torch.tensor([s], dtype=torch.float64))[0])
           for s in (-1e-12, 0.0, 0.2, 0.3, 0.7, 0.99, 1.0, 1.0 + 1e-12)]
    assert got == [1, 1, 1, 300, 300, 301, 301, 301]
    v = torch.tensor([float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")])
    assert [pick(v, torch.arange(5), u) for u in (0.0, 0.49, 0.51, 1.0)] == [1, 1, 3, 3]


def test_sampler_rows_and_params():
    s = Sampler()
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, seed=5)
    s.add("g", greedy)
    s.add("h", hot)
    rows = SamplingRows.of([s.row("g", greedy), s.row("h", hot)])
    back = SamplingRows.decode(rows.encode())  # through the step's int64 wire format
    assert back == rows and rows.greedy_rows() == [0]
    assert rows.temperature == [0.0, 0.7] and rows.top_k == [0, 10]
    assert rows.top_p == [1.0, 0.9] and rows.seed[0] == 0
    s2 = Sampler()
    s2.add("h", hot)
    # a request's seeds follow from its seed alone, step after step
    assert [s2.row("h", hot)[3] for _ in range(3)] == \
        [rows.seed[1]] + [s.row("h", hot)[3] for _ in range(2)]
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


def broken(**kw) -> SamplingParams:
    """A request that passed validation and then broke (as a bug in it would): the leader
    fails it while building its part of a step."""
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
    for k, v in kw.items():
        setattr(sp, k, v)
    return sp


def test_a_request_that_breaks_its_step_fails_alone(smol):
    ok = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True)]
    prompts = [[5, 6, 7], [8, 9]]
    alone = [smol.generate([p], [sp])[0]["tokens"] for p, sp in zip(prompts, ok)]
    bad = [broken(seed=2**70), broken(top_k=2**63)]
    out = smol.generate(prompts + [[3, 4]] * len(bad), ok + bad)
    assert [o["tokens"] for o in out[:2]] == alone  # the others finish as they would alone
    assert [o["finish_reason"] for o in out] == ["length", "length", "error", "error"]
    assert "Overflow" in out[2]["error"] or "overflow" in out[2]["error"]
    assert all(o["error"] and not o["tokens"] for o in out[2:])
    assert smol.generate([[5, 6, 7]], [ok[0]])[0]["tokens"] == alone[0]  # and it serves on


def test_request_past_the_context_is_refused(smol):
    from ladder.engine.scheduler import RequestError
    with pytest.raises(RequestError, match="the prompt has 200 tokens; the context holds 128"):
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
    from ladder.links.detect import gpu_link
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


def test_a_taken_rendezvous_port_starts_again_on_another(tiny_llama, monkeypatch):
    """The rendezvous port is probed free, then listened on by rank 0 in its own process:
    another socket can take it in between (seen in CI as EADDRINUSE). The group starts again on
    a fresh port rather than failing."""
    import socket

    import ladder.engine.local as local
    from ladder.links.factory import free_port
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    probes = []

    def probe(host: str = "127.0.0.1") -> int:
        probes.append(taken.getsockname()[1] if not probes else free_port(host))
        return probes[-1]

    monkeypatch.setattr(local, "free_port", probe)
    try:
        with LocalTPGroup(GroupOptions(model=str(tiny_llama), tp=2, max_seq=32)) as g:
            assert g.logits([[3, 4, 5]])[0].shape[0] == 3
    finally:
        taken.close()
    assert len(probes) == 2 and probes[0] != probes[1]
