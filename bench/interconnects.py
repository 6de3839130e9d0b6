"""Ladder vs standard across interconnects, on a launched cluster: the run users make before
they buy hardware.

On a cluster from `ladder cluster up` (or `--launch`, which brings up head + two workers per
network link profile and takes it down after), TP=2 groups are placed so that their all-reduce
crosses each link: `shm` (both ranks on one node, shared memory), and for each network profile
the two workers labelled with it (STRICT_SPREAD, gloo bound to the node addresses). For every
residual (standard, ladder, partial = the upper half laddered, parallel) x link x batch size x
prompt length it measures, per cell:

  direct   the TP group driven from the bench (`actors.TPGroup`): per-token decode latency (the
           median engine step over full-batch decode steps), exposed all-reduce wait per step,
           TTFT (submission to first token, median over the batch) and throughput (all new
           tokens / wall time, prefill included);
  serve    the same through the Serve app's HTTP endpoint (`/v1/completions`, streamed, token-id
           prompts): client-side TTFT, time per output token and throughput.

A `desync` group (no communication: the speed bound) runs beside them on each link, so the
overlap efficiency (T_standard - T_ladder) / (T_standard - T_desync) is measured, not guessed;
the live estimate (1 - ladder's exposed wait per step / standard's, same link) is printed beside.
The efficiency is a difference of differences of a few ms a token, so the direct path keeps every
residual's group of a link up at once and runs their cells in turn, `--reps` times (medians): a
change in the machine's load between two groups' runs would otherwise read as a schedule's gain.
Outputs: tables, one JSON line (`--out DIR` writes it and the report's PNG/HTML there), the
figures as Prometheus gauges (`ladder_bench_*`, a text file beside the JSON and, with
`--metrics-port`, served while the run lasts), and the groups' own `ladder_*` series through
Ray's metrics agents, so the "Interconnects" dashboard shows the run by `interconnect`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.interconnect_cells import direct_cell, serve_cell
from bench.interconnect_report import Gauges, overlap, report, speedups
from bench.timed import bench_main, csv, log
from ladder.model.tp import HEAD_SPLITS

RESIDUALS = {"standard": "standard", "ladder": "ladder", "partial": "ladder:upper-half",
             "parallel": "parallel"}
LAUNCH_LINKS = ("high-end", "cheap")
IN_CLUSTER = "LADDER_BENCH_CLUSTER"  # set when the bench runs as the cluster's driver


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default="ladder", help="the `ladder cluster` to run on")
    p.add_argument("--launch", action="store_true",
                   help="bring the cluster up for the run (head + 2 workers per network link) "
                        "and take it down after")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--residuals", default=",".join(RESIDUALS),
                   help=f"among {', '.join(RESIDUALS)}")
    p.add_argument("--links", default="shm," + ",".join(LAUNCH_LINKS),
                   help="shm and/or the cluster's link profiles")
    p.add_argument("--comm", default="auto", choices=["auto", "gloo", "tcp"],
                   help="the all-reduce over network links (auto: the group's choice, gloo); "
                   "the shm link is always shared memory")
    p.add_argument("--head-split", default="even", choices=HEAD_SPLITS,
                   help="how the two ranks split the attention heads (ladder.model.tp; even is what "
                   "deploy/smollm2.yaml serves)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-lens", default="16,256", help="prompt lengths in tokens")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per request (forced)")
    p.add_argument("--paths", default="direct,serve", help="direct and/or serve")
    p.add_argument("--reps", type=int, default=3,
                   help="direct path: runs of every cell, interleaved across the residuals' "
                        "groups (medians reported)")
    p.add_argument("--phase-timeout", type=float, default=600.0,
                   help="a group's start, a cell or a Serve deploy that takes longer dumps "
                        "every thread's stack and ends the run")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve the ladder_bench_* gauges on this port while the run lasts")
    p.add_argument("--out", help="write the JSON line, the .prom file and the report here")


# -- driver side (inside the cluster) -----------------------------------------------------------
class _Phase:
    """Names what the run is doing in the log, and bounds it: past `timeout_s` every thread's
    stack goes to stderr and the process exits (a hang says where it hung)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def __call__(self, what: str) -> "_Phase":
        import faulthandler
        log(what)
        faulthandler.dump_traceback_later(self.timeout_s, exit=True)
        return self

    def __enter__(self) -> "_Phase":
        return self

    def __exit__(self, *exc) -> None:
        import faulthandler
        faulthandler.cancel_dump_traceback_later()


def placement(link: str) -> tuple[str, str]:
    """(strategy, node label to place on) of a group whose all-reduce crosses `link`."""
    return ("PACK", "") if link == "shm" else ("STRICT_SPREAD", link)


def sweep(a: argparse.Namespace) -> dict:
    import ray
    ray.init(log_to_driver=False)
    residuals, links = csv(a.residuals), csv(a.links)
    batches = [int(b) for b in csv(a.batches)]
    plens = [int(x) for x in csv(a.prompt_lens)]
    paths = csv(a.paths)
    bad = sorted(set(residuals) - set(RESIDUALS))
    if bad:
        raise SystemExit(f"--residuals: {bad} are not among {sorted(RESIDUALS)}")
    have = {n["Labels"].get("ladder.io/link") for n in ray.nodes()
            if n["Alive"] and n["Resources"].get("CPU", 0) >= 1}
    missing = [li for li in links if li != "shm" and li not in have]
    if missing:
        raise SystemExit(f"the cluster has no worker nodes with link {missing} "
                         f"(it has {sorted(have)})")
    n_slots = max(batches)
    from ladder.loaders import open_checkpoint
    vocab = open_checkpoint(a.model).config.vocab_size
    cells = []
    gauges = Gauges(a.metrics_port)
    phase = _Phase(a.phase_timeout)
    for link in links:
        strategy, label = placement(link)
        if "direct" in paths:
            cells += direct_sweep(a, link, [*residuals, "desync"], batches, plens, n_slots,
                                  vocab, gauges, phase)
        if "serve" in paths:
            for res in residuals:
                cells += serve_sweep(a, group_options(a, res, link, n_slots, plens), res, link,
                                     strategy, label, batches, plens, vocab, gauges, phase)
    with phase("shutting down"):
        if "serve" in paths:
            from ray import serve
            serve.shutdown()
        ray.shutdown()
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        gauges.write(Path(a.out) / "interconnects.prom")
    from cluster.launcher import load_state
    st = load_state(a.cluster)
    return {"bench": "interconnects", "model": a.model, "dtype": a.dtype, "tp": 2,
            "tokens": a.tokens, "reps": a.reps, "mtu": st.mtu if st else None, "cells": cells,
            "overlap": overlap(cells), "speedup": speedups(cells)}


def group_options(a: argparse.Namespace, res: str, link: str, n_slots: int, plens: list[int]):
    from ladder.options import GroupOptions
    return GroupOptions(model=a.model, tp=2, residual=RESIDUALS.get(res, res), dtype=a.dtype,
                        comm="auto" if link == "shm" else a.comm, n_slots=n_slots,
                        max_seq=max(plens) + a.tokens + 8, threads=1, head_split=a.head_split,
                        prefix_caching=False,  # each rep's time to first token from scratch
                        max_num_batched_tokens=0)  # whole prompts: a batch decodes together


def direct_sweep(a, link: str, kinds: list[str], batches: list[int], plens: list[int],
                 n_slots: int, vocab: int, gauges, phase) -> list[dict]:
    """Every residual's group over `link` at once, driven one at a time: each rep runs every
    cell of every group, in turn (the order reversed every other rep), so a change in the
    machine's load shifts all residuals alike instead of one. Each figure is the median over
    the reps; `range_ms` is the spread of ms/token."""
    from actors.group import TPGroup
    strategy, label = placement(link)
    groups: dict = {}
    runs: dict = {}
    try:
        for res in kinds:
            with phase(f"direct: {res} over {link}: starting the group"):
                groups[res] = TPGroup(group_options(a, res, link, n_slots, plens),
                                      strategy=strategy, link=label, metrics=True,
                                      model_label=Path(a.model).name,
                                      cpus_per_worker=1 / len(kinds))  # idle in turn
        for rep in range(a.reps):
            for b in batches:
                for plen in plens:
                    for res in kinds if rep % 2 == 0 else kinds[::-1]:
                        with phase(f"direct: {res} over {link}, batch {b}, prompt {plen}, "
                                   f"rep {rep + 1}/{a.reps}"):
                            c = asyncio.run(direct_cell(groups[res], b, plen, a.tokens, vocab))
                        runs.setdefault((res, b, plen), []).append(c)
    finally:
        for g in groups.values():
            g.shutdown()
    cells = []
    for (res, b, plen), rs in runs.items():
        ms = [r["ms_per_token"] for r in rs]
        cells.append({"path": "direct", "link": link, "residual": res,
                      "interconnect": groups[res].info.interconnect,
                      "comm": groups[res].opts.comm, "batch": b, "prompt_len": plen,
                      **{k: statistics.median(r[k] for r in rs) for k in rs[0]},
                      "reps": len(rs), "range_ms": max(ms) - min(ms)})
        gauges.set(cells[-1])
    cells.sort(key=lambda c: (kinds.index(c["residual"]), c["batch"], c["prompt_len"]))
    return cells


def serve_sweep(a, opts, res, link, strategy, label, batches, plens, vocab, gauges,
                phase) -> list[dict]:
    from dataclasses import asdict

    from ray import serve

    from deploy.server import build_app
    args = {k: v for k, v in asdict(opts).items()
            if k in ("model", "tp", "residual", "dtype", "comm", "n_slots", "max_seq",
                     "threads", "head_split")}
    args.update(model_name="bench", strategy=strategy, link=label, queue_limit=64)
    out = []
    try:
        with phase(f"serve: {res} over {link}: deploying"):
            serve.start(http_options={"host": "127.0.0.1", "port": 8000},
                        proxy_location="HeadOnly")
            serve.run(build_app(args), name="bench", route_prefix="/")
            import requests
            info = requests.get("http://127.0.0.1:8000/v1/models", timeout=30).json()["data"][0]
        for b in batches:
            for plen in plens:
                with phase(f"serve: {res} over {link}, batch {b}, prompt {plen}"):
                    c = serve_cell("http://127.0.0.1:8000", "bench", b, plen, a.tokens, vocab)
                out.append({"path": "serve", "link": link, "residual": res,
                            "interconnect": info["interconnect"], "batch": b,
                            "prompt_len": plen, **c})
                gauges.set(out[-1])
    finally:
        with phase(f"serve: {res} over {link}: deleting the app"):
            serve.delete("bench")
    return out


# -- the command: the driver inside the cluster, or its launcher outside ------------------------
def run(a: argparse.Namespace) -> int:
    if os.environ.get(IN_CLUSTER) == a.cluster:  # the driver, inside the head's namespace
        result = sweep(a)
        report(result, a.out)
        return 0
    return _launch_and_drive(a)


def _launch_and_drive(a: argparse.Namespace) -> int:
    """Re-run this bench as a driver in the cluster's head namespace (bringing the cluster up
    first with --launch, and down after)."""
    from cluster.launcher import ClusterError, down, load_state, ray_env, up
    from cluster.links import parse_links
    launched = False
    try:
        if load_state(a.cluster) is None:
            if not a.launch:
                print(f"bench interconnects: no cluster {a.cluster!r} is up: `ladder cluster up "
                      f"--name {a.cluster} --nodes 5 --link high-end,high-end,high-end,cheap,"
                      f"cheap`, or pass --launch", file=sys.stderr)
                return 2
            nets = [li for li in csv(a.links) if li != "shm"] or ["high-end"]
            spec = ",".join([nets[0]] + [li for li in nets for _ in range(2)])
            log(f"launching cluster {a.cluster!r}: {spec}")
            up(a.cluster, parse_links(spec, 1 + 2 * len(nets)), cpus=2, log=log)
            launched = True
        st = load_state(a.cluster)
        env = dict(ray_env(a.cluster), **{IN_CLUSTER: a.cluster})
        argv = [x for x in sys.argv[1:] if x != "--launch"]
        if argv[:2] == ["bench", "interconnects"]:  # run as `ladder bench interconnects`
            argv = argv[2:]
        cmd = [sys.executable, "-m", "bench.interconnects", *argv]
        if not st.plain:
            cmd = ["ip", "netns", "exec", st.head.ns, *cmd]
        return subprocess.run(cmd, env=env, cwd=os.getcwd()).returncode
    except ClusterError as e:
        print(f"bench interconnects: {e}", file=sys.stderr)
        return 2
    finally:
        if launched:
            down(a.cluster, log=log)


def main() -> int:
    return bench_main(__doc__, add_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
