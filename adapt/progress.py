"""An adaptation run's `progress.jsonl`: one JSON object a line, appended by Ray Train's controller
(each step's rank-0 metrics, worker failures) and the driver (each start), tailed by the driver
to print progress, read again on resume to find the last checkpoint.

A writer that dies mid-line (a killed controller, a full disk) leaves a torn last line. Readers
skip it; the next append first removes it (its record is lost either way; left in place, it
would become a bad line in the middle, which stays an error naming the file and line).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class ProgressError(ValueError):
    """progress.jsonl holds a bad line before its last one; the message names the file and line."""


def read_progress(run_dir: Path) -> list[dict]:
    """The records of the run's progress.jsonl (none when there is no such file)."""
    p = run_dir / "progress.jsonl"
    if not p.is_file():
        return []
    lines = p.read_text().split("\n")
    tail = lines.pop()  # '' after a complete last line, else a last line without its newline
    records = [_parse(p, n, line) for n, line in enumerate(lines, 1)]
    last = _whole(tail)
    return records + [last] if last is not None else records


def _parse(path: Path, n: int, line: str) -> dict:
    try:
        return json.loads(line)
    except ValueError as e:
        raise ProgressError(f"{path}: line {n} is not JSON ({e}); only a torn last line is "
                            "skipped") from None


def _whole(line: str | bytes) -> dict | None:
    """The record of a last line that lacks its newline, or None where it is torn (or empty)."""
    try:
        return json.loads(line) if line else None
    except ValueError:
        return None


def append_progress(path: str | Path, rec: dict) -> None:
    """Append `rec` as a line, after mending a last line that lacks its newline: a whole record
    gets the newline, a torn one is removed."""
    with open(path, "a+b") as f:  # O_APPEND: every write lands at the end
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                _mend(f)
        f.write(json.dumps(rec).encode() + b"\n")


def _mend(f) -> None:
    """Give a last line without its newline that newline if it is a whole record, else cut the
    torn line off."""
    f.seek(0)
    data = f.read()
    cut = data.rfind(b"\n") + 1
    if _whole(data[cut:]) is None:
        f.truncate(cut)
    else:
        f.write(b"\n")


def progress_callback(path: str):
    """A Ray Train callback (runs in the controller) appending reports to `path`."""
    from ray.train import UserCallback

    class Progress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            # one record a step: a report holds its last step and the steps before it
            for i in range(len(metrics[0].get("earlier", []))):
                append_progress(path, {**metrics[0]["earlier"][i],
                                       "pids": [m["earlier"][i].get("pid") for m in metrics]})
            rec = {k: v for k, v in metrics[0].items() if k != "earlier"}
            rec["pids"] = [m.get("pid") for m in metrics]
            if checkpoint is not None:
                rec["checkpoint"] = checkpoint.path
            append_progress(path, rec)

        def after_exception(self, run_context, worker_exceptions):
            append_progress(path, {"event": "worker_failure", "ranks": sorted(worker_exceptions),
                                   "error": "; ".join(f"{type(e).__name__}: {e}".splitlines()[0]
                                                      for e in worker_exceptions.values())})

    return Progress()


class ProgressPrinter:
    """Tails progress.jsonl in a thread and prints one line per step: step, loss, tokens/s,
    held-out perplexity where evaluated, ETA. It reads whole lines only, from the end of the
    last whole line when it starts: a torn last line is never read, and once an append removes
    it the printer is where the next record begins."""

    def __init__(self, path: Path, steps: int, out=None) -> None:
        self.path, self.steps, self.out = path, steps, out
        self._stop = threading.Event()
        self._pos = path.read_bytes().rfind(b"\n") + 1 if path.is_file() else 0
        self._times: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._drain()

    def _drain(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._pos += end
        for line in chunk[:end].decode().splitlines():
            print(self.format(json.loads(line)), file=self.out, flush=True)

    def format(self, r: dict) -> str:
        if r.get("event") == "worker_failure":
            return (f"[adapt] worker(s) {r['ranks']} failed ({r['error']}); Ray Train restarts "
                    "the group from the last checkpoint")
        line = f"[adapt] step {r['step']}/{self.steps}"
        if "loss" in r:
            self._times.append(r["step_s"])
            recent = self._times[-20:]
            per = sum(recent) / len(recent)
            line += (f" | loss {r['loss']:.4f} (kl {r['kl']:.4f}) | lr {r['lr']:.2e} | "
                     f"{r['tokens'] / max(r['step'], 1) / r['step_s']:.0f} tok/s")
        if "ppl" in r:
            line += (f" | held-out ppl {r['ppl']:.3f} ({r['ppl_ratio']:.3f}x parent "
                     f"{r['parent_ppl']:.3f}) top-1 {r['top1']:.3f}")
        if "loss" in r:
            line += f" | ETA {_duration(per * (self.steps - r['step']))}"
        if "checkpoint" in r:
            line += " | checkpoint"
        return line


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
