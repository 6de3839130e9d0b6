"""The OpenAI wire format's responses: the models `/openapi.json` declares (and the fuzz tests
check every answer against), and the dicts the server builds to match them (requests:
deploy.protocol)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: None = None


class Detokenized(BaseModel):
    prompt: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


Finish = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Finish


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Finish


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class StepTimes(BaseModel):
    predicted_ms: float | None = Field(description="`ladder plan`'s decode step for this group")
    measured_ms: float | None = Field(description="the median of the last minute's steps")
    steps: int = Field(description="decode steps of the last minute at this batch size")


class Performance(BaseModel):
    prediction: str = Field(description="how the step was predicted, or why it was not")
    decode_step: dict[str, StepTimes] = Field(
        description="by batch size (rows in a step): batch 1 and each size the last minute ran")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    tp: int
    residual: str
    residual_plan: str
    adapted: bool
    interconnect: str
    performance: Performance


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class HealthBody(BaseModel):
    status: Literal["ok", "unhealthy"]
    checked_s_ago: float | None = Field(None, description="with a valid key: the details")
    reason: str | None = None
    rtt_s: float | None = None
    group: str | None = None
    namespace: str | None = None
    tp: int | None = None
    interconnect: str | None = None
    residual: str | None = None


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
