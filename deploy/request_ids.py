"""X-Request-Id: every request's id, the client's own or one made here, on its response too."""

from __future__ import annotations

import re
import uuid

from fastapi.responses import JSONResponse

from deploy.protocol import ApiError

_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no space: nothing to forge a log


class RequestIds:
    """ASGI middleware: a request's X-Request-Id (the client's, or a new one) in
    `request.state.request_id` and on its response; a malformed one is a 400."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id")
        rid = uuid.uuid4().hex
        if given is not None and not _REQUEST_ID.fullmatch(given.decode("latin-1")):
            err = ApiError(400, "X-Request-Id must be 1-128 printable ASCII characters "
                             "without spaces", param="X-Request-Id")
            response = JSONResponse(err.body(), status_code=400, headers={"X-Request-Id": rid})
            return await response(scope, receive, send)
        rid = given.decode() if given is not None else rid
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                       (b"x-request-id", rid.encode())]
            await send(message)
        await self.app(scope, receive, send_with_id)
