"""A request's generations on the group while the HTTP layer serves them: opened together,
merged as they come, closed together however the request ends."""

from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse

from ladder.engine.group import Group


class Generations:
    """The open generations of one request (one per choice). Their `n` places in `count`
    (the server's active generations, a one-item list) are taken at once and held until
    `close`, which also cancels what is unfinished."""

    def __init__(self, group: Group, count: list[int], n: int) -> None:
        self.group, self.count, self.n = group, count, n
        self.streams: list = []
        self.tasks: list[asyncio.Task] = []
        count[0] += n  # taken before any await: a burst sees it

    async def open(self, ids: list[int], params: list, rid: str) -> None:
        for i, sp in enumerate(params):
            self.streams.append(await self.group.open(ids, sp, f"{rid}-{i}"))

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
        self.count[0] -= self.n
        self.n = 0


class EventStream(StreamingResponse):
    """An SSE response that closes its generations however it ends (finished, or the client
    went away before or while it was sent)."""

    def __init__(self, body, gens: Generations) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.gens = gens

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.gens.close()
