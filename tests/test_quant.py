"""Weights kept quantized: GGUF's Q8_0, Q4_0 and Q4_1 blocks (ladder/native/quant.py) multiplied
without dequantizing (native.c's ladder_qgemm).

- The blocks are llama.cpp's: quantizing gives the bytes gguf's own quantizer writes, and
  re-quantizing SmolLM2's file as read gives back the file's blocks.
- The product is the arithmetic it claims (int8 rows per block of 32, exact int32 dots, the
  scales applied in float), on the vector path and the plain-C one, for any row count, column
  count and thread count.
- Served: a TP=2 group of SmolLM2 in q4_1 agrees with TP=1 in q4_1 and stays within
  quantization noise of the dequantized float32 model, and its held-out perplexity is within 1%
  of that model's; what cannot be served quantized fails clearly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from ladder import native
from ladder.native import quant
from ladder.native.layouts import FastLinear, decode_layout
from ladder.options import GroupOptions

LIB = native.load()
pytestmark = pytest.mark.skipif(LIB is None, reason=f"no native library: "
                                f"{native.unavailable_reason()}")
KINDS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}


def gguf_blocks(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor, kind: str) -> np.ndarray:
    """(u, d, m) as GGUF's block bytes [out, in / 32 * block bytes]."""
    out, inp = u.shape
    u = u.reshape(out, inp // 32, 32).numpy()
    dd = d.numpy().view(np.uint8).reshape(out, -1, 2)
    if kind == "q8_0":
        qs = (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [dd, qs]
    else:
        qs = u[..., :16] | (u[..., 16:] << 4)
        parts = [dd, qs] if kind == "q4_0" else [dd, m.numpy().view(np.uint8).reshape(out, -1, 2),
                                                 qs]
    return np.concatenate(parts, -1).reshape(out, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_writes_llamacpp_blocks(kind):
    """Our quantizer's blocks are byte for byte those of gguf's (llama.cpp's reference
    quantizers in numpy), ties and all-zero blocks included; dequantizing agrees too."""
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.1
    w[3, :32] = 0  # an all-zero block: d = 0
    w[5, 32:64] = 0.25  # a constant block
    w[7, 64:96] = torch.arange(32) / 127 * 0.5  # x / d on the halves: rounding ties
    u, d, m = quant.quantize(w, kind)
    want = gguf_quantize(w.numpy(), KINDS[kind])
    np.testing.assert_array_equal(gguf_blocks(u, d, m, kind), want)
    np.testing.assert_array_equal(quant.dequantize(u, d, m).numpy(),
                                  gguf_dequantize(want, KINDS[kind]))


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.7.attn_v.weight",
                                  "blk.29.ffn_gate.weight", "token_embd.weight"])
def test_file_blocks_round_trip(smollm2, name):
    """SmolLM2's own blocks (its layers' Q4_1, its embedding's Q8_0), dequantized as the loader
    does and quantized again, are the file's bytes: serving q4_1 from this file keeps its
    weights, not a second rounding of them."""
    t = next(t for t in smollm2.reader.tensors if t.name == name)
    kind = t.tensor_type.name.lower()
    raw = np.array(t.data[:1024])  # the embedding's first 1024 rows; every row otherwise
    u, d, m = quant.quantize(torch.from_numpy(gguf_dequantize(raw, t.tensor_type)), kind)
    np.testing.assert_array_equal(gguf_blocks(u, d, m, kind), raw)


def exact(x: torch.Tensor, u: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """What ladder_qgemm computes, in float64 from its definition: each row of x quantized to
    int8 per block of 32 (dx = max |x| / 127 in float32, to nearest, ties to even), then
    sum over blocks of dx (d dot(u, xq) + m sum(xq))."""
    rows, inp = x.shape
    xb = x.reshape(rows, inp // 32, 32)
    dx = xb.abs().amax(-1) / 127
    inv = torch.where(dx != 0, 1 / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv[..., None]).double()
    ub = u.reshape(u.shape[0], inp // 32, 32).double()
    dots = torch.einsum("rjk,cjk->rcj", xq, ub)
    sums = xq.sum(-1)  # [rows, blocks]
    per = dx.double()[:, None, :] * (d.double()[None] * dots + m.double()[None] * sums[:, None])
    return per.sum(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_f,in_f,rows", [(50, 64, 1), (576, 576, 3), (33, 96, 9),
                                             (200, 1536, 5), (1030, 128, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_product_is_its_arithmetic(kind, out_f, in_f, rows, threads):
    """The product (vector path where the CPU has VNNI) equals its definition within float32's
    summation noise, and the plain-C path; columns not a multiple of 16, rows not of the tile,
    one thread or two."""
    torch.manual_seed(out_f + in_f + rows)
    w = torch.randn(out_f, in_f) * 0.05
    x = torch.randn(rows, in_f) * 3
    x[0, :32] = 0  # a zero block of x: dx = 0
    u, d, m = quant.quantize(w, kind)
    lin = FastLinear(w, LIB, quant=kind)
    torch.set_num_threads(threads)
    try:
        got = lin(x)
    finally:
        torch.set_num_threads(2)
    want = exact(x, u, d, m)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    plain = torch.empty(rows, out_f)
    scratch = torch.empty(LIB.ladder_qgemm_scratch(rows, in_f), dtype=torch.uint8)
    LIB.ladder_qgemm_reference(x.data_ptr(), lin.weight.data_ptr(), plain.data_ptr(), rows, out_f,
                               in_f, quant.BITS[kind], scratch.data_ptr())
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    # and it is a product of these weights: within int8 rounding of x of the float one
    ref = x @ quant.dequantize(u, d, m).T
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
    assert lin.weight.numel() == quant.packed_bytes(out_f, in_f, quant.BITS[kind])


def test_layout_bytes_per_weight():
    """q4 holds 0.625 bytes a weight, q8 1.125, as GGUF's Q4_1 and Q8_0 (a third and a half of
    bfloat16's two bytes come from the memory bus a token)."""
    assert quant.packed_bytes(576, 1536, 4) == 576 * 1536 * 20 // 32
    assert quant.packed_bytes(576, 1536, 8) == 576 * 1536 * 36 // 32


def test_bad_shapes_and_options_fail_clearly():
    from ladder.model.config import ModelConfig, ResidualPlan
    from ladder.model.tp import ShardSpec
    from ladder.model.transformer import Transformer
    with pytest.raises(ValueError, match="multiple of the 32-input quant block"):
        quant.quantize(torch.zeros(4, 48), "q8_0")
    with pytest.raises(ValueError, match="not one of"):
        quant.quantize(torch.zeros(4, 64), "q5_k")
    with pytest.raises(ValueError, match="runs on the CPU"):
        GroupOptions(dtype="q4_1", device="cuda", comm="nccl")
    with pytest.raises(ValueError, match="is not one of"):
        GroupOptions(dtype="q3_k")
    cfg = ModelConfig(vocab_size=64, dim=48, intermediate_size=64, n_layers=1, n_heads=2,
                      n_kv_heads=1, max_seq_len=16)
    model = Transformer(cfg, ShardSpec.make(cfg, 0, 1), ResidualPlan()).eval()
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wqkv: this rank's 48 inputs"):
        decode_layout(model, quant="q4_1")


def _models(ckpt, residual: str):
    """SmolLM2 at TP=1 in this process, the same weights twice: dequantized to float32 (the
    plain model) and kept in q4_1 (the decode layout)."""
    from ladder.loaders import load_shard
    from ladder.model.config import ResidualPlan
    from ladder.model.tp import ShardSpec
    from ladder.model.transformer import build_model
    spec = ShardSpec.make(ckpt.config, 0, 1)
    state = load_shard(ckpt, spec, torch.float32)
    plan = ResidualPlan.parse(residual, ckpt.config.n_layers)
    return (build_model(ckpt.config, spec, plan, state),
            decode_layout(build_model(ckpt.config, spec, plan, state), quant="q4_1"))


@pytest.fixture(scope="module")
def served(smollm2):
    """The served default's plan (top six layers laddered) in q4_1 at TP=2 over shared memory:
    its greedy continuation of a question and its full-sequence logits of prompt and
    continuation; the same sequence's logits at TP=1 in this process, kept in q4_1 and
    dequantized to float32."""
    from ladder.engine.local import LocalTPGroup
    from ladder.engine.sampling import SamplingParams
    out = {}
    with LocalTPGroup(GroupOptions(model="smollm2", tp=2, dtype="q4_1", comm="shm",
                                   residual="ladder:24-29", max_seq=256)) as g:
        out["prompt"] = g.encode("Name the planets of the solar system.", chat=True)
        out["gen"] = g.generate([out["prompt"]], [SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True)])[0]
        seq = out["prompt"] + out["gen"]["tokens"]
        out["tp2"] = g.logits([seq])[0].float()
    ref, kept = _models(smollm2, "ladder:24-29")
    with torch.no_grad():
        out["float"], out["tp1"] = (m(torch.tensor([seq]))[0].float() for m in (ref, kept))
    return out


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_served_q4_1_decodes_its_weights(served):
    """Each rank holds its slice's blocks: TP=2's decode steps pick what its own prefill of the
    same sequence ranks first, TP=2 and TP=1 (a cache-less forward) agree (int8 rows re-round
    where the all-reduce adds in another order: agreement, not identity), and both stay within
    quantization noise of the dequantized float32 model (KL per position)."""
    n = len(served["prompt"])
    gen = torch.tensor(served["gen"]["tokens"])
    steps = slice(n - 1, n - 1 + len(gen))  # the logits that chose each generated token
    own = (served["tp2"][steps].argmax(-1) == gen).float().mean().item()
    assert own >= 0.9, own
    agree = (served["tp1"][steps].argmax(-1) == gen).float().mean().item()
    assert agree >= 0.8, agree
    assert _kl(served["tp1"], served["tp2"]) < 0.02
    for key in ("tp1", "tp2"):
        assert _kl(served["float"], served[key]) < 0.05, key


def test_q4_1_perplexity_within_one_percent_of_dequantized(smollm2):
    """Held-out text (the Python docs `ladder adapt` holds out): SmolLM2's Q4_1 weights kept
    quantized (int8 activations per block) against the same weights dequantized to float32:
    perplexity within 1%, top-1 agreement high."""
    from adapt.data import DEFAULT_DATA, prepare
    from adapt.distill import held_out_sums, summarize
    ref, kept = _models(smollm2, "standard")
    packed = prepare(DEFAULT_DATA, smollm2.tokenizer(), seq_len=128,
                     max_seq_len=smollm2.config.max_seq_len, parts=("held_out",))
    rows = torch.from_numpy(packed.held_out[:6]).long()
    r = summarize(held_out_sums(kept, ref, rows, batch=3))
    assert abs(r["ppl_ratio"] - 1) <= 0.01, r
    assert r["top1"] >= 0.9, r
