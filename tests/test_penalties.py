"""Penalties and biases on the vocabulary slices (ladder.engine.penalties): greedy tokens equal
a reference that applies them to transformers' full logits (vLLM's definitions) at TP 1, 2 and
3 (greedy and penalized rows in one batch with rows without them), and a seed draws the same
tokens at every TP size with them on (and with min_p, whose likeliest token is found across the
slices)."""

from __future__ import annotations

import torch

from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.options import GroupOptions

PROMPTS = [[5, 70, 71, 72, 33, 90, 70, 71], [1, 2, 3, 80, 81]]
N = 10
SETTINGS = [dict(presence_penalty=1.5), dict(frequency_penalty=0.8),
            dict(repetition_penalty=1.8), dict(presence_penalty=-0.5, frequency_penalty=0.4,
                                               repetition_penalty=1.3,
                                               logit_bias=((17, 3.0), (70, -2.5)))]


def reference(hf, prompt: list[int], s: dict) -> list[int]:
    """Greedy decoding with the penalties applied to the full logits, one token at a time."""
    out: list[int] = []
    for _ in range(N):
        with torch.no_grad():
            x = hf(torch.tensor([prompt + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64),
                                minlength=x.numel()).float()
        rep = s.get("repetition_penalty", 1.0)
        seen = torch.zeros_like(x, dtype=torch.bool)
        seen[torch.tensor(prompt)] = True
        seen |= counts > 0
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - s.get("presence_penalty", 0.0) * (counts > 0) \
            - s.get("frequency_penalty", 0.0) * counts
        for t, b in s.get("logit_bias", ()):
            x[t] += b
        out.append(int(x.argmax()))
    return out


def run(model, tp: int, prompts: list[list[int]], params: list[SamplingParams]
        ) -> list[list[int]]:
    with LocalTPGroup(GroupOptions(model=str(model), tp=tp, n_slots=8, max_seq=64)) as g:
        return [o["tokens"] for o in g.generate(prompts, params)]


SAMPLED = [SamplingParams(max_tokens=N, temperature=1.0, seed=11, ignore_eos=True,
                          frequency_penalty=0.7, repetition_penalty=1.2, logit_bias=((33, 2.0),)),
           SamplingParams(max_tokens=N, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True,
                          presence_penalty=1.0),
           SamplingParams(max_tokens=N, temperature=1.2, min_p=0.1, seed=7, ignore_eos=True)]


def test_penalties_at_every_tp(tiny_llama):
    """One batch a TP size: a greedy row per setting, one without any (as is), and two sampled
    rows with penalties. Greedy rows equal the reference; the sampled rows' tokens are the same
    at every TP size."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    greedy = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, **s)
              for s in SETTINGS] + [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)]
    prompts = [PROMPTS[0]] * len(SETTINGS) + [PROMPTS[1]] * 3
    want = [reference(hf, PROMPTS[0], s) for s in SETTINGS] + [reference(hf, PROMPTS[1], {})]
    sampled = {}
    for tp in (1, 2, 3):
        got = run(tiny_llama, tp, prompts, greedy + SAMPLED)
        assert got[:len(want)] == want, tp
        sampled[tp] = got[len(want):]
    assert sampled[2] == sampled[1] and sampled[3] == sampled[1]


def test_a_large_bias_decides():
    """+100 on a token makes every greedy step take it; the unbiased row is untouched."""
    from ladder.engine.penalties import History, Penalties
    from ladder.engine.vocab import Shard
    from ladder.links.base import NoComm
    h = History(2, Shard(0, 1, 0, 50, 50, NoComm()), torch.device("cpu"))
    h.update([[1, 2, 3], [4]], [0, 1], [0, 0])
    x = torch.randn(2, 50)
    got = h.apply(x.clone(), [0, 1], Penalties([0.0, 0.0], [0.0, 0.0], [1.0, 1.0],
                                               [(0, 7, 100.0)]))
    assert got[0].argmax() == 7 and torch.equal(got[1], x[1])
    assert Penalties.decode(Penalties([1.5, 0.0], [0.0, 2.0], [1.0, 1.1],
                                      [(1, 9, -3.25)]).encode(), 2) == \
        Penalties([1.5, 0.0], [0.0, 2.0], [1.0, 1.1], [(1, 9, -3.25)])
