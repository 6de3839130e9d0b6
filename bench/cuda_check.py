"""The CUDA path, checked on a GPU machine: NCCL groups, the device KV cache, CUDA-event timing.

Writes a small random Llama checkpoint, runs it as a TP group of one rank on CUDA over NCCL
(`comm=nccl` builds the process group even at TP=1) and on CPU over gloo, for the standard and
ladder schedules, and compares logits and greedy tokens. Prints a table and one JSON line.
These machines have no GPU: run it where one is lent (`python -m bench.cuda_check`).
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    from ladder.engine.local import LocalTPGroup
    from ladder.engine.sampling import SamplingParams
    from ladder.options import GroupOptions
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    rows = [[int(t) for t in torch.randint(0, 512, (n,))] for n in (17, 5, 30)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    results = []
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        for residual in ("standard", "ladder", "ladder:2-3", "parallel"):
            out = {}
            for device, comm in (("cpu", "gloo"), ("cuda", "nccl")):
                with LocalTPGroup(GroupOptions(model=d, tp=1, comm=comm, device=device,
                                               residual=residual, max_seq=128)) as g:
                    logits = g.logits(rows)
                    g.reset_timing()
                    gen = g.generate(rows, [params] * len(rows))
                    tm = g.timing()
                    out[device] = (logits, [o["tokens"] for o in gen], tm, g.info)
            diff = max((a - b).abs().max().item() for a, b in zip(out["cpu"][0], out["cuda"][0]))
            same = out["cpu"][1] == out["cuda"][1]
            tm = out["cuda"][2]
            results.append({"residual": residual, "max_abs_logit_diff": diff,
                            "greedy_equal": same, "cuda_decode_tok_s":
                            tm.decode_tokens / tm.decode_s, "cuda_exposed_s": tm.exposed_s,
                            "cuda_allreduce_bytes": tm.bytes,
                            "interconnect": out["cuda"][3]["interconnect"]})
    print(f"{'residual':<12}{'max |dlogit|':>14}{'greedy equal':>14}{'tok/s':>10}"
          f"{'exposed s':>12}{'bytes':>12}")
    for r in results:
        print(f"{r['residual']:<12}{r['max_abs_logit_diff']:>14.2e}{str(r['greedy_equal']):>14}"
              f"{r['cuda_decode_tok_s']:>10.1f}{r['cuda_exposed_s']:>12.5f}"
              f"{r['cuda_allreduce_bytes']:>12}")
    print(json.dumps({"bench": "cuda_check", "device": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "results": results}))
    return 0 if all(r["greedy_equal"] and r["max_abs_logit_diff"] < 1e-3 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
