"""One request must never take a TP group down; bad input gets a 4xx, never a 5xx.

The model: 2 layers with SmolLM2's tokenizer and a chat template that refuses what real ones
refuse (`tiny_chat`), TP=2 over shared memory, an API key. The HTTP API (`deploy.api`) runs over
the serving contract, so most of this runs it over a local group (uvicorn, no Ray): every hostile
probe of `bench.hostile` (no 5xx, each followed by a request that succeeds) and a schema-driven
fuzz of the whole API from its own `/openapi.json` (schemathesis: no 5xx, every response as the
document declares it, the group answering afterwards). The Serve deployment on the real
three-node Ray cluster adds: `/health` without and with a key (no collective per call), the
document through Serve's proxy, bodies past the limit through the proxy, and a rank 0 that dies
(503 with Retry-After until Serve has replaced the replica, never a 500).
"""

from __future__ import annotations

import json
import time

import pytest
import ray
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from local_api import AUTH, KEY, MAX_PROMPT_CHARS, SETTINGS, serving_locally

from bench.hostile import probes, send
from ladder.links.factory import free_port


@pytest.fixture(scope="module")
def local_api(tiny_chat):
    with serving_locally(tiny_chat) as url:
        yield url


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_chat):
    from ray import serve

    from deploy.server import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        serve.run(build_app({**SETTINGS, "model": str(tiny_chat), "num_replicas": 1,
                             "health_check_period_s": 2, "health_check_timeout_s": 15}),
                  name="hardening", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def small(url: str) -> requests.Response:
    return requests.post(url + "/v1/completions", headers=AUTH, timeout=60,
                         json={"model": "tiny-chat", "prompt": "Hello", "max_tokens": 2})


def is_openai_error(body: bytes) -> bool:
    err = json.loads(body).get("error")
    return isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"} \
        and isinstance(err["message"], str) and err["message"]


PROBES = probes("tiny-chat", max_prompt_chars=MAX_PROMPT_CHARS)


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_a_hostile_request_gets_a_4xx_and_the_group_serves_on(local_api, probe):
    app = local_api
    status, body, headers = send(app, probe, KEY)
    assert status in probe.statuses, (status, body[:300])
    if status >= 400:
        assert is_openai_error(body), body[:300]
    r = small(app)  # the next request is served as before
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_stream_is_validated_before_its_first_byte(local_api):
    app = local_api
    """A stream the group refuses is an HTTP error, not a 200 whose events end in an error."""
    r = requests.post(app + "/v1/completions", headers=AUTH, stream=True, timeout=60,
                      json={"model": "tiny-chat", "prompt": [3, 49152], "stream": True})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    ok = requests.post(app + "/v1/completions", headers=AUTH, stream=True, timeout=60,
                       json={"model": "tiny-chat", "prompt": "Hi", "stream": True,
                             "max_tokens": 3, "ignore_eos": True})
    lines = [x for x in ok.iter_lines() if x]
    assert ok.status_code == 200 and lines[-1] == b"data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_health_is_liveness_without_a_key_and_details_with_one(app):
    bare = requests.get(app + "/health", timeout=30)
    assert bare.status_code == 200 and bare.json() == {"status": "ok"}
    wrong = requests.get(app + "/health", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.json() == {"status": "ok"}
    full = requests.get(app + "/health", headers=AUTH, timeout=30).json()
    assert full["status"] == "ok" and full["tp"] == 2 and full["interconnect"] == "shm"
    assert full["group"].startswith("tiny-chat-") and full["namespace"]
    assert 0 <= full["checked_s_ago"] < 60  # the last periodic check, not one per call
    before = requests.get(app + "/stats", headers=AUTH, timeout=30).json()["steps_total"]
    for _ in range(20):
        requests.get(app + "/health", timeout=30)
    after = requests.get(app + "/stats", headers=AUTH, timeout=30).json()["steps_total"]
    assert after == before  # /health ran no step on the group


def test_the_openapi_document_declares_every_body(app):
    doc = requests.get(app + "/openapi.json", timeout=30).json()
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatRequest")):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert {"200", "400", "401", "413", "503"} <= set(op["responses"])
        assert "text/event-stream" in op["responses"]["200"]["content"]
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["temperature"]["maximum"] == 2 and props["n"]["maximum"] == 8


def fuzz_cases(url: str):
    """(operation label, generation mode, Hypothesis strategy of its cases) for every operation
    of the server's own document: schema-valid bodies and schema-breaking ones."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in schemathesis.GenerationMode:
            if mode is schemathesis.GenerationMode.NEGATIVE and not op.body:
                continue  # a route without parameters has nothing to break
            yield op.label, mode.value, op.as_strategy(generation_mode=mode)


def test_fuzz_the_api_from_its_own_schema(local_api):
    """No 5xx; every status, content type, header and body as the document declares it (every
    4xx an OpenAI error body). A schema-valid body may still be refused (a prompt past the
    context), so only schema-breaking ones must be. The same examples every run."""
    seen: dict[str, set[str]] = {}
    app = local_api
    for label, mode, strategy in fuzz_cases(app):
        @given(case=strategy)
        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def one(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "tiny-chat"  # the served one: else every body is a 404
            kw = case.as_transport_kwargs(base_url=app, headers=AUTH)
            r = requests.request(**kw, timeout=120)
            what = "template" if "chat template refused" in r.text else str(r.status_code)
            seen.setdefault(f"{label} {mode}", set()).add(what)
            case.validate_response(r, headers=AUTH, transport_kwargs=kw, excluded_checks=[
                schemathesis.checks.positive_data_acceptance])
        one()
    # the fuzz reached generation (or, for chats, the template on rank 0), and was refused
    assert "200" in seen["POST /v1/completions positive"], seen
    assert {"200", "template"} & seen["POST /v1/chat/completions positive"], seen
    assert all(seen[f"POST {p} negative"] == {"400"}
               for p in ("/v1/completions", "/v1/chat/completions")), seen


def test_the_group_answers_after_the_fuzz(local_api):
    assert small(local_api).status_code == 200
    assert requests.get(local_api + "/health", timeout=30).json() == {"status": "ok"}


LIMIT_PROBES = [p for p in PROBES if p.statuses == (413,)]


@pytest.mark.parametrize("probe", LIMIT_PROBES, ids=[p.name for p in LIMIT_PROBES])
def test_a_body_past_the_limit_through_serves_proxy(app, probe):
    status, body, _ = send(app, probe, KEY)
    assert status == 413 and is_openai_error(body), body[:300]
    assert small(app).status_code == 200


def test_a_dead_rank_0_is_a_503_with_retry_after_until_replaced(app):
    h = requests.get(app + "/health", headers=AUTH, timeout=30).json()
    old = h["group"]
    ray.kill(ray.get_actor(f"{old}-rank0", namespace=h["namespace"]), no_restart=True)
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        r = small(app)
        seen.append(r.status_code)
        if r.status_code == 503:
            assert r.headers.get("retry-after") and is_openai_error(r.content)
        elif r.status_code == 200:
            now = requests.get(app + "/health", headers=AUTH, timeout=30).json()
            if now.get("group") != old:
                break
        else:
            pytest.fail(f"{r.status_code} while the group was replaced: {r.text[:300]}")
        time.sleep(0.5)
    assert 503 in seen and seen[-1] == 200, seen
