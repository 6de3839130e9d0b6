"""The request fields OpenAI's and vLLM's clients send, through the official `openai` client:
what is not served yet is a 400 naming it (never silently dropped), what changes nothing here
is accepted, an unknown field is refused as OpenAI refuses it; X-Request-Id on every response;
vLLM's /tokenize and /detokenize.

The server: deploy.api over a local TP=2 group of the tiny chat model (test_hardening's).
"""

from __future__ import annotations

import concurrent.futures as cf
import re

import openai
import pytest
import requests
from local_api import AUTH, KEY, serving_locally

from deploy.protocol import NOT_YET

MODEL = "tiny-chat"
MESSAGES = [{"role": "user", "content": "Say hi."}]
# a value of each field that asks for something this server does not do yet
ASKS = {
    "bad_words": ["x"], "functions": [{"name": "f"}], "function_call": "auto", "best_of": 2,
    "suffix": "end", "audio": {"voice": "x"}, "modalities": ["audio"],
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
    "web_search_options": {},
}
COMPLETION_ONLY = {"suffix", "best_of"}  # fields of the legacy completions API alone
CHAT_ONLY = {"functions", "function_call", "audio", "modalities",
             "prediction", "reasoning_effort", "web_search_options"}


@pytest.fixture(scope="module")
def local_api(tiny_chat):
    with serving_locally(tiny_chat) as url:
        yield url


@pytest.fixture(scope="module")
def client(local_api):
    return openai.OpenAI(base_url=local_api + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_every_field_not_served_yet_is_named_in_a_400(client):
    assert set(ASKS) == set(NOT_YET)
    for name, value in ASKS.items():
        for chat in (False, True):
            if name in (CHAT_ONLY if not chat else COMPLETION_ONLY):
                continue
            with pytest.raises(openai.BadRequestError) as e:
                if chat:
                    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                                   extra_body={name: value})
                else:
                    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                              extra_body={name: value})
            err = e.value.body
            assert err["param"] == name and err["code"] == "unsupported_parameter", (name, err)
            assert f"{name} is not supported" in err["message"]


def test_defaults_and_fields_without_effect_are_served(client):
    """What asks for nothing (a penalty of 0, an empty bias, text output, no tools) and what
    OpenAI clients send for their own bookkeeping is a 200."""
    quiet = dict(presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="u-1", seed=1,
                 temperature=0, max_tokens=3)
    c = client.completions.create(model=MODEL, prompt="Hi", best_of=1,
                                  extra_body={"ignore_eos": True, "store": False,
                                              "metadata": {"team": "infra"}}, **quiet)
    assert c.usage.completion_tokens == 3
    ch = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=False,
                                        response_format={"type": "text"}, tool_choice="none",
                                        parallel_tool_calls=True, store=False,
                                        metadata={"team": "infra"}, service_tier="auto",
                                        extra_body={"ignore_eos": True}, **quiet)
    assert ch.usage.completion_tokens == 3


def test_an_unknown_field_is_refused_by_name(client, local_api):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                  extra_body={"temprature": 0.5})
    assert e.value.body["param"] == "temprature" and e.value.body["code"] == "unknown_parameter"
    assert "unrecognized request argument supplied: temprature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # echo is the completions API's
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"echo": True})
    assert e.value.body["param"] == "echo"
    # a message keeps what it does not know: a client replays OpenAI's own responses
    replay = [*MESSAGES, {"role": "assistant", "content": "hi", "refusal": None,
                          "tool_calls": None}, {"role": "user", "content": "again"}]
    r = requests.post(local_api + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": MODEL, "messages": replay, "max_tokens": 2})
    assert r.status_code in (200, 400) and "refusal" not in r.text  # (the template may refuse)


def test_x_request_id_is_echoed_or_made_on_every_response(local_api):
    url = local_api + "/v1/completions"
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    r = requests.post(url, headers={**AUTH, "X-Request-Id": "trace-17/a:b"}, json=body,
                      timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-17/a:b"
    assert r.json()["id"] == "cmpl-trace-17/a:b"
    made = requests.post(url, headers=AUTH, json=body, timeout=60)
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert made.json()["id"] == "cmpl-" + made.headers["x-request-id"]
    for r in (requests.post(url, headers={**AUTH, "X-Request-Id": "e1"}, json={}, timeout=60),
              requests.get(local_api + "/v1/models", headers={"X-Request-Id": "e1"}, timeout=60),
              requests.get(local_api + "/nowhere", headers={"X-Request-Id": "e1"}, timeout=60),
              requests.post(url, headers={**AUTH, "X-Request-Id": "e1"}, timeout=60,
                            json={**body, "stream": True})):
        assert r.headers["x-request-id"] == "e1", (r.status_code, r.text[:200])
    for bad in ("has space", "x" * 129, "caf\u00e9"):
        r = requests.post(url, headers={**AUTH, "X-Request-Id": bad.encode()}, json=body,
                          timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_clients_reusing_a_request_id_each_get_their_own_answer(local_api):
    """The group's ids stay unique when two requests in flight carry the same X-Request-Id."""
    def one(prompt):
        r = requests.post(local_api + "/v1/completions", timeout=120,
                          headers={**AUTH, "X-Request-Id": "same"},
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()["choices"][0]["text"]

    alone = [one(p) for p in ("Once upon", "In a galaxy")]
    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, ["Once upon", "In a galaxy"] * 2))
    assert together == alone * 2


def test_tokenize_and_detokenize(local_api, tiny_chat):
    """vLLM's shapes; the ids are the model's own tokenizer's and chat template's."""
    from ladder.tokenizer import Tokenizer
    tok = Tokenizer.from_folder(tiny_chat)
    def post(path, **body):
        return requests.post(local_api + path, headers=AUTH, json=body, timeout=60)

    text = "Ladder residual overlaps the all-reduce."
    r = post("/tokenize", model=MODEL, prompt=text)
    ids = tok.encode(text)
    assert r.status_code == 200
    assert r.json() == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                        "token_strs": None}
    chat = post("/tokenize", messages=MESSAGES).json()  # model may be left out, as in vLLM
    assert chat["tokens"] == tok.apply_chat_template(MESSAGES)
    assert post("/detokenize", model=MODEL, tokens=ids).json() == {"prompt": text}
    for path, body, param, status in (
            ("/tokenize", {}, "prompt", 400),
            ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt", 400),
            ("/tokenize", {"prompt": "a", "add_special_tokens": False}, "add_special_tokens",
             400),
            ("/tokenize", {"prompt": "a", "model": "other"}, "model", 404),
            ("/tokenize", {"prompt": "a", "extra": 1}, "extra", 400),
            ("/detokenize", {"tokens": [1, 49152]}, "tokens", 400),
            ("/detokenize", {"tokens": [-1]}, "tokens", 400),
            ("/detokenize", {"tokens": "1 2"}, "tokens", 400)):
        r = post(path, **body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    assert requests.post(local_api + "/tokenize", json={"prompt": "a"},
                         timeout=60).status_code == 401


def test_metrics_on_the_api_port(local_api, client):
    """The replica's own series in Prometheus text: what the API measured and the group's."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        r = requests.get(local_api + "/metrics", timeout=60)  # no key, as /health
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {(s.name, s.labels.get("finish_reason") or s.labels.get("kind") or ""): s.value
                for f in text_string_to_metric_families(r.text) for s in f.samples}

    before = scrape()
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, n=2,
                              extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)  # a token whose text is empty (a special one) sends no chunk
    assert chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", extra_body={"nope": 1})
    after = scrape()

    def grew(key) -> float:
        return after.get(key, 0) - before.get(key, 0)
    assert grew(("ladder_generation_tokens_total", "")) == 2 * 4 + 3
    assert grew(("ladder_requests_finished_total", "length")) == 3
    assert grew(("ladder_ttft_seconds_count", "")) == 2  # one first token a request
    assert grew(("ladder_e2e_latency_seconds_count", "")) == 2
    assert grew(("ladder_request_errors_total", "http_400")) == 1
    assert grew(("ladder_decode_tokens_total", "")) >= 2 * 3 + 2
    assert after[("ladder_kv_slots", "")] == 4 and after[("ladder_requests_running", "")] == 0
    assert after[("ladder_link_rtt_seconds", "")] > 0


def test_stop_token_ids(client):
    """vLLM's extension: ids in the vocabulary are passed to the engine (whose stop on them
    test_engine_parts checks), others refused by name."""
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3,
                                  extra_body={"stop_token_ids": [0, 5, 49151]})
    assert r.choices[0].finish_reason in ("stop", "length")
    for bad in ([49152], [-1], list(range(65))):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=3,
                                      extra_body={"stop_token_ids": bad})
        assert e.value.body["param"] == "stop_token_ids"


def test_penalties_and_biases_through_the_api(client, local_api):
    """A bias of +100 decides every greedy token; penalties are taken (their effect on the
    tokens: test_penalties); a bias key that is no token id is refused by name."""
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0,
                                  logit_bias={"42": 100}, presence_penalty=1.0,
                                  frequency_penalty=0.5, extra_body={"ignore_eos": True,
                                                                     "repetition_penalty": 1.3})
    text = requests.post(local_api + "/detokenize", headers=AUTH, timeout=60,
                         json={"tokens": [42] * 4}).json()["prompt"]
    assert r.choices[0].text == text
    # min_p 1 keeps only the likeliest token: a sampled answer is the greedy one
    greedy, kept = (client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, seed=4,
                                              extra_body={"ignore_eos": True, **kw})
                    for kw in ({"temperature": 0}, {"temperature": 1.0, "min_p": 1.0}))
    assert kept.choices[0].text == greedy.choices[0].text
    for bad in ({"logit_bias": {"49152": 1}}, {"logit_bias": {"x": 1}},
                {"presence_penalty": 3}, {"repetition_penalty": 0}, {"min_p": 1.5}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=bad)
        assert e.value.body["param"] == next(iter(bad)), bad


def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(client):
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`: 0 the first time, the shared
    start's full blocks (of 16 tokens) the next, whole and streamed; the answer is the same."""
    system = "You are a careful assistant who answers in one short sentence. " * 4
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a color."}]
    ask = dict(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    first = client.chat.completions.create(**ask)
    assert first.usage.prompt_tokens > 48 and first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(**ask)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and again.usage.prompt_tokens - 16 <= cached < \
        again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    other = dict(ask, messages=[msgs[0], {"role": "user", "content": "Name a fruit."}])
    chunks = list(client.chat.completions.create(**other, stream=True,
                                                 stream_options={"include_usage": True}))
    used = chunks[-1].usage
    assert used.prompt_tokens_details.cached_tokens >= 48  # the system prompt's blocks
    c = client.completions.create(model=MODEL, prompt=system + "Go.", max_tokens=2)
    assert c.usage.prompt_tokens_details.cached_tokens == 0  # no chat template: other tokens
