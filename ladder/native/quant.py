"""Weights kept quantized: GGUF's Q8_0, Q4_0 and Q4_1 blocks in the layout of `ladder_qgemm`.

Each block of 32 inputs of one output column is quantized as llama.cpp's reference quantizers
do (ggml-quants.c, `quantize_row_q8_0_ref`, `_q4_0_ref`, `_q4_1_ref`), scales stored as float16,
so that quantizing the float weights a GGUF of that type dequantizes to gives back the file's
own blocks (tests/test_quant.py checks it on SmolLM2's Q4_1 file). All three are w = d u + m
with u unsigned (Q8_0: u = q + 128, m = -128 d; Q4_0: m = -8 d; Q4_1: m the block's minimum),
which is what the kernel reads; see native.c for the layout.
"""

from __future__ import annotations

import torch

BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4}
BLOCK = 32  # inputs a quant block
GROUP = 16  # output columns a layout block


def quantize(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float weights (in a multiple of 32) -> (u uint8 [out, in], d and m float16
    [out, in / 32]) with w ~ d u + m block by block, as llama.cpp rounds."""
    if kind not in BITS:
        raise ValueError(f"quantization {kind!r} is not one of {sorted(BITS)}")
    out, inp = w.shape
    if inp % BLOCK:
        raise ValueError(f"{inp} inputs are not a multiple of the {BLOCK}-input quant block")
    x = w.detach().to(torch.float32).reshape(out, inp // BLOCK, BLOCK)
    if kind == "q8_0":
        d = x.abs().amax(-1) / 127
        v = x * _inverse(d)[..., None]
        q = torch.where(v.abs() % 1 == 0.5, torch.trunc(v) + torch.sign(v), torch.round(v))
        u = (q.clamp(-127, 127) + 128).to(torch.uint8)  # roundf's ties away from zero
        d16 = d.to(torch.float16)
        m16 = (d16.float() * -128).to(torch.float16)
    elif kind == "q4_0":
        at = x.abs().argmax(-1, keepdim=True)  # the value of largest magnitude, with its sign
        d = x.gather(-1, at)[..., 0] / -8
        u = torch.clamp(torch.trunc(x * _inverse(d)[..., None] + 8.5), max=15).to(torch.uint8)
        d16 = d.to(torch.float16)
        m16 = (d16.float() * -8).to(torch.float16)
    else:
        lo, hi = x.amin(-1), x.amax(-1)
        d = (hi - lo) / 15
        u = torch.clamp(torch.trunc((x - lo[..., None]) * _inverse(d)[..., None] + 0.5),
                        max=15).to(torch.uint8)
        d16, m16 = d.to(torch.float16), lo.to(torch.float16)
    return u.reshape(out, inp), d16, m16


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


def dequantize(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 weights [out, in] that (u, d, m) stand for."""
    out, inp = u.shape
    x = u.reshape(out, inp // BLOCK, BLOCK).float() * d.float()[..., None] + m.float()[..., None]
    return x.reshape(out, inp)


def pack(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """(u, d, m) -> uint8 [ceil(out / 16), in / 32, S] for `ladder_qgemm` (zero columns pad the
    last layout block): per block of 32 inputs, the 16 columns' integers in groups of four inputs
    (two groups a byte in nibbles for 4 bits), then their 16 d and 16 m as float16."""
    out, inp = u.shape
    nb, nblk = -(-out // GROUP), inp // BLOCK
    pad = nb * GROUP - out
    if pad:
        u = torch.cat([u, u.new_zeros(pad, inp)])
        d, m = torch.cat([d, d.new_zeros(pad, nblk)]), torch.cat([m, m.new_zeros(pad, nblk)])
    v = u.reshape(nb, GROUP, nblk, BLOCK)
    if bits == 8:  # [nb, nblk, 8 groups, 16 columns, 4 inputs]
        data = v.reshape(nb, GROUP, nblk, 8, 4).permute(0, 2, 3, 1, 4)
    else:  # [nb, nblk, 4 groups, 16 columns, 4 inputs], inputs 8k+t low, 8k+4+t high
        v = v.reshape(nb, GROUP, nblk, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
        data = v[..., 0, :] | (v[..., 1, :] << 4)
    data = data.reshape(nb, nblk, -1)
    scales = [s.reshape(nb, GROUP, nblk).transpose(1, 2).contiguous().view(torch.uint8)
              for s in (d, m)]  # [nb, nblk, 32 bytes] each
    return torch.cat([data, *scales], dim=-1).contiguous()


def packed_bytes(out: int, inp: int, bits: int) -> int:
    return -(-out // GROUP) * (inp // BLOCK) * (576 if bits == 8 else 320)
