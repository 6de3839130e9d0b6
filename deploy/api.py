"""The OpenAI-compatible HTTP API over a TP group: a thin layer over the serving contract
(`ladder.engine.group.Group`), so the same app serves a Ray group in a Serve replica
(`deploy.server`) and a local group in a test. `deploy.app` makes the FastAPI app of it.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
POST /tokenize and /detokenize (vLLM's), GET /health (liveness from the last collective check;
details with a valid key), GET /stats, GET /metrics (the replica's own series:
deploy.replica_metrics). Every response carries X-Request-Id: the client's own (1-128
printable ASCII characters) or one made here; it names the request in the logs and in its
completion's id (`cmpl-<X-Request-Id>`).
Every error is an OpenAI-style body: a 4xx for what the client sent (413 past the body limit,
checked before parsing), 503 with Retry-After while the group is down or full, 500 only for a
fault of ours, logged with the request id. Validation ends before the first byte of a 200: a
stream starts only once the group has accepted every choice. A client that goes away cancels
its generations (their slots are freed at the next step).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deploy import protocol as P
from deploy import responses as R
from deploy import structured as S
from deploy.config import ServerConfig
from deploy.replica_metrics import CONTENT_TYPE, ReplicaMetrics
from deploy.streams import EventStream, Generations
from ladder.engine.group import Group, GroupError, Health
from ladder.engine.scheduler import RequestError, RequestFailed, add_event, new_result
from ladder.plan.serving import Prediction

log = logging.getLogger("ray.serve")
GROUP_RETRY_AFTER_S = 5  # a broken group's replica is replaced within about this many seconds


class OpenAIServer:
    """What the routes do, over `group`. `metrics` (duck-typed: on_error) counts errors by
    kind, or None; `details` are shown on /health to a valid key (e.g. the Ray namespace)."""

    def __init__(self, group: Group, cfg: ServerConfig, *, metrics=None,
                 details: dict | None = None) -> None:
        self.group, self.cfg, self.metrics = group, cfg, metrics
        self.details = details or {}
        info = self.info = group.info
        self.limits = P.Limits(
            vocab_size=info.vocab_size, max_seq=info.max_seq,
            max_prompt_chars=cfg.max_prompt_chars or info.max_seq * max(1, info.max_token_chars),
            default_max_tokens=cfg.default_max_tokens)
        self.keys = [k.encode() for k in cfg.api_keys]
        self.created = R.now()
        self.active = [0]  # generations of ours in the group (running or waiting)
        self.last_health = (Health(True, "started"), time.monotonic())
        self.own = ReplicaMetrics(cfg.model_name, info.residual, info.tp, info.interconnect)
        self.prediction = Prediction(info.config, info.tp, info.residual_plan, info.interconnect,
                                     cfg.dtype, cfg.head_split, cfg.device, info.device_name)
        log.info("%s: %s", info.name, self.prediction.describe())

    async def check_health(self) -> None:
        """The periodic health check (Serve's): the group's collective round trip, the one
        place that runs it; /health reports its last result."""
        h = await self.group.health(self.cfg.health_timeout_s)
        self.last_health = (h, time.monotonic())
        if not h.healthy:
            raise RuntimeError(f"TP group unhealthy: {h.reason}")

    # -- routes ----------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        """Liveness without a key, from the last collective check; the details with one."""
        h, at = self.last_health
        body: dict = {"status": "ok" if h.healthy else "unhealthy"}
        if self.key_ok(request):
            body.update(checked_s_ago=round(time.monotonic() - at, 3), reason=h.reason,
                        rtt_s=h.rtt_s, group=self.info.name, tp=self.info.tp,
                        interconnect=self.info.interconnect, residual=self.info.residual,
                        **self.details)
        return JSONResponse(body, status_code=200 if h.healthy else 503)

    async def metrics_text(self, request: Request) -> Response:
        """This replica's own series (deploy.replica_metrics); no key needed, as /health."""
        try:
            return Response(self.own.text(await self.group.stats(since=float("inf"))),
                            media_type=CONTENT_TYPE)
        except GroupError:  # a broken group: the API's own series still tell it
            return Response(self.own.text({}), media_type=CONTENT_TYPE)

    async def stats(self, request: Request) -> dict:
        """The group's slots in use, queue and totals (per-step records left out)."""
        self.begin(request, "stats")
        try:
            st = await self.group.stats(since=float("inf"))
        except GroupError as e:
            raise self.unavailable(e) from None
        st.pop("steps")
        return {"group": self.info.name, **st}

    async def models(self, request: Request) -> dict:
        """The served model, and its predicted decode step beside the last minute's."""
        self.begin(request, "models")
        i = self.info
        try:
            steps = (await self.group.stats(since=time.time() - 60.0))["steps"]
        except GroupError:
            steps = []  # the model's side still says what to expect
        performance = {"prediction": self.prediction.describe(),
                       "decode_step": self.prediction.beside(steps)}
        return {"object": "list", "data": [{
            "id": self.cfg.model_name, "object": "model", "created": self.created,
            "owned_by": "ladder-serve", "max_model_len": self.limits.max_seq, "tp": i.tp,
            "residual": i.residual, "residual_plan": i.residual_plan, "adapted": i.adapted,
            "interconnect": i.interconnect, "performance": performance}]}

    async def tokenize_text(self, request: Request) -> dict:
        """vLLM's /tokenize: the ids of a prompt or of chat messages (with the template)."""
        self.begin(request, "tok")
        req = P.parse(P.TokenizeRequest, await self.body(request))
        if req.model is not None:
            self.check_model(req.model)
        if req.prompt is not None:
            ids = await self.tokenize("prompt", text=req.prompt)
        else:
            ids = await self.tokenize("messages", messages=[
                {"role": m.role, "content": m.text()} for m in req.messages])
        return {"count": len(ids), "max_model_len": self.limits.max_seq, "tokens": ids,
                "token_strs": None}

    async def detokenize(self, request: Request) -> dict:
        """vLLM's /detokenize: the text of token ids."""
        self.begin(request, "detok")
        req = P.parse(P.DetokenizeRequest, await self.body(request))
        if req.model is not None:
            self.check_model(req.model)
        try:
            return {"prompt": await self.group.detokenize(list(req.tokens))}
        except RequestError as e:  # an id outside the vocabulary, or no tokenizer
            raise P.ApiError(400, str(e), param="tokens") from None
        except GroupError as e:
            raise self.unavailable(e) from None

    async def completions(self, request: Request):
        rid = self.begin(request, "cmpl")
        req = P.parse(P.CompletionRequest, await self.body(request))
        self.check_model(req.model)
        prompt = req.prompt_text_or_ids()
        if isinstance(prompt, str):
            self.check_chars(len(prompt), "prompt")
            ids = await self.tokenize("prompt", text=prompt)
        else:  # token ids: the group checks them against the vocabulary before accepting
            ids = list(prompt)
        echo = prompt if req.echo and isinstance(prompt, str) else ""
        return await self.serve(rid, req, ids, self.limits.default_max_tokens, chat=False,
                                echo=echo)

    async def chat_completions(self, request: Request):
        rid = self.begin(request, "chatcmpl")
        req = P.parse(P.ChatRequest, await self.body(request))
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await self.tokenize("messages", messages=messages)
        return await self.serve(rid, req, ids, self.limits.max_seq, chat=True)

    # -- checks ----------------------------------------------------------------------------
    def begin(self, request: Request, prefix: str) -> str:
        """A request's id (its completion's id, in its error responses and logs: the
        X-Request-Id after a prefix) and its key check."""
        rid = f"{prefix}-{request.state.request_id}"
        request.state.rid = rid
        if not self.key_ok(request):
            raise P.ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                             type_="authentication_error", code="invalid_api_key")
        return rid

    def key_ok(self, request: Request) -> bool:
        if not self.keys:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # compared as bytes: a header may hold any character, and a timing-safe compare of
        # str takes ASCII only
        got = key.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(got, k)
                                                  for k in self.keys)

    async def body(self, request: Request) -> bytes:
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

    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise P.ApiError(404, f"the model {name!r} does not exist; this server serves "
                             f"{self.cfg.model_name!r}", param="model", code="model_not_found")

    def check_chars(self, n: int, param: str) -> None:
        """Refuse, before tokenizing, a text that cannot fit the context whatever its tokens."""
        if n > self.limits.max_prompt_chars:
            raise P.ApiError(400, f"the prompt has {n} characters, more than the context of "
                             f"{self.limits.max_seq} tokens can hold (at most "
                             f"{self.limits.max_prompt_chars})", param=param,
                             code="context_length_exceeded")

    async def tokenize(self, param: str, **kw) -> list[int]:
        try:
            return await self.group.tokenize(**kw)
        except RequestError as e:  # no tokenizer, or the chat template refused the messages
            raise P.ApiError(400, str(e), param=param) from None
        except GroupError as e:
            raise self.unavailable(e) from None

    def unavailable(self, e: GroupError) -> P.ApiError:
        """The group broke: /health says so at once, and clients retry (Serve replaces us)."""
        self.last_health = (Health(False, str(e)), time.monotonic())
        return P.ApiError(503, str(e), type_="server_error", code="group_unavailable",
                          headers={"Retry-After": str(GROUP_RETRY_AFTER_S)})

    def failure(self, e: BaseException, rid: str) -> P.ApiError:
        """What a generation's error says to the client."""
        if isinstance(e, RequestError):
            return P.ApiError(400, str(e))
        if isinstance(e, GroupError):
            return self.unavailable(e)
        log.error("request %s failed: %s", rid, e)  # RequestFailed: a fault of ours
        return P.ApiError(500, f"the server failed this request ({rid}); it was logged",
                          type_="server_error")

    # -- generation ------------------------------------------------------------------------
    async def serve(self, rid: str, req, ids: list[int], default_max: int, *, chat: bool,
                    echo: str = ""):
        params = req.sampling(self.limits, len(ids), default_max)
        if self.active[0] + len(params) > self.info.n_slots + self.cfg.queue_limit:
            raise P.ApiError(503, "the server is at capacity; retry shortly",
                             type_="server_error", code="overloaded",
                             headers={"Retry-After": str(self.cfg.retry_after_s)})
        gens = Generations(self.group, self.active, len(params))
        try:  # unique in the group even when clients reuse an X-Request-Id
            await gens.open(ids, params, f"{rid}.{uuid.uuid4().hex[:8]}")
        except (RequestError, GroupError, RequestFailed) as e:
            await gens.close()
            raise self.failure(e, rid) from None
        except BaseException:
            await gens.close()
            raise
        obs = self.own.request(len(ids))
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            calls = [S.CallStream(req.forced_call) for _ in params] \
                if getattr(req, "forced_call", None) else None
            return EventStream(self.sse(rid, len(ids), gens, chat, usage, echo, obs, calls),
                               gens)
        try:
            outs = [new_result(logprobs=params[0].logprobs is not None) for _ in params]
            async for i, ev in gens.merged():
                if isinstance(ev, Exception):
                    raise self.failure(ev, rid)
                obs.event(ev)
                add_event(outs[i], ev)
        finally:
            await gens.close()
        obs.done()
        for o in outs:
            o["text"] = echo + o["text"]
        use = R.usage(len(ids), sum(len(o["tokens"]) for o in outs),
                      R.cached_tokens([o["stats"] for o in outs]))
        return R.completion_body(rid, self.cfg.model_name, R.now(), outs, use, chat,
                                 echoed=len(echo), call=getattr(req, "forced_call", None))

    async def sse(self, rid: str, n_prompt: int, gens: Generations, chat: bool,
                  include_usage: bool, echo: str, obs, calls: list | None = None):
        """SSE chunks of every choice as they come, then usage (if asked) and [DONE]. An error
        after the stream has started is sent as an error event before [DONE]: never silence."""
        model, created = self.cfg.model_name, R.now()
        generated, started, finals = 0, set(), []
        offset = [len(echo)] * len(gens.streams)  # characters streamed per choice (logprobs)
        if echo:
            for i in range(len(gens.streams)):
                yield R.sse(R.chunk(rid, model, created, i, echo, None, chat))
        async for i, ev in gens.merged():
            if isinstance(ev, Exception):
                yield R.sse(self.failure(ev, rid).body())
                continue
            generated += ev.token_id is not None
            if ev.stats is not None:
                finals.append(ev.stats)
            obs.event(ev)
            first = chat and i not in started
            started.add(i)
            lps = None
            if ev.logprob is not None:
                items = [(ev.logprob, ev.top_logprobs)]
                if ev.prompt_logprobs:  # echo: the prompt's tokens first, counted from 0
                    items[:0], offset[i] = ev.prompt_logprobs, 0
                lps = R.logprobs_body(items, chat, offset[i])
                offset[i] += sum(len(s.text) for s, _ in items)
            text, call = ev.text, None
            if calls is not None:  # a forced tool call: its arguments, not content
                text, call = calls[i].delta(text, first, ev.finish_reason)
            if text or ev.finish_reason or first or lps or call:
                yield R.sse(R.chunk(rid, model, created, i, text, ev.finish_reason, chat,
                                    first=first, logprobs=lps, tool_call=call))
        obs.done()
        if include_usage:
            yield R.sse(R.usage_chunk(rid, model, created,
                                      R.usage(n_prompt, generated, R.cached_tokens(finals)),
                                      chat))
        yield R.sse("[DONE]")


def _too_large(limit: int) -> P.ApiError:
    return P.ApiError(413, f"the request body is larger than {limit} bytes",
                      code="request_too_large")
