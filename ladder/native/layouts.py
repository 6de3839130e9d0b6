"""Weight layouts that CPU decode reads fastest, applied to a loaded model for serving.

Decode is a chain of matrix products with few rows (one per request in the batch), so its speed
is how fast each weight is streamed from memory and, at 16 or 32 rows, how well the kernel
blocks. F.linear over the checkpoint's [out, in] layout reads slowest; oneDNN's packed layout
and `ladder.native`'s blocked products read about twice as fast (measured per product and per
token in bench/results/2026-12-03-session10.md, "Decode layouts"). oneDNN packs a weight for an
expected row count; packing for 16 rows is as fast at 1 row as packing for 1 row is, so every
weight is packed for 16. Where `ladder.native` builds and the CPU has AVX-512 (AVX512-BF16 for
bfloat16), its own blocked products replace oneDNN's: about as fast per byte, without oneDNN's
per-call overhead (121 calls a token).

`decode_layout(model)` is the serving build's explicit last step (`ladder.engine.build`): it
swaps the model's linears (and gives the LM head a module of its own in the fast layout) and,
with the native library, wraps each norm, attention and MLP so that the small operators between
the weight products run as one C call each: the norm; rotary embedding, KV-cache write and
attention of a decode step; silu(gate) * up. Where every part of a layer has its C kernel, the
layer becomes a `NativeBlock`, whose decode steps run each module (norm, products and all) as
one C call: ~40 us of Python and ctypes less a module, 120 modules a token on SmolLM2 (1.4x a
q4_1 token, 1.2x bfloat16, same bits). It is for inference only: the re-laid weights have
no autograd and no state_dict names that a checkpoint would recognise. The model code does not
know it; training and the reference tests use the plain layout.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ladder import native
from ladder.links.base import Communicator, NoComm
from ladder.links.shm import ShmComm
from ladder.model.layers import MLP, Attention, Block, RMSNorm, StepContext
from ladder.model.transformer import Transformer
from ladder.native import quant as qformat


def _mkldnn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class FastLinear(nn.Module):
    """y = x @ W.T for a [out, in] weight, stored in the layout its dtype reads fastest.

    `mode`: "native" (ladder.native's blocked layout, with `lib`, where the CPU has the
    instructions: AVX-512 for float32, AVX512-BF16 for bfloat16),
    "packed" (oneDNN blocked, float32 or bfloat16), "t" (float32 [in, out], where oneDNN is
    missing), "plain" (F.linear), or with `quant` that GGUF block format ("q8_0", "q4_0",
    "q4_1"; `ladder_qgemm`, float32 inputs quantized to int8 per block of 32 as llama.cpp's).
    """

    PACK_ROWS = 16  # the row count oneDNN blocks the weight for (see the module docstring)

    def __init__(self, weight: torch.Tensor, lib=None, bias: torch.Tensor | None = None,
                 quant: str | None = None) -> None:
        super().__init__()
        self.bias = bias  # added after the product (Qwen2's q/k/v)
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        if quant is not None:
            if lib is None:
                raise ValueError(f"weights kept quantized ({quant}) need the native library: "
                                 f"{native.unavailable_reason()}")
            self.mode, self.bits = quant, qformat.BITS[quant]
            self.weight = qformat.pack(*qformat.quantize(weight, quant), self.bits)
            self._qgemm, self._scratch_bytes = lib.ladder_qgemm, lib.ladder_qgemm_scratch
            self._scratch, self._rows = torch.empty(0, dtype=torch.uint8), 0  # rows it fits
        elif weight.dtype in native.gemm_dtypes(lib):
            self.mode = "native"
            self._gemm = (lib.ladder_gemm_f32 if weight.dtype == torch.float32
                          else lib.ladder_gemm_bf16)
            self.weight = native.block_weight(weight)
        elif weight.dtype in (torch.float32, torch.bfloat16) and _mkldnn_ok():
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
        y = self._product(x)
        return y if self.bias is None else y.add_(self.bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in qformat.BITS:
            return self._quantized(x)
        if self.mode == "native":
            if x.dtype != self.weight.dtype:
                raise TypeError(f"FastLinear: input is {x.dtype}, the weight {self.weight.dtype}")
            x = x.contiguous()
            y = x.new_empty(*x.shape[:-1], self.out_features)
            self._gemm(x.data_ptr(), self.weight.data_ptr(), y.data_ptr(),
                       x.numel() // self.in_features, self.out_features, self.in_features,
                       torch.get_num_threads())
            return y
        if self.mode == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        if self.mode == "t":
            return x @ self.weight
        return F.linear(x, self.weight)

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"FastLinear ({self.mode}): input is {x.dtype}, not torch.float32")
        x = x.contiguous()
        m = x.numel() // self.in_features
        if m > self._rows:
            self._scratch = torch.empty(self._scratch_bytes(m, self.in_features),
                                        dtype=torch.uint8)
            self._rows = m
        y = x.new_empty(*x.shape[:-1], self.out_features)
        self._qgemm(x.data_ptr(), self.weight.data_ptr(), y.data_ptr(), m, self.out_features,
                    self.in_features, self.bits, self._scratch.data_ptr(),
                    torch.get_num_threads())
        return y

    @property
    def kind(self) -> int | None:
        """native.c's ladder_linear kind of this product (0 float32, 1 bfloat16 blocked, or the
        quantized bits), None where a C module cannot run it (oneDNN's and torch's modes)."""
        if self.mode in qformat.BITS:
            return self.bits
        if self.mode == "native":
            return native.DTYPE_CODES[self.weight.dtype]
        return None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}"


def _plain(module: nn.Module, **refs) -> None:
    """Keep `refs` as plain attributes of `module`, beside the registered submodules: nn.Module
    finds submodules and parameters through __getattr__ (~1 us each) and wraps a submodule's
    call in its hook handling (~2.5 us); decode goes through these wrappers 90 times a token."""
    module.__dict__.update(refs)


class NativeNorm(nn.Module):
    """RMSNorm through `ladder_rmsnorm` (any rows; the torch module where the dtypes differ)."""

    def __init__(self, norm: RMSNorm, lib) -> None:
        super().__init__()
        self.inner, self.lib = norm, lib
        self.code = native.DTYPE_CODES.get(norm.weight.dtype)
        _plain(self, _weight=norm.weight, _eps=norm.eps, _torch=norm.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight
        if x.dtype != w.dtype or self.code is None or not x.is_contiguous():
            return self._torch(x)
        y = torch.empty_like(x)
        d = x.shape[-1]
        self.lib.ladder_rmsnorm(self.code, x.data_ptr(), w.data_ptr(), y.data_ptr(),
                                x.numel() // d, d, self._eps)
        return y


class NativeAttention(nn.Module):
    """Attention with a KV cache as one kernel call between the two weight products: rotary
    embedding, the cache write and attention; `ladder_attn_decode` for the one-token rows,
    `ladder_attn_chunk` for a prompt or a prompt's chunk (causal over the cached positions and
    its own; 1.4-20x faster than torch's gather, mask and SDPA on these cores); both honour a
    sliding window and read no block before it. Cache-less forwards run the torch module."""

    def __init__(self, attention: Attention, lib) -> None:
        super().__init__()
        self.inner, self.lib = attention, lib
        self.scale = attention.head_dim ** -0.5
        self._scratch = torch.empty(0)
        a = attention
        _plain(self, _torch=a.forward, _wqkv=a.wqkv.forward, _wo=a.wo.forward,
               _shape=(a.n_heads, a.n_kv, a.head_dim), _layer=a.layer_id, _window=a.window,
               _kv_map=torch.tensor(a.kv_map, dtype=torch.int64))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        cache = ctx.cache
        b, t, _ = x.shape
        code = native.DTYPE_CODES.get(x.dtype)
        if cache is None or ctx.tables is None or code is None or cache.k.dtype != x.dtype:
            return self._torch(x, ctx)
        qkv = self._wqkv(x).contiguous()  # [B, T, (H + 2K) E]
        if ctx.packed is not None:
            return self._wo(self.inner.packed(
                qkv, ctx, decode=functools.partial(self._decode, code, cache),
                chunk=functools.partial(self._chunk, code, cache)))
        if t > 1:  # prompts: row by row (a shorter row's padding as torch's path writes it)
            starts = ctx.positions[:, 0].tolist()
            cos, sin = ctx.cos[:, 0], ctx.sin[:, 0]
            y = torch.stack([self._chunk(code, cache, qkv[i], cos[i].contiguous(),
                                         sin[i].contiguous(), ctx.tables[i].contiguous(), st)
                             for i, st in enumerate(starts)])
            return self._wo(y)
        y = self._decode(code, cache, qkv.view(b, -1), ctx.cos, ctx.sin,
                         ctx.tables.contiguous(), ctx.positions)
        return self._wo(y.view(b, 1, -1))

    def _chunk(self, code: int, cache, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               table: torch.Tensor, start: int) -> torch.Tensor:
        """A prompt chunk, T tokens of one sequence from position `start`: qkv [T, (H + 2K) E]
        -> [T, H E] (every tensor contiguous); rotation, the cache write and attention over the
        cached positions and the chunk's own, causally, in one kernel call."""
        h, k_, e = self._shape
        t = qkv.shape[0]
        y = qkv.new_empty(t, h * e)
        stride = self.lib.ladder_attn_chunk_stride(h, e, start + t)
        threads, scratch = self._scratch_for(stride)
        self.lib.ladder_attn_chunk(
            code, qkv.data_ptr(), y.data_ptr(), t, h, k_, e, cos.data_ptr(), sin.data_ptr(),
            *self._layer_cache(cache), cache.block, table.data_ptr(), start, self._window or 0,
            self._kv_map.data_ptr(), self.scale, scratch, stride, threads)
        return y

    def _scratch_for(self, stride: int) -> tuple[int, int]:
        """(torch's thread count, the address of `stride` float32 of scratch for each)."""
        threads = torch.get_num_threads()
        if self._scratch.numel() < threads * stride:
            self._scratch = torch.empty(threads * stride)
        return threads, self._scratch.data_ptr()

    def _layer_cache(self, cache) -> tuple[int, int]:
        """The addresses of this layer's keys and values in the cache."""
        layer = self._layer * cache.k.stride(0) * cache.k.element_size()
        return cache.k.data_ptr() + layer, cache.v.data_ptr() + layer

    def _decode(self, code: int, cache, qkv: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, tables: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token a row, B rows: qkv [B, (H + 2K) E] -> [B, H E]; rotation, the cache
        write and attention in one kernel call (every tensor contiguous)."""
        h, k_, e = self._shape
        b = pos.numel()
        y = qkv.new_empty(b, h * e)
        stride = cache.max_seq
        threads, scratch = self._scratch_for(stride)
        self.lib.ladder_attn_decode(
            code, qkv.data_ptr(), y.data_ptr(), b, h, k_, e, cos.data_ptr(), sin.data_ptr(),
            *self._layer_cache(cache), cache.block, tables.data_ptr(), tables.shape[1],
            pos.data_ptr(), self._window or 0, self._kv_map.data_ptr(), self.scale, scratch,
            stride, threads)
        return y


class NativeMLP(nn.Module):
    """SwiGLU with silu(gate) * up as one `ladder_silu_mul` call between the weight products."""

    def __init__(self, mlp: MLP, lib) -> None:
        super().__init__()
        self.inner, self.lib = mlp, lib
        _plain(self, _torch=mlp.forward, _w13=mlp.w13.forward, _w2=mlp.w2.forward,
               _ffn=mlp.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._ffn
        code = native.DTYPE_CODES.get(x.dtype)
        if code is None:
            return self._torch(x)
        gu = self._w13(x).contiguous()  # [..., 2F]: gate, then up
        a = gu.new_empty(*gu.shape[:-1], f)
        self.lib.ladder_silu_mul(code, gu.data_ptr(), a.data_ptr(), gu.numel() // (2 * f), f,
                                 torch.get_num_threads())
        return self._w2(a)


class DecodeStep:
    """What a decode step's fused modules share (native.Step), filled once a step: the rows'
    rotary tables, block tables and positions, the cache, the scores' and the modules' scratch
    (grown with the rows, kept between steps)."""

    def __init__(self, lib, dtype: torch.dtype) -> None:
        self.lib, self.dtype = lib, dtype
        self.args = native.Step()
        self.addr = ctypes.addressof(self.args)
        self.module: int | None = None  # a module's description, for ladder_module_work
        self._ctx: StepContext | None = None
        self._keep: tuple = ()  # the step's tensors whose addresses `args` holds
        self._work = torch.empty(0, dtype=torch.uint8)
        self._work_rows = 0
        self._scores = torch.empty(0)

    def bind(self, ctx: StepContext) -> bool:
        """Whether the fused modules run `ctx`'s step (one new token a row, a cache of their
        dtype, no packed rows); `args` describes it when they do."""
        if ctx is self._ctx:
            return True
        cache = ctx.cache
        if (cache is None or ctx.tables is None or ctx.packed is not None
                or ctx.positions.shape[1] != 1 or cache.k.dtype != self.dtype
                or ctx.cos.dtype != self.dtype):
            return False
        a = self.args
        b = ctx.positions.shape[0]
        threads = torch.get_num_threads()
        tables, pos = ctx.tables.contiguous(), ctx.positions.contiguous()
        cos, sin = ctx.cos.contiguous(), ctx.sin.contiguous()
        if b > self._work_rows:
            self._work = torch.empty(self.lib.ladder_module_work(self.module, b),
                                     dtype=torch.uint8)
            self._work_rows = b
        if self._scores.numel() < threads * cache.max_seq:
            self._scores = torch.empty(threads * cache.max_seq)
        a.B, a.cos, a.sin = b, cos.data_ptr(), sin.data_ptr()
        a.k, a.v = cache.k.data_ptr(), cache.v.data_ptr()
        a.layer_bytes, a.block = cache.k.stride(0) * cache.k.element_size(), cache.block
        a.tables, a.width, a.pos = tables.data_ptr(), tables.shape[1], pos.data_ptr()
        a.scores, a.stride = self._scores.data_ptr(), cache.max_seq
        a.work, a.nt = self._work.data_ptr(), threads
        self._keep = (tables, pos, cos, sin, cache)
        self._ctx = ctx
        return True


class NativeBlock(nn.Module):
    """A layer whose attention and MLP each run as one C call on a decode step of one new token
    a row (`ladder_attn_module`, `ladder_mlp_module`: the same kernels as the separate calls, so
    the same results to the bit, without ~40 us of Python and ctypes between them a module);
    other steps (prompts, packed steps, cache-less forwards) run the block's own modules."""

    def __init__(self, block: Block, step: DecodeStep, lib) -> None:
        super().__init__()
        self.inner = block
        a, m = block.attention, block.mlp
        dt = native.DTYPE_CODES[step.dtype]

        def linear(lin: FastLinear) -> native.Linear:
            bias = 0 if lin.bias is None else lin.bias.data_ptr()
            return native.Linear(lin.kind, lin.out_features, lin.in_features,
                                 lin.weight.data_ptr(), bias)

        inner_a = a.inner
        h, k_, e = a._shape
        self.attn_args = native.Module(
            dt, block.attn_norm._weight.numel(), block.attn_norm._weight.data_ptr(),
            block.attn_norm._eps, linear(inner_a.wqkv), linear(inner_a.wo), h, k_, e,
            a._kv_map.data_ptr(), a.scale, a._window or 0, a._layer)
        self.mlp_args = native.Module(
            dt, block.mlp_norm._weight.numel(), block.mlp_norm._weight.data_ptr(),
            block.mlp_norm._eps, linear(m.inner.w13), linear(m.inner.w2))
        step.module = step.module or ctypes.addressof(self.mlp_args)
        if lib.ladder_module_work(ctypes.addressof(self.attn_args), 1) > \
                lib.ladder_module_work(step.module, 1):
            step.module = ctypes.addressof(self.attn_args)
        _plain(self, attn_norm=block.attn_norm, attention=a, mlp_norm=block.mlp_norm, mlp=m,
               _generic=block.modules_in_order, _step=step, _lib=lib,
               _fused=(self._attention, self._mlp),
               _attn_addr=ctypes.addressof(self.attn_args),
               _mlp_addr=ctypes.addressof(self.mlp_args))

    @staticmethod
    def fits(block: Block, dtype: torch.dtype) -> bool:
        """Whether a laid-out block's parts are all ones a C module runs: native norms,
        attention and MLP; products of a native or quantized kind over `dtype` activations
        (float32 for the quantized), biases of that dtype."""
        a, m = block.attention, block.mlp
        if not (isinstance(a, NativeAttention) and isinstance(m, NativeMLP)
                and isinstance(block.attn_norm, NativeNorm)
                and isinstance(block.mlp_norm, NativeNorm)):
            return False
        if dtype not in native.DTYPE_CODES or any(
                n._weight.dtype != dtype for n in (block.attn_norm, block.mlp_norm)):
            return False
        for lin in (a.inner.wqkv, a.inner.wo, m.inner.w13, m.inner.w2):
            if not isinstance(lin, FastLinear) or lin.kind is None:
                return False
            if lin.mode in qformat.BITS and dtype != torch.float32:
                return False
            if lin.mode == "native" and lin.weight.dtype != dtype:
                return False
            if lin.bias is not None and (lin.bias.dtype != dtype or not lin.bias.is_contiguous()):
                return False
        return True

    def modules_in_order(self, ctx: StepContext):
        if self._step.bind(ctx):
            return self._fused
        return self._generic(ctx)

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        y = torch.empty_like(h)
        self._lib.ladder_attn_module(self._attn_addr, self._step.addr, h.data_ptr(),
                                     y.data_ptr())
        return y

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        h = h.contiguous()
        y = torch.empty_like(h)
        self._lib.ladder_mlp_module(self._mlp_addr, self._step.addr, h.data_ptr(), y.data_ptr())
        return y


class NativeLayers:
    """A decode step's whole layer stack as one C call (`ladder_decode_layers`): the
    NativeBlocks' modules in order, the residual adds in C, the residual plan's schedule as a
    flag a module (which output joins the stream one module late), and the all-reduces through
    a shared-memory group's segment by ShmComm's own protocol (or none: TP=1, `desync`); so the
    same additions in the same order as Transformer.hidden's walk and the same bits, without its
    Python between the modules (ctypes, torch's adds, the communicator's bookkeeping: SmolLM2's
    q4_1 decode 1.1-1.7x faster at TP=2, bench/results/2026-12-04-session17.md). Other steps and
    other communicators (None): the walk."""

    def __init__(self, model: Transformer, step: DecodeStep, lib) -> None:
        blocks = list(model.layers)
        plan = model.plan
        addrs, flags = [], []
        for i, b in enumerate(blocks):
            ladder = plan.is_ladder(i)
            for j, addr in enumerate((b._attn_addr, b._mlp_addr)):
                defer = ladder or (j == 1 and plan.is_ladder(i + 1))
                addrs.append(addr)
                flags.append(int(ladder) | int(defer) << 1)
        self._blocks = blocks  # what the addresses point into
        self._mods = (ctypes.c_void_p * len(addrs))(*addrs)
        self._flags = (ctypes.c_ubyte * len(flags))(*flags)
        self._n, self._step, self._lib = len(addrs), step, lib

    def __call__(self, h: torch.Tensor, ctx: StepContext,
                 comm: Communicator) -> torch.Tensor | None:
        """The stream after the last layer (h itself, added to in place), or None where the
        step is not one the fused modules run or `comm` not one they reduce through."""
        nbytes = h.numel() * h.element_size()
        shm = type(comm) is ShmComm and comm.world_size <= native.SHM_MAX_WORLD and \
            nbytes <= comm.slot_bytes
        if not (shm or isinstance(comm, NoComm)) or not self._step.bind(ctx):
            return None
        h = h.contiguous()
        ya, yb = torch.empty_like(h), torch.empty_like(h)
        args = (self._mods, self._flags, self._n, self._step.addr, h.data_ptr(), ya.data_ptr(),
                yb.data_ptr())
        if shm:
            comm.run_native(lambda g: self._lib.ladder_decode_layers(*args, g), nbytes)
        else:
            self._lib.ladder_decode_layers(*args, None)
        return h


def decode_layout(model: Transformer, fused: bool = True,
                  quant: str | None = None) -> Transformer:
    """Re-lay out a CPU model's weights for decode speed (in place; returns the model).

    Same outputs up to the order of additions (the weight products alone are bit-identical in
    bfloat16; the fused operators sum squares, dot products and softmax terms in their own
    order). A tied LM head gets its own copy in the fast layout (the embedding lookup needs the
    rows); an untied one moves. `fused=False` keeps torch's small operators (comparisons).

    `quant` ("q8_0", "q4_0", "q4_1"; a float32 model): the layers' weight products kept in that
    GGUF block format (ladder.native.quant), the LM head in q8_0 (llama.cpp's files of the Q4
    types keep it there too); each rank's slice of an input dimension must be whole blocks of 32.
    """
    if model.tok_embeddings.weight.device.type != "cpu":
        return model
    lib = native.load() if fused or quant else None
    if quant is not None and model.tok_embeddings.weight.dtype != torch.float32:
        raise ValueError(f"weights kept quantized ({quant}) run with float32 activations, not "
                         f"{model.tok_embeddings.weight.dtype}")
    for i, layer in enumerate(model.layers):
        for parent, name in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                             (layer.mlp, "w13"), (layer.mlp, "w2")):
            lin = getattr(parent, name)
            if isinstance(lin, nn.Linear):
                if quant and lin.in_features % qformat.BLOCK:
                    raise ValueError(
                        f"layers.{i}.{type(parent).__name__.lower()}.{name}: this rank's "
                        f"{lin.in_features} inputs are not whole {qformat.BLOCK}-input quant "
                        f"blocks ({quant}); choose a TP size or head split that keeps them so")
                setattr(parent, name, FastLinear(lin.weight.detach(), lib, None if lin.bias is None
                                                 else lin.bias.detach(), quant=quant))
    model.output = FastLinear(model.lm_head_weight().detach(), lib,
                              quant="q8_0" if quant else None)
    if lib is not None:
        for layer in model.layers:
            if isinstance(layer.attention, Attention):
                layer.attn_norm = NativeNorm(layer.attn_norm, lib)
                layer.mlp_norm = NativeNorm(layer.mlp_norm, lib)
                layer.attention = NativeAttention(layer.attention, lib)
                layer.mlp = NativeMLP(layer.mlp, lib)
        if isinstance(model.norm, RMSNorm):
            model.norm = NativeNorm(model.norm, lib)
        dtype = model.tok_embeddings.weight.dtype
        if fused and all(NativeBlock.fits(layer, dtype) for layer in model.layers):
            step = DecodeStep(lib, dtype)
            for i, layer in enumerate(model.layers):
                model.layers[i] = NativeBlock(layer, step, lib)
            if model.plan.kind != "parallel":
                model.fused_layers = NativeLayers(model, step, lib)
    return model
