"""The HTTP/2 side, loaded when something first needs it.

h2, hpack and hyperframe (and our h2common, h2server, h2upstream, h2relay)
take 1-2 MiB of resident memory once imported (measured idle: 1.1 MiB with a
static token, 1.9 MiB with a service-account key). A proxy that only ever
sees HTTP/1.1 never needs them, so the listener and the request path hold
these stand-ins, which import the HTTP/2 modules at the first connection that
opens with the HTTP/2 preface (``LazyH2Connections.take``) or the first
request that needs an HTTP/2 connection upstream (``LazyH2Pool.open_stream``).
Nothing here imports h2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .h2common import Headers
    from .h2server import H2Connections, ServerStream
    from .h2upstream import H2Pool, Origin, UpstreamStream


class LazyH2Connections:
    """A listener's HTTP/2 side (http1.H2Handoff): h2server.H2Connections, made at the first h2c connection."""

    def __init__(self, handler: Callable[[ServerStream], Awaitable[None]], idle_timeout: float | None = None) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self._connections: H2Connections | None = None

    @property
    def loaded(self) -> H2Connections | None:
        """The HTTP/2 side, once a connection made it; None before."""
        return self._connections

    @property
    def count(self) -> int:
        return self._connections.count if self._connections is not None else 0

    def take(self, transport: asyncio.Transport, data: bytes) -> None:
        if self._connections is None:
            from .h2server import H2Connections

            self._connections = H2Connections(self.handler, self.idle_timeout)
        self._connections.take(transport, data)

    def shutdown(self) -> None:
        if self._connections is not None:
            self._connections.shutdown()

    def stream_tasks(self) -> set[asyncio.Future[None]]:
        return self._connections.stream_tasks() if self._connections is not None else set()

    def close(self) -> None:
        if self._connections is not None:
            self._connections.close()


class LazyH2Pool:
    """HTTP/2 connections to upstreams (h2upstream.H2Pool), made at the first request that needs one.

    One of these is shared by the request paths of successive reloads, as the pool itself was.
    """

    def __init__(self, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._pool: H2Pool | None = None

    @property
    def loaded(self) -> H2Pool | None:
        """The pool, once a request made it; None before."""
        return self._pool

    def get(self) -> H2Pool:
        if self._pool is None:
            from .h2upstream import H2Pool

            self._pool = H2Pool(self.connect_timeout)
        return self._pool

    async def open_stream(self, origin: Origin, headers: Headers, end_stream: bool) -> UpstreamStream:
        """A new stream to ``origin`` with ``headers`` sent (H2Pool.open_stream); raises H2UpstreamError."""
        return await self.get().open_stream(origin, headers, end_stream)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


__all__ = ["LazyH2Connections", "LazyH2Pool"]
