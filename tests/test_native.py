"""The fused CPU decode operators (ladder/native.c) compute what the torch operators compute.

Each kernel runs against the model's own torch code on the same inputs: bit-identical where the
kernel rounds where torch rounds and sums in no different order (bfloat16 norms and SwiGLU, the
rotated keys written into the cache), within float32 summation-order noise elsewhere.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from ladder import native
from ladder.engine.step import ShardEngine, StepBatch
from ladder.links.base import NoComm
from ladder.links.shm import CommTimeout, ShmComm
from ladder.model.config import ModelConfig, ResidualPlan
from ladder.model.layers import Attention, KVCache, RMSNorm, StepContext
from ladder.model.tp import ShardSpec
from ladder.model.transformer import Transformer
from ladder.native.layouts import FastLinear, NativeAttention, NativeBlock, decode_layout

LIB = native.load()
pytestmark = pytest.mark.skipif(LIB is None, reason=f"no native library: "
                                f"{native.unavailable_reason()}")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f", [(96, 32), (40, 37), (1, 16), (3072, 576)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 13, 16, 130])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_matches_f_linear(dtype, out_f, in_f, rows, threads):
    if dtype not in native.gemm_dtypes(LIB):
        pytest.skip(f"this CPU lacks the instructions of the native {dtype} product")
    torch.manual_seed(0)
    w, x = torch.randn(out_f, in_f).to(dtype), torch.randn(rows, in_f).to(dtype)
    lin = FastLinear(w, LIB)
    assert lin.mode == "native"
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = lin(x)
    finally:
        torch.set_num_threads(saved)
    # bfloat16: float32 sums of the same products in another order, rounded once: the results
    # differ by at most one rounding step of bfloat16 (2^-8 relative)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=2e-2)
    torch.testing.assert_close(got, F.linear(x, w), **tol)
    # leading dims and a non-contiguous input
    x3 = torch.randn(2, 3, 2 * in_f).to(dtype)[..., ::2]
    torch.testing.assert_close(lin(x3), F.linear(x3, w), **tol)
    with pytest.raises(TypeError, match="input is"):
        lin(x.to(torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_weight_layout(dtype):
    w = torch.arange(20 * 3).view(20, 3).to(dtype)
    b = native.block_weight(w)
    if dtype == torch.float32:  # [block][input][16 outputs]
        assert b.shape == (2, 3, 16)
        assert b[1, 2, 3] == w[19, 2] and b[0, 1, 5] == w[5, 1]
        assert torch.all(b[1, :, 4:] == 0)  # the padding rows
    else:  # [block][input pair][16 outputs][2 inputs]
        assert b.shape == (2, 2, 16, 2)
        assert b[1, 1, 3, 0] == w[19, 2] and b[0, 0, 5, 1] == w[5, 1]
        assert torch.all(b[:, 1, :, 1] == 0) and torch.all(b[1, :, 4:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_silu_mul(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(5, 576).to(dtype)
    y = torch.empty_like(x)
    LIB.ladder_rmsnorm(native.DTYPE_CODES[dtype], x.data_ptr(), norm.weight.data_ptr(),
                       y.data_ptr(), 5, 576, 1e-5)
    gu = torch.randn(3, 2 * 100).to(dtype)
    a = torch.empty(3, 100, dtype=dtype)
    LIB.ladder_silu_mul(native.DTYPE_CODES[dtype], gu.data_ptr(), a.data_ptr(), 3, 100, 1)
    gate, up = gu.split(100, dim=-1)
    if dtype == torch.bfloat16:  # rounded where torch rounds: the same values
        assert torch.equal(y, norm(x))
        assert torch.equal(a, F.silu(gate) * up)
    else:
        torch.testing.assert_close(y, norm(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [[0, 1, 2], [3, 0, 2]], ids=["consecutive", "scattered"])
@pytest.mark.parametrize("split", ["whole", "even"])
def test_attention_decode_step(dtype, slots, split):
    """One decode token for three rows at different positions: the cache writes and the output
    against the torch Attention's. 'even': rank 1 of an even head split of 6 query heads over 3
    KV heads at TP=2, whose query heads 3, 4, 5 read its KV heads 0, 1, 1 (unequal groups)."""
    if split == "whole":
        cfg = ModelConfig(vocab_size=32, dim=96, intermediate_size=96, n_layers=2, n_heads=6,
                          n_kv_heads=2, max_seq_len=32)
        spec = ShardSpec.make(cfg, 0, 1)
    else:
        cfg = ModelConfig(vocab_size=32, dim=96, intermediate_size=96, n_layers=2, n_heads=6,
                          n_kv_heads=3, max_seq_len=32)
        spec = ShardSpec.make(cfg, 1, 2, "even")
        assert spec.kv_map == (0, 1, 1) and not spec.grouped
    kv = spec.n_kv_heads
    torch.manual_seed(0)
    attn = Attention(cfg, spec, layer_id=1)
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    attn = attn.to(dtype).eval().requires_grad_(False)
    model = Transformer(cfg, spec, ResidualPlan.parse("standard", 2)).to(dtype)
    cache = KVCache(2, 4, kv, 32, cfg.head_dim, dtype)
    cache.k.normal_()
    cache.v.normal_()
    starts = [5, 0, 17]
    positions = torch.tensor(starts)[:, None]
    keys = torch.arange(max(starts) + 1)
    cos, sin = model.rope(positions, dtype)

    def ctx(c):  # the cache's blocks as slots of 32 positions
        return StepContext(cos=cos, sin=sin, positions=positions, cache=c,
                           tables=torch.tensor(slots)[:, None], kv_len=max(starts) + 1,
                           mask=(keys[None, None, :] <= positions[:, :, None])[:, None])

    x = torch.randn(3, 1, 96).to(dtype)
    ref_cache, got_cache = cache, KVCache(2, 4, kv, 32, cfg.head_dim, dtype)
    got_cache.k.copy_(cache.k)
    got_cache.v.copy_(cache.v)
    with torch.inference_mode():
        ref = attn(x, ctx(ref_cache))
        got = NativeAttention(attn, LIB)(x, ctx(got_cache))
    assert torch.equal(got_cache.k, ref_cache.k)  # rotated keys: the same roundings
    assert torch.equal(got_cache.v, ref_cache.v)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)


def _random_model(dtype, plan: str, config: dict, rank: int = 0, tp: int = 1, seed: int = 0):
    """A 3-layer model of this rank's shapes ('even' head split beyond one rank) with random
    weights in `dtype`: (config, spec, plan, state dict)."""
    cfg = ModelConfig(**{**dict(vocab_size=96, dim=64, intermediate_size=128, n_layers=3,
                                n_heads=4, n_kv_heads=2, max_seq_len=64), **config})
    spec = ShardSpec.make(cfg, rank, tp, "even" if tp > 1 else "groups")
    torch.manual_seed(seed)
    base = Transformer(cfg, spec, ResidualPlan.parse(plan, 3))
    for p in base.parameters():
        p.data.normal_(0, 0.2)
    state = {k: v.to(dtype) for k, v in base.state_dict().items() if k != "inv_freq"}
    return cfg, spec, ResidualPlan.parse(plan, 3), state


def _engine(model_parts, dtype, comm=None, **layout) -> ShardEngine:
    cfg, spec, plan, state = model_parts
    model = Transformer(cfg, spec, plan).to(dtype)
    model.load_state_dict(state, strict=False)
    model = decode_layout(model.eval().requires_grad_(False), **layout)
    comm = comm or NoComm()
    model.set_comm(comm)
    return ShardEngine(model, comm, n_slots=4, max_seq=48)


def _engines(dtype, tp_plan="ladder", **config):
    parts = _random_model(dtype, tp_plan, config)
    return [_engine(parts, dtype, fused=fused) for fused in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_decode_fused_equals_torch_operators(dtype):
    """Prefill three prompts into scattered slots (the chunk kernel), then decode them together
    (the decode kernel), both engines fed the torch engine's greedy tokens: the fused engine's
    logits are within summation-order noise of torch's at every step, and it picks the same
    token wherever torch's best two are further apart than that noise (bfloat16 rounds near
    ties either way)."""
    plain, fused = _engines(dtype)
    assert isinstance(fused.model.layers[0].attention, NativeAttention)
    prompts = {3: [5, 9, 2, 11], 0: [7, 1], 2: [4, 4, 8, 15, 16, 23]}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    toks = {s: list(p) for s, p in prompts.items()}
    batch = StepBatch(tokens=list(prompts.values()), slots=list(prompts), starts=[0] * 3)
    clear = 0
    for _ in range(13):
        want, got = (eng.step(batch).float() for eng in (plain, fused))
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        top = want.topk(2, -1)
        nxt = top.indices[:, 0].tolist()
        sure = (top.values[:, 0] - top.values[:, 1]) > 2 * tol
        assert got.argmax(-1)[sure].tolist() == top.indices[sure, 0].tolist()
        clear += int(sure.sum())
        for s, t in zip(prompts, nxt):
            toks[s].append(t)
        batch = StepBatch(tokens=[[t] for t in nxt], slots=list(prompts),
                          starts=[len(toks[s]) - 1 for s in prompts])
    assert clear >= 13  # a third of the choices or more are clear: the check tests something


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32), dict(dtype=torch.bfloat16, qkv_bias=True),
    dict(dtype=torch.float32, quant="q4_1", plan="ladder:1-2"),
    dict(dtype=torch.float32, quant="q8_0", qkv_bias=True, sliding_window=6, plan="parallel"),
    dict(dtype=torch.float32, quant="q4_0", rank=1, tp=2, dim=192, n_heads=6, n_kv_heads=3),
    dict(dtype=torch.bfloat16, plan="standard"), dict(dtype=torch.float32, plan="ladder:0-0"),
], ids=["float32", "bfloat16-bias", "q4_1-partial-ladder", "q8_0-bias-window-parallel",
        "q4_0-even-split-rank", "bfloat16-standard", "float32-first-layer-ladder"])
def test_whole_modules_equal_separate_calls(case):
    """A decode step's layers as one C call (NativeLayers), or at least each attention and MLP
    as one (NativeBlock, the parallel plan), give the logits and the KV cache of the separate
    calls to the bit, prompt and every decode step, several rows at different positions; with
    biases, a sliding window that the rows pass, quantized products, standard, ladder, partial
    ladder and parallel plans, and a rank of the 'even' head split (its own KV head map)."""
    case = dict(case)
    dtype, quant = case.pop("dtype"), case.pop("quant", None)
    plan, rank, tp = case.pop("plan", "ladder"), case.pop("rank", 0), case.pop("tp", 1)
    parts = _random_model(dtype, plan, case, rank, tp, seed=1)
    engines = [_engine(parts, dtype, quant=quant) for _ in range(2)]
    for eng in engines:
        assert all(isinstance(layer, NativeBlock) for layer in eng.model.layers)
        assert (eng.model.fused_layers is None) == (plan == "parallel")
    engines[1].model.fused_layers = None
    layers = engines[1].model.layers
    for i, layer in enumerate(layers):  # the second: the block's own modules, call by call
        layers[i] = layer.inner
    steps = [StepBatch(tokens=[[5, 9, 2, 11, 3, 3, 8], [7, 1]], slots=[2, 0], starts=[0, 0],
                       all_logits=True)]
    toks = {2: 7, 0: 2}
    for i in range(12):
        steps.append(StepBatch(tokens=[[(3 * i + s) % 90 + 1] for s in toks], slots=list(toks),
                               starts=[toks[s] + i for s in toks]))
    for batch in steps:
        a, b = (eng.step(batch) for eng in engines)
        assert torch.equal(a, b)
    assert engines[0].model.layers[0]._step.bind(engines[0]._context(steps[-1])[0])
    assert torch.equal(engines[0].cache.k, engines[1].cache.k)
    assert torch.equal(engines[0].cache.v, engines[1].cache.v)


class _ShmGroup:
    """A TP=2 group of engines in this process, one thread a rank, on a real shared-memory
    communicator (ShmComm; ctypes lets the ranks' C loops run at once): the leader steps, the
    follower follows. Always closed."""

    def __init__(self, dtype, plan, config, quant=None, timeout_s=20.0):
        name = f"t{os.getpid()}_{time.monotonic_ns()}"
        self.comms = [None, None]

        def make(r):
            self.comms[r] = ShmComm(name, r, 2, timeout_s=timeout_s)

        threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(self.comms), "the group's segment did not come up"
        self.engines = [_engine(_random_model(dtype, plan, config, r, 2, seed=1), dtype,
                                self.comms[r], quant=quant) for r in range(2)]
        self.error: list = []
        self.follower = threading.Thread(target=self._follow, daemon=True)
        self.follower.start()

    def _follow(self):
        try:
            self.engines[1].follow()
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            self.error.append(e)

    def stop(self):
        if self.follower.is_alive():
            self.engines[0].stop_followers()
            self.follower.join(30)
        assert not self.follower.is_alive() and not self.error, self.error

    def close(self):
        for c in self.comms:
            if c is not None:
                c.close()


def _decode_steps(n=10):
    steps = [StepBatch(tokens=[[5, 9, 2, 11, 3, 3, 8], [7, 1]], slots=[2, 0], starts=[0, 0])]
    toks = {2: 7, 0: 2}
    for i in range(n):
        steps.append(StepBatch(tokens=[[(3 * i + s) % 90 + 1] for s in toks], slots=list(toks),
                               starts=[toks[s] + i for s in toks]))
    return steps


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float32, plan="ladder"),
    dict(dtype=torch.bfloat16, plan="ladder:1-2", qkv_bias=True),
    dict(dtype=torch.float32, plan="standard", quant="q4_1"),
], ids=["float32-ladder", "bfloat16-partial-ladder-bias", "q4_1-standard"])
def test_whole_layers_reduce_through_shared_memory_as_the_walk(case):
    """At TP=2 over shared memory, a decode step's layers as one C call per rank, all-reducing
    through the segment by ShmComm's protocol, give the logits and both ranks' KV caches of the
    Python walk (the same communicator's all_reduce / wait) to the bit, with the same number of
    reduces and bytes a step; a whole ladder, a partial one (a pending reduce added before a
    standard module), a standard plan with quantized products."""
    case = dict(case)
    dtype, plan, quant = case.pop("dtype"), case.pop("plan"), case.pop("quant", None)
    runs = []
    for walk in (False, True):
        g = _ShmGroup(dtype, plan, case, quant)
        try:
            assert all(e.model.fused_layers is not None for e in g.engines)
            if walk:
                for e in g.engines:
                    e.model.fused_layers = None
            outs, comm = [], []
            for batch in _decode_steps():
                outs.append(g.engines[0].step(batch))
                comm.append((g.engines[0].last.bytes, g.engines[0].last.ops))
            g.stop()
            runs.append((outs, comm, [(e.cache.k.clone(), e.cache.v.clone())
                                      for e in g.engines],
                         g.engines[0].model.layers[0]._step._ctx is not None))
        finally:
            g.close()
    (fused, fcomm, fcache, bound), (walked, wcomm, wcache, _) = runs
    assert bound  # the fused run's decode steps did run the fused modules
    for a, b in zip(fused, walked):
        assert torch.equal(a, b)
    assert fcomm == wcomm and fcomm[-1][1] == 3 * 2 + 1  # 6 modules' reduces, the logits' gather
    for (ka, va), (kb, vb) in zip(fcache, wcache):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


class _Interrupted(Exception):
    pass


def _interrupt(*_):
    raise _Interrupted


@pytest.mark.parametrize("how", ["died", "timeout", "interrupted"])
def test_whole_layers_name_the_peer_that_failed(how):
    """A peer that dies, or does not publish within the communicator's timeout, while the C
    loop waits for it: CommTimeout naming the rank and why (in well under the timeout when it
    died), and the communicator refuses later use. A signal that comes while the loop waits is
    handled once it returns: its exception comes out as itself, and the communicator, its
    counters never handed back, refuses later use."""
    g = _ShmGroup(torch.float32, "ladder", {}, timeout_s=1.0)
    try:
        steps = _decode_steps(2)
        for batch in steps[:2]:
            g.engines[0].step(batch)
        g.stop()  # rank 1 no longer takes part
        leader = g.engines[0]
        if how == "died":
            child = subprocess.Popen(["true"])
            child.wait()
            comm = g.comms[0]
            comm._w[comm._line[1]] = child.pid  # rank 1's pid word: a process that is gone
        t0 = time.monotonic()
        if how == "interrupted":
            before = signal.signal(signal.SIGALRM, _interrupt)
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                with pytest.raises(_Interrupted):  # once the C loop gave up on rank 1
                    leader._run(steps[2])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, before)
            with pytest.raises(CommTimeout, match="a native step was interrupted"):
                leader._run(steps[2])
            return
        with pytest.raises(CommTimeout) as e:
            leader._run(steps[2])
        waited = time.monotonic() - t0
        if how == "died":
            assert "rank 1 did not finish: it died" in str(e.value) and waited < 0.5
        else:
            assert "rank 1 did not finish within 1.0 s" in str(e.value) and waited < 3.0
        with pytest.raises(CommTimeout, match="failed earlier"):
            leader._run(steps[2])
    finally:
        g.close()


@pytest.mark.parametrize("config", [{}, dict(dim=96, n_heads=4, n_kv_heads=1),
                                    dict(n_heads=4, n_kv_heads=4, sliding_window=7)],
                         ids=["gqa", "head-dim-24", "window"])
def test_prompt_chunks_fused_equal_torch_operators(config):
    """Prompts in pieces beside decode rows (packed steps), a prompt continued alone from a
    cached start, and a fresh prompt longer than a tile of the chunk kernel: the fused engine's
    logits match torch's within float32's summation-order noise, step by step; with a head
    size the vector path does not take (24) and with a sliding window."""
    plain, fused = _engines(torch.float32, **config)
    long = [(7 * i) % 90 + 3 for i in range(40)]  # > CHUNK_TILE tokens in one step
    steps = [
        StepBatch(tokens=[long, [5, 9, 2]], slots=[0, 1], starts=[0, 0]),
        # decode rows beside chunks that start mid-block and cross blocks
        StepBatch(tokens=[[4], [6, 7, 8, 9, 10, 11]], slots=[0, 1], starts=[40, 3]),
        StepBatch(tokens=[[12], [1] * 9, [3]], slots=[1, 2, 0], starts=[9, 0, 41]),
        # one row, from a cached start (a prefix hit's rest)
        StepBatch(tokens=[[2, 3, 4, 5, 6]], slots=[2], starts=[9]),
        # a plain decode step, every row past the window where there is one
        StepBatch(tokens=[[3], [4], [5]], slots=[0, 1, 2], starts=[42, 10, 14]),
    ]
    for batch in steps:
        want, got = (eng.step(batch).float() for eng in (plain, fused))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_turned_off_or_unbuildable_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("LADDER_NATIVE", "0")
    assert native.load() is None and "LADDER_NATIVE=0" in native.unavailable_reason()

    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("LADDER_NATIVE")
    monkeypatch.setenv("LADDER_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="ladder.native"):
        assert native.load() is None
    assert "no C compiler" in native.unavailable_reason()
    assert "using torch's" in caplog.text
    assert list(tmp_path.iterdir()) == []
    # the model still converts, to oneDNN's layout and torch's small operators
    cfg = ModelConfig(vocab_size=32, dim=32, intermediate_size=64, n_layers=1, n_heads=2,
                      n_kv_heads=1, max_seq_len=16)
    model = decode_layout(Transformer(cfg, ShardSpec.make(cfg, 0, 1),
                                        ResidualPlan.parse("standard", 1)).eval())
    assert isinstance(model.layers[0].attention, Attention)
    assert model.layers[0].attention.wqkv.mode in ("packed", "t", "plain")


def test_builds_into_its_directory(monkeypatch, tmp_path):
    """A fresh directory gets the library built (once; a second load finds it)."""
    monkeypatch.setenv("LADDER_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    lib = native.load()
    assert lib is not None and lib.ladder_native_version() == 6
    built = list(tmp_path.iterdir())
    assert [p.name for p in built] == [native.library_path().name]
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_tried", False)
    assert native.load() is not None and built[0].stat().st_mtime_ns == mtime


def test_build_prunes_old_libraries(monkeypatch, tmp_path):
    """A build keeps the KEEP newest libraries (its own among them) and drops an hour-old
    temporary file of a crashed build; a fresh temporary file (a build under way) stays."""
    monkeypatch.setenv("LADDER_NATIVE_DIR", str(tmp_path))
    now = time.time()
    old = []
    for i in range(native.KEEP + 2):  # other checkouts' builds, newest first
        p = tmp_path / f"ladder_native-{i:016x}.so"
        p.write_bytes(b"")
        os.utime(p, (now - 60 * (i + 1),) * 2)
        old.append(p)
    crashed, running = tmp_path / "ladder_native-x.so.tmp", tmp_path / "ladder_native-y.so.tmp"
    for p, age in ((crashed, 7200), (running, 10)):
        p.write_bytes(b"")
        os.utime(p, (now - age,) * 2)
    native.build(native.library_path())
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([native.library_path().name, running.name,
                           *(p.name for p in old[:native.KEEP - 1])])


@pytest.mark.parametrize("how", ["dir-writable", "lib-writable", "dir-owner", "lib-owner",
                                 "lib-symlink"])
def test_untrusted_cache_is_not_loaded(monkeypatch, tmp_path, caplog, how):
    """A cached library somebody else could have written is not loaded: a private copy is built
    (in a temporary 0700 directory, removed after loading) and works."""
    if how.endswith("owner") and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("LADDER_NATIVE_DIR", str(cache))
    monkeypatch.setattr(native.tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    cache.mkdir(mode=0o755)
    lib = native.library_path()
    planted = tmp_path / "planted.so"  # loading this would fail: load() would return None
    planted.write_bytes(b"not a shared library")
    if how == "lib-symlink":
        lib.symlink_to(planted)
    else:
        planted.rename(lib)
    bad, why = {"dir-writable": (cache, "mode 0777 lets group or others write to it"),
                "lib-writable": (lib, "mode 0666 lets group or others write to it"),
                "dir-owner": (cache, "owned by uid 12345, not by this user \\(uid 0\\)"),
                "lib-owner": (lib, "owned by uid 12345, not by this user \\(uid 0\\)"),
                "lib-symlink": (lib, f"a symbolic link \\(to {planted}\\)")}[how]
    if how.endswith("writable"):
        bad.chmod(0o777 if bad.is_dir() else 0o666)
    elif how.endswith("owner"):
        os.chown(bad, 12345, 12345)
    with caplog.at_level(logging.WARNING, logger="ladder.native"):
        got = native.load()
    assert got is not None, native.unavailable_reason()
    assert got.ladder_native_version() == 6
    assert caplog.records and re.search(f"cached at {bad}: {why}; building a private copy",
                                        caplog.text), caplog.text
    assert list(scratch.iterdir()) == []  # the private directory is gone
    assert lib.is_symlink() or lib.read_bytes().startswith(b"not a")  # the cache untouched
