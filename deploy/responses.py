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


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


Finish = Literal["stop", "length"] | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Finish


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON of the function's parameters")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message is a tool call")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; `cached_tokens`: the prompt's tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_tokens(stats: list) -> int:
    """The prompt's cached tokens over a request's choices (each its own sequence): the most
    any of them found (the prompt is counted once)."""
    return max((s.cached_tokens for s in stats if s is not None), default=0)


def _lp(v: float) -> float:
    return max(v, -9999.0)  # JSON has no -Infinity (a token the model gives no chance)


def _top(s) -> dict:
    """A chat logprob entry: the token's text alone and its own bytes (OpenAI's, llama.cpp's:
    a token that ends inside a character has the character's first bytes, its text a
    replacement character; joined in order, the bytes are the answer's)."""
    raw = s.text.encode() if s.raw is None else s.raw
    return {"token": s.text, "logprob": _lp(s.logprob), "bytes": list(raw)}


def logprobs_body(items: list | None, chat: bool, offset: int = 0) -> dict | None:
    """OpenAI's logprobs of a choice (or a chunk) from its tokens' (Scored, alternatives):
    chat's `content` list, or the completions API's parallel lists, `text_offset` counted from
    `offset` characters (the echoed prompt's, or the text streamed before)."""
    if items is None:
        return None
    if chat:
        return {"content": [{**_top(s), "top_logprobs": [_top(t) for t in top]}
                            for s, top in items], "refusal": None}
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for s, top in items:  # (a prompt's first token has no log-prob: null, as OpenAI's)
        out["tokens"].append(s.text)
        out["token_logprobs"].append(None if s.logprob is None else _lp(s.logprob))
        out["top_logprobs"].append(None if top is None else
                                   {t.text: _lp(t.logprob) for t in (*top, s)})
        out["text_offset"].append(offset)
        offset += len(s.text)
    return out


def completion_body(rid: str, model: str, created: int, choices: list[dict], use: dict,
                    chat: bool, echoed: int = 0, call=None) -> dict:
    """`call`: a chat's forced tool call (deploy.structured.ForcedCall), whose output is the
    call's arguments."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": c["text"]}
                  if call is None else call.message(c["text"], c["finish_reason"] == "stop"),
                  "logprobs": logprobs_body(c.get("logprobs"), True),
                  "finish_reason": FINISH[c["finish_reason"]]} for i, c in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": items, "usage": use}
    items = [{"index": i, "text": c["text"], "logprobs": logprobs_body(
                  None if c.get("logprobs") is None else (c.get("prompt_logprobs") or [])
                  + c["logprobs"], False, 0 if c.get("prompt_logprobs") else echoed),
              "finish_reason": FINISH[c["finish_reason"]]} for i, c in enumerate(choices)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": items, "usage": use}


def chunk(rid: str, model: str, created: int, index: int, text: str | None,
          finish_reason: str | None, chat: bool, first: bool = False,
          logprobs: dict | None = None, tool_call: dict | None = None) -> dict:
    if chat:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        if tool_call is not None:
            delta["tool_calls"] = [tool_call]
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": FINISH.get(finish_reason) if finish_reason else None}
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs,
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
