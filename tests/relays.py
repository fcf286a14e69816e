"""An asyncio TCP relay to a Redis server, for tests that change what passes on the way.

`LoopThread` runs an event loop in a thread (for a relay beside a gateway process, or a gateway
between hypothesis examples) and stops it the way `asyncio.run` ends: every task left cancelled and
awaited first, so no socket or task outlives the loop to be found by the garbage collector later
(where pytest, warnings being errors, charges it to whichever test runs then).

`Relay` forwards both directions byte for byte and closes both sides as soon as either ends;
`close` ends the listener and every connection still open, and waits for them, so nothing is
left for the garbage collector to warn about after the event loop is gone.
A test subclasses it to choose the server a new connection goes to (`port`) or to change one
direction (`up`: client -> Redis, `down`: Redis -> client).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], seconds: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(seconds)

    def stop(self, seconds: float = 10) -> None:
        async def finish() -> None:
            this = asyncio.current_task()
            left = [task for task in asyncio.all_tasks() if task is not this]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            await asyncio.get_running_loop().shutdown_asyncgens()

        with contextlib.suppress(Exception):
            self.run(finish(), seconds)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(seconds)
        self.loop.close()


class Relay:
    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()  # every socket open, both sides

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.links):
            task.cancel()
        await asyncio.gather(*self.links, return_exceptions=True)
        # A link cancelled before it ever ran closed nothing: its client socket is still here.
        await _close(self.writers)
        self.writers.clear()
        if self.server is not None:
            await self.server.wait_closed()  # on 3.12+ this waits for the connections, ended above

    def port(self) -> int:
        """The server a new connection goes to."""
        return self.redis_port

    async def up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        """Client -> Redis. `link`: state the two directions of one connection share."""
        await pipe(r, w)

    async def down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, link: dict[str, object]) -> None:
        """Redis -> client."""
        await pipe(r, w)

    def _accepted(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """A plain callback, called as the connection is made: the socket is known to `close` from
        its first moment, before the link's task runs (or is cancelled without ever running)."""
        self.writers.add(client_w)
        task = asyncio.get_running_loop().create_task(self._link(client_r, client_w))
        self.links.add(task)
        task.add_done_callback(self.links.discard)

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        writers = [client_w]
        tasks: list[asyncio.Task[None]] = []
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.port())
            writers.append(redis_w)
            self.writers.add(redis_w)
            link: dict[str, object] = {}
            tasks = [asyncio.create_task(self.up(client_r, redis_w, link)),
                     asyncio.create_task(self.down(redis_r, client_w, link))]  # fmt: skip
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.writers.difference_update(writers)
            await _close(writers)


async def _close(writers: Iterable[asyncio.StreamWriter]) -> None:
    """Close every one at once (closing is immediate), then wait until each is closed."""
    writers = list(writers)
    for w in writers:
        w.close()
    for w in writers:
        with contextlib.suppress(Exception):
            await w.wait_closed()


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
