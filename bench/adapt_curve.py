"""Recovery curve of ladder adaptation: held-out perplexity relative to the standard parent
against training tokens, for SmolLM2 with its top 6 layers laddered (ladder:24-29) and with its
upper half laddered (ladder:15-29), and the time per step.

Each run is `ladder adapt` (Ray Train on a local Ray instance; KL distillation from the standard
parent, laddered layers only) with a held-out evaluation every few steps; its progress records
give the curve. Runs live in OUT/<plan>.train and resume where they stopped, so the benchmark
may be interrupted and started again; `--report-only` redraws the table, JSON and PNG from them.
Times are wall time on this shared machine (noisy): the ratios are the figure to read.

    python -m bench.adapt_curve --runs ladder:24-29:100 ladder:15-29:200
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "adapt"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", default=["ladder:24-29:100", "ladder:15-29:200"],
                   help="PLAN:STEPS for each curve")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folders and the PNG")
    p.add_argument("--json-dir", default=None, help="also write the JSON line here")
    p.add_argument("--report-only", action="store_true", help="no training: redraw from runs")


def _runs(args) -> list[tuple[str, int]]:
    out = []
    for r in args.runs:
        plan, steps = r.rsplit(":", 1)
        out.append((plan, int(steps)))
    return out


def curve(run_dir: Path) -> dict:
    """The evaluated points and step times of one run's progress records."""
    from adapt.train import read_progress
    recs = [r for r in read_progress(run_dir) if "step" in r]
    by_step: dict[int, dict] = {}
    for r in recs:  # a resumed run repeats steps after its checkpoint: keep the last
        by_step[r["step"]] = r
    elapsed, points, train_s = 0.0, [], []
    for step in sorted(by_step):
        r = by_step[step]
        if "step_s" in r:
            elapsed += r["step_s"]
            if "ppl" not in r:
                train_s.append(r["step_s"])
        if "ppl" in r:
            points.append({"step": step, "tokens": r["tokens"], "minutes": elapsed / 60,
                           "ppl_ratio": r["ppl_ratio"], "ppl": r["ppl"],
                           "parent_ppl": r["parent_ppl"], "held_out_kl": r["held_out_kl"],
                           "top1": r["top1"]})
    return {"points": points, "step_s": statistics.median(train_s) if train_s else None,
            "steps": max(by_step, default=0)}


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for plan, c in curves.items():
        pts = c["points"]
        ax.plot([p["tokens"] / 1e3 for p in pts], [p["ppl_ratio"] for p in pts], marker="o",
                ms=3, label=f"{plan} ({c['step_s']:.1f} s/step)" if c["step_s"] else plan)
    for y, what in ((1.05, "5%"), (1.15, "15%")):
        ax.axhline(y, ls="--", lw=0.8, color="grey")
        ax.text(0, y, f" {what}", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out perplexity / standard parent's")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: ladder adaptation by distillation (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from bench.table import table
    from bench.timed import emit
    curves = {}
    if not args.report_only:
        from adapt.cli import ray_cluster
        from adapt.train import AdaptOptions, run_adapt
        with ray_cluster(None, args.workers * args.cpus_per_worker):
            for plan, steps in _runs(args):
                name = plan.replace(":", "_")
                o = AdaptOptions(model=args.model, residual=plan, steps=steps, lr=args.lr,
                                 warmup=args.warmup, batch=args.batch, seq_len=args.seq_len,
                                 eval_every=args.eval_every, eval_rows=args.eval_rows,
                                 checkpoint_every=args.eval_every, workers=args.workers,
                                 cpus_per_worker=args.cpus_per_worker,
                                 out=str(args.out / name))
                run_adapt(o)
    for plan, steps in _runs(args):
        curves[plan] = curve(args.out / (plan.replace(":", "_") + ".train") / "run")
    rows = [[plan, p["step"], p["tokens"], p["minutes"], p["ppl"], p["parent_ppl"],
             p["ppl_ratio"], p["held_out_kl"], p["top1"]]
            for plan, c in curves.items() for p in c["points"]]
    print(table("held-out perplexity vs the standard parent (same rows), by training tokens",
                ["plan", "step", "tokens", "minutes", "ppl", "parent ppl", "ratio", "KL/token",
                 "top-1"], rows, digits=3))
    print(table("time per training step (median, evaluation steps excluded)",
                ["plan", "steps", "s/step", "tokens/s"],
                [[plan, c["steps"], c["step_s"],
                  args.batch * args.seq_len / c["step_s"] if c["step_s"] else None]
                 for plan, c in curves.items()]))
    png = args.out / "adapt_curve.png"
    plot(curves, png)
    print(f"plot: {png}")
    emit({"bench": "adapt_curve", "model": args.model, "lr": args.lr, "batch": args.batch,
          "seq_len": args.seq_len, "workers": args.workers,
          "cpus_per_worker": args.cpus_per_worker, "curves": curves}, args.json_dir,
         "adapt_curve")
    return 0


def main() -> int:
    from bench.timed import bench_main
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
