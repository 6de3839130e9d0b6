"""The OpenAI wire format's requests, validated into SamplingParams (responses: deploy.responses).

The pydantic models here and in deploy.responses are the one source of the wire format: the server
parses bodies with them, `/openapi.json` describes them, and the fuzz tests generate from that
document. Every validation error becomes an `ApiError` (a 4xx with OpenAI's error body) here,
before anything reaches the TP group; what only the model can judge (the prompt's length in tokens,
token ids against the vocabulary) is checked by the server against the group's `Limits`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)

from deploy import structured as S
from deploy.errors import ApiError
from ladder.engine.sampling import SEED_SPACE, SamplingParams

MAX_N = 8  # choices per request: each is a full generation on the group
MAX_STOPS = 4  # stop sequences per request (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_STOP_IDS = 64  # stop_token_ids per request
MAX_BIASES = 300  # logit_bias entries per request


@dataclass(frozen=True, slots=True)
class Limits:
    """What the served model allows a request, from the group's info and the settings."""

    vocab_size: int
    max_seq: int  # prompt plus generated tokens
    max_prompt_chars: int  # a longer prompt has more tokens than the context holds
    default_max_tokens: int  # /v1/completions without max_tokens (OpenAI's default: 16)


# -- requests ---------------------------------------------------------------------------------
# Numbers and booleans are strict (no "1" for 1, no true for 1.0), floats finite (no NaN or
# Infinity). A request's own fields: an unknown one is a 400 naming it, as OpenAI's API answers
# ("Unrecognized request argument supplied"); parts of it (messages, stream_options) keep what
# they do not know, as a client replaying a conversation sends fields of OpenAI's responses.
_STRICT = ConfigDict(extra="ignore", allow_inf_nan=False)
_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False)

# Fields OpenAI clients send that change nothing here: accepted, with no effect.
NO_EFFECT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls",
             "prompt_cache_key", "safety_identifier")
# Fields of OpenAI's or vLLM's API not served yet: a 400 naming the field unless its value is
# one that asks for nothing (the default), so that a client is never silently given something
# other than what it asked for (JSON it asked for as free text, an unpenalized sample).
NOT_YET: dict[str, tuple] = {
    "bad_words": (None, []),
    "functions": (None, []), "function_call": (None, "none"),
    "best_of": (None, 1), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
}


def _not_yet(name: str) -> Any:
    """A NOT_YET field: any JSON value parses (so that the 400 says "not supported" rather than
    "invalid"), while the document admits only the values that ask for nothing."""
    return Field(None, description="not supported yet: any other value is a 400",
                 json_schema_extra={"enum": list(NOT_YET[name])})


def _integral(v: Any) -> Any:
    """1.0 is an integer to JSON Schema (and to JavaScript clients): take it as 1."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[StrictInt, BeforeValidator(_integral)]
Text = Annotated[str, Field(min_length=1)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _same(v: Any, default: Any) -> bool:
    """`v` is `default` (0 and 0.0 alike; a boolean is not a number here: True is not 1)."""
    if isinstance(v, bool) or isinstance(default, bool):
        return type(v) is type(default) and v == default
    return v == default


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = _REQUEST

    model: str
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)  # the chat API's newer name
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    top_k: Int = Field(0, ge=-1, description="an extension (vLLM's): 0 or -1 = off")
    seed: Int | None = Field(None, description="any integer, reduced modulo 2**64")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    min_tokens: Int = Field(0, ge=0, description="an extension: no stop before this many")
    ignore_eos: StrictBool = Field(False, description="an extension (benchmarks)")
    # accepted, no effect (NO_EFFECT); not served yet (NOT_YET)
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    presence_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    repetition_penalty: StrictFloat | None = Field(None, gt=0, le=10, description="an extension "
                                                   "(vLLM's): 1 = off")
    logit_bias: Annotated[dict[str, Annotated[StrictFloat, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_BIASES)] | None = Field(
        None, description="token id (as a string) -> added to its logit, -100..100")
    min_p: StrictFloat | None = Field(None, ge=0, le=1, description="an extension (vLLM's): "
                                      "keep tokens at least this times as likely as the "
                                      "likeliest; 0 = off")
    stop_token_ids: Annotated[list[Int], Field(max_length=MAX_STOP_IDS)] | None = Field(
        None, description="an extension (vLLM's): stop at any of these token ids")
    bad_words: Any = _not_yet("bad_words")
    response_format: S.ResponseFormat | None = Field(
        None, description="json_object or json_schema: the output follows it (deploy.structured)")
    best_of: Any = _not_yet("best_of")

    def grammar(self) -> str | None:
        """The grammar the output follows (llguidance's text), or None."""
        return S.format_grammar(self.response_format)

    def asked_prompt_logprobs(self) -> int | None:
        return None

    def biases(self, limits: Limits) -> tuple[tuple[int, float], ...]:
        out = []
        for key, b in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= limits.vocab_size:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id in "
                               f"0..{limits.vocab_size - 1}", param="logit_bias")
            out.append((int(key), float(b)))
        return tuple(out)

    def refuse_what_is_not_served(self) -> None:
        """A 400 naming the first field of NOT_YET set to something other than its default."""
        for name, defaults in NOT_YET.items():
            if name in type(self).model_fields and not any(
                    _same(getattr(self, name), d) for d in defaults):
                raise ApiError(400, f"{name} is not supported by this server yet",
                               param=name, code="unsupported_parameter")


    def sampling(self, limits: Limits, n_prompt: int, default_max: int) -> list[SamplingParams]:
        """One SamplingParams per choice for a prompt of `n_prompt` tokens; `default_max`
        applies when the request names no max_tokens (as much as the context leaves, at most)."""
        room = limits.max_seq - n_prompt  # new tokens the context leaves after the prompt
        if room < 1:
            raise ApiError(400, f"the prompt has {n_prompt} tokens; the context holds "
                           f"{limits.max_seq}", param=self.prompt_param,
                           code="context_length_exceeded")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true",
                           param="stream_options")
        if self.top_k > limits.vocab_size:
            raise ApiError(400, f"top_k must be at most the vocabulary size "
                           f"({limits.vocab_size}), got {self.top_k}", param="top_k")
        mt = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        if mt is None:
            mt = min(default_max, room)
        elif mt > room:
            raise ApiError(400, f"max_tokens={mt} does not fit the context: the prompt leaves "
                           f"room for {room} new tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        stop_ids = tuple(self.stop_token_ids or ())
        if any(not 0 <= t < limits.vocab_size for t in stop_ids):
            raise ApiError(400, f"stop_token_ids must be token ids in 0..{limits.vocab_size - 1}",
                           param="stop_token_ids")
        bias = self.biases(limits)
        grammar = self.grammar()
        out = []
        for i in range(self.n):  # each choice its own seed, so choices differ when sampling
            seed = None if self.seed is None else (self.seed + i) % SEED_SPACE
            out.append(SamplingParams(
                max_tokens=mt, temperature=self.temperature, top_k=max(self.top_k, 0),
                top_p=self.top_p, min_p=self.min_p or 0.0, seed=seed, stop=stop, stop_token_ids=stop_ids,
                ignore_eos=self.ignore_eos, logprobs=self.asked_logprobs(),
                prompt_logprobs=self.asked_prompt_logprobs(),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=self.repetition_penalty or 1.0, logit_bias=bias,
                min_tokens=min(self.min_tokens, mt), grammar=grammar))
        return out


class CompletionRequest(_Common):
    prompt_param: ClassVar[str] = "prompt"  # where a prompt past the context is said to be
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | Annotated[list[Int],
        Field(min_length=1)] | Annotated[list[Annotated[list[Int], Field(min_length=1)]],
                                         Field(min_length=1)]
    echo: StrictBool = False
    logprobs: Int | None = Field(None, ge=0, le=20, description="each token's log-prob and "
                                 "this many most likely alternatives")
    suffix: Any = _not_yet("suffix")

    def asked_logprobs(self) -> int | None:
        return self.logprobs

    def asked_prompt_logprobs(self) -> int | None:
        """echo with logprobs: the prompt's tokens' log-probs too (evaluation harnesses)."""
        return self.logprobs if self.echo else None

    def prompt_text_or_ids(self) -> str | list[int]:
        """The one prompt: a string, or token ids. One-string lists and one-list lists of ids
        (evaluation harnesses batch their prompts so) are unwrapped."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (send a list of one string, a "
                               "string, or token ids)", param="prompt")
            prompt = prompt[0]
        return prompt  # never empty: the schema asks for one character or one token at least


class ContentPart(BaseModel):
    model_config = _STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are understood
            parts = []
            for p in self.content:
                if p.type != "text" or p.text is None:
                    raise ApiError(400, f"unsupported content part {p.type!r}: only text",
                                   param="messages")
                parts.append(p.text)
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Common):
    prompt_param: ClassVar[str] = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = Field(None, description="each token's log-prob")
    top_logprobs: Int | None = Field(None, ge=0, le=20, description="with logprobs: this many "
                                     "most likely alternatives of each token")
    tools: Annotated[list[S.Tool], Field(max_length=S.MAX_TOOLS)] | None = None
    tool_choice: S.ToolChoice | None = Field(
        None, description='a named function or "required" (the call follows its schema), '
        'or "none"; "auto" with tools is a 400 (free-form calls are not parsed)')
    functions: Any = _not_yet("functions")
    function_call: Any = _not_yet("function_call")
    audio: Any = _not_yet("audio")
    modalities: Any = _not_yet("modalities")
    prediction: Any = _not_yet("prediction")
    reasoning_effort: Any = _not_yet("reasoning_effort")
    web_search_options: Any = _not_yet("web_search_options")

    def asked_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @cached_property
    def forced_call(self) -> S.ForcedCall | None:
        """The tool call `tools` and `tool_choice` force (compiled once), or None."""
        return S.forced_call(self.tools, self.tool_choice)

    def grammar(self) -> str | None:
        call = self.forced_call
        if call is None:
            return super().grammar()
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "response_format and a forced tool call both shape the output: "
                           "give one", param="response_format")
        return call.grammar

    def refuse_what_is_not_served(self) -> None:
        super().refuse_what_is_not_served()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""
    model_config = _REQUEST
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = Field(True, description="only true: the model's own")
    add_generation_prompt: StrictBool = Field(True, description="only true (messages)")
    return_token_strs: StrictBool = Field(False, description="only false")

    def refuse_what_is_not_served(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        for name, default in (("add_special_tokens", True), ("add_generation_prompt", True),
                              ("return_token_strs", False)):
            if getattr(self, name) is not default:
                raise ApiError(400, f"{name}: {not default} is not supported by this server "
                               "yet", param=name, code="unsupported_parameter")


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text."""
    model_config = _REQUEST
    model: str | None = None
    tokens: list[Int]

    def refuse_what_is_not_served(self) -> None:
        pass


# pydantic names the member of a union it tried ("prompt.str", "stop.list[str]"): not a field
_UNION_TAG = re.compile(r"str|int|float|bool|list|dict|constrained-.*|.*\[.*")


def parse(model_cls: type[BaseModel], raw: bytes) -> Any:
    """JSON body -> request model, or an ApiError(400) that says what is wrong.

    pydantic's own JSON parser reads the body: it refuses NaN, integers past 4300 digits and
    nesting past its recursion limit with a validation error, never an exception of Python's."""
    try:
        req = model_cls.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # of a union's members, the one whose type fitted says what is wrong ("at most 4
        # items"), not the others ("not a string")
        err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        loc = [str(x) for x in err["loc"] if not _UNION_TAG.fullmatch(str(x))]
        if err["type"] == "extra_forbidden" and len(loc) == 1:
            raise ApiError(400, f"unrecognized request argument supplied: {loc[0]}",
                           param=loc[0], code="unknown_parameter") from None
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}") from None
        if err["type"] in ("model_type", "model_attributes_type") and not loc:
            raise ApiError(400, "the request body must be a JSON object") from None
        what = "is required" if err["type"] == "missing" else f"is invalid: {err['msg']}"
        raise ApiError(400, f"{'.'.join(loc) or 'body'} {what}",
                       param=loc[0] if loc else None) from None
    req.refuse_what_is_not_served()
    return req
