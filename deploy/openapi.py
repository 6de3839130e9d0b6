"""The API's OpenAPI document from the protocol's pydantic models.

The routes read their bodies themselves (a size limit comes before any parsing), so FastAPI
cannot see the request models in their signatures: `body_of` declares each route's body, and
`describe` puts the models' schemas into the document's components, where those references
point. Responses are declared with `responses`. One source: what the server parses is what
`/openapi.json` (and `/docs`) describes and what the fuzz tests generate from.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deploy.responses import ErrorResponse

REF = "#/components/schemas/{model}"
# one event of a stream: its data is a chunk (the JSON of a completion or chat completion chunk),
# an OpenAI error body, or [DONE] at the end
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
ERRORS = {400: "Invalid request", 401: "Missing or invalid API key", 404: "Unknown model",
          413: "Body too large", 500: "A fault of the server's, logged with the request id",
          503: "The group is down or full: retry after Retry-After seconds"}


def body_of(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra`: its JSON request body is `model`."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def responses(model: type[BaseModel], *, stream: bool = False) -> dict:
    """A route's `responses`: `model` on success (or, with `stream`, server-sent events of
    chunks ending in `data: [DONE]`), OpenAI's error body otherwise."""
    ok: dict = {"model": model, "description": "Success"}
    if stream:
        ok["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
        ok["description"] = "Success; with stream: true, server-sent events"
    out: dict = {200: ok}
    for status, what in ERRORS.items():
        out[status] = {"model": ErrorResponse, "description": what}
    return out


def describe(app: FastAPI, bodies: tuple[type[BaseModel], ...]) -> None:
    """Give `app` an OpenAPI document whose components hold the request `bodies`' schemas."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in bodies],
                                         ref_template=REF)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
