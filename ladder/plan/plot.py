"""`--png`: predicted speedup over standard against the link's bandwidth, the user's link marked.

The link keeps its latencies and calibrated terms while its bandwidth sweeps 0.1 GB/s to
1 TB/s per direction (measured all-reduce times, which hold for one bandwidth only, are set
aside); one line per plan and batch, at the first context asked.
"""

from __future__ import annotations

import dataclasses

from ladder.model.config import ConfigError, ResidualPlan
from ladder.plan.sweep import Setup

BANDWIDTHS = [10 ** (8 + i / 8) for i in range(33)]  # bytes/s per direction, 0.1 GB/s - 1 TB/s


def speedup_curve(setup: Setup, plan: ResidualPlan, batch: int, context: int) -> list[float]:
    standard = ResidualPlan("standard")
    out = []
    for bw in BANDWIDTHS:
        s = dataclasses.replace(setup, link=dataclasses.replace(setup.link, bandwidth=bw,
                                                                measured=()))
        out.append(s.step(standard, batch, context).seconds / s.step(plan, batch, context).seconds)
    return out


def write_png(setup: Setup, plans: list[tuple[str, ResidualPlan]], batches: list[int],
              context: int, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--png needs matplotlib, which is not installed") from None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    gbs = [bw / 1e9 for bw in BANDWIDTHS]
    for label, plan in plans:
        if plan.kind == "standard":
            continue
        for b in batches:
            ax.plot(gbs, speedup_curve(setup, plan, b, context), label=f"{label}, batch {b}")
    mark = setup.link.bandwidth / 1e9
    ax.axvline(mark, ls="--", lw=1, color="black")
    ax.text(mark, ax.get_ylim()[1], f" {setup.link.name}", va="top", fontsize=9)
    ax.axhline(1.0, lw=0.8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth per direction (GB/s); latencies kept")
    ax.set_ylabel("predicted speedup over standard")
    cfg = setup.config
    ax.set_title(f"{cfg.name}, TP={setup.tp}, {setup.hardware.name}, context {context}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise ConfigError(f"--png {path}: cannot write it ({e})") from None
    finally:
        plt.close(fig)
