"""The OpenAI wire format: requests validated into our SamplingParams, responses and SSE chunks.

Validation errors become `ApiError`s (status, OpenAI-style body) here, before anything reaches
the TP group; what only the group can judge (the prompt's length in tokens) is checked against
the group's context after tokenization, in the server.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from ladder.sampling import SamplingParams

MAX_N = 8  # choices per request: each is a full generation on the group


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # the chat API's newer name
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = 0  # an extension (vLLM has it too); 0 = off
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    min_tokens: StrictInt = 0  # extension
    ignore_eos: StrictBool = False  # extension (benchmarks)

    def sampling(self, default_max: int, room: int) -> list[SamplingParams]:
        """One SamplingParams per choice. `room`: new tokens the context has left after the
        prompt; `default_max` applies when the request names no max_tokens."""
        if not 1 <= self.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true",
                           param="stream_options")
        mt = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        if mt is None:
            mt = min(default_max, room)
        elif mt <= 0:
            raise ApiError(400, f"max_tokens must be at least 1, got {mt}", param="max_tokens")
        elif mt > room:
            raise ApiError(400, f"max_tokens={mt} does not fit the context: the prompt leaves "
                           f"room for {room} new tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > 4:
            raise ApiError(400, f"at most 4 stop sequences, got {len(stop)}", param="stop")
        out = []
        for i in range(self.n):  # each choice its own seed, so choices differ when sampling
            seed = None if self.seed is None else self.seed + i
            try:
                out.append(SamplingParams(
                    max_tokens=mt, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, seed=seed, stop=stop, ignore_eos=self.ignore_eos,
                    min_tokens=min(self.min_tokens, mt)))
            except ValueError as e:
                raise ApiError(400, str(e), param=_param_of(str(e))) from None
        return out


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are understood
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ApiError(400, f"unsupported content part {p.get('type')!r}: only "
                                   "text", param="messages")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = None


def parse(model_cls: type[BaseModel], raw: bytes) -> Any:
    """JSON body -> request model, or an ApiError(400) that says what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        what = {"missing": "is required"}.get(err["type"], f"has the wrong type or value "
                                              f"({err['msg']})")
        raise ApiError(400, f"{field or 'body'} {what}", param=field) from None
    if getattr(req, "logprobs", None):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if getattr(req, "suffix", None):
        raise ApiError(400, "suffix is not supported", param="suffix")
    return req


def _param_of(msg: str) -> str | None:
    head = msg.split(" ", 1)[0]
    return head if head.isidentifier() else None


# -- responses --------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, created: int, choices: list[dict], use: dict,
                    chat: bool) -> dict:
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                  "logprobs": None, "finish_reason": FINISH[c["finish_reason"]]}
                 for i, c in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": items, "usage": use}
    items = [{"index": i, "text": c["text"], "logprobs": None,
              "finish_reason": FINISH[c["finish_reason"]]} for i, c in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": items, "usage": use}


def chunk(rid: str, model: str, created: int, index: int, text: str | None,
          finish_reason: str | None, chat: bool, first: bool = False) -> dict:
    if chat:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None,
                  "finish_reason": FINISH.get(finish_reason) if finish_reason else None}
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None,
              "finish_reason": FINISH.get(finish_reason) if finish_reason else None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, use: dict, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": use}


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def now() -> int:
    return int(time.time())
