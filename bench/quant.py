"""Weights kept quantized beside bfloat16 and float32, in one run: SmolLM2 from its own Q4_1 GGUF.

The file's weights three ways: dequantized at load (float32, the reference; bfloat16), kept as
the file's blocks (`--dtype q4_1`: its layers Q4_1, its head Q8_0) and as Q8_0 (`q8_0`), at
TP=1 and at TP=2 over shared memory with the served plan (deploy/smollm2.yaml), every core
(bench.llamacpp_compare's groups, without llama.cpp):

  - speed: single-stream decode tokens/s (1 / TPOT) and K streams' aggregate tokens/s, greedy,
    N new tokens forced, the configurations run round-robin `--rounds` times (each figure the
    mean of its rounds, the spread shown) so that a slow minute of this shared machine falls
    on all of them;
  - quality: held-out perplexity (the Python docs `ladder adapt` holds out, `--rows` rows of
    128 tokens) of each quantized model against the same weights dequantized to float32, with
    the KL per position and top-1 agreement.

Targets (issue 26): q4_1 >= 2x bfloat16's single stream at TP=1 and TP=2; TP=2 >= 1.3x TP=1
single stream for every weight type; q4_1's perplexity within 1% of the dequantized model's.

    python -m bench.quant [--tokens 64] [--streams 16] [--rounds 2] [--rows 16] [--out DIR]
"""

from __future__ import annotations

import statistics

from bench.llamacpp_compare import CONFIGS, _prompt, ours
from bench.table import table
from bench.timed import OtherLoad, emit, log

TARGETS = {"q4_1_over_bfloat16_1": 2.0, "tp2_over_tp1_1": 1.3, "tp2_over_tp1_k": 1.0,
           "ppl_ratio_max": 1.01}


def add_args(p) -> None:
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtypes", default="bfloat16,float32,q4_1,q8_0")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rows", type=int, default=16, help="held-out rows of 128 tokens")
    p.add_argument("--out", default=None)


def speed(name: str, dtype: str, prompt: list[int], a) -> tuple[float, float]:
    """(single-stream tokens/s, K-stream aggregate tokens/s) of one fresh group."""
    r = ours(name, dtype, prompt, a)
    return 1 / r["single"].tpot_s, r["multi"].aggregate_tok_s


def quality(kinds: list[str], rows: int) -> dict[str, dict]:
    """Held-out perplexity of each quantized kind against the dequantized float32 model."""
    import torch

    from adapt.data import DEFAULT_DATA, prepare
    from adapt.distill import held_out_sums, summarize
    from ladder.loaders import load_shard, open_checkpoint
    from ladder.model.config import ResidualPlan
    from ladder.model.tp import ShardSpec
    from ladder.model.transformer import build_model
    from ladder.native.layouts import decode_layout
    ck = open_checkpoint("smollm2")
    spec = ShardSpec.make(ck.config, 0, 1)
    state = load_shard(ck, spec, torch.float32)
    ref = build_model(ck.config, spec, ResidualPlan(), state)
    packed = prepare(DEFAULT_DATA, ck.tokenizer(), seq_len=128,
                     max_seq_len=ck.config.max_seq_len, parts=("held_out",))
    x = torch.from_numpy(packed.held_out[:rows]).long()
    out = {}
    for kind in kinds:
        log(f"perplexity: {kind}")
        model = decode_layout(build_model(ck.config, spec, ResidualPlan(), state), quant=kind)
        out[kind] = summarize(held_out_sums(model, ref, x, batch=4))
        out[kind]["rows"] = len(x)
    return out


def run(a) -> int:
    from ladder.options import QUANT_DTYPES
    other = OtherLoad(tree=True)
    dtypes, configs = a.dtypes.split(","), a.configs.split(",")
    prompt = _prompt()
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(a.rounds):
        for name in configs:
            for dtype in dtypes:
                log(f"round {r + 1}: {name} {dtype}")
                runs.setdefault((name, dtype), []).append(speed(name, dtype, prompt, a))
    mean = {key: (statistics.mean(s for s, _ in v), statistics.mean(k for _, k in v))
            for key, v in runs.items()}
    spread = {key: (max(s for s, _ in v) / min(s for s, _ in v) - 1) for key, v in runs.items()}
    lines, rows = [], []
    for (name, dtype), (s1, sk) in mean.items():
        bf = mean.get((name, "bfloat16"))
        tp1 = mean.get(("tp1", dtype))
        row = {"config": name, "dtype": dtype, "tok_s_1": s1, f"tok_s_{a.streams}": sk,
               "spread_1": spread[(name, dtype)],
               "over_bfloat16_1": s1 / bf[0] if bf else None,
               "over_bfloat16_k": sk / bf[1] if bf else None,
               "tp2_over_tp1_1": s1 / tp1[0] if tp1 and name != "tp1" else None,
               "tp2_over_tp1_k": sk / tp1[1] if tp1 and name != "tp1" else None}
        rows.append(row)
        lines.append([name, dtype, s1, f"{row['spread_1']:.0%}", row["over_bfloat16_1"], sk,
                      row["over_bfloat16_k"], row["tp2_over_tp1_1"], row["tp2_over_tp1_k"]])
    print(table(f"SmolLM2-135M-Instruct decode tokens/s, greedy, {a.tokens} new tokens, mean of "
                f"{a.rounds} rounds (spread: max/min - 1)",
                ["config", "weights", "1 stream", "spread", "/ bf16", f"{a.streams} streams",
                 "/ bf16", "TP2/TP1 1", f"TP2/TP1 {a.streams}"], lines))
    kinds = [d for d in dtypes if d in QUANT_DTYPES]
    q = quality(kinds, a.rows) if kinds and a.rows else {}
    if q:
        print(table(f"held-out perplexity against the dequantized float32 model "
                    f"({a.rows} rows x 128 tokens)",
                    ["weights", "perplexity", "float32", "ratio", "KL / position", "top-1"],
                    [[k, r["ppl"], r["parent_ppl"], f"{r['ppl_ratio']:.4f}",
                      f"{r['held_out_kl']:.4f}", r["top1"]] for k, r in q.items()]))
    emit({"bench": "quant", "tokens": a.tokens, "streams": a.streams, "rounds": a.rounds,
          "rows": rows, "quality": q, "targets": TARGETS,
          "other_processes_cores": other.cores()}, a.out, "quant")
    return 0


if __name__ == "__main__":
    from bench.timed import bench_main
    raise SystemExit(bench_main(__doc__, add_args, run))
