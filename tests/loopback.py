"""A raw asyncio server on 127.0.0.1 for tests: it owns the listener, the port and the task of
every open connection; a subclass answers each connection in `serve`.

`close()` stops listening, cancels the connections still open and waits for them (without a bound,
or `close_timeout` seconds), then for the listener. Every connection ends the same way: its task
leaves the open set, then its writer is closed."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class LoopbackServer:
    close_timeout: float | None = None  # None: wait for every cancelled connection
    close_errors: tuple[type[BaseException], ...] = (ConnectionError,)  # ignored while closing a writer
    stream_limit: int = 2**16  # asyncio's default StreamReader buffer limit

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        assert self.port, "the server was not started"
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, limit=self.stream_limit)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._closing()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if self.close_timeout is None:
            await asyncio.gather(*tasks, return_exceptions=True)
        elif tasks:
            await asyncio.wait(tasks, timeout=self.close_timeout)
        if self._server is not None:
            await self._server.wait_closed()

    def _closing(self) -> None:
        """Called by close() once the listener is closed, before the open connections are cancelled."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers one connection; it should end quietly when cancelled by close()."""
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.serve(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(*self.close_errors):
                await writer.wait_closed()
