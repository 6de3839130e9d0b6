"""Log-probabilities computed on the vocabulary slices (ladder.engine.logprobs): each generated
token's log-prob and its most likely alternatives equal transformers' log_softmax of the same
model at TP 1, 2 and 3 (standard plan), and TP=1's for a ladder plan; greedy and sampled rows
alike; and through the HTTP API in OpenAI's shapes (completions, chat, streaming)."""

from __future__ import annotations

import json

import openai
import pytest
import requests
import torch
from local_api import AUTH, KEY, serving_locally

from ladder.engine.local import LocalTPGroup
from ladder.engine.logprobs import token_logprobs
from ladder.engine.sampling import SamplingParams
from ladder.engine.vocab import Shard
from ladder.links.base import NoComm
from ladder.options import GroupOptions

PROMPTS = [[5, 70, 71, 72, 33, 90], [1, 2, 3, 80]]
K = 5


def test_one_slice_equals_log_softmax():
    x = torch.randn(4, 300)
    tok = torch.tensor([3, 250, 7, 99])
    got = token_logprobs(x, tok, [K, -1, 0, 20], Shard(0, 1, 0, 300, 300, NoComm()))
    ref = torch.log_softmax(x.double(), -1)
    assert got[1] is None and got[2].top == ()
    for i in (0, 2, 3):
        assert got[i].logprob == pytest.approx(ref[i, tok[i]].item(), abs=1e-5)
    top = ref[3].topk(20)
    assert [t for t, _ in got[3].top] == top.indices.tolist()
    assert [v for _, v in got[3].top] == pytest.approx(top.values.tolist(), abs=1e-5)


def _reference(model_path, prompt, tokens) -> torch.Tensor:
    """transformers' log_softmax at each generated position: [len(tokens), V]."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].double()
    return torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) + len(tokens) - 1]


def _generate(model, tp, residual, params):
    with LocalTPGroup(GroupOptions(model=str(model), tp=tp, residual=residual, n_slots=4,
                                   max_seq=64)) as g:
        return g.generate(PROMPTS, params)


SAMPLED = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=K),
           SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True,
                          logprobs=K)]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_logprobs_equal_transformers(tiny_llama, tp):
    """A greedy row and a sampled one in the same steps, at tp; K alternatives each."""
    outs = _generate(tiny_llama, tp, "standard", SAMPLED)
    for prompt, out in zip(PROMPTS, outs):
        ref = _reference(tiny_llama, prompt, out["tokens"])
        assert len(out["logprobs"]) == len(out["tokens"]) == 6
        for pos, (tok, (chosen, top)) in enumerate(zip(out["tokens"], out["logprobs"])):
            assert chosen.id == tok and chosen.text == f"token_id:{tok}"  # no tokenizer
            assert chosen.logprob == pytest.approx(ref[pos, tok].item(), abs=1e-4)
            want = ref[pos].topk(K)
            assert [t.logprob for t in top] == pytest.approx(want.values.tolist(), abs=1e-4)
            assert {t.id for t in top} == set(want.indices.tolist())


def test_ladder_logprobs_equal_tp1(tiny_llama):
    ref = _generate(tiny_llama, 1, "ladder", SAMPLED)
    for tp in (2, 3):
        for a, b in zip(_generate(tiny_llama, tp, "ladder", SAMPLED), ref):
            assert a["tokens"] == b["tokens"]
            for (ca, ta), (cb, tb) in zip(a["logprobs"], b["logprobs"]):
                assert ca.logprob == pytest.approx(cb.logprob, abs=1e-4)
                assert [t.logprob for t in ta] == pytest.approx([t.logprob for t in tb],
                                                                abs=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_logprobs_equal_transformers(tiny_llama, tp):
    """Each prompt token after the first, from the position before it (echo with logprobs)."""
    params = [SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=2,
                             prompt_logprobs=3), SamplingParams(max_tokens=2, temperature=0)]
    outs = _generate(tiny_llama, tp, "standard", params)
    assert outs[1]["prompt_logprobs"] is None and outs[1]["logprobs"] is None
    prompt = PROMPTS[0]
    got = outs[0]["prompt_logprobs"]
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)
    assert [s.id for s, _ in got] == prompt and got[0][0].logprob is None and got[0][1] is None
    for pos, (s, top) in enumerate(got[1:]):
        assert s.logprob == pytest.approx(ref[pos, prompt[pos + 1]].item(), abs=1e-4)
        assert [t.logprob for t in top] == pytest.approx(ref[pos].topk(3).values.tolist(),
                                                         abs=1e-4)


def test_a_tokens_bytes_are_its_own(smollm2_tokenizer):
    """"日本 é" is 4 SmolLM2 tokens, the first two halves of 日 (each alone decodes to a
    replacement character): each token's bytes are its own, and in order they are the text's."""
    from ladder.engine.guided import Guide
    from ladder.engine.logprobs import TokenLogprobs, scored
    ids = smollm2_tokenizer.encode("日本 é", add_special_tokens=False)
    guide = Guide(smollm2_tokenizer, 49152, (2,))
    assert [smollm2_tokenizer.decode([i]) for i in ids[:2]] == ["\ufffd"] * 2
    assert b"".join(guide.token_bytes(i) for i in ids) == "日本 é".encode()
    s, top = scored(TokenLogprobs(-0.5, ((ids[1], -0.7),)), ids[0],
                    lambda i: smollm2_tokenizer.decode([i]), guide.token_bytes)
    assert (s.text, s.raw, top[0].raw) == ("\ufffd", "日".encode()[:2], "日".encode()[2:])


def test_the_api_reports_each_tokens_own_bytes(api, smollm2_tokenizer):
    """A bias of +100 on the first half of 日 (e6 97, alone a replacement character) makes
    every greedy token that one: each entry carries those two bytes, not the replacement
    character's (ef bf bd), and the answer's bytes are theirs in order."""
    half = smollm2_tokenizer.encode("日本", add_special_tokens=False)[0]
    client = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, timeout=60)
    ch = client.chat.completions.create(model="tiny-chat", max_tokens=4, logprobs=True,
                                        temperature=0, logit_bias={str(half): 100},
                                        extra_body={"ignore_eos": True},
                                        messages=[{"role": "user", "content": "Hi"}])
    content = ch.choices[0].logprobs.content
    assert [(t.token, t.bytes) for t in content] == [("\ufffd", [0xE6, 0x97])] * 4


@pytest.fixture(scope="module")
def api(tiny_chat):
    with serving_locally(tiny_chat) as url:
        yield url


def test_the_api_returns_openai_shapes(api):
    client = openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0, timeout=60)
    c = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, logprobs=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(3 <= len(d) <= 4 and tok in d for d, tok in zip(lp.top_logprobs, lp.tokens))
    # greedy: the chosen token is the most likely one
    assert all(d[tok] == max(d.values()) for d, tok in zip(lp.top_logprobs, lp.tokens))
    ch = client.chat.completions.create(model="tiny-chat", max_tokens=3, logprobs=True,
                                        top_logprobs=2, extra_body={"ignore_eos": True},
                                        messages=[{"role": "user", "content": "Hi"}])
    content = ch.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    # a token's own bytes: its text's, unless it ends inside a character (then "\ufffd")
    assert all(bytes(t.bytes).decode() == t.token for t in content if "\ufffd" not in t.token)
    plain = client.chat.completions.create(model="tiny-chat", max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert plain.choices[0].logprobs is None
    stream = client.chat.completions.create(model="tiny-chat", max_tokens=3, logprobs=True,
                                            top_logprobs=1, stream=True,
                                            extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": "Hi"}])
    streamed = [t for chunk in stream for ch in chunk.choices if ch.logprobs
                for t in ch.logprobs.content]
    assert len(streamed) == 3 and all(len(t.top_logprobs) == 1 for t in streamed)
    r = requests.post(api + "/v1/completions", headers=AUTH, stream=True, timeout=60,
                      json={"model": "tiny-chat", "prompt": "Hello", "max_tokens": 3,
                            "logprobs": 0, "stream": True, "ignore_eos": True})
    chunks = [json.loads(x[6:]) for x in r.iter_lines() if x and x != b"data: [DONE]"]
    offsets = [o for c in chunks if c["choices"][0]["logprobs"]
               for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert len(offsets) == 3 and offsets == sorted(offsets)


def test_echo_with_logprobs_scores_the_prompt(api):
    """What lm-evaluation-harness's local-completions sends for a loglikelihood request: token
    ids batched as a list of one list, echo, logprobs 1, max_tokens 1."""
    ids = requests.post(api + "/tokenize", headers=AUTH, timeout=60,
                        json={"prompt": "The sky is blue"}).json()["tokens"]
    r = requests.post(api + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny-chat", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
        "temperature": 0, "seed": 1234})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.status_code == 200 and len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    text = requests.post(api + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny-chat", "prompt": "The sky is blue", "echo": True, "logprobs": 1,
        "max_tokens": 1, "temperature": 0}).json()["choices"][0]
    assert text["text"].startswith("The sky is blue")
    assert text["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30},
     "top_logprobs"),
])
def test_bad_logprobs_requests_name_the_field(api, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = requests.post(api + path, headers=AUTH, json={"model": "tiny-chat", **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
