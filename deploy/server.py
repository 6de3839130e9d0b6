"""The Serve deployment: an OpenAI-compatible HTTP front for one TP group per replica.

A thin shim over the actor layer (`actors.TPGroup`): the replica owns bundle 0 of its placement
group and starts the group's ShardWorkers in bundles 1..tp, so Serve gang-schedules whole TP
groups and autoscaling adds and removes whole groups. `check_health` runs the group's collective
round trip: a replica whose group is broken fails it and Serve replaces it.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
GET /health (liveness from the last collective check; details with a valid key), GET /stats.
Every error is an OpenAI-style body: a 4xx for what the client sent (413 past the body limit,
checked before parsing), 503 with Retry-After while the group is down or full, 500 only for a
fault of ours, logged with the request id. Validation ends before the first byte of a 200: a
stream starts only once the group has accepted every choice. A client that goes away cancels
its generations (their slots are freed at the next step).
"""


import asyncio
import hmac
import logging
import time
import uuid
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from actors.group import GroupError, Health, TPGroup
from deploy import protocol as P
from deploy.config import ServerConfig, deployment_options, split_args
from deploy.openapi import body_of, describe, responses
from ladder.scheduler import RequestError, RequestFailed, add_event, new_result

log = logging.getLogger("ray.serve")
GROUP_RETRY_AFTER_S = 5  # a broken group's replica is replaced within about this many seconds
# Everything the deployment class uses sits above it: Serve serializes the class when it is
# decorated, with the module globals that exist by then.

app = FastAPI(title="ladder-serve", docs_url="/docs", redoc_url=None)
describe(app, (P.CompletionRequest, P.ChatRequest))


@app.exception_handler(P.ApiError)
async def _api_error(request: Request, e: P.ApiError) -> JSONResponse:
    metrics = getattr(request.state, "metrics", None)
    if metrics is not None:
        metrics.on_error(f"http_{e.status}")
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own (an unknown route, a wrong method) in OpenAI's error body."""
    return await _api_error(request, P.ApiError(e.status_code, str(e.detail),
                                                headers=dict(e.headers or {})))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return await _api_error(request, P.ApiError(400, f"invalid request: {e.errors()[0]}"))


@app.exception_handler(Exception)
async def _bug(request: Request, e: Exception) -> JSONResponse:
    rid = getattr(request.state, "rid", "-")
    log.error("request %s failed: %s", rid, e, exc_info=e)
    return JSONResponse(P.ApiError(500, f"internal error (request {rid}); it was logged",
                                   type_="server_error").body(), status_code=500)


def _too_large(limit: int) -> P.ApiError:
    return P.ApiError(413, f"the request body is larger than {limit} bytes",
                      code="request_too_large")


class _Generations:
    """The open generations of one request (one per choice), holding their places in the
    replica's count of active generations until `close`, which cancels what is unfinished."""

    def __init__(self, server: "LadderServer", n: int) -> None:
        self.server, self.n = server, n
        self.streams: list = []
        self.tasks: list[asyncio.Task] = []
        server.active += n  # taken before any await: a burst sees it

    async def open(self, ids: list[int], params: list, rid: str) -> None:
        for i, sp in enumerate(params):
            self.streams.append(await self.server.group.open(ids, sp, f"{rid}-{i}"))

    async def merged(self):
        """(choice, TokenEvent or the exception that ended it) as they come, every choice."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for ev in stream:
                    queue.put_nowait((i, ev))
            except Exception as e:  # noqa: BLE001 - handed to the reader
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        self.tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        open_ = len(self.tasks)
        while open_:
            i, ev = await queue.get()
            if ev is None:
                open_ -= 1
            else:
                yield i, ev

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in self.streams:
            await s.aclose()
        self.server.active -= self.n
        self.n = 0


class _EventStream(StreamingResponse):
    """An SSE response that closes its generations however it ends (finished, or the client
    went away before or while it was sent)."""

    def __init__(self, body, gens: _Generations) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.gens = gens

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.gens.close()


@serve.deployment
@serve.ingress(app)
class LadderServer:
    def __init__(self, config: dict | None = None) -> None:
        self.cfg = ServerConfig.from_dict(config)
        import ray
        in_pg = ray.util.get_current_placement_group() is not None
        self.group = TPGroup(self.cfg.group_options(), strategy=self.cfg.strategy,
                             placement_group="current" if in_pg else None,
                             bundle_offset=1 if in_pg else 0,
                             fault_timeout_s=self.cfg.fault_timeout_s,
                             name=f"{self.cfg.model_name}-{uuid.uuid4().hex[:8]}",
                             metrics=self.cfg.metrics, model_label=self.cfg.model_name)
        self.namespace = ray.get_runtime_context().namespace
        self.info = self.group.info
        max_seq = self.info["max_seq"]
        self.limits = P.Limits(
            vocab_size=self.info["config"]["vocab_size"], max_seq=max_seq,
            max_prompt_chars=self.cfg.max_prompt_chars
            or max_seq * max(1, self.info["max_token_chars"]),
            default_max_tokens=self.cfg.default_max_tokens)
        self.keys = [k.encode() for k in self.cfg.api_keys]
        self.created = P.now()
        self.active = 0  # generations of this replica in the group (running or waiting)
        self.last_health = (Health(True, "started"), time.monotonic())
        self.metrics = None
        if self.cfg.metrics:
            from actors.metrics import GroupMetrics
            self.metrics = GroupMetrics(self.cfg.model_name, self.info["residual"],
                                        self.info["tp"], self.info["interconnect"])

    async def check_health(self) -> None:
        """Serve's periodic health check: the group's collective round trip (the one place
        that runs it; /health reports its last result)."""
        h = await self.group.health_async(self.cfg.health_timeout_s)
        self.last_health = (h, time.monotonic())
        if not h.healthy:
            raise RuntimeError(f"TP group unhealthy: {h.reason}")

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown(timeout_s=10)

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health", responses=responses(P.HealthBody))
    async def health(self, request: Request) -> JSONResponse:
        """Liveness without a key, from the last collective check; the details with one."""
        h, at = self.last_health
        body: dict = {"status": "ok" if h.healthy else "unhealthy"}
        if self._key_ok(request):
            body.update(checked_s_ago=round(time.monotonic() - at, 3), reason=h.reason,
                        rtt_s=h.rtt_s, group=self.group.name, namespace=self.namespace,
                        tp=self.info["tp"], interconnect=self.info["interconnect"],
                        residual=self.info["residual"])
        return JSONResponse(body, status_code=200 if h.healthy else 503)

    @app.get("/stats")
    async def stats(self, request: Request) -> dict:
        """This replica's group: slots in use, queue, totals (per-step records left out)."""
        self._begin(request, "stats")
        try:
            st = await self.group.stats_async(since=float("inf"))
        except GroupError as e:
            raise self._unavailable(e) from None
        st.pop("steps")
        return {"group": self.group.name, **st}

    @app.get("/v1/models", responses=responses(P.ModelList))
    async def models(self, request: Request) -> dict:
        self._begin(request, "models")
        return {"object": "list", "data": [{
            "id": self.cfg.model_name, "object": "model", "created": self.created,
            "owned_by": "ladder-serve", "max_model_len": self.limits.max_seq,
            "tp": self.info["tp"], "residual": self.info["residual"],
            "residual_plan": self.info["residual_plan"], "adapted": self.info["adapted"],
            "interconnect": self.info["interconnect"]}]}

    @app.post("/v1/completions", openapi_extra=body_of(P.CompletionRequest),
              responses=responses(P.Completion, stream=True))
    async def completions(self, request: Request):
        rid = self._begin(request, "cmpl")
        req = P.parse(P.CompletionRequest, await self._body(request))
        self._check_model(req.model)
        prompt = req.prompt_text_or_ids()
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
            ids = await self._tokenize("prompt", text=prompt)
        else:
            ids = self._check_ids(prompt)
        echo = prompt if req.echo and isinstance(prompt, str) else ""
        return await self._serve(rid, req, ids, self.limits.default_max_tokens, chat=False,
                                 echo=echo)

    @app.post("/v1/chat/completions", openapi_extra=body_of(P.ChatRequest),
              responses=responses(P.ChatCompletion, stream=True))
    async def chat_completions(self, request: Request):
        rid = self._begin(request, "chatcmpl")
        req = P.parse(P.ChatRequest, await self._body(request))
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await self._tokenize("messages", messages=messages)
        return await self._serve(rid, req, ids, self.limits.max_seq, chat=True)

    # -- checks ----------------------------------------------------------------------------
    def _begin(self, request: Request, prefix: str) -> str:
        """A request's id (in its error responses and logs) and its key check."""
        rid = P.new_id(prefix)
        request.state.rid, request.state.metrics = rid, self.metrics
        if not self._key_ok(request):
            raise P.ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                             type_="authentication_error", code="invalid_api_key")
        return rid

    def _key_ok(self, request: Request) -> bool:
        if not self.keys:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # compared as bytes: a header may hold any character, and a timing-safe compare of
        # str takes ASCII only
        got = key.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(got, k)
                                                  for k in self.keys)

    async def _body(self, request: Request) -> bytes:
        """The raw body, refused with 413 past `max_body_bytes` before it is all read."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        parts, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > limit:
                raise _too_large(limit)
            parts.append(part)
        return b"".join(parts)

    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise P.ApiError(404, f"the model {name!r} does not exist; this server serves "
                             f"{self.cfg.model_name!r}", param="model", code="model_not_found")

    def _check_chars(self, n: int, param: str) -> None:
        """Refuse, before tokenizing, a text that cannot fit the context whatever its tokens."""
        if n > self.limits.max_prompt_chars:
            raise P.ApiError(400, f"the prompt has {n} characters, more than the context of "
                             f"{self.limits.max_seq} tokens can hold (at most "
                             f"{self.limits.max_prompt_chars})", param=param,
                             code="context_length_exceeded")

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.limits.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                             param="prompt")
        return list(ids)

    async def _tokenize(self, param: str, **kw) -> list[int]:
        try:
            return await self.group.tokenize(**kw)
        except RequestError as e:  # no tokenizer, or the chat template refused the messages
            raise P.ApiError(400, str(e), param=param) from None
        except GroupError as e:
            raise self._unavailable(e) from None

    def _unavailable(self, e: GroupError) -> P.ApiError:
        """The group broke: /health says so at once, and clients retry (Serve replaces us)."""
        self.last_health = (Health(False, str(e)), time.monotonic())
        return P.ApiError(503, str(e), type_="server_error", code="group_unavailable",
                          headers={"Retry-After": str(GROUP_RETRY_AFTER_S)})

    def _failure(self, e: BaseException, rid: str) -> P.ApiError:
        """What a generation's error says to the client."""
        if isinstance(e, RequestError):
            return P.ApiError(400, str(e))
        if isinstance(e, GroupError):
            return self._unavailable(e)
        log.error("request %s failed: %s", rid, e)  # RequestFailed: a fault of ours
        return P.ApiError(500, f"the server failed this request ({rid}); it was logged",
                          type_="server_error")

    # -- generation ------------------------------------------------------------------------
    async def _serve(self, rid: str, req, ids: list[int], default_max: int, *, chat: bool,
                     echo: str = ""):
        room = self.limits.max_seq - len(ids)
        if room < 1:
            raise P.ApiError(400, f"the prompt has {len(ids)} tokens; the context holds "
                             f"{self.limits.max_seq}", param="messages" if chat else "prompt",
                             code="context_length_exceeded")
        params = req.sampling(self.limits, room, default_max)
        if self.active + len(params) > self.info["n_slots"] + self.cfg.queue_limit:
            raise P.ApiError(503, "the server is at capacity; retry shortly",
                             type_="server_error", code="overloaded",
                             headers={"Retry-After": str(self.cfg.retry_after_s)})
        gens = _Generations(self, len(params))
        try:
            await gens.open(ids, params, rid)
        except (RequestError, GroupError, RequestFailed) as e:
            await gens.close()
            raise self._failure(e, rid) from None
        except BaseException:
            await gens.close()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _EventStream(self._sse(rid, len(ids), gens, chat, include_usage, echo), gens)
        try:
            outs = [new_result() for _ in params]
            async for i, ev in gens.merged():
                if isinstance(ev, Exception):
                    raise self._failure(ev, rid)
                add_event(outs[i], ev)
        finally:
            await gens.close()
        for o in outs:
            o["text"] = echo + o["text"]
        use = P.usage(len(ids), sum(len(o["tokens"]) for o in outs))
        return P.completion_body(rid, self.cfg.model_name, P.now(), outs, use, chat)

    async def _sse(self, rid: str, n_prompt: int, gens: _Generations, chat: bool,
                   include_usage: bool, echo: str):
        """SSE chunks of every choice as they come, then usage (if asked) and [DONE]. An error
        after the stream has started is sent as an error event before [DONE]: never silence."""
        model, created = self.cfg.model_name, P.now()
        generated, started = 0, set()
        if echo:
            for i in range(len(gens.streams)):
                yield P.sse(P.chunk(rid, model, created, i, echo, None, chat))
        async for i, ev in gens.merged():
            if isinstance(ev, Exception):
                yield P.sse(self._failure(ev, rid).body())
                continue
            generated += ev.token_id is not None
            first = chat and i not in started
            started.add(i)
            if ev.text or ev.finish_reason or first:
                yield P.sse(P.chunk(rid, model, created, i, ev.text, ev.finish_reason, chat,
                                    first=first))
        if include_usage:
            yield P.sse(P.usage_chunk(rid, model, created, P.usage(n_prompt, generated), chat))
        yield P.sse("[DONE]")


def build_app(args: dict | None = None):
    """The Serve application (`serve run deploy/<name>.yaml` imports this as its import_path).

    `args`: ServerConfig's fields, plus Serve's deployment settings (`deploy.config.DEPLOY_KEYS`).
    Keys in a file or an environment variable are read here, where the application is built.
    """
    cfg, dep = split_args(args)
    cfg = cfg.resolve_keys()
    return LadderServer.options(**deployment_options(cfg, **dep)).bind(asdict(cfg))


__all__ = ["LadderServer", "ServerConfig", "build_app", "deployment_options"]
