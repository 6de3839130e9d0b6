"""Hardware presets: what one tensor-parallel rank's device can read and compute.

A decode module's time on a rank is a roofline, max(bytes / memory bandwidth, FLOPs / FLOP/s),
divided by the achievable fraction, plus a fixed cost per module (kernel launches, the small
kernels around the matmuls). Figures are datasheet peaks, dense (NVIDIA lists tensor FLOP/s
"with sparsity": the dense rate is half). The fractions and overheads are calibrated terms;
`ladder plan --calibrate` measures them, and the module times themselves, into a measured.json
(`ladder.plan.calibrate`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ladder.model.config import ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Weights kept quantized (`--dtype q4_1` etc., ladder.native.quant's layout): bytes a weight, a
# block of 32 with its float16 scale (and, in our layout, its float16 minimum or offset); the
# activations, KV cache and embedding stay float32, and the Q4 types keep the LM head in q8_0.
QUANT_WEIGHT_BYTES = {"q4_0": 0.625, "q4_1": 0.625, "q8_0": 1.125}
PLAN_DTYPES = sorted(DTYPE_BYTES) + sorted(QUANT_WEIGHT_BYTES)


def act_bytes(dtype: str) -> int:
    """Bytes of an activation or KV-cache element under `dtype`."""
    return 4 if dtype in QUANT_WEIGHT_BYTES else DTYPE_BYTES[dtype]


def weight_bytes(dtype: str, head: bool = False) -> float:
    """Bytes a weight (of the LM head with `head`) under `dtype`."""
    if dtype in QUANT_WEIGHT_BYTES:
        return QUANT_WEIGHT_BYTES["q8_0" if head else dtype]
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True, slots=True)
class ComputeSample:
    """One measured module time: seconds for `module` (attention, mlp or lm_head) of the model
    whose shape is `shape` (`models.shape_key`) at TP=`tp`, on `rank` (None: on every rank),
    its heads split by `split` (`groups` / `even`; None: whichever is asked)."""

    shape: str
    tp: int
    dtype: str
    module: str
    batch: int
    context: int
    seconds: float
    rank: int | None = None
    split: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Hardware:
    """One rank's device. `mem_bw` bytes/s; `flops16` / `flops32` dense FLOP/s for 16-bit
    (tensor cores) and float32 math; `memory` bytes (0: unknown); `measured`: module times
    that replace the roofline where they cover the case (`costs.module_seconds`);
    `step_overhead_s` + `row_overhead_s` x rows: a step's cost beyond its modules (the
    residual adds, the scheduler, each row's token turned into text)."""

    name: str
    mem_bw: float
    flops16: float
    flops32: float
    efficiency: float
    module_overhead_s: float
    step_overhead_s: float
    dtype: str
    memory: float = 0.0
    source: str = ""
    measured: tuple[ComputeSample, ...] = field(default=())
    row_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for f in ("mem_bw", "flops16", "flops32"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"hardware {self.name!r}: {f} must be positive")
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"hardware {self.name!r}: efficiency must be within (0, 1]")
        if min(self.module_overhead_s, self.step_overhead_s, self.row_overhead_s) < 0:
            raise ConfigError(f"hardware {self.name!r}: overheads must not be negative")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"hardware {self.name!r}: dtype {self.dtype!r} is not one of "
                              f"{sorted(DTYPE_BYTES)}")

    def flops(self, dtype: str) -> float:
        return self.flops32 if dtype == "float32" else self.flops16


# Calibrated once on the paper's published runs (Llama-3.1-70B, batch 1, 8 x H100 SXM, gpt-fast
# compiled with CUDA graphs; github.com/mayank31398/ladder-residual-inference tools/plot-70b.py:
# desync ("upper bound") 38.24 / 69.04 / 110.59 tokens/s at TP 2 / 4 / 8, i.e. 26.2 / 14.5 /
# 9.0 ms a step for 70.8 / 36.4 / 19.3 GB a rank, the LM head replicated): 0.9 of the HBM peak
# and 16 us a module (launch gaps, norms, rope) fit all three within 2%. gpt-fast's own README
# (A100-80GB at 330 W) reads Llama-3.1-8B at 1410.76 GB/s, 0.69 of the datasheet's 2,039 GB/s;
# with 64 modules x 16 us taken out, 0.77 of it, 0.92 of the ~1700 GB/s the README finds the
# power cap allows. The same figures are assumed for every GPU until measured. At batch 4
# the paper's runs are 16-27% slower than this predicts (their tokens/s include the prompt's
# prefill, ~4%; the rest is their batched kernels): ratios hold, absolute times do not. Our
# engine runs eager PyTorch: calibrate before trusting absolute GPU times.
GPU_EFFICIENCY = 0.9
GPU_MODULE_OVERHEAD_S = 16e-6
GPU_STEP_OVERHEAD_S = 20e-6


def _gpu(name: str, mem_bw: float, flops16: float, flops32: float, memory_gb: float,
         source: str) -> Hardware:
    return Hardware(name=name, mem_bw=mem_bw, flops16=flops16, flops32=flops32,
                    efficiency=GPU_EFFICIENCY, module_overhead_s=GPU_MODULE_OVERHEAD_S,
                    step_overhead_s=GPU_STEP_OVERHEAD_S, dtype="bfloat16",
                    memory=memory_gb * 1e9, source=source)


HARDWARE: dict[str, Hardware] = {
    "h100-sxm": _gpu("h100-sxm", 3.35e12, 989e12, 67e12, 80,
                     "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 3.35 TB/s HBM3, BF16 "
                     "1,979 TFLOPS with sparsity (989 dense), FP32 67 TFLOPS, 80 GB"),
    "h200": _gpu("h200", 4.8e12, 989e12, 67e12, 141,
                 "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 4.8 TB/s HBM3e, BF16 1,979 "
                 "TFLOPS with sparsity (989 dense), FP32 67 TFLOPS, 141 GB"),
    "a100-80gb": _gpu("a100-80gb", 2.039e12, 312e12, 19.5e12, 80,
                      "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: 2,039 GB/s HBM2e, "
                      "BF16 312 TFLOPS (624 with sparsity), FP32 19.5 TFLOPS"),
    "l4": _gpu("l4", 300e9, 121e12, 30.3e12, 24,
               "NVIDIA L4 Tensor Core GPU datasheet: 300 GB/s GDDR6, BF16 242 TFLOPS with "
               "sparsity (121 dense), FP32 30.3 TFLOPS, 24 GB, PCIe Gen4 x16"),
    "l40s": _gpu("l40s", 864e9, 362.05e12, 91.6e12, 48,
                 "NVIDIA L40S datasheet: 864 GB/s GDDR6, BF16 362.05 TFLOPS (733 with "
                 "sparsity), FP32 91.6 TFLOPS, 48 GB, PCIe Gen4 x16"),
}


def gpu_preset(device_name: str) -> str | None:
    """The preset of a GPU by the name CUDA gives it ("NVIDIA H100 80GB HBM3": h100-sxm), or
    None."""
    name = device_name.lower()
    for key, preset in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb"),
                        ("l40s", "l40s"), ("l4", "l4")):
        if key in name:
            return preset
    return None


# This machine when no measured.json is found: one rank per core (DESIGN.md). Memory: 32.5 GB/s
# streamed by two threads (DESIGN.md), half a rank. FLOP/s: Zen 4 runs AVX-512 as two 256-bit
# FMA pipes, 2 x 8 float32 lanes x 2 FLOP a cycle at the 2.6 GHz /proc/cpuinfo reports = 83
# GFLOP/s (bf16 dot products twice that). Against measured SmolLM2 TP=2 desync runs
# (bench/results/2026-11-27-session8.md: 14-17 / 28-29 / 55-58 ms a token at batch 1 / 8 / 32)
# these figures predict 19.7 / 20.2 / 59.7 ms: slower (conservative) at batch 1 and 32, but 30%
# fast at batch 8, where this CPU does not overlap its loads with its arithmetic as a roofline
# assumes. Measured module times (measured.json) replace all of it.
THIS_CPU = Hardware(name="this-cpu", mem_bw=16.25e9, flops16=166e9, flops32=83e9,
                    efficiency=0.9, module_overhead_s=10e-6, step_overhead_s=0.5e-3,
                    dtype="float32",
                    source="default for this 2-core AMD EPYC (Zen 4) VM, unmeasured; "
                    "`ladder plan --calibrate` replaces it with a measured.json")


def measured_path() -> Path:
    """Where `--calibrate` writes this machine's measured.json: $LADDER_MEASURED, else
    $XDG_CACHE_HOME/ladder-serve/measured.json (~/.cache when unset)."""
    env = os.environ.get("LADDER_MEASURED")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ladder-serve" / "measured.json"


def measured_gpu_path() -> Path:
    """Where `--calibrate --device cuda` writes this machine's GPUs: beside `measured_path()`,
    measured-cuda.json."""
    return measured_path().with_name("measured-cuda.json")


def preset_hardware(name: str) -> Hardware:
    if name in HARDWARE:
        return HARDWARE[name]
    if name == "this-cpu":
        return THIS_CPU
    raise ConfigError(f"--hardware {name!r}: not a preset ({', '.join([*HARDWARE, 'this-cpu'])})"
                      " or a measured.json file")
