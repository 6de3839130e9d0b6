"""Run by bench/llamacpp_compare.py in bench/.llamacpp-venv (llama-cpp-python's low-level API,
nothing of ours imported): greedy decode of K copies of a prompt's token ids, all K sequences
in each llama_decode call (as llama.cpp's own server batches parallel slots), exactly N new
tokens each. Prints one JSON line: per run, each stream's token timestamps (perf_counter) and
tokens, and the start."""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np


def main() -> int:
    args = json.loads(sys.argv[1])
    path, prompt, n, threads = args["gguf"], args["prompt"], args["tokens"], args["threads"]
    ks = args["streams"]
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    kmax = max(ks)
    cp = L.llama_context_default_params()
    cp.n_ctx = kmax * (len(prompt) + n + 16)
    cp.n_batch = cp.n_ubatch = max(512, kmax * len(prompt))
    cp.n_seq_max = kmax
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    batch = L.llama_batch_init(cp.n_batch, 0, kmax)

    def fill(rows: list[tuple[int, int, int, bool]]) -> None:
        for i, (tok, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def greedy(i: int) -> int:
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                         shape=(n_vocab,)).argmax())

    def run(k: int, n_new: int) -> dict:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start = time.perf_counter()
        p = len(prompt)
        fill([(t, j, s, j == p - 1) for s in range(k) for j, t in enumerate(prompt)])
        last = [greedy(s * p + p - 1) for s in range(k)]
        stamps = [[time.perf_counter()] for _ in range(k)]
        tokens = [[t] for t in last]
        for step in range(n_new - 1):
            fill([(last[s], p + step, s, True) for s in range(k)])
            last = [greedy(s) for s in range(k)]
            now = time.perf_counter()
            for s in range(k):
                stamps[s].append(now)
                tokens[s].append(last[s])
        return {"start": start, "stamps": stamps, "tokens": tokens}

    run(1, 8)  # warm-up
    out = {"version": L.__version__, "n_vocab": n_vocab,
           "runs": {str(k): run(k, n) for k in ks}}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
