"""Run an aiohttp application on its own event loop in a daemon thread.

A server on its own loop serves sync tests, async tests running on another
loop, and subprocesses alike, and keeps serving while the test's loop is
blocked in a synchronous google-auth call.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

from aiohttp import web

T = TypeVar("T")

_START_TIMEOUT = 10.0


class BackgroundServer:
    """An aiohttp ``web.Application`` served on 127.0.0.1 from a background thread."""

    def __init__(
        self, app: web.Application, port: int = 0, sock: socket.socket | None = None
    ) -> None:
        self.app = app
        self._want_port = port
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (only after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's own event loop."""
        if self._loop is None:
            raise RuntimeError("server not started")
        return self._loop

    def start(self) -> Self:
        """Start serving; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"fake-server-{id(self):x}", daemon=True
        )
        self._thread.start()
        try:
            self._port = self.call(self._setup, timeout=_START_TIMEOUT)
        except BaseException:
            self._stop_loop()
            raise
        return self

    async def _setup(self) -> int:
        # Short shutdown timeout: hung handlers (fault injection, SSE, websockets)
        # must not hold up a test's teardown for aiohttp's default 60 s.
        runner = web.AppRunner(self.app, shutdown_timeout=0.5)
        await runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(runner, self._sock)
        else:
            site = web.TCPSite(runner, "127.0.0.1", self._want_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port: int = runner.addresses[0][1]
        return port

    def call(self, coro_fn: Callable[[], Awaitable[T]], timeout: float | None = 30.0) -> T:
        """Run ``coro_fn()`` on the server's loop and return its result."""

        async def run() -> T:
            return await coro_fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        """Stop serving, close the socket and end the thread (idempotent)."""
        if self._thread is None:
            return
        runner, self._runner = self._runner, None
        if runner is not None:
            self.call(runner.cleanup, timeout=_START_TIMEOUT)
        self._stop_loop()

    def _stop_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_START_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()
        self._thread = None
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
