"""The FastAPI app of an `OpenAIServer` (deploy.api): its routes, X-Request-Id, OpenAI error
bodies for every error (Starlette's own too), and the OpenAPI document."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from deploy import protocol as P
from deploy import responses as R
from deploy.api import OpenAIServer
from deploy.openapi import body_of, describe, responses
from deploy.request_ids import RequestIds

log = logging.getLogger("ray.serve")


def build_api(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of `server`: routes, OpenAI error bodies, the OpenAPI document."""
    app = FastAPI(title="ladder-serve", docs_url="/docs", redoc_url=None)
    app.add_middleware(RequestIds)
    describe(app, (P.CompletionRequest, P.ChatRequest, P.TokenizeRequest, P.DetokenizeRequest))

    @app.exception_handler(P.ApiError)
    async def api_error(request: Request, e: P.ApiError) -> JSONResponse:
        if server.metrics is not None:
            server.metrics.on_error(f"http_{e.status}")
        server.own.on_error(f"http_{e.status}")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """Starlette's own (an unknown route, a wrong method) in OpenAI's error body."""
        return await api_error(request, P.ApiError(e.status_code, str(e.detail),
                                                   headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, P.ApiError(400, f"invalid request: {e.errors()[0]}"))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        rid = getattr(request.state, "rid", "-")
        log.error("request %s failed: %s", rid, e, exc_info=e)
        # Starlette answers this outside the middleware: the header is set here
        return JSONResponse(P.ApiError(500, f"internal error (request {rid}); it was logged",
                                       type_="server_error").body(), status_code=500,
                            headers={"X-Request-Id": getattr(request.state, "request_id", "-")})

    app.get("/health", responses=responses(R.HealthBody))(server.health)
    app.get("/stats")(server.stats)
    app.get("/metrics", response_class=Response)(server.metrics_text)
    app.get("/v1/models", responses=responses(R.ModelList))(server.models)
    app.post("/v1/completions", openapi_extra=body_of(P.CompletionRequest),
             responses=responses(R.Completion, stream=True))(server.completions)
    app.post("/v1/chat/completions", openapi_extra=body_of(P.ChatRequest),
             responses=responses(R.ChatCompletion, stream=True))(server.chat_completions)
    app.post("/tokenize", openapi_extra=body_of(P.TokenizeRequest),
             responses=responses(R.Tokenized))(server.tokenize_text)
    app.post("/detokenize", openapi_extra=body_of(P.DetokenizeRequest),
             responses=responses(R.Detokenized))(server.detokenize)
    return app
