"""Parts (b) and (c) of the decode benchmark: our engine against transformers, and bandwidth.

(b) Our engine at TP=1 against transformers' `generate` on SmolLM2-135M-Instruct: the same
    weights (transformers' LlamaForCausalLM is built from our checkpoint's config and given the
    tensors our GGUF loader reads, since transformers' own GGUF loading needs accelerate), the
    same chat prompt and dtype, greedy, N new tokens forced (transformers: min_new_tokens =
    max_new_tokens = N; ours: ignore_eos), float32 and bfloat16, 2 torch threads each. Decode
    only: ours is the engine's decode-step time (`StepTiming.decode_s`: forward and LM head, no
    sampling, scheduling or pipe), with the wall time between our streamed tokens beside it;
    transformers' is the wall time from its first to its last streamed token (its whole
    per-token loop: forward, logits processors, argmax, cache update).
(c) Weight bytes a decode token reads (every linear weight of the shard: wqkv, wo, w13 and w2 of
    each layer, plus the LM head's vocab x dim rows; the one embedding row and the KV cache are
    left out) over the engine's time per token, against a plain matrix-vector pass over the
    same bytes: `F.linear` of a [1, in] vector with each of the same matrices, same dtype, same
    threads, in the same process state as transformers (the engine group idles meanwhile). The
    engine reads its weights in faster layouts than F.linear's (ladder.native.layouts), so the pass runs
    in those layouts too, and the target is judged against the faster of the two passes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.table import table
from bench.timed import OtherLoad, decode_run, log, median
from ladder.engine.local import LocalTPGroup
from ladder.loaders import load_shard, open_checkpoint
from ladder.model.tp import ShardSpec
from ladder.native.layouts import FastLinear
from ladder.options import DTYPES, GroupOptions

THREADS = 2  # torch threads for our engine, transformers and the matrix-vector pass alike
TARGETS = {"engine_vs_hf": 1.3, "bandwidth_fraction": 0.8}  # reported against, not asserted
PROMPT = ("Explain in two sentences why overlapping communication with compute speeds up "
          "tensor-parallel inference.")


@dataclass(frozen=True)
class Settings:
    tokens: int  # new tokens per timed run
    reps: int
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


def hf_model(ckpt, weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding our checkpoint's weights (read by our loader:
    transformers' own GGUF path needs accelerate)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = ckpt.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim,
                     intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layers,
                     num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                     head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                     max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
                     bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids))
    with torch.device("meta"):
        hf = LlamaForCausalLM(hc)
    hf.load_state_dict({n: w.to(dtype) for n, w in weights.items()}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hc)  # its buffer was on meta
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"transformers model left without weights: {missing[:3]}")
    return hf.eval()


def hf_weights(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor transformers' Llama names that the checkpoint holds, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = ckpt.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim,
                     intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layers,
                     num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                     head_dim=c.head_dim, tie_word_embeddings=c.tie_embeddings)
    with torch.device("meta"):
        names = list(LlamaForCausalLM(hc).state_dict())
    return {n: ckpt.read(n) for n in names if ckpt.has(n)}


class _Stamps:
    """A transformers streamer that only records when each put() arrives (the prompt first)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_run(hf, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """transformers' greedy generate of exactly `n` tokens; seconds per decode token (first to
    last streamed token: the prefill and first token excluded) and the tokens."""
    ids = torch.tensor([prompt])
    st = _Stamps()
    eos = hf.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, streamer=st, pad_token_id=eos)
    tokens = out[0, len(prompt):].tolist()
    if len(tokens) != n or len(st.t) != n + 1:
        raise RuntimeError(f"transformers generated {len(tokens)} tokens, expected {n}")
    return (st.t[-1] - st.t[1]) / (n - 1), tokens


def shard_matrices(ckpt, dtype: torch.dtype) -> list[torch.Tensor]:
    """The weights a TP=1 decode token reads, in model order: wqkv, wo, w13, w2 per layer, then
    the LM head (the embedding matrix when tied)."""
    sd = load_shard(ckpt, ShardSpec.make(ckpt.config, 0, 1), dtype)
    mats = []
    for i in range(ckpt.config.n_layers):
        p = f"layers.{i}."
        mats += [sd[p + k] for k in ("attention.wqkv.weight", "attention.wo.weight",
                                     "mlp.w13.weight", "mlp.w2.weight")]
    mats.append(sd["output.weight"] if "output.weight" in sd else sd["tok_embeddings.weight"])
    return mats


def gemv_pass_s(mats: list, xs: list[torch.Tensor]) -> float:
    """One matrix-vector product per matrix: F.linear for plain tensors, the module otherwise."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        for w, x in zip(mats, xs):
            F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
        return time.perf_counter() - t0


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(group: LocalTPGroup, ckpt, weights: dict, dt: str, s: Settings, vs_hf: bool,
            bandwidth: bool) -> tuple[dict | None, dict | None]:
    """One dtype: our decode against transformers' (interleaved) and/or the matrix-vector passes
    over the shard's weights."""
    dtype, n = DTYPES[dt], s.tokens
    prompt = group.encode(PROMPT, chat=True)
    hf = hf_model(ckpt, weights, dtype) if vs_hf else None
    mats = shard_matrices(ckpt, dtype) if bandwidth else []
    laid_out = [FastLinear(w) for w in mats]  # the layouts the engine reads
    xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in mats]
    nbytes = sum(w.numel() * w.element_size() for w in mats)
    decode_run(group, prompt, min(8, n))  # warm-up
    if hf is not None:
        hf_run(hf, prompt, min(8, n))
    ours, theirs, gemv, gemv_fast = [], [], [], []
    for rep in range(s.reps):  # ours, theirs, then theirs, ours: drift falls on both
        if rep % 2 == 0:
            ours.append(decode_run(group, prompt, n))
        if hf is not None:
            theirs.append(hf_run(hf, prompt, n))
        if rep % 2 == 1:
            ours.append(decode_run(group, prompt, n))
        if mats:
            gemv_pass_s(mats, xs)  # warm
            gemv += [gemv_pass_s(mats, xs) for _ in range(3)]
            gemv_pass_s(laid_out, xs)
            gemv_fast += [gemv_pass_s(laid_out, xs) for _ in range(3)]
    del hf, mats, laid_out, xs
    ours_s = median(r.per_token_s for r in ours)
    ours_wall = median(r.wall_per_token_s for r in ours)
    hf_out = bw_out = None
    if vs_hf:
        hf_s = median(t for t, _ in theirs)
        hf_out = {"ours_tok_s": 1 / ours_s, "ours_wall_tok_s": 1 / ours_wall, "hf_tok_s": 1 / hf_s,
                  "ratio": hf_s / ours_s, "ratio_wall": hf_s / ours_wall,
                  "greedy_prefix_match": prefix_match(ours[0].tokens, theirs[0][1]),
                  "tokens": n, "prompt_tokens": len(prompt)}
    if bandwidth:
        g, best = median(gemv), min(median(gemv), median(gemv_fast))
        bw_out = {"weight_bytes_per_token": nbytes, "decode_ms_per_token": 1e3 * ours_s,
                  "decode_gb_s": nbytes / ours_s / 1e9, "gemv_ms_per_pass": 1e3 * g,
                  "gemv_gb_s": nbytes / g / 1e9, "fraction": g / ours_s,
                  "best_gemv_gb_s": nbytes / best / 1e9, "fraction_of_best": best / ours_s}
    return hf_out, bw_out


def run(s: Settings, vs_hf: bool, bandwidth: bool) -> tuple[dict, dict, str]:
    """Parts (b) and/or (c), one engine group per dtype; returns their JSON dicts and tables."""
    torch.set_num_threads(THREADS)

    def start(dt: str) -> LocalTPGroup:
        return LocalTPGroup(GroupOptions(model="smollm2", tp=1, dtype=dt, threads=THREADS,
                                         n_slots=1, max_seq=512))

    log("SmolLM2: starting the engine while reading the weights for transformers")
    with ThreadPoolExecutor(1) as pool:  # the rank's start is mostly its own GGUF read
        first = pool.submit(start, s.dtypes[0])
        try:
            ckpt = open_checkpoint("smollm2")
            weights = hf_weights(ckpt) if vs_hf else {}
        except BaseException:
            first.result().close()
            raise
    hf_out, bw_out = {}, {}
    for i, dt in enumerate(s.dtypes):
        log(f"SmolLM2 TP=1 {dt}: engine" + (" vs transformers" if vs_hf else "")
            + (" and matrix-vector bandwidth" if bandwidth else ""))
        other = OtherLoad()
        with first.result() if i == 0 else start(dt) as group:
            hf, bw = measure(group, ckpt, weights, dt, s, vs_hf, bandwidth)
        busy = other.cores()  # the rest of the machine while this dtype ran (0: quiet), once
        if hf:  # the rank has been reaped: its time is ours
            hf_out[dt] = {**hf, "other_processes_cores": busy}
        if bw:
            bw_out[dt] = {**bw, "other_processes_cores": busy}
    return hf_out, bw_out, report(hf_out, bw_out, s)


def report(hf_out: dict, bw_out: dict, s: Settings) -> str:
    parts = []
    if hf_out:
        rows = [[dt, r["ours_tok_s"], r["ours_wall_tok_s"], r["hf_tok_s"], r["ratio"],
                 r["ratio_wall"], r["ratio"] >= TARGETS["engine_vs_hf"],
                 f"{r['greedy_prefix_match']}/{r['tokens']}", r["other_processes_cores"]]
                for dt, r in hf_out.items()]
        parts.append(table(
            f"(b) Engine vs transformers generate: SmolLM2-135M, TP=1, {THREADS} threads, greedy, "
            f"{s.tokens} new tokens forced, {s.reps} interleaved reps, medians; decode "
            "tokens/s (ours: engine decode steps; 'wall': between streamed tokens; transformers: "
            "between its streamed tokens)",
            ["dtype", "ours tok/s", "ours wall tok/s", "transformers tok/s", "ratio",
             "ratio (wall)", f">= {TARGETS['engine_vs_hf']}", "same greedy prefix",
             "other procs cores"], rows))
    if bw_out:
        rows = [[dt, r["weight_bytes_per_token"] / 1e6, r["decode_ms_per_token"],
                 r["decode_gb_s"], r["gemv_gb_s"], r["fraction"], r["best_gemv_gb_s"],
                 r["fraction_of_best"],
                 r["fraction_of_best"] >= TARGETS["bandwidth_fraction"], r["other_processes_cores"]]
                for dt, r in bw_out.items()]
        parts.append(table(
            f"(c) Memory bandwidth: weight bytes per decode token (all linear weights + LM head "
            f"rows) / time per token, against a matrix-vector pass over the same matrices: "
            f"F.linear([1, in], W), and the faster of that and the engine's own layouts "
            f"(ladder.native.layouts; the target is judged against this one), {THREADS} threads",
            ["dtype", "MB/token", "decode ms/token", "decode GB/s", "F.linear GB/s", "fraction",
             "best pass GB/s", "fraction of best", f">= {TARGETS['bandwidth_fraction']}",
             "other procs cores"], rows))
    return "\n\n".join(parts)


