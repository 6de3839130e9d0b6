"""What a TP group serves and how its ranks talk: `GroupOptions`, checked when it is built.

Where the ranks run (processes, Ray actors, network namespaces) is the launcher's business and
not an option here: a local group takes its namespaces beside its options
(`ladder.links.netns.Namespaces`), a Ray group its placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladder.model.tp import HEAD_SPLITS
from ladder.native.quant import BITS as QUANT_BITS

COMMS = ("auto", "gloo", "tcp", "shm", "nccl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# weights kept quantized as GGUF blocks (CPU, ladder.native.quant), activations in float32;
# q4_0 and q4_1 keep the LM head in q8_0, as llama.cpp's files of those types do
QUANT_DTYPES = tuple(sorted(QUANT_BITS))


def torch_dtype(name: str) -> torch.dtype:
    """The dtype of activations, KV cache and unquantized weights under `--dtype name`."""
    return torch.float32 if name in QUANT_DTYPES else DTYPES[name]


@dataclass(kw_only=True)
class GroupOptions:
    model: str = "smollm2"
    tp: int = 1
    residual: str | None = None  # None: the checkpoint's own plan (an adapted one's), else standard
    dtype: str = "float32"
    comm: str = "auto"  # how ranks all-reduce: auto | gloo | tcp | shm | nccl (make_comm)
    device: str = "cpu"  # cpu | cuda (rank r uses cuda:r, NCCL all-reduces)
    cuda_index: int | None = None  # this rank's GPU when not cuda:<rank> (a Ray worker's: 0)
    n_slots: int = 8  # sequences at once at most (vLLM's max_num_seqs)
    max_seq: int = 2048  # the longest sequence, prompt and output
    # the KV cache, per rank: bytes, or else a fraction of the memory free after the model
    # loads (the GPU's, or the machine's shared by the group's ranks), or else (both 0) room
    # for n_slots sequences of max_seq tokens
    kv_cache_bytes: int = 0
    kv_cache_fraction: float = 0.0
    block_size: int = 16  # tokens per KV-cache block
    prefix_caching: bool = True  # full blocks shared by prompts that start alike
    # chunked prefill: while sequences decode, a step runs at most this many tokens (theirs,
    # and prompt chunks in the rest), so that a long prompt does not stall them; 0: off
    max_num_batched_tokens: int = 24  # bench.paged: longest gap <= 3x the pace at 8 streams
    latency_s: float = 0.0  # emulated link latency per all-reduce (0: none)
    threads: int = 0  # torch threads per rank; 0: cores // tp
    host: str = ""  # the address this rank's gloo binds to ('' = gloo's default resolution)
    interconnect: str = ""  # the link's label when the launcher knows it better (e.g. network)
    fast_kernels: bool = True  # CPU: weights re-laid out for decode (ladder.native.layouts)
    head_split: str = "groups"  # groups | even: how attention heads are split (ladder.model.tp)
    startup_timeout_s: float = 300.0
    op_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype not in QUANT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of "
                             f"{sorted(DTYPES) + list(QUANT_DTYPES)}")
        if self.dtype in QUANT_DTYPES and (self.device != "cpu" or not self.fast_kernels):
            raise ValueError(f"dtype {self.dtype!r} (weights kept quantized) runs on the CPU with "
                             "fast_kernels on")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.comm not in COMMS:
            raise ValueError(f"comm {self.comm!r} is not one of {COMMS}")
        if self.kv_cache_bytes < 0 or not 0 <= self.kv_cache_fraction < 1:
            raise ValueError("kv_cache_bytes must be >= 0 and kv_cache_fraction in [0, 1), got "
                             f"{self.kv_cache_bytes} and {self.kv_cache_fraction}")
        if self.max_num_batched_tokens < 0:
            raise ValueError("max_num_batched_tokens must be >= 0 (0: no chunked prefill), got "
                             f"{self.max_num_batched_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.head_split not in HEAD_SPLITS:
            raise ValueError(f"head_split {self.head_split!r} is not one of {HEAD_SPLITS}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of ('cpu', 'cuda')")
        if (self.comm == "nccl") != (self.device == "cuda") and self.comm != "auto":
            raise ValueError(f"comm {self.comm!r} does not run on device {self.device!r} "
                             "(nccl is the CUDA link, the others are CPU links)")

    def cuda_device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank if self.cuda_index is None else self.cuda_index)
