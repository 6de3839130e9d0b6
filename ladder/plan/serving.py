"""A running group's predicted decode step beside the measured one (`/v1/models`, the start-up
log), so that a user sees when reality departs from the model.

The group's link label picks the link preset: shm -> `shm`; loopback and the launcher's
`high-end` profile -> `tcp-high-end` (tcp between ranks of one host); `cheap` -> `tcp-cheap`;
nvlink / pcie -> `nvlink4` / `pcie4`. TP=1 has no link to model. An emulated latency
(`+emu...us`) or a label without a preset gets no prediction, and says so. The device is
`this-cpu` on CPU (this machine's measured.json where one exists); on a GPU, this machine's
GPU calibration (`ladder plan --calibrate --device cuda`, measured-cuda.json) where it measured
a GPU of that name, else the preset the name gives.
"""

from __future__ import annotations

from dataclasses import fields
from statistics import median

from ladder.model.config import ConfigError, ModelConfig, ResidualPlan
from ladder.plan import measured
from ladder.plan.hardware import PLAN_DTYPES, gpu_preset, measured_gpu_path
from ladder.plan.measured import resolve_hardware, resolve_link
from ladder.plan.sweep import Setup

LINK_PRESETS = {"shm": "shm", "loopback": "tcp-high-end", "high-end": "tcp-high-end",
                "cheap": "tcp-cheap", "nvlink": "nvlink4", "pcie": "pcie4", "none": "shm"}
CONTEXT = 256  # the cached positions a predicted step attends to (short chats)


def device_preset(device: str, device_name: str = "") -> str | None:
    """What `resolve_hardware` takes for the group's device: a preset, or a measured.json."""
    if device == "cpu":
        return "this-cpu"
    path, hardware = measured_gpu_path(), None
    if device_name and path.is_file():
        try:
            hardware = measured.read(path, "this machine's GPU calibration").get("hardware")
        except ConfigError:
            pass  # unreadable: the preset, as without one
    if isinstance(hardware, dict) and hardware.get("name") == device_name:
        return str(path)
    return gpu_preset(device_name)


class Prediction:
    """The model's decode step for one group: `ms(batch)`; None where it cannot say (`why`)."""

    def __init__(self, config: dict, tp: int, plan: str, interconnect: str, dtype: str,
                 head_split: str, device: str, device_name: str = "") -> None:
        self.setup: Setup | None = None
        self.plan: ResidualPlan | None = None
        self.why = ""
        link = LINK_PRESETS.get(interconnect)
        hardware = device_preset(device, device_name)
        if dtype not in PLAN_DTYPES:
            self.why = f"no cost model for dtype {dtype!r}"
        elif link is None:
            self.why = f"no link preset for the interconnect {interconnect!r}"
        elif hardware is None:
            self.why = f"no device preset for {device_name or device!r}"
        else:
            try:
                cfg = ModelConfig(**{f.name: config[f.name] for f in fields(ModelConfig)
                                     if f.name in config})
                self.plan = ResidualPlan.parse(plan, cfg.n_layers)
                self.setup = Setup(config=cfg, tp=tp, hardware=resolve_hardware(hardware),
                                   link=resolve_link(link), dtype=dtype, head_split=head_split)
            except Exception as e:  # noqa: BLE001 - a prediction never stops a server
                self.why = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)

    def ms(self, batch: int) -> float | None:
        if self.setup is None or self.plan is None:
            return None
        context = min(CONTEXT, self.setup.config.max_seq_len)
        try:
            return self.setup.step(self.plan, batch, context).seconds * 1e3
        except Exception:  # noqa: BLE001 - as above: no figure rather than no answer
            return None

    def describe(self) -> str:
        one = self.ms(1)
        if self.setup is None or one is None:
            return f"no predicted step: {self.why or 'the model failed at batch 1'}"
        s = self.setup
        return (f"predicted decode step {one:.2f} ms at batch 1 ({s.hardware.name}, link "
                f"{s.link.name}, context {min(CONTEXT, s.config.max_seq_len)})")

    def beside(self, steps: list[dict]) -> dict:
        """Predicted and measured ms per decode step, by the batch sizes `steps` (the group's
        recent step records) ran at, and batch 1."""
        by_rows: dict[int, list[float]] = {}
        for s in steps:
            if s["kind"] == "decode":
                by_rows.setdefault(s["rows"], []).append(s["step_s"])
        out = {}
        for rows in sorted({1, *by_rows}):
            ms = self.ms(rows)
            seen = by_rows.get(rows, [])
            out[str(rows)] = {"predicted_ms": None if ms is None else round(ms, 3),
                              "measured_ms": round(1e3 * median(seen), 3) if seen else None,
                              "steps": len(seen)}
        return out
