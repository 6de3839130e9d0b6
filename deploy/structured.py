"""Structured output on the wire: `response_format` (json_object, json_schema) and a chat's forced
tool call (`tool_choice` naming a function, or "required"), each compiled here into llguidance's
grammar text for `SamplingParams.grammar` (the ranks follow it: ladder.engine.guided), and the
tool call's place in the response.

A schema the grammar engine cannot use is a 400 naming the field, before anything reaches the
group. JSON is written compactly or with the whitespace the model chooses, at most
`JSON_OPTIONS`' run of it between two tokens of JSON (unbounded, a sampled model can spend its
whole budget on blank lines); a schema's own "x-guidance" options win. `strict` changes
nothing: the output always follows the schema. Free-form tool calls (`tool_choice` "auto" with tools) are not parsed here:
a 400 says to name the function.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from deploy.errors import ApiError

_STRICT = ConfigDict(extra="ignore", allow_inf_nan=False)
NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for a schema's and a function's name
MAX_TOOLS = 128  # OpenAI's limit
JSON_OPTIONS = {"whitespace_pattern": r"[\n\r\t ]{0,24}"}  # indentation up to 6 levels deep


class JsonSchemaSpec(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionSpec(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def grammar(schema: dict[str, Any], param: str) -> str:
    """llguidance's grammar text for a JSON schema; a 400 naming `param` when unusable."""
    import llguidance
    try:
        g = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ApiError(400, f"{param}: the schema cannot be used: {e}", param=param) from None
    err = llguidance.LLMatcher.validate_grammar(g)
    if err:
        raise ApiError(400, f"{param}: the schema cannot be used: {err}", param=param)
    return g


def format_grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar `response_format` asks for (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammar({"type": "object"}, "response_format")
    if fmt.json_schema is None:
        raise ApiError(400, "response_format: json_schema needs its json_schema object",
                       param="response_format")
    return grammar(fmt.json_schema.schema_ or {"type": "object"}, "response_format")


@dataclass(frozen=True, slots=True)
class ForcedCall:
    """A chat's forced tool call: `name` the named function (the output is its arguments), or
    None for "required" (the output is {"name": ..., "arguments": {...}} of one of the tools)."""

    name: str | None
    grammar: str

    def message(self, text: str, complete: bool) -> dict:
        """The assistant message of a choice whose output is `text`; an output cut short (or,
        for "required", one that does not parse) stays content."""
        call = self.call(text) if complete else None
        if call is None:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def call(self, text: str) -> dict | None:
        name, args = self.name, text
        if name is None:
            try:
                got = json.loads(text)
                name, args = got["name"], json.dumps(got["arguments"])
            except (ValueError, KeyError, TypeError):
                return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": args}}


def forced_call(tools: list[Tool] | None, choice: ToolChoice | None) -> ForcedCall | None:
    """What `tools` and `tool_choice` ask for: a forced call, nothing ("none", or no tools), or
    a 400 for what is not served (free-form calls) or makes no sense."""
    if not tools:
        if choice is not None and choice != "none":
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise ApiError(400, 'tools with tool_choice "auto": free-form tool calls are not parsed '
                       'by this server; name the function in tool_choice, or use "required" '
                       'or "none"', param="tool_choice", code="unsupported_parameter")
    by_name = {t.function.name: t.function for t in tools}
    if len(by_name) != len(tools):
        raise ApiError(400, "tools: two functions share a name", param="tools")
    if choice == "required":
        calls = [{"type": "object", "properties": {
                      "name": {"const": f.name},
                      "arguments": f.parameters or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for f in by_name.values()]
        return ForcedCall(None, grammar({"anyOf": calls}, "tools"))
    f = by_name.get(choice.function.name)
    if f is None:
        raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among "
                       "the tools", param="tool_choice")
    return ForcedCall(f.name, grammar(f.parameters or {"type": "object"}, "tools"))


class CallStream:
    """A streamed choice's forced call: a named function's arguments stream as they come (the
    call's id and name in the first delta, as OpenAI streams them); a "required" call is held
    until it ends, then sent whole (or as content, if it was cut short or does not parse)."""

    def __init__(self, call: ForcedCall) -> None:
        self.call, self.held, self.id = call, "", f"call_{uuid.uuid4().hex[:24]}"

    def delta(self, text: str, first: bool, finish_reason: str | None) -> tuple[str, dict | None]:
        """(content text, tool call delta) for this event of the choice."""
        if self.call.name is not None:
            d: dict = {"index": 0, "function": {"arguments": text}}
            if first:
                d.update(id=self.id, type="function")
                d["function"]["name"] = self.call.name
            return "", d if text or first else None
        self.held += text
        if finish_reason is None:
            return "", None
        got = self.call.call(self.held) if finish_reason == "stop" else None
        if got is None:
            return self.held, None
        return "", {"index": 0, **got}
