"""The Serve deployment: an OpenAI-compatible HTTP front for one TP group per replica.

A thin shim over the actor layer (`actors.TPGroup`): the replica owns bundle 0 of its placement
group and starts the group's ShardWorkers in bundles 1..tp, so Serve gang-schedules whole TP
groups and autoscaling adds and removes whole groups. `check_health` runs the group's collective
round trip: a replica whose group is broken fails it and Serve replaces it.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
GET /health (the group's own health check). Every error is an OpenAI-style body with a 4xx or
503; a client that goes away cancels its generation (the slot is freed at the next step).
"""


import asyncio
import hmac
import uuid
from dataclasses import asdict, dataclass, field, fields

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from actors.group import LINK_LABEL, GroupError, TPGroup
from deploy import protocol as P
from ladder.runner import GroupOptions
from ladder.scheduler import RequestError, add_event, new_result


@dataclass(kw_only=True)
class ServerConfig:
    """What a replica serves; the `args` of a Serve config's application (see deploy/*.yaml)."""

    model: str = "smollm2"  # a checkpoint: smollm2, a folder or a .gguf
    model_name: str = "smollm2"  # the id clients send as `model`
    tp: int = 2
    residual: str | None = "ladder:24-29"  # None: the checkpoint's own plan, else standard
    dtype: str = "float32"
    device: str = "cpu"
    comm: str = "auto"
    n_slots: int = 16
    max_seq: int = 2048
    threads: int = 1  # torch threads per rank
    head_split: str = "groups"  # groups | even: how attention heads are split over the ranks
    strategy: str = "PACK"  # placement of the ranks (the deployment's placement group)
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    queue_limit: int = 32  # generations waiting for a slot, past which: 503 + Retry-After
    retry_after_s: int = 1
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    metrics: bool = True  # Prometheus series through Ray's metrics agents
    interconnect: str = ""  # the link's label when the launch knows it (e.g. a shaped link)
    link: str = ""  # ranks only on nodes of this launcher link profile (Ray node label)
    health_timeout_s: float = 10.0
    fault_timeout_s: float = 20.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "ServerConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown server settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    def group_options(self) -> GroupOptions:
        return GroupOptions(model=self.model, tp=self.tp, residual=self.residual,
                            dtype=self.dtype, device=self.device, comm=self.comm,
                            n_slots=self.n_slots, max_seq=self.max_seq, threads=self.threads,
                            head_split=self.head_split, interconnect=self.interconnect)


REPLICA_MEMORY = 256 * 2**20  # bytes reserved for the replica process (bundle 0)

app = FastAPI(title="ladder-serve", docs_url=None, redoc_url=None)


_METRICS = []  # this replica process's GroupMetrics (errors by kind), set by LadderServer


@app.exception_handler(P.ApiError)
async def _api_error(request: Request, e: P.ApiError) -> JSONResponse:
    for m in _METRICS:
        m.on_error(f"http_{e.status}")
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Reservation:  # above the deployment: Serve serializes the class when it is decorated
    """Places in a replica's `active` count, taken when a request is admitted and given back
    as its generations end; what was never used (a stream whose body never started) is given
    back when the reservation is dropped."""

    def __init__(self, server: "LadderServer", n: int) -> None:
        self.server, self.left = server, n
        server.active += n

    def release(self, k: int) -> None:
        k = min(k, self.left)
        self.left -= k
        self.server.active -= k

    def __del__(self) -> None:
        self.release(self.left)


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
        self.max_seq = self.info["max_seq"]
        self.created = P.now()
        self.active = 0  # generations of this replica in the group (running or waiting)
        if self.cfg.metrics:
            from actors.metrics import GroupMetrics
            _METRICS[:] = [GroupMetrics(self.cfg.model_name, self.info["residual"],
                                        self.info["tp"], self.info["interconnect"])]

    async def check_health(self) -> None:
        """Serve's health check: the group's collective round trip, not mere liveness."""
        h = await self.group.health_async(self.cfg.health_timeout_s)
        if not h.healthy:
            raise RuntimeError(f"TP group unhealthy: {h.reason}")

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown(timeout_s=10)

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        h = await self.group.health_async(self.cfg.health_timeout_s)
        body = {"status": "ok" if h.healthy else "unhealthy", "reason": h.reason,
                "rtt_s": h.rtt_s, "group": self.group.name, "namespace": self.namespace,
                "tp": self.info["tp"],
                "interconnect": self.info["interconnect"], "residual": self.info["residual"]}
        return JSONResponse(body, status_code=200 if h.healthy else 503)

    @app.get("/stats")
    async def stats(self, request: Request) -> dict:
        """This replica's group: slots in use, queue, totals (per-step records left out)."""
        self._auth(request)
        st = await self.group.stats_async(since=float("inf"))
        st.pop("steps")
        return {"group": self.group.name, **st}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [{
            "id": self.cfg.model_name, "object": "model", "created": self.created,
            "owned_by": "ladder-serve", "max_model_len": self.max_seq,
            "tp": self.info["tp"], "residual": self.info["residual"],
            "residual_plan": self.info["residual_plan"], "adapted": self.info["adapted"],
            "interconnect": self.info["interconnect"]}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._auth(request)
        req = P.parse(P.CompletionRequest, await request.body())
        self._check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise P.ApiError(400, "one prompt per request (send a list of one string, a "
                                 "string, or token ids)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise P.ApiError(400, "the prompt is empty", param="prompt")
            ids = await self._tokenize(text=prompt)
        else:
            ids = list(prompt)
        text_prefix = prompt if (req.echo and isinstance(prompt, str)) else ""
        return await self._serve(req, ids, self.cfg.default_max_tokens, chat=False,
                                 echo=text_prefix)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._auth(request)
        req = P.parse(P.ChatRequest, await request.body())
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self._tokenize(messages=messages)
        return await self._serve(req, ids, self.max_seq, chat=True)

    # -- helpers ---------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.cfg.api_keys:
            return
        got = request.headers.get("authorization", "")
        key = got[7:] if got.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(key, k) for k in self.cfg.api_keys):
            raise P.ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                             type_="authentication_error", code="invalid_api_key")

    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise P.ApiError(404, f"the model {name!r} does not exist; this server serves "
                             f"{self.cfg.model_name!r}", param="model", code="model_not_found")

    async def _tokenize(self, **kw) -> list[int]:
        try:
            return await self.group.tokenize(**kw)
        except RequestError as e:
            raise P.ApiError(400, str(e)) from None
        except GroupError as e:
            raise P.ApiError(503, str(e), type_="server_error", code="group_unavailable",
                             headers={"Retry-After": "5"}) from None

    async def _serve(self, req, ids: list[int], default_max: int, *, chat: bool, echo: str = ""):
        if not ids:
            raise P.ApiError(400, "the prompt is empty", param="prompt")
        room = self.max_seq - len(ids)
        if room < 1:
            raise P.ApiError(400, f"the prompt has {len(ids)} tokens; the context holds "
                             f"{self.max_seq}", param="messages" if chat else "prompt",
                             code="context_length_exceeded")
        params = req.sampling(default_max, room)
        if self.active + len(params) > self.info["n_slots"] + self.cfg.queue_limit:
            raise P.ApiError(503, "the server is at capacity; retry shortly",
                             type_="server_error", code="overloaded",
                             headers={"Retry-After": str(self.cfg.retry_after_s)})
        res = _Reservation(self, len(params))  # taken before any await: bursts see it
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(rid, ids, params, chat, include_usage, echo,
                                               res), media_type="text/event-stream")
        try:
            outs = await asyncio.gather(*(self._collect(ids, sp, f"{rid}-{i}", res)
                                          for i, sp in enumerate(params)))
        except RequestError as e:
            raise P.ApiError(400, str(e)) from None
        except GroupError as e:
            raise P.ApiError(503, str(e), type_="server_error", code="group_unavailable",
                             headers={"Retry-After": "5"}) from None
        for o in outs:
            o["text"] = echo + o["text"]
        use = P.usage(len(ids), sum(len(o["tokens"]) for o in outs))
        return P.completion_body(rid, self.cfg.model_name, P.now(), outs, use, chat)

    async def _collect(self, ids: list[int], sp, request_id: str, res: "_Reservation") -> dict:
        out = new_result()
        async for ev in self._generation(ids, sp, request_id, res):
            add_event(out, ev)
        return out

    async def _generation(self, ids: list[int], sp, request_id: str, res: "_Reservation"):
        """The group's stream of one generation; its place in `active` is freed at the end."""
        try:
            async for ev in self.group.stream(ids, sp, request_id=request_id):
                yield ev
        finally:
            res.release(1)

    async def _sse(self, rid: str, ids: list[int], params: list, chat: bool,
                   include_usage: bool, echo: str, res: "_Reservation"):
        """SSE chunks of every choice as they come, then usage (if asked) and [DONE]. An error
        after the stream has started is sent as an error event before [DONE]: never silence."""
        model, created = self.cfg.model_name, P.now()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, sp) -> None:
            try:
                async for ev in self._generation(ids, sp, f"{rid}-{i}", res):
                    await queue.put((i, ev))
            except BaseException as e:  # noqa: BLE001 - reported in-band below
                await queue.put((i, e))
                if isinstance(e, asyncio.CancelledError):
                    raise
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
        open_, generated = len(tasks), 0
        started = set()
        try:
            if echo:
                for i in range(len(params)):
                    yield P.sse(P.chunk(rid, model, created, i, echo, None, chat))
            while open_:
                i, ev = await queue.get()
                if ev is None:
                    open_ -= 1
                    continue
                if isinstance(ev, BaseException):
                    status = 400 if isinstance(ev, RequestError) else 503
                    err = P.ApiError(status, str(ev), type_="invalid_request_error"
                                     if status == 400 else "server_error")
                    yield P.sse(err.body())
                    continue
                if ev.token_id is not None:
                    generated += 1
                first = chat and i not in started
                started.add(i)
                if ev.text or ev.finish_reason or first:
                    yield P.sse(P.chunk(rid, model, created, i, ev.text,
                                        ev.finish_reason, chat, first=first))
            if include_usage:
                yield P.sse(P.usage_chunk(rid, model, created, P.usage(len(ids), generated),
                                          chat))
            yield P.sse("[DONE]")
        finally:
            for t in tasks:  # a client that went away: closing the streams cancels them
                t.cancel()


def build_app(args: dict | None = None):
    """The Serve application (`serve run deploy/<name>.yaml` imports this as its import_path).

    `args`: ServerConfig's fields, plus the deployment settings `num_replicas`,
    `autoscaling_config`, `max_ongoing_requests`, `max_queued_requests`,
    `health_check_period_s`, `health_check_timeout_s`, `graceful_shutdown_timeout_s`.
    """
    args = dict(args or {})
    deploy_keys = ("num_replicas", "autoscaling_config", "max_ongoing_requests",
                   "max_queued_requests", "health_check_period_s", "health_check_timeout_s",
                   "graceful_shutdown_timeout_s")
    dep = {k: args.pop(k) for k in deploy_keys if k in args}
    cfg = ServerConfig.from_dict(args)
    return LadderServer.options(**deployment_options(cfg, **dep)).bind(asdict(cfg))


def deployment_options(cfg: ServerConfig, **overrides) -> dict:
    """Gang scheduling: bundle 0 for the replica itself, one bundle per rank. The replica
    refuses work past `n_slots + queue_limit` itself (503 with an OpenAI-style body and
    Retry-After); Serve's own queue limits sit above that as a safety net."""
    rank = {"CPU": float(cfg.threads)}
    if cfg.device == "cuda":
        rank = {"CPU": 1.0, "GPU": 1.0}
    # the replica only relays HTTP and token events: it reserves memory, not a core, so that
    # a TP=2 group fits a 2-core machine
    replica = {"memory": REPLICA_MEMORY}
    opts = {
        "ray_actor_options": {"num_cpus": 0, "memory": REPLICA_MEMORY},
        "placement_group_bundles": [replica] + [dict(rank) for _ in range(cfg.tp)],
        "placement_group_strategy": cfg.strategy,
        # `link`: the ranks' bundles only on nodes the launcher labelled with that profile
        **({"placement_group_bundle_label_selector":
            [{}] + [{LINK_LABEL: cfg.link}] * cfg.tp} if cfg.link else {}),
        "max_ongoing_requests": cfg.n_slots + cfg.queue_limit + 8,
        "max_queued_requests": 4 * (cfg.n_slots + cfg.queue_limit),
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "health_check_period_s": 5.0,
        "health_check_timeout_s": cfg.health_timeout_s + 10,
        "graceful_shutdown_timeout_s": 30.0,
    }
    opts.update(overrides)
    if "autoscaling_config" in opts:
        opts.pop("num_replicas", None)
    return opts


__all__ = ["LadderServer", "ServerConfig", "build_app", "deployment_options"]
