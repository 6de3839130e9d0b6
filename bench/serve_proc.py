"""`ladder serve` as a child process, for benchmarks and tests.

The config is deploy/smollm2.yaml with some settings changed and one replica at most; the child
runs in a session of its own with a local Ray of its own (no token of ours in its environment),
and is ended by its id however the caller leaves the `ladder_serve` block.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ladder.procs import cmdline, descendants

ROOT = Path(__file__).resolve().parent.parent


def write_config(folder: Path, port: int, **args) -> Path:
    """folder/serve.yaml: deploy/smollm2.yaml on `port` with `args` changed, one replica."""
    import yaml
    cfg = yaml.safe_load((ROOT / "deploy" / "smollm2.yaml").read_text())
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"].update(args)
    cfg["applications"][0]["args"]["autoscaling_config"]["max_replicas"] = 1
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def ladder_serve(config: Path) -> Iterator[subprocess.Popen]:
    """`ladder serve --config config` (stdout and stderr merged, text) for the block's length."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "ladder.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait()


def wait_ready(proc: subprocess.Popen, timeout_s: float) -> float:
    """Read the child's output until it says it serves; the seconds that took. RuntimeError with
    the output's tail when it exits or the time runs out first."""
    lines, t0 = [], time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops" in line:
            return time.monotonic() - t0
    raise RuntimeError("ladder serve did not come up:\n" + "".join(lines[-30:]))



def session_processes(pid: int, title: str = "") -> list[int]:
    """The live processes `ladder serve` (`pid`, a session leader) started: its descendants and
    the members of its session (Ray's daemons may leave the process tree), oldest first;
    with `title`, only those whose command line starts with it (e.g. ray::ShardWorker)."""
    ours = descendants(pid, session=True)
    return [p for p in ours if cmdline(p).startswith(title)] if title else ours
