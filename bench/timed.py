"""Timed decode runs on a local TP group, and the small helpers the decode benchmarks share."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.links.factory import free_port

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the tables and the JSON line)."""
    print(f"[bench {time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def probe_pair(target, host: str, *args, timeout_s: float = 120.0):
    """Two spawned ranks running `target(rank, init, *args, out)`, `init` a free
    tcp://host:port for them to meet at; what rank 0 puts on `out`. A rank that fails (its
    traceback on stderr) ends the wait at once."""
    import queue
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"tcp://{host}:{free_port()}"
    procs = [ctx.Process(target=target, args=(r, init, *args, out), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    deadline, grace = time.monotonic() + timeout_s, 30.0
    try:
        while True:
            try:
                return out.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    grace = 0.0  # the other rank waits for the failed one: end it now
                    raise RuntimeError(f"probe rank {failed[0]} of {target.__name__} exited "
                                       f"with {procs[failed[0]].exitcode}") from None
                if time.monotonic() >= deadline:
                    raise
    finally:
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()


def csv(text: str) -> list[str]:
    """The non-empty items of a comma-separated flag."""
    return [x.strip() for x in text.split(",") if x.strip()]


def csv_ints(flag: str, text: str) -> list[int]:
    """A comma-separated flag of whole numbers >= 1; ValueError naming the flag otherwise."""
    try:
        out = [int(x) for x in csv(text)]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated whole numbers") from None
    if not out or min(out) < 1:
        raise ValueError(f"{flag} {text!r}: give at least one number, each >= 1")
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


@dataclass
class DecodeRun:
    per_token_s: float  # engine decode-step time per token (StepTiming.decode_s / tokens)
    exposed_per_token_s: float  # of which blocked in all-reduce waits
    wall_per_token_s: float  # wall time between the first and last streamed token, per token
    tokens: list[int]


def decode_run(group: LocalTPGroup, prompt: list[int], n: int) -> DecodeRun:
    """Greedy, exactly `n` new tokens (ignore_eos). The decode figures exclude the prefill step
    (which yields the first token): they cover the n - 1 decode steps."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    group.reset_timing()
    stamps, tokens = [], []

    def seen(_, ev) -> None:
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
            tokens.append(ev.token_id)

    group.generate([prompt], [params], on_event=seen)
    tm = group.timing()
    if tm.decode_tokens < 1 or len(tokens) != n:
        raise RuntimeError(f"expected {n} tokens with {n - 1} decode steps, got {len(tokens)} "
                           f"tokens and {tm.decode_tokens} decode tokens")
    return DecodeRun(per_token_s=tm.decode_s / tm.decode_tokens,
                     exposed_per_token_s=tm.decode_exposed_s / tm.decode_tokens,
                     wall_per_token_s=(stamps[-1] - stamps[0]) / (len(stamps) - 1), tokens=tokens)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (Linux /proc, clock-tick resolution); 0 for gone ones."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


class OtherLoad:
    """CPU time the rest of the machine used while this benchmark ran, in cores on average:
    all busy time (/proc/stat) less this process's and its reaped children's (with `tree`,
    also its live descendants': a group's ranks while they run). Anything well above zero
    means the figures were taken on a shared, busy machine."""

    def __init__(self, tree: bool = False) -> None:
        self.own = _tree_s if tree else _own_s
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), self.own()

    def cores(self) -> float:
        busy, own = _busy_s() - self.busy0, self.own() - self.own0
        return max(0.0, busy - own) / (time.perf_counter() - self.t0)


def _busy_s() -> float:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guests are in user


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _tree_s() -> float:
    from ladder.procs import cpu_seconds, descendants
    return _own_s() + sum(map(cpu_seconds, descendants(os.getpid())))


def emit(result: dict, out_dir: str | None, name: str) -> None:
    """Print the benchmark's one JSON line; with `out_dir`, also write it to
    out_dir/<name>-<time>.json."""
    import json
    line = json.dumps(result)
    print(line, flush=True)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(line + "\n")


def bench_main(module_doc: str, add_args, run) -> int:
    """`python -m bench.<name>`: the module's flags, then its run()."""
    import argparse
    p = argparse.ArgumentParser(description=module_doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args())
