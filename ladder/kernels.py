"""Weight layouts that CPU decode reads fastest, applied to a loaded model for serving.

Decode is a chain of matrix products with few rows (one per request in the batch), so its speed
is how fast each weight is streamed from memory and, at 16 or 32 rows, how well the kernel
blocks. Measured on the SmolLM2 shapes (30 copies of each weight, far larger than the cache),
one thread, time per product against F.linear over the checkpoint's [out, in] layout:

                               1 row        16 rows
    float32, F.linear          1.00         1.00
    float32, [in, out], x @ W  0.71         1.02    (the layout used before: batch-1 only)
    float32, oneDNN-packed     0.46-0.56    0.40-0.46
    bfloat16, oneDNN-packed    0.5-0.65     (F.linear runs oneDNN for bf16: bit-identical)

oneDNN packs a weight for an expected row count; packing for 16 rows is as fast at 1 row as
packing for 1 row is (and 1.3-1.5x faster at 16 rows in float32; bfloat16 does not care), so
every weight is packed for 16.

`fast_cpu_decode(model)` swaps the model's linears (and adds an LM-head copy in the fast layout)
in place. It is for inference only: the packed weights have no autograd and no state_dict names
that a checkpoint would recognise. The model code is unchanged and still reads like a
single-device model; training and the reference tests use the plain layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladder.model import Transformer


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FastLinear(nn.Module):
    """y = x @ W.T for a [out, in] weight, stored in the layout its dtype reads fastest.

    `mode`: "packed" (oneDNN blocked, float32 or bfloat16), "t" (float32 [in, out], where oneDNN
    is missing) or "plain" (F.linear).
    """

    PACK_ROWS = 16  # the row count oneDNN blocks the weight for (see the module docstring)

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        if weight.dtype in (torch.float32, torch.bfloat16) and _mkldnn_ok():
            self.mode = "packed"
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(),
                                                                  self.PACK_ROWS)
        elif weight.dtype == torch.float32 and out_f >= in_f:
            self.mode = "t"
            self.weight = weight.t().contiguous()
        else:
            self.mode = "plain"
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        if self.mode == "t":
            return x @ self.weight
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}"


def fast_cpu_decode(model: Transformer) -> Transformer:
    """Re-lay out a CPU model's weights for decode speed (in place; returns the model).

    Same outputs up to float32 summation order (bit-identical in bfloat16). A tied LM head gets
    its own copy in the fast layout (the embedding lookup needs the rows); an untied one moves.
    """
    if model.tok_embeddings.weight.device.type != "cpu":
        return model
    for layer in model.layers:
        for parent, name in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                             (layer.mlp, "w13"), (layer.mlp, "w2")):
            lin = getattr(parent, name)
            if isinstance(lin, nn.Linear):
                setattr(parent, name, FastLinear(lin.weight.detach()))
    model.head = FastLinear(model.lm_head_weight().detach())
    model.output = None  # an untied head's only copy now lives in `head`
    return model
