"""The serving contract: what a TP group offers the layers above (the HTTP server, the CLI, the
benchmarks), whether its ranks are local processes (`ladder.engine.local.LocalTPGroup`) or Ray
actors (`actors.TPGroup`). Both drive the same leader loop (`ladder.engine.leader.Leader`).

A request is `open`ed (it returns once rank 0 has accepted it, so that a server can answer with
an error before any byte of a stream) and then streamed; `generate` runs prompts to completion
for scripts. Errors: `RequestError` (the request cannot be served as asked: nothing ran),
`RequestFailed` (it failed alone: the group and the others go on), `GroupError` (the group could
not start or broke: every request of it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from ladder.engine.sampling import SamplingParams
from ladder.engine.scheduler import RequestFailed, TokenEvent, add_event, new_result


class GroupError(RuntimeError):
    """The group could not start, or it broke."""


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: str = ""
    rtt_s: float | None = None  # the collective round trip, when healthy


@dataclass(frozen=True, kw_only=True)
class GroupInfo:
    """What a group serves, as its leader reports it."""

    name: str
    tp: int
    interconnect: str  # the link's label (shm, loopback, network, nvlink, ...)
    emulated: bool  # part of the link's timing is emulated
    residual: str  # standard | partial | ladder | parallel | desync
    residual_plan: str  # e.g. ladder:24-29
    adapted: bool  # the checkpoint is a ladder adaptation of a standard model
    max_seq: int
    n_slots: int
    vocab_size: int
    has_tokenizer: bool
    max_token_chars: int  # the most characters one token stands for (0: no tokenizer)
    config: dict = field(default_factory=dict)  # the model's config
    device_name: str = ""  # rank 0's GPU as CUDA names it ("" on the CPU)


class EventStream(Protocol):
    """One request's TokenEvents as they come; `aclose` cancels it unless it finished."""

    def __aiter__(self) -> "EventStream": ...

    async def __anext__(self) -> TokenEvent: ...

    async def aclose(self) -> None: ...


class Group(ABC):
    """A TP group serving one model. Use as a context manager or call `shutdown()`."""

    info: GroupInfo

    @abstractmethod
    async def open(self, prompt: list[int], params: SamplingParams,
                   request_id: str | None = None) -> EventStream:
        """Submit one request; returns its stream once rank 0 has accepted it. Raises
        RequestError (it cannot be served) or GroupError (the group is down)."""

    async def open_many(self, prompts: list[list[int]], params: list[SamplingParams]
                        ) -> list[EventStream]:
        """`open` for several requests (a local group submits them in one step)."""
        streams: list[EventStream] = []
        try:
            for p, sp in zip(prompts, params):
                streams.append(await self.open(p, sp))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return streams

    @abstractmethod
    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None
                       ) -> list[int]:
        """Prompt ids of `text` (as is) or of chat `messages` (through the chat template)."""

    @abstractmethod
    async def detokenize(self, ids: list[int]) -> str:
        """The text of token `ids` (RequestError for an id outside the vocabulary)."""

    @abstractmethod
    async def health(self, timeout_s: float = 10.0) -> Health:
        """A collective round trip through every rank, under `timeout_s`."""

    @abstractmethod
    async def cancel(self, request_id: str) -> None: ...

    @abstractmethod
    async def stats(self, since: float = 0.0) -> dict:
        """Totals, queue and slots, and the records of the steps that ended after `since`
        (a time.time() value)."""

    @abstractmethod
    def shutdown(self) -> None:
        """End every rank; pending requests end."""

    async def stream(self, prompt: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[TokenEvent]:
        """`open`, then its events; leaving early cancels the request."""
        async with contextlib.aclosing(await self.open(prompt, params, request_id)) as events:
            async for ev in events:
                yield ev

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
                 on_event: Callable[[int, TokenEvent], None] | None = None) -> list[dict]:
        """All prompts at once (continuous batching does the rest), run to completion: one
        dict per prompt with tokens, text, finish_reason, stats (and the error of a request
        that failed alone). `on_event(i, event)` sees each event as it comes. For scripts."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        return asyncio.run(self._generate(prompts, params, on_event))

    async def _generate(self, prompts, params, on_event) -> list[dict]:
        streams = await self.open_many(prompts, params)

        async def one(i: int, events: EventStream) -> dict:
            out = new_result(logprobs=params[i].logprobs is not None)
            try:
                async for ev in events:
                    add_event(out, ev)
                    if on_event is not None:
                        on_event(i, ev)
            except RequestFailed as e:  # that request alone: the others' results stand
                out["finish_reason"], out["error"] = "error", str(e)
            finally:
                await events.aclose()
            return out

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(streams))))

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text` (as a user turn of the chat template with `chat`). For scripts."""
        messages = [{"role": "user", "content": text}] if chat else None
        return asyncio.run(self.tokenize(None if chat else text, messages))

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
