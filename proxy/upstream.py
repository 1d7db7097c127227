"""A lean upstream client for plain GET and HEAD requests without a body.

Profiles showed aiohttp's ClientSession as the largest cost per proxied request
(request object, connector, timers, reader and payload machinery). For the
common case, a request without a body answered by a plain response, this module
does the same with less: a keep-alive pool of asyncio Protocols per upstream,
one request head written at once, httptools (llhttp) parsing the response, and
the body handed over with flow control (reading pauses while the client is
behind): a body of known length is piped, each part written to the client as
it is parsed. Everything else (bodies, websockets, routes behind an outbound proxy)
stays on the ClientSession path in forward.py.

Behaviour matches that path: same error reasons, a stale pooled connection is
retried once on a fresh one (as aiohttp does for idempotent requests), nothing
is decompressed, and a connection whose response did not end cleanly is closed,
never reused.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from aiohttp import hdrs
from multidict import CIMultiDict

from .errors import UpstreamError, UpstreamTimeout, redact
from .policy.headers import HOP_BY_HOP, UPSTREAM_CORS
from .policy.router import CompiledRoute

_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
#: Lengths of the hop-by-hop names: most names are passed over without lower().
_HOP_LENGTHS = frozenset(len(n) for n in _HOP_BY_HOP)

# What on_header notices about a response head, as bits of _Connection.seen.
_LENGTH = 1  # Content-Length (digits only)
_CHUNKED = 2  # Transfer-Encoding
_DATE = 4
_SERVER = 8
_TYPE = 16  # Content-Type
_CONNECTION = 32
_REWRITTEN = 64  # a header the proxy rewrites (Location, Set-Cookie) or removes (upstream CORS)
_UNUSUAL = 128  # a value that is not ASCII, or a Content-Length that is not just digits
#: Names on_header looks for, lower-cased, and the bit each sets.
_WATCHED = {
    b"content-length": _LENGTH,
    b"transfer-encoding": _CHUNKED,
    b"date": _DATE,
    b"server": _SERVER,
    b"content-type": _TYPE,
    b"connection": _CONNECTION,
    b"location": _REWRITTEN,
    b"set-cookie": _REWRITTEN,
    **{name.lower().encode(): _REWRITTEN for name in UPSTREAM_CORS},
}
_WATCHED_LENGTHS = frozenset(len(n) for n in _WATCHED)
#: A head aiohttp would add nothing to: framed by length, with Date, Server and Content-Type.
_COMPLETE_HEAD = _LENGTH | _DATE | _SERVER | _TYPE
#: Connection tokens that name no other header.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})
#: Methods the lean path carries (without a request body).
METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})
#: Response body bytes queued for the client before reading from the upstream pauses
#: (bodies read with read(): chunked ones), and the most read from an upstream socket
#: at once, into one buffer all connections share. Measured with 64 concurrent 1 MiB
#: downloads (bench/run.py): 256 KiB reads (uvloop's own size) with queued parts
#: peaked at ~70 MiB RSS, 64 KiB at ~53 MiB; with the pipe below, ~46 MiB.
_HIGH_WATER = 16 * 1024
_READ_SIZE = 64 * 1024
#: Bytes waiting in the client's transport before a piped body (pipe()) pauses the upstream.
PIPE_HIGH_WATER = 64 * 1024
#: Idle connections kept per upstream, and how long one may sit idle (below the
#: usual server keep-alive of 60 s or more, so the upstream rarely closes it first).
#: As many as the client connections allowed by default (limits.max_connections):
#: with 256, a load at 1,000 connections closed and reopened several hundred
#: upstream connections a second (bench/run.py c1000).
_MAX_IDLE = 1024
_IDLE_SECONDS = 30.0
#: Response head bounds, as aiohttp's client: one field, how many, and in all.
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 64 * 1024


class Disconnected(Exception):
    """The upstream closed the connection (``received``: whether any response byte came)."""

    def __init__(self, received: bool, exc: BaseException | None = None) -> None:
        super().__init__("Server disconnected")
        self.received = received
        self.exc = exc


class _Connection(asyncio.BufferedProtocol):
    """One upstream HTTP/1.1 connection carrying one exchange at a time.

    A buffered protocol: the loop reads into ``read_buffer`` (shared by every
    connection of a LeanClient) and the parser takes the bytes out at once, as
    body parts of their own. Nothing else runs between a read and its
    ``buffer_updated``, so one buffer serves all; and a read is at most
    ``_READ_SIZE``, where a plain protocol gets whatever the loop reads (256 KiB
    with uvloop) before reading can pause: under many large downloads that was
    most of the proxy's memory.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, read_buffer: memoryview | None = None) -> None:
        self.loop = loop
        self.read_buffer = read_buffer if read_buffer is not None else memoryview(bytearray(_READ_SIZE))
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        #: Fires at the route's deadline unless the response head came first.
        self.timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser: Any = None
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        #: Values of Connection headers (the names they list are hop-by-hop too).
        self.connection_values: list[bytes] = []
        #: What on_header noticed (the _LENGTH, _DATE, ... bits).
        self.seen = 0
        self.head_bytes = 0
        self.head_error: UpstreamProtocolError | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error: BaseException | None = None
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.head_only = False
        self.until_eof = False
        #: While set, body parts go to it as they are parsed (pipe); else they queue for read().
        self.sink: Callable[[bytes], bool] | None = None
        self.sink_error: BaseException | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.parser is None or self.complete:
            # Bytes nobody asked for: the framing is off, the connection unusable.
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(self.head_error or UpstreamProtocolError(f"invalid HTTP response ({type(e).__name__})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.parser is not None and not self.complete:
            if exc is None and self.until_eof and self.head is not None and self.head.done():
                # A body delimited by the end of the connection has ended.
                self.on_message_complete()
            else:
                self._fail(Disconnected(self.received, exc))

    # -- httptools callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request: the upstream's framing is off.
            raise UpstreamProtocolError("unsolicited response")

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        # The same bounds aiohttp's client applies: a hostile upstream must not
        # push an unbounded head through the proxy's memory.
        size = len(name) + len(value)
        self.head_bytes += size
        if size > MAX_FIELD_SIZE or len(self.raw_headers) >= MAX_HEADERS or self.head_bytes > MAX_HEAD_BYTES:
            self.head_error = UpstreamProtocolError("response headers too large")
            raise self.head_error
        self.raw_headers.append((name, value))
        # The few names that matter here, told apart by length first (no lower() for the rest).
        if len(name) in _WATCHED_LENGTHS:
            bit = _WATCHED.get(name.lower(), 0)
            if bit == _CONNECTION:
                self.connection_values.append(value)
            elif bit == _LENGTH and not value.isdigit():
                bit |= _UNUSUAL
            self.seen |= bit
        if not value.isascii():
            self.seen |= _UNUSUAL

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Informational (103 Early Hints): not relayed; the real answer follows.
            self.reason = ""
            self.raw_headers = []
            self.connection_values = []
            self.seen = 0
            return
        self.status = status
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.until_eof = not self.seen & (_LENGTH | _CHUNKED) and status not in (204, 304)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.head_only:
            # A response to HEAD has no body whatever its headers say; llhttp cannot be
            # told, so the exchange ends here and the connection is not reused.
            self.keep_alive = False
            self.until_eof = False
            self.complete = True
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            try:
                behind = sink(body)
            except Exception as e:  # the client's connection is gone: pipe() raises it
                self.sink = None
                self.sink_error = e
                behind = True
            if behind and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
                self._wake()
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an informational response
        self.complete = True
        self._wake()

    # -- the exchange ---------------------------------------------------------

    def send(self, head: bytes, head_only: bool, deadline: float) -> asyncio.Future[None]:
        """Write a request head; the future resolves when the response head is in.

        It fails with TimeoutError (and the connection is closed) if the head is not
        in by ``deadline`` (loop time): one timer on the connection, cheaper per
        request than a timeout context around the wait.
        """
        self._reset()
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self.head = self.loop.create_future()
        self.timer = self.loop.call_at(deadline, self._head_timeout)
        assert self.transport is not None
        self.transport.write(head)
        return self.head

    def _head_timeout(self) -> None:
        self.timer = None
        self._fail(TimeoutError())
        self.close()

    async def read(self) -> bytes:
        """The next part of the body; b"" at its end. Raises if the upstream broke off."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await self.waiter
        data = self.take()
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def pipe(self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]) -> None:
        """Hand the rest of the body to ``sink`` as it is parsed, inside the read callback.

        ``sink`` writes a part to the client and says whether the client is behind;
        then reading pauses until ``drain`` returns. No part waits in between, and
        no task switch happens per part while the client keeps up. Raises like
        read() if the upstream breaks off, and what ``sink`` raised if the client went away.
        """
        # Body bytes that came before the sink was attached go first.
        data = self.take()
        if data and sink(data):
            await drain()
        self.sink = sink
        try:
            while not self.complete:
                if self.sink_error is not None:
                    raise self.sink_error
                if self.error is not None:
                    raise self.error
                if self.paused:
                    await drain()
                    self.paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                    continue
                self.waiter = self.loop.create_future()
                await self.waiter
        finally:
            self.sink = None
        if self.sink_error is not None:
            raise self.sink_error

    def take(self) -> bytes:
        """The body bytes queued so far (b"" if none), without waiting."""
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return data

    def client_headers(self) -> CIMultiDict[str]:
        """The response headers for the client: decoded as aiohttp's client decodes them, and
        hop-by-hop ones dropped as headers.downstream_response_headers does, in one pass."""
        dropped = _HOP_BY_HOP
        for value in self.connection_values:
            dropped = dropped | {t.strip().lower() for t in value.split(b",")}
        # Names are tokens (llhttp checks): ASCII, so bytes and text lower-case alike.
        return CIMultiDict(
            [
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers
                if name.lower() not in dropped
            ]
        )

    def plain_head(self) -> bytes | None:
        """The response head for the client as bytes, where it needs no rewriting; else None.

        That is where aiohttp's StreamResponse, given client_headers(), would write
        the same bytes: the head is framed by a Content-Length of digits, has Date,
        Server and Content-Type (aiohttp adds those where missing), is all ASCII
        (aiohttp writes text as UTF-8; the upstream's bytes may be Latin-1), names
        no other header in Connection, and has nothing the proxy rewrites
        (Location, Set-Cookie) or removes (upstream CORS headers). The caller
        checks the request's side (HTTP/1.1 keep-alive, not HEAD, nothing added).
        tests/test_plain_response.py compares the two byte for byte.
        """
        seen = self.seen
        if seen & _COMPLETE_HEAD != _COMPLETE_HEAD or seen & (_CHUNKED | _REWRITTEN | _UNUSUAL) or not self.reason.isascii():
            return None
        for value in self.connection_values:
            for token in value.split(b","):
                if token.strip().lower() not in _PLAIN_CONNECTION:
                    return None
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason.encode("ascii"))]
        for name, value in self.raw_headers:
            if len(name) not in _HOP_LENGTHS or name.lower() not in _HOP_BY_HOP:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        return b"".join(lines)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and not self.chunks and self.transport is not None

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def release(self) -> None:
        """Drop a response that will not be relayed (a 401 about to be retried)."""
        self.close()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class UpstreamProtocolError(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


class LeanClient:
    """Keep-alive pools of upstream connections, one per route's upstream."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        #: The read buffer every connection shares (see _Connection).
        self._read_buffer = memoryview(bytearray(_READ_SIZE))

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Created on first use: a process with only http upstreams never builds one.
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, route: CompiledRoute) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = route.scheme == "https"
        _, conn = await loop.create_connection(
            lambda: _Connection(loop, self._read_buffer),
            route.host,
            route.port,
            ssl=self._ssl_context() if tls else None,
            # The certificate must name the route's host, whatever the client asked for.
            server_hostname=route.host if tls else None,
        )
        return conn

    async def exchange(self, route: CompiledRoute, head: bytes, head_only: bool, deadline: float) -> _Connection:
        """Send ``head`` upstream; return the connection once the response head is in.

        Failures raise UpstreamError/UpstreamTimeout-ready exceptions: OSError and
        ssl errors from connecting, Disconnected, UpstreamProtocolError, and
        TimeoutError when no response head came by ``deadline`` (loop time).
        """
        key = (route.scheme, route.host, route.port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.closed or conn.loop.time() - conn.idle_since > _IDLE_SECONDS:
                conn.close()
                continue
            try:
                await self._wait(conn, conn.send(head, head_only, deadline))
                return conn
            except Disconnected as e:
                # A pooled connection the upstream had closed: retry on a fresh one
                # (GET and HEAD are idempotent), as aiohttp's client does.
                if e.received:
                    raise
        async with asyncio.timeout_at(deadline):
            conn = await self._connect(route)
        await self._wait(conn, conn.send(head, head_only, deadline))
        return conn

    @staticmethod
    async def _wait(conn: _Connection, head: asyncio.Future[None]) -> None:
        try:
            await head
        except BaseException:
            conn.close()
            raise

    def release(self, route: CompiledRoute, conn: _Connection) -> None:
        """Return a connection whose response was read to its end; close anything else."""
        if not conn.reusable():
            conn.close()
            return
        key = (route.scheme, route.host, route.port)
        idle = self._idle.setdefault(key, [])
        if len(idle) >= _MAX_IDLE:
            conn.close()
            return
        conn.parser = None
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def request_head(method: str, path_qs: str, headers: CIMultiDict[str]) -> bytes | None:
    """The request head as bytes, or None if a value would break the framing."""
    text = "".join([f"{method} {path_qs} HTTP/1.1\r\n", *[f"{name}: {value}\r\n" for name, value in headers.items()], "\r\n"])
    # One CR LF per line and no other CR or LF anywhere: no value or name splits a line.
    lines = len(headers) + 2
    if text.count("\n") != lines or text.count("\r") != lines:
        return None
    return text.encode("utf-8", "surrogateescape")


def upstream_error(route: CompiledRoute, e: BaseException) -> UpstreamError:
    """The 502 for a failure of the lean path, worded as for the ClientSession path."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return UpstreamError(f"{route.name}: TLS certificate of {route.origin} not trusted ({type(e).__name__})")
    if isinstance(e, ssl.SSLError):
        return UpstreamError(f"{route.name}: TLS failure talking to {route.origin} ({type(e).__name__})")
    if isinstance(e, OSError):
        return UpstreamError(f"{route.name}: cannot connect to {route.origin} ({e.strerror or type(e).__name__})")
    if isinstance(e, Disconnected):
        return UpstreamError(f"{route.name}: upstream {route.origin} failed (ServerDisconnectedError: Server disconnected)")
    # Redacted at the source: whatever the exception says, no token leaves in a 502 body.
    return UpstreamError(redact(f"{route.name}: upstream {route.origin} failed ({e})"))


def timeout_error(route: CompiledRoute) -> UpstreamTimeout:
    return UpstreamTimeout(f"{route.name}: no response from {route.origin} within {route.route.timeout:g} s")


__all__ = ["METHODS", "PIPE_HIGH_WATER", "Disconnected", "LeanClient", "UpstreamProtocolError", "request_head", "timeout_error", "upstream_error"]
