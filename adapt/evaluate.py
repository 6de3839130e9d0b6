"""`ladder eval`: how close a ladder model is to its standard parent.

Three figures: held-out perplexity (beside the parent's on the same rows), top-1 next-token
agreement with the parent on those rows, and greedy-continuation agreement on a set of prompts
(the share of each continuation's tokens before the first one that differs from the parent's).
The model is a checkpoint under a residual plan, or an adapted folder, whose parent is the
checkpoint it records; an unadapted model's parent is itself under the standard plan.
"""

from __future__ import annotations

import torch

from adapt.data import DEFAULT_DATA, prepare
from adapt.distill import held_out_sums, summarize
from ladder.loaders import load_shard, open_checkpoint
from ladder.model.config import ResidualPlan
from ladder.model.tp import ShardSpec
from ladder.model.transformer import Transformer, build_model

# The README's example: a question SmolLM2-135M itself answers right ("What is tensor
# parallelism?" was the example once; the 135M parent gets it wrong, so no adaptation can).
README_PROMPT = "What is parallel computing?"
PROMPTS = (  # the README's example first
    README_PROMPT,
    "What is tensor parallelism?",
    "Explain in two sentences why overlapping communication with compute speeds up "
    "tensor-parallel inference.",
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "How do I read a file line by line in Python?",
    "What does the Python `with` statement do?",
    "Give three tips for writing clear documentation.",
    "Name the planets of the solar system.",
)


def _load(ckpt, plan: ResidualPlan, state=None) -> Transformer:
    spec = ShardSpec.make(ckpt.config, 0, 1)
    return build_model(ckpt.config, spec, plan, state or load_shard(ckpt, spec, torch.float32))


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens by full forwards (no cache: the reference path, exact)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def evaluate(model: str, residual: str | None = None, *, parent: str | None = None,
             data: str = str(DEFAULT_DATA), seq_len: int = 256, rows: int = 16,
             held_out: float = 0.05, prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 32,
             threads: int = 0) -> dict:
    """The three figures (and what they were measured on) as a dict."""
    if threads:
        torch.set_num_threads(threads)
    ckpt = open_checkpoint(model)
    plan = ckpt.plan(residual)
    n = ckpt.config.n_layers
    parent = parent or (ckpt.adapted or {}).get("parent") or model
    spec = ShardSpec.make(ckpt.config, 0, 1)
    state = load_shard(ckpt, spec, torch.float32)
    student = _load(ckpt, plan, state)
    if parent == model:
        reference = _load(ckpt, ResidualPlan(), state)
    else:
        pck = open_checkpoint(parent)
        if pck.config.vocab_size != ckpt.config.vocab_size:
            raise ValueError(f"{pck.path}: the parent's vocabulary ({pck.config.vocab_size}) "
                             f"differs from {ckpt.path}'s ({ckpt.config.vocab_size})")
        reference = _load(pck, ResidualPlan())
    tok = ckpt.tokenizer()
    packed = prepare(data, tok, seq_len=seq_len, max_seq_len=ckpt.config.max_seq_len,
                     held_out=held_out, model=str(ckpt.path), parts=("held_out",))
    x = torch.from_numpy(packed.held_out[:rows]).long()
    figures = summarize(held_out_sums(student, reference, x, batch=4))
    conts = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}]) \
            if tok.chat_template else tok.encode(p)
        a, b = greedy(student, ids, max_tokens), greedy(reference, ids, max_tokens)
        same = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))
        conts.append({"prompt": p, "agree": same / max_tokens, "text": tok.decode(a),
                      "parent_text": tok.decode(b)})
    return {"model": model, "residual": plan.spec(n), "parent": parent,
            "adapted": ckpt.adapted is not None, "data": data, "rows": len(x),
            "seq_len": seq_len, **figures,
            "greedy_agree": sum(c["agree"] for c in conts) / max(len(conts), 1),
            "greedy_exact": sum(c["agree"] == 1.0 for c in conts), "prompts": conts,
            "max_tokens": max_tokens}


def table(r: dict) -> str:
    rows = [("model", f"{r['model']} ({r['residual']}{', adapted' if r['adapted'] else ''})"),
            ("parent", f"{r['parent']} (standard)"),
            ("held-out rows", f"{r['rows']} x {r['seq_len']} tokens from {r['data']}"),
            ("perplexity", f"{r['ppl']:.3f} (parent {r['parent_ppl']:.3f}, "
                           f"ratio {r['ppl_ratio']:.3f})"),
            ("KL to parent / token", f"{r['held_out_kl']:.4f}"),
            ("top-1 agreement", f"{r['top1']:.3f}"),
            ("greedy agreement", f"{r['greedy_agree']:.3f} ({r['greedy_exact']} of "
                                 f"{len(r['prompts'])} continuations of {r['max_tokens']} "
                                 "tokens identical)")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
