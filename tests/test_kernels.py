"""The decode weight layouts (ladder.native.layouts) compute what the plain layout computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ladder import native
from ladder.model.config import ModelConfig, ResidualPlan
from ladder.model.tp import ShardSpec
from ladder.model.transformer import Transformer
from ladder.native.layouts import FastLinear, decode_layout


@pytest.mark.parametrize("dtype,shape,mode", [
    (torch.float32, (96, 32), "packed"),
    (torch.float32, (32, 96), "packed"),
    (torch.bfloat16, (96, 32), "packed"),
    (torch.bfloat16, (32, 96), "packed"),
])
@pytest.mark.parametrize("rows", [(1, 1), (3, 1), (2, 7), (16, 1), (33, 1)])
def test_fast_linear_matches_f_linear(dtype, shape, mode, rows):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=dtype)
    x = torch.randn(*rows, shape[1], dtype=dtype)
    lin = FastLinear(w)
    assert lin.mode == mode
    got, ref = lin(x), F.linear(x, w)
    assert got.shape == ref.shape and got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, ref)  # oneDNN is what F.linear runs for bf16: same sums
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["onednn", "native"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layout_keeps_the_model(tied, dtype, fused):
    cfg = ModelConfig(vocab_size=80, dim=64, intermediate_size=96, n_layers=2, n_heads=4,
                      n_kv_heads=2, max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(cfg, ShardSpec.make(cfg, 0, 1), ResidualPlan.parse("ladder", 2))
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model = model.to(dtype).eval().requires_grad_(False)
    toks = torch.tensor([[3, 9, 27, 4, 61]])
    ref = model(toks)
    decode_layout(model, fused=fused)
    got = model(toks)
    native_bf16 = fused and dtype in native.gemm_dtypes(native.load())
    if dtype == torch.bfloat16 and not native_bf16:
        assert torch.equal(got, ref)
    elif dtype == torch.bfloat16:  # the same sums in another order, each rounded to bfloat16
        torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert isinstance(model.output, FastLinear)  # the head in the decode layout, tied or not


@pytest.mark.parametrize("shape,mode", [((96, 32), "t"), ((32, 96), "plain")])
def test_without_onednn_float32_falls_back_to_plain_layouts(monkeypatch, shape, mode):
    monkeypatch.setattr("ladder.native.layouts._mkldnn_ok", lambda: False)
    torch.manual_seed(0)
    w, x = torch.randn(shape), torch.randn(2, 5, shape[1])
    lin = FastLinear(w)
    assert lin.mode == mode
    torch.testing.assert_close(lin(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
