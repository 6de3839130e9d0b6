"""The protocol layer without a server: property tests of its conversions (Hypothesis) and the
server settings' checks (keys in the YAML, a file or the environment).

Any JSON body becomes a request or an ApiError(400) that names what is wrong, never another
exception; a request that parses becomes SamplingParams the engine accepts (seeds reduced to
64 bits, every number in its range) or an ApiError(400); the response builders' output is what
the OpenAPI document declares.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy import protocol as P
from deploy import responses as R
from deploy.config import ServerConfig, split_args
from ladder.engine.sampling import SEED_SPACE, SamplingParams

LIMITS = P.Limits(vocab_size=49152, max_seq=2048, max_prompt_chars=100_000,
                  default_max_tokens=16)
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

scalars = (st.none() | st.booleans() | st.text(max_size=20)
           | st.integers(min_value=-2**80, max_value=2**80)
           | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
# request-shaped bodies: the fields we read, each with plausible and hostile values
numbers = (st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
           | st.sampled_from([0, 1, 2, 0.5, 1.0, 2.0, 9, 49152, 2**63, -1]))
fields = {
    "max_tokens": numbers, "max_completion_tokens": numbers, "temperature": numbers,
    "top_p": numbers, "top_k": numbers, "seed": numbers, "n": numbers, "min_tokens": numbers,
    "stop": st.none() | st.text(max_size=300) | st.lists(st.text(max_size=10), max_size=6),
    "stream": st.booleans() | numbers, "ignore_eos": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.none() | st.booleans() | numbers, "echo": st.booleans(),
    "stop_token_ids": st.none() | st.lists(st.integers(min_value=-3, max_value=50_000),
                                           max_size=70),
}
prompts = (st.text(max_size=30) | st.lists(st.text(max_size=5), max_size=3)
           | st.lists(st.integers(min_value=-5, max_value=60_000), max_size=5))
completion_bodies = st.fixed_dictionaries(
    {"model": st.just("m"), "prompt": prompts},
    optional={k: v for k, v in fields.items()})
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"]),
     "content": st.none() | st.text(max_size=20) | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=5)}),
         max_size=2)}), max_size=3)
chat_bodies = st.fixed_dictionaries({"model": st.just("m"), "messages": messages},
                                    optional={k: v for k, v in fields.items()
                                              if k != "echo"})


def through_the_protocol(cls, raw: bytes) -> list[SamplingParams] | P.ApiError:
    """What the server does with a body before it tokenizes: parse, then sampling."""
    try:
        req = P.parse(cls, raw)
        if cls is P.CompletionRequest:
            req.prompt_text_or_ids()
        else:
            [m.text() for m in req.messages]
        return req.sampling(LIMITS, n_prompt=LIMITS.max_seq - 100,
                            default_max=LIMITS.default_max_tokens)
    except P.ApiError as e:
        return e


def check(out, body: dict | None = None) -> None:
    if isinstance(out, P.ApiError):
        assert out.status == 400 and out.message and set(out.body()["error"]) == {
            "message", "type", "param", "code"}
        return
    n = body.get("n", 1) if body else 1
    assert len(out) == n
    for sp in out:  # what the engine receives is in range: no step can overflow on it
        assert 1 <= sp.max_tokens <= 100 and 0 <= sp.min_tokens <= sp.max_tokens
        assert math.isfinite(sp.temperature) and 0 <= sp.temperature <= 2
        assert 0 < sp.top_p <= 1 and 0 <= sp.top_k <= LIMITS.vocab_size
        assert sp.seed is None or 0 <= sp.seed < SEED_SPACE
        assert len(sp.stop) <= P.MAX_STOPS and all(0 < len(s) <= P.MAX_STOP_CHARS
                                                   for s in sp.stop)
    if body and body.get("stop_token_ids") is not None:  # every id in the vocabulary, passed on
        assert all(sp.stop_token_ids == tuple(body["stop_token_ids"]) for sp in out)
    assert all(0 <= t < LIMITS.vocab_size for sp in out for t in sp.stop_token_ids)
    if body and body.get("seed") is not None:  # any integer, reduced modulo 2**64 per choice
        assert [sp.seed for sp in out] == [(int(body["seed"]) + i) % SEED_SPACE
                                           for i in range(n)]


@FAST
@given(json_values)
def test_any_json_is_a_request_or_a_400(value):
    for cls in (P.CompletionRequest, P.ChatRequest):
        check(through_the_protocol(cls, json.dumps(value).encode()))


@FAST
@given(st.binary(max_size=64))
def test_any_bytes_are_a_request_or_a_400(raw):
    check(through_the_protocol(P.CompletionRequest, raw))


@FAST
@given(completion_bodies)
def test_completion_bodies(body):
    check(through_the_protocol(P.CompletionRequest, json.dumps(body).encode()), body)


@FAST
@given(chat_bodies)
def test_chat_bodies(body):
    check(through_the_protocol(P.ChatRequest, json.dumps(body).encode()), body)


@FAST
@given(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000]),
       st.sampled_from(["temperature", "top_p", "seed", "n", "max_tokens"]))
def test_non_finite_and_oversized_numbers_are_refused(literal, name):
    raw = f'{{"model": "m", "prompt": "x", "{name}": {literal}}}'.encode()
    out = through_the_protocol(P.CompletionRequest, raw)
    assert isinstance(out, P.ApiError) and out.status == 400


@FAST
@given(st.lists(st.fixed_dictionaries({"text": st.text(max_size=10),
                                       "finish_reason": st.sampled_from(
                                           ["stop", "length", "cancelled"])}),
                min_size=1, max_size=3), st.booleans())
def test_responses_are_what_the_document_declares(choices, chat):
    use = R.usage(3, 4)
    body = R.completion_body("id-1", "m", 1, choices, use, chat)
    (R.ChatCompletion if chat else R.Completion).model_validate(body)
    R.ErrorResponse.model_validate(P.ApiError(400, "x", param="n").body())


def test_api_keys_must_be_a_list_of_keys(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="api_keys: 'sk-secret' is not a list of strings"):
        ServerConfig.from_dict({"api_keys": "sk-secret"})  # not the set of its characters
    for bad in ([""], [" sk"], ["sk", 5]):
        with pytest.raises(ValueError, match="api_keys"):
            ServerConfig.from_dict({"api_keys": bad})
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsk-file-1\n\n  sk-file-2  \n")
    monkeypatch.setenv("LADDER_KEYS", "sk-env-1, sk-env-2 sk-file-1")
    cfg, _ = split_args({"api_keys": ["sk-yaml"], "api_keys_file": str(keys),
                         "api_keys_env": "LADDER_KEYS", "num_replicas": 1})
    got = cfg.resolve_keys()
    assert got.api_keys == ["sk-yaml", "sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2"]
    assert got.api_keys_file == got.api_keys_env == ""  # the replica gets keys, not places
    with pytest.raises(ValueError, match=f"api_keys_file: cannot read {tmp_path}/none"):
        ServerConfig(api_keys_file=str(tmp_path / "none")).resolve_keys()
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="api_keys_file: .* holds no key"):
        ServerConfig(api_keys_file=str(tmp_path / "empty")).resolve_keys()
    with pytest.raises(ValueError, match="api_keys_env: .*LADDER_NONE is unset or empty"):
        ServerConfig(api_keys_env="LADDER_NONE").resolve_keys()


def test_settings_name_the_field():
    for args, field in (({"tp": "2"}, "tp"), ({"max_body_bytes": 0}, "max_body_bytes"),
                        ({"queue_limit": -1}, "queue_limit"), ({"metrics": 1}, "metrics"),
                        ({"n_slots": True}, "n_slots"), ({"nope": 1}, "unknown")):
        with pytest.raises(ValueError, match=field):
            ServerConfig.from_dict(args)
