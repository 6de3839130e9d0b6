"""The serving side of `ladder plan`: which presets a running group maps to, and what
/v1/models shows (the HTTP side runs in test_serve)."""

from __future__ import annotations

from ladder.plan.models import preset_model
from ladder.plan.serving import Prediction, device_preset


def smollm2(**kw) -> Prediction:
    args = dict(config=preset_model("smollm2-135m").to_dict(), tp=2, plan="ladder:24-29",
                interconnect="shm", dtype="float32", head_split="even", device="cpu")
    return Prediction(**{**args, **kw})


def test_a_cpu_group_over_shm_is_predicted():
    p = smollm2()
    assert p.setup is not None and p.setup.link.name == "shm", p.why
    assert p.setup.hardware.name == "this-cpu" and p.ms(1) > 0
    assert p.ms(32) > p.ms(1)  # more rows, more KV cache and activations to read
    assert p.describe().startswith("predicted decode step") and "link shm" in p.describe()


def test_links_and_devices_map_to_presets():
    assert smollm2(interconnect="cheap").setup.link.name == "tcp-cheap"
    assert smollm2(interconnect="loopback").setup.link.name == "tcp-high-end"
    assert device_preset("cuda", "NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert device_preset("cuda", "NVIDIA H200") == "h200"
    assert device_preset("cuda", "") is None


def test_a_gpu_group_reads_this_machines_calibration_of_its_gpu(tmp_path, monkeypatch):
    """measured-cuda.json (`ladder plan --calibrate --device cuda`) beside this machine's file:
    a group on the GPU it measured is predicted from it, one on another GPU from its preset."""
    import json
    monkeypatch.setenv("LADDER_MEASURED", str(tmp_path / "measured.json"))
    gpu = tmp_path / "measured-cuda.json"
    gpu.write_text(json.dumps({"format": "ladder-plan-measured/1", "hardware": {
        "name": "NVIDIA H200", "base": "h200", "mem_bw": 1e12, "module_overhead_s": 4e-5}}))
    assert device_preset("cuda", "NVIDIA H200") == str(gpu)
    assert device_preset("cuda", "NVIDIA H100 80GB HBM3") == "h100-sxm"
    args = dict(device="cuda", dtype="bfloat16", interconnect="nvlink", tp=1)
    measured, preset = (smollm2(device_name=n, **args) for n in ("NVIDIA H200", "NVIDIA H100"))
    assert measured.setup.hardware.name == "NVIDIA H200" and measured.setup.hardware.mem_bw == 1e12
    assert preset.setup.hardware.name == "h100-sxm"
    assert measured.ms(1) > preset.ms(1)  # a third of the bandwidth, 2.5x the module overhead
    gpu.write_text("{")  # unreadable: the preset, and the server still starts
    assert device_preset("cuda", "NVIDIA H200") == "h200"


def test_what_cannot_be_predicted_says_why():
    p = smollm2(interconnect="loopback+emu200us")
    assert p.ms(1) is None and "no link preset for the interconnect 'loopback+emu200us'" in \
        p.describe()
    p = smollm2(device="cuda")
    assert p.ms(1) is None and "no device preset for 'cuda'" in p.describe()
    p = smollm2(plan="ladder:40-41")
    assert p.ms(1) is None and "out of range" in p.describe()
    p = smollm2(dtype="int3")
    assert p.ms(1) is None and "no cost model for dtype 'int3'" in p.describe()


def test_weights_kept_quantized_are_predicted_by_their_bytes():
    """q4_1 reads 0.625 bytes a weight (its head q8_0's 1.125), activations float32: at batch
    1, where the step is the weights' bytes, it is predicted faster than bfloat16, and that
    than float32; the bytes a weight are those ladder.native.quant lays out."""
    from ladder.native import quant
    from ladder.plan.hardware import QUANT_WEIGHT_BYTES
    ms = {d: smollm2(dtype=d).ms(1) for d in ("float32", "bfloat16", "q8_0", "q4_1")}
    assert ms["q4_1"] < ms["q8_0"] < ms["bfloat16"] < ms["float32"], ms
    for kind, b in QUANT_WEIGHT_BYTES.items():
        assert quant.packed_bytes(576, 1536, quant.BITS[kind]) == 576 * 1536 * b


def test_steps_beside_the_prediction():
    steps = [{"kind": "decode", "rows": 1, "step_s": 0.02}, {"kind": "decode", "rows": 1,
             "step_s": 0.04}, {"kind": "prefill", "rows": 1, "step_s": 0.5},
             {"kind": "decode", "rows": 8, "step_s": 0.05}]
    by = smollm2().beside(steps)
    assert set(by) == {"1", "8"}
    assert by["1"]["measured_ms"] == 30.0 and by["1"]["steps"] == 2
    assert by["8"]["steps"] == 1 and by["8"]["predicted_ms"] > by["1"]["predicted_ms"]
    assert smollm2().beside([])["1"] == {"predicted_ms": by["1"]["predicted_ms"],
                                          "measured_ms": None, "steps": 0}
