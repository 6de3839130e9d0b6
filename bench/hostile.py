"""Hostile but plausible requests against the OpenAI API, each with the statuses it may get.

What a careless or malicious client sends: numbers past 64 bits, NaN, 5,000-digit integers,
JSON nested 100,000 deep, bodies past the size limit (with and without Content-Length), prompts
past the context by their characters, token ids outside the vocabulary, bad keys and headers,
a chat the template refuses. None may get a 5xx, and the server must serve the next request
as before. `tests/test_hardening.py` runs them all; `bench.soak` mixes them into its load.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Probe:
    name: str
    body: bytes | None
    path: str = "/v1/completions"
    method: str = "POST"
    statuses: tuple[int, ...] = (400,)
    headers: dict = field(default_factory=dict)  # over the key and Content-Type
    chunked: bool = False  # sent without Content-Length


def probes(model: str, *, max_body_bytes: int = 4 * 2**20, max_prompt_chars: int = 200_000
           ) -> list[Probe]:
    m = json.dumps(model)

    def body(**kw) -> bytes:
        return json.dumps({"model": model, "max_tokens": 2, **kw}).encode()

    def raw(rest: str) -> bytes:
        return f'{{"model": {m}, "max_tokens": 2, {rest}}}'.encode()

    turns = [{"role": r, "content": "a"} for r in ("user", "assistant") * 20_000] + \
        [{"role": "user", "content": "a"}]
    big = b'{"model": ' + m.encode() + b', "prompt": "' + b"x" * (max_body_bytes + 1) + b'"}'
    chat = "/v1/chat/completions"
    return [
        Probe("seed 2**64", body(prompt="x", seed=2**64, temperature=0.5), statuses=(200,)),
        Probe("seed -2**70", body(prompt="x", seed=-2**70, temperature=0.5), statuses=(200,)),
        Probe("seed 10**20, n 3", body(prompt="x", seed=10**20, n=3), statuses=(200,)),
        Probe("top_k 2**63", body(prompt="x", top_k=2**63)),
        Probe("top_k past the vocabulary", body(prompt="x", top_k=10**9)),
        Probe("temperature NaN", raw('"prompt": "x", "temperature": NaN')),
        Probe("temperature Infinity", raw('"prompt": "x", "temperature": Infinity')),
        Probe("top_p -Infinity", raw('"prompt": "x", "top_p": -Infinity')),
        Probe("temperature 1e400", raw('"prompt": "x", "temperature": 1e400')),
        Probe("an integer of 5,000 digits", raw('"prompt": "x", "seed": ' + "9" * 5000)),
        Probe("JSON nested 100,000 deep", raw('"prompt": ' + "[" * 100_000 + "]" * 100_000)),
        Probe("a lone surrogate", raw('"prompt": "\\ud800x"')),
        Probe("max_tokens 10**30", body(prompt="x", max_tokens=10**30)),
        Probe("max_tokens 1.5", body(prompt="x", max_tokens=1.5)),
        Probe("min_tokens -1", body(prompt="x", min_tokens=-1)),
        Probe("n 9", body(prompt="x", n=9)),
        Probe("five stop strings", body(prompt="x", stop=["a", "b", "c", "d", "e"])),
        Probe("a stop string of 10,000", body(prompt="x", stop=["s" * 10_000])),
        Probe("logprobs 21", body(prompt="x", logprobs=21)),
        Probe("a logit_bias past the vocabulary", body(prompt="x", logit_bias={"10" * 9: 1})),
        Probe("min_p 1.5", body(prompt="x", min_p=1.5)),
        Probe("bad_words (not served yet)", body(prompt="x", bad_words=["x"])),
        Probe("a JSON schema the grammar engine refuses", body(
            prompt="x", response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}})),
        Probe("a JSON schema nested 10,000 deep", raw(
            '"prompt": "x", "response_format": {"type": "json_schema", "json_schema": '
            '{"name": "x", "schema": ' + '{"items": ' * 10_000 + "{}" + "}" * 10_000 + "}}")),
        Probe("an unknown field", body(prompt="x", temprature=0.5)),
        Probe("token ids outside the vocabulary, streamed",
              body(prompt=[1, 2**40, -1], stream=True)),
        Probe("100,000 token ids", body(prompt=[5] * 100_000)),
        Probe("a prompt past the context by characters", body(prompt="x" * (max_prompt_chars + 1))),
        Probe("an empty prompt", body(prompt="")),
        Probe("a body past the limit", big, statuses=(413,)),
        Probe("a body past the limit, chunked", big, statuses=(413,), chunked=True),
        Probe("an empty body", b""),
        Probe("a JSON array", b"[1, 2, 3]"),
        Probe("not JSON", b"\xff\xfe{{{"),
        Probe("two user turns in a row (templates that need turns to alternate refuse them)",
              body(messages=[{"role": "user", "content": "a"},
                             {"role": "user", "content": "b"}]), path=chat, statuses=(200, 400)),
        Probe("an image part", body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), path=chat),
        Probe("an unknown role", body(messages=[{"role": "wizard", "content": "x"}]), path=chat),
        Probe("40,001 chat turns", body(messages=turns), path=chat),
        Probe("a non-ASCII bearer", body(prompt="x"), statuses=(401,),
              headers={"Authorization": "Bearer sk-\u00e9\u00e9"}),
        Probe("a Basic authorization", body(prompt="x"), statuses=(401,),
              headers={"Authorization": "Basic c2s6c2s="}),
        Probe("a bare Bearer", body(prompt="x"), statuses=(401,),
              headers={"Authorization": "Bearer"}),
        Probe("an unknown route", None, path="/v1/engines", method="GET", statuses=(404,)),
        Probe("a wrong method", None, path="/v1/completions", method="DELETE",
              statuses=(405,)),
    ]


def send(url: str, probe: Probe, key: str | None, timeout_s: float = 120.0
         ) -> tuple[int, bytes, dict]:
    """One probe: (status, body, headers). A server that answers before it has read all of a
    body past its limit may close the connection meanwhile: what it answered still counts."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(probe.headers)
    headers = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
    body = probe.body
    try:
        if probe.chunked and body is not None:
            parts = (body[i:i + CHUNK] for i in range(0, len(body), CHUNK))
            conn.request(probe.method, u.path + probe.path, body=parts, headers=headers,
                         encode_chunked=True)
        else:
            conn.request(probe.method, u.path + probe.path, body=body, headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the answer came first; it is read below
    try:
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()
