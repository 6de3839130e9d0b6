"""Predictions per plan x batch x context, as rows a script can rely on, and as a table.

Each row: {plan, batch, context, ms_per_token, tokens_per_s, speedup, allreduce_share,
hidden_share} (plus `quality` where a recovery curve is known):

    ms_per_token     one decode step: every row of the batch gets one token
    tokens_per_s     batch / step
    speedup          standard's step / this plan's, same batch and context
    allreduce_share  this plan's all-reduce time / standard's step (for standard: the share
                     of a step spent all-reducing, the paper's figure)
    hidden_share     (T_standard - T_plan) / (T_standard - T_desync): the share of standard's
                     communication this plan hides, the overlap efficiency `ladder bench
                     interconnects` measures (0 where there is nothing to hide, as at TP=1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ladder.model.config import ConfigError, ModelConfig, ResidualPlan
from ladder.model.tp import ShardSpec
from ladder.plan.costs import default_split, rank_bytes, shards
from ladder.plan.hardware import Hardware
from ladder.plan.links import Link
from ladder.plan.step import Step, StepOptions, step

PLAN_ALIASES = {"upper-half": "ladder:upper-half"}
ROW_KEYS = ("plan", "batch", "context", "ms_per_token", "tokens_per_s", "speedup",
            "allreduce_share", "hidden_share")


@dataclass(frozen=True, kw_only=True, slots=True)
class Setup:
    """What is predicted: a model at a TP size on a device and a link, in a dtype."""

    config: ModelConfig
    tp: int
    hardware: Hardware
    link: Link
    dtype: str
    head_split: str | None = None  # None: as the engine's default would split
    options: StepOptions = field(default_factory=StepOptions)
    specs: list[ShardSpec] = field(init=False, repr=False, compare=False)
    split: str = field(init=False, repr=False, compare=False)  # head_split, or the default

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"--tp {self.tp}: must be at least 1")
        object.__setattr__(self, "split", default_split(self.config, self.tp, self.head_split))
        try:
            object.__setattr__(self, "specs", shards(self.config, self.tp, self.split))
        except ConfigError as e:
            raise ConfigError(f"--tp {self.tp}: {e}") from None

    def step(self, plan: ResidualPlan, batch: int, context: int) -> Step:
        return step(self.config, self.specs, self.hardware, self.link, plan, batch, context,
                    self.dtype, self.options, self.split)


def parse_plans(specs: list[str], n_layers: int) -> list[tuple[str, ResidualPlan]]:
    """(label as given, plan) for each spec; `upper-half` is `ladder:upper-half`."""
    out = []
    for spec in specs:
        label = spec.strip()
        if not label:
            raise ConfigError("--plans has an empty entry")
        try:
            out.append((label, ResidualPlan.parse(PLAN_ALIASES.get(label, label), n_layers)))
        except ConfigError as e:
            raise ConfigError(f"--plans: {e}") from None
    return out


def rows(setup: Setup, plans: list[tuple[str, ResidualPlan]], batches: list[int],
         contexts: list[int]) -> list[dict]:
    """One row per plan x batch x context, in that order."""
    for c in contexts:
        if c > setup.config.max_seq_len:
            raise ConfigError(f"--context {c}: beyond the model's {setup.config.max_seq_len} "
                              "positions")
    standard, desync = ResidualPlan("standard"), ResidualPlan("desync")
    bounds = {(b, c): (setup.step(standard, b, c), setup.step(desync, b, c))
              for b in batches for c in contexts}
    out = []
    for label, plan in plans:
        for b in batches:
            for c in contexts:
                std, des = bounds[(b, c)]
                out.append(row(label, b, c, setup.step(plan, b, c), std, des))
    return out


def row(label: str, batch: int, context: int, s: Step, std: Step, des: Step) -> dict:
    hideable = std.seconds - des.seconds
    return {"plan": label, "batch": batch, "context": context,
            "ms_per_token": round(s.seconds * 1e3, 4),
            "tokens_per_s": round(batch / s.seconds, 2),
            "speedup": round(std.seconds / s.seconds, 4),
            "allreduce_share": round(s.comm / std.seconds, 4),
            "hidden_share": round((std.seconds - s.seconds) / hideable, 4) if hideable > 0
            else 0.0}


def memory_notes(setup: Setup, batches: list[int], contexts: list[int]) -> list[str]:
    """A line for each batch x context whose weights and KV cache exceed a rank's memory."""
    cap = setup.hardware.memory
    if not cap:
        return []
    notes = []
    for b in batches:
        for c in contexts:
            need = rank_bytes(setup.config, setup.specs, b, c, setup.dtype)
            if need > cap:
                notes.append(f"note: batch {b} at context {c} needs {need / 1e9:.1f} GB a rank "
                             f"(weights and KV cache); {setup.hardware.name} has "
                             f"{cap / 1e9:.0f} GB")
    return notes


def table(setup: Setup, result: list[dict]) -> str:
    """The rows as a text table under a one-line description of the setup."""
    cfg, hw, link = setup.config, setup.hardware, setup.link
    head = (f"{cfg.name} ({cfg.n_layers} layers), TP={setup.tp}, {hw.name}, link {link.name}, "
            f"{setup.dtype}: predicted decode")
    cols = ["plan", "batch", "context", "ms/token", "tokens/s", "speedup", "all-reduce",
            "hidden"]
    quality = any("quality" in r for r in result)
    if quality:
        cols.append("ppl ratio")
    body = []
    for r in result:
        cells = [r["plan"], str(r["batch"]), str(r["context"]), f"{r['ms_per_token']:.3f}",
                 f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.3f}",
                 f"{r['allreduce_share']:.3f}", f"{r['hidden_share']:.3f}"]
        if quality:
            q = r.get("quality", {}).get("ppl_ratio")
            cells.append("-" if q is None else f"{q:.3f}")
        body.append(cells)
    widths = [max(len(c), *(len(line[i]) for line in body)) for i, c in enumerate(cols)]

    def fmt(cells: list[str]) -> str:  # the plan left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [head, fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, body)]
    lines.append("all-reduce: all-reduce time / standard's step; hidden: (T_standard - T_plan) "
                 "/ (T_standard - T_desync)")
    return "\n".join(lines)
