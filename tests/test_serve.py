"""The Serve application on the real three-node Ray cluster, through the official openai client.

One app (SmolLM2, TP=2 partial ladder, API key on) serves: completions and chat, streaming and
not; every bad input gets a 4xx with an OpenAI-style body; 32 concurrent streaming clients get
what each gets alone; a client that disconnects frees its slot; autoscaling goes 1 -> 2 -> 1
whole TP groups; a killed shard worker makes its replica fail Serve's health check, Serve
replaces it and requests succeed again; `ladder serve` says why a replica did not start (that
it serves and stops cleanly on Ctrl-C is tests/test_soak.py's).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request

import pytest
import ray
from openai import OpenAI

from bench.serve_proc import ladder_serve, write_config
from ladder.links.factory import free_port

KEY = "sk-test-ladder"
APP_ARGS = {
    "model": "smollm2", "model_name": "smollm2", "tp": 2, "residual": "ladder:24-29",
    "n_slots": 8, "max_seq": 512, "threads": 1, "api_keys": [KEY],
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                           "upscale_delay_s": 2, "downscale_delay_s": 8,
                           "look_back_period_s": 12},  # > Serve's 10 s metrics push
    "health_check_period_s": 2, "health_check_timeout_s": 15,
}


@pytest.fixture(scope="module")
def server(ray_cluster):
    from ray import serve

    from deploy.server import build_app
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                proxy_location="HeadOnly")  # one proxy: every node here shares the address
    try:
        serve.run(build_app(dict(APP_ARGS)), name="ladder", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture
def client(server):
    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, body, key: str | None = KEY) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def get(url: str, key: str | None = KEY) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_completions_and_chat(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    r = client.completions.create(model="smollm2", prompt="The three primary colours are",
                                  max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The three primary colours are", max_tokens=12,
        temperature=0, stream=True))
    assert streamed == r.choices[0].text  # same greedy text, streamed or not

    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=10,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # stop strings, seeds and n
    s = client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=20,
                                  temperature=0, stop=[" 6"])
    assert " 6" not in s.choices[0].text and s.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="smollm2", prompt="Once upon a time",
                                      max_tokens=8, temperature=1.0, seed=7, n=2)
            for _ in range(2))
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2


BAD = [
    (b"{not json", 400, None),
    ({"model": "smollm2"}, 400, "prompt"),
    ({"model": "smollm2", "prompt": 5}, 400, "prompt"),
    ({"model": "smollm2", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ({"model": "smollm2", "prompt": ""}, 400, "prompt"),
    ({"model": "smollm2", "prompt": "word " * 600}, 400, "prompt"),
    ({"model": "smollm2", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "smollm2", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "smollm2", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": "smollm2", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "smollm2", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "smollm2", "prompt": "x", "n": 1000}, 400, "n"),
    ({"model": "smollm2", "prompt": [3, 99999999]}, 400, None),
]


def test_models_shows_the_predicted_step_beside_the_measured(client, server):
    """/v1/models: `ladder plan`'s decode step for this group (SmolLM2 TP=2 over shm on this
    CPU) beside the median of the last minute's steps at the same batch size. No time is
    asserted: only that both exist and that the model is not off by an order of magnitude."""
    for _ in range(3):  # with two replicas, /v1/models may reach the one that did not serve
        client.completions.create(model="smollm2", prompt=[5, 6, 7], max_tokens=16,
                                  temperature=0, extra_body={"ignore_eos": True})
        code, body = get(server + "/v1/models")
        assert code == 200, body
        perf = body["data"][0]["performance"]
        if perf["decode_step"]["1"]["steps"]:
            break
    assert perf["prediction"].startswith("predicted decode step"), perf
    one = perf["decode_step"]["1"]
    assert one["steps"] >= 15 and one["predicted_ms"] > 0 and one["measured_ms"] > 0, perf
    assert 0.1 < one["predicted_ms"] / one["measured_ms"] < 10, perf


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_an_openai_error(server, body, status, param):
    code, err, _ = post(server + "/v1/completions", body)
    assert code == status
    assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["message"]
    if param:
        assert err["error"]["param"] == param


def test_bad_chat_and_auth(server):
    code, err, _ = post(server + "/v1/chat/completions", {"model": "smollm2", "messages": []})
    assert code == 400 and err["error"]["param"] == "messages"
    code, err, _ = post(server + "/v1/chat/completions",
                        {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]})
    assert code == 400
    code, err, _ = post(server + "/v1/completions", {"model": "smollm2", "prompt": "x"}, key=None)
    assert code == 401 and err["error"]["type"] == "authentication_error"
    code, _, _ = post(server + "/v1/completions", {"model": "smollm2", "prompt": "x"},
                      key="sk-wrong")
    assert code == 401
    code, body, _ = post(server + "/v1/completions",
                         {"model": "smollm2", "prompt": "still serving", "max_tokens": 3,
                          "ignore_eos": True})
    assert code == 200 and body["usage"]["completion_tokens"] == 3
    code, h = get(server + "/health", key=None)
    assert code == 200 and h == {"status": "ok"}  # liveness only without a key
    code, h = get(server + "/health")
    assert code == 200 and h["status"] == "ok" and h["interconnect"] == "shm"


def test_disconnect_frees_the_slot(server):
    import requests
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    auth = {"Authorization": f"Bearer {KEY}"}
    with requests.post(server + "/v1/completions", json=body, headers=auth, stream=True,
                       timeout=60) as r:
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith(b"data:")
            if lines == 3:
                break  # leaving the block closes the connection mid-stream
    try:  # non-streaming: give up on the response after a moment
        requests.post(server + "/v1/completions", json={**body, "stream": False}, headers=auth,
                      timeout=1.5)
    except requests.Timeout:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        code, st = get(server + "/stats")
        if code == 200 and st["running"] == 0 and st["waiting"] == 0:
            break
        time.sleep(0.5)
    assert st["running"] == 0 and st["waiting"] == 0, st


def test_32_concurrent_streaming_clients(client):
    prompts = [f"Give me fact number {i} about the sea." for i in range(32)]
    lengths = [4 + i % 9 for i in range(32)]

    def one(i: int) -> str:
        out = client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=lengths[i],
                                        temperature=0, stream=True)
        return "".join(c.choices[0].text for c in out)

    alone = {i: client.completions.create(model="smollm2", prompt=prompts[i],
                                          max_tokens=lengths[i], temperature=0).choices[0].text
             for i in range(0, 32, 4)}  # a sample, run alone first
    with cf.ThreadPoolExecutor(32) as pool:
        futs = [pool.submit(one, i) for i in range(32)]
        results, failures = {}, []
        for i, f in enumerate(futs):
            try:
                results[i] = f.result(timeout=300)
            except Exception as e:  # counted: an accepted request must never fail
                failures.append((i, repr(e)))
    assert failures == [] and len(results) == 32
    assert all(results[i] == alone[i] for i in alone)


def replicas(state: str = "RUNNING") -> int:
    from ray import serve
    st = serve.status().applications["ladder"].deployments["LadderServer"]
    return st.replica_states.get(state, 0)


def test_autoscaling_adds_and_removes_whole_groups(client):
    assert replicas() >= 1
    stop = time.monotonic() + 240

    def load(i):
        while time.monotonic() < stop and replicas() < 2:
            client.completions.create(model="smollm2", prompt=f"Story {i}:", max_tokens=48,
                                      temperature=0.8, extra_body={"ignore_eos": True})
        return True

    with cf.ThreadPoolExecutor(12) as pool:
        list(pool.map(load, range(12)))
    assert replicas() == 2, "load did not scale the deployment to two TP groups"
    deadline = time.monotonic() + 120
    while replicas() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert replicas() == 1, "the idle deployment did not scale back to one TP group"


def test_a_killed_shard_worker_gets_its_replica_replaced(server, client):
    code, h = get(server + "/health")
    assert code == 200
    old = h["group"]
    ray.kill(ray.get_actor(f"{old}-rank1", namespace=h["namespace"]), no_restart=True)
    deadline = time.monotonic() + 180
    new, served = old, False
    while time.monotonic() < deadline and not (served and new != old):
        code, h = get(server + "/health")
        new = h.get("group", old) if code == 200 else old
        if new != old:
            try:
                served = client.completions.create(
                    model="smollm2", prompt="Back again?", max_tokens=3,
                    extra_body={"ignore_eos": True}).usage.completion_tokens == 3
            except Exception:
                served = False
        time.sleep(1)
    assert new != old and served


def test_ladder_serve_says_why_a_replica_did_not_start(tmp_path, ray_cluster, tiny_llama):
    """A setting only the replica can check (a layer the model lacks) ends `ladder serve` with
    the replica's own error, not Serve's bare "failed to update the deployments"."""
    path = write_config(tmp_path, free_port(), model=str(tiny_llama), residual="ladder:40-41",
                        max_seq=256, n_slots=2)
    with ladder_serve(path) as proc:
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out[-3000:]
    assert (f"{path}: the application did not start:" in out
            and "layer 41 out of range (the model has 4 layers, 0..3)" in out), out[-3000:]


def test_overload_gets_503_with_retry_after(server, tiny_llama):
    """A deployment at its queue limit answers 503 + Retry-After (a second app, tiny model)."""
    from ray import serve

    from deploy.server import build_app
    serve.run(build_app({"model": str(tiny_llama), "model_name": "tiny", "tp": 1,
                         "residual": "standard", "n_slots": 1, "max_seq": 512,
                         "queue_limit": 1, "retry_after_s": 3}),
              name="tiny", route_prefix="/tiny")
    try:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as pool:  # 1 slot + 1 waiting: the rest are refused
            results = list(pool.map(lambda _: post(server + "/tiny/v1/completions", body,
                                                   key=None), range(6)))
        codes = sorted(code for code, _, _ in results)
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        assert set(codes) <= {200, 503}
        code, err, busy = next(r for r in results if r[0] == 503)
        assert {k.lower(): v for k, v in busy.items()}["retry-after"] == "3"
        assert err["error"]["code"] == "overloaded"
    finally:
        serve.delete("tiny")
