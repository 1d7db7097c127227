"""The upstream transport: keep-alive pools of HTTP/1.1 connections on asyncio protocols.

One transport for every request the proxy sends upstream. A pool per origin
(scheme, host, port, and the outbound proxy if any); one request head written
at once, a request body after it (bytes in the same write, or streamed from the
client with Content-Length or chunked framing, pausing while the upstream is
behind); httptools (llhttp) parsing the response, the head bounded as
aiohttp's client bounded it; the body handed over with flow control (reading
pauses while the client is behind): a body of known length is piped, each part
written to the client as it is parsed. TLS verifies the certificate against the
origin's host name (SNI the same), with the trust store of
``ssl.create_default_context()`` (which honours ``SSL_CERT_FILE`` and
``SSL_CERT_DIR``). Outbound proxies: an ``http://`` upstream's requests go to
the proxy in absolute form; an ``https://`` one's through a CONNECT tunnel.

An upstream answering ``101 Switching Protocols`` hands its connection to the
tunnel (engine/tunnel.py). A stale pooled connection is retried once on a fresh
one when the request can be sent again (no streamed body); nothing is
decompressed; a connection whose exchange did not end cleanly is closed, never
reused. Failures are raised as they are (OSError, ssl errors, Disconnected,
UpstreamProtocolError, TimeoutError); the request path words them.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
from multidict import CIMultiDict

#: RFC 9110 7.6.1 connection-specific fields (as policy/headers.py has them).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
#: Response headers the proxy removes (only the proxy grants CORS: policy/guard.py).
UPSTREAM_CORS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Private-Network",
)

_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
#: Lengths of the hop-by-hop names: most names are passed over without lower().
_HOP_LENGTHS = frozenset(len(n) for n in _HOP_BY_HOP)

# What on_header notices about a response head, as bits of UpstreamConnection.seen.
_LENGTH = 1  # Content-Length (digits only)
_CHUNKED = 2  # Transfer-Encoding
_DATE = 4
_SERVER = 8
_TYPE = 16  # Content-Type
_CONNECTION = 32
_REWRITTEN = 64  # a header the proxy rewrites (Location, Set-Cookie) or removes (upstream CORS)
_UNUSUAL = 128  # a value that is not ASCII, or a Content-Length that is not just digits
_HOP = 256  # a hop-by-hop header other than Connection and Transfer-Encoding (Keep-Alive, ...)
_INFORMATIONAL = 512  # a 1xx response came before this one
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
    **{name.encode(): _HOP for name in HOP_BY_HOP if name not in ("connection", "transfer-encoding")},
}
_WATCHED_LENGTHS = frozenset(len(n) for n in _WATCHED)
#: A head aiohttp would add nothing to: framed by length, with Date, Server and Content-Type.
_COMPLETE_HEAD = _LENGTH | _DATE | _SERVER | _TYPE
#: Connection tokens that name no other header.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})
#: A hop-by-hop header's line in a lower-cased head, with the CR LF before it.
_HOP_LINE = re.compile(rb"\r\n(?:" + b"|".join(re.escape(n) for n in sorted(_HOP_BY_HOP)) + rb"):[^\r]*")
#: Methods the lean path carries (without a request body).
METHODS = frozenset({"GET", "HEAD"})
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
#: A pooled connection idle at most this long may carry a body that cannot be sent twice.
_FRESH_SECONDS = 2.0
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


class UpstreamConnection(asyncio.BufferedProtocol):
    """One upstream HTTP/1.1 connection carrying one exchange at a time.

    A buffered protocol: the loop reads into ``read_buffer`` (shared by every
    connection of a Pool) and the parser takes the bytes out at once, as
    body parts of their own. Nothing else runs between a read and its
    ``buffer_updated``, so one buffer serves all; and a read is at most
    ``_READ_SIZE``, where a plain protocol gets whatever the loop reads (256 KiB
    with uvloop) before reading can pause: under many large downloads that was
    most of the proxy's memory.
    """

    # No per-connection __dict__: idle pooled connections stay small.
    __slots__ = (
        "_connect_reply", "_connect_waiter", "_drain_waiters", "_write_paused", "body_sent", "buffered", "chunks", "closed", "complete",
        "connection_values", "deadline", "error", "head", "head_bytes", "head_error", "head_only", "idle_since", "keep_alive", "leftover", "loop", "parser",
        "paused", "raw_head", "raw_headers", "read_buffer", "reason", "received", "seen", "sender", "sink", "sink_error", "status", "timer", "transport",
        "tunnel", "until_eof", "upgrade", "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, read_buffer: memoryview | None = None) -> None:
        self.loop = loop
        self.read_buffer = read_buffer if read_buffer is not None else memoryview(bytearray(_READ_SIZE))
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        #: Checks the route's deadline for the response head (see send): one timer that
        #: outlives the exchanges it checks, instead of one made and cancelled per request.
        self.timer: asyncio.TimerHandle | None = None
        #: Loop time by which the response head must be in (0: no response awaited).
        self.deadline = 0.0
        #: Whether a 101 is the answer awaited (an upgrade request): then the tunnel takes over.
        self.upgrade = False
        #: After a 101: where the upstream's bytes go (engine/tunnel.py), and those that came with the head.
        self.tunnel: Any = None
        self.leftover = b""
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: CONNECT through an outbound proxy: the proxy's answer so far, and who waits for it.
        self._connect_reply: bytearray | None = None
        self._connect_waiter: asyncio.Future[bytes] | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser: Any = None
        self.head: asyncio.Future[None] | None = None
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        #: The response head as the upstream sent it, when the whole response came in one read.
        self.raw_head: bytes | None = None
        #: Values of Connection headers (the names they list are hop-by-hop too).
        self.connection_values: list[bytes] = []
        #: What on_header noticed (the _LENGTH, _DATE, ... bits).
        self.seen = 0
        self.head_bytes = 0
        self.head_error: UpstreamProtocolError | None = None
        #: A list, not a deque: only appended, joined and cleared, and an idle pooled connection keeps no block.
        self.chunks: list[bytes] = []
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
        #: The task streaming the request body up, and whether all of it went.
        self.sender: asyncio.Task[None] | None = None
        self.body_sent = True

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_data(bytes(data))
            return
        if self._connect_reply is not None:
            self._connect_data(bytes(data))
            return
        if self.parser is None or self.complete:
            # Bytes nobody asked for: the framing is off, the connection unusable.
            self.close()
            return
        first = not self.received
        self.received = True
        try:
            self.parser.feed_data(data)
            if first and self.complete and not self.seen & (_CHUNKED | _INFORMATIONAL) and self.sink is None:
                # The whole response in this one read: its head is what precedes its body.
                self.raw_head = bytes(data[: len(data) - self.buffered])
        except httptools.HttpParserUpgrade as e:
            # The bytes after a 101's head are the tunnel's: kept until it is attached.
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self.leftover = bytes(data[offset:])
            if self.transport is not None:
                self.transport.pause_reading()
        except httptools.HttpParserError as e:
            self._fail(self.head_error or UpstreamProtocolError(f"invalid HTTP response ({type(e).__name__})"))
            self.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.tunnel is not None:
            self.tunnel.upstream_pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self.tunnel is not None:
            self.tunnel.upstream_resume_writing()

    async def drain(self) -> None:
        if self.transport is None:
            raise Disconnected(self.received)
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._lost(exc)
        finally:
            # The parser holds this protocol's callbacks: without it the two would wait
            # for the cyclic garbage collector, which runs rarely while serving.
            self.parser = None

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(Disconnected(self.received, exc))
        self._drain_waiters.clear()
        if self._connect_waiter is not None and not self._connect_waiter.done():
            self._connect_waiter.set_exception(ProxyConnectError(f"the proxy closed the connection{f' ({exc})' if exc else ''}"))
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        if self.status == 101:
            return
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
        if 100 <= status < 200 and not (status == 101 and self.upgrade):
            # Informational (103 Early Hints): not relayed; the real answer follows.
            self.reason = ""
            self.raw_headers = []
            self.connection_values = []
            self.seen = _INFORMATIONAL
            return
        self.status = status
        self.keep_alive = bool(self.parser.should_keep_alive()) and status != 101
        self.until_eof = not self.seen & (_LENGTH | _CHUNKED) and status not in (101, 204, 304)
        self.deadline = 0.0
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

    def send(
        self, head: bytes, head_only: bool, deadline: float, body: BodySource = None, chunked: bool = False
    ) -> asyncio.Future[None]:
        """Write a request head (and body); the future resolves when the response head is in.

        It fails with TimeoutError (and the connection is closed) if the head is not
        in by ``deadline`` (loop time): one timer on the connection, cheaper per
        request than a timeout context around the wait. A streamed body goes up
        in a task of its own, so that an upstream answering early is heard.
        """
        self._reset()
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self.head = self.loop.create_future()
        self.deadline = deadline
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self._head_timeout)
        assert self.transport is not None
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
        else:
            self.transport.write(head)
            self.body_sent = False
            self.sender = self.loop.create_task(self._send_body(body, chunked))
        return self.head

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream the request body up, pausing while the upstream is behind."""
        try:
            async for part in body:
                transport = self.transport
                if transport is None or self.closed:
                    return  # the upstream went away: the response side reports it
                if chunked:
                    part = b"%x\r\n%b\r\n" % (len(part), part)
                transport.write(part)
                if self._write_paused:
                    await self.drain()
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
            self.body_sent = True
        except Disconnected:
            return
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the client's body failed (too large, bad framing, gone)
            self._fail(e)
            self.close()

    async def tunnel_through_proxy(self, origin: Origin, context: ssl.SSLContext) -> None:
        """CONNECT to ``origin`` through the outbound proxy this connection reaches, then TLS."""
        assert self.transport is not None and origin.via is not None
        authority = f"[{origin.host}]:{origin.port}" if ":" in origin.host else f"{origin.host}:{origin.port}"
        lines = [f"CONNECT {authority} HTTP/1.1\r\n", f"Host: {authority}\r\n"]
        if origin.via.authorization:
            lines.append(f"Proxy-Authorization: {origin.via.authorization}\r\n")
        self._connect_reply = bytearray()
        self._connect_waiter = self.loop.create_future()
        self.transport.write(("".join(lines) + "\r\n").encode("latin-1"))
        try:
            reply = await self._connect_waiter
        finally:
            self._connect_reply = None
            self._connect_waiter = None
        status_line = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit() or not parts[1].startswith("2"):
            raise ProxyConnectError(f"the proxy refused CONNECT ({' '.join(parts[1:])[:80]})")
        transport = await self.loop.start_tls(self.transport, self, context, server_hostname=origin.host)
        assert transport is not None
        self.transport = transport

    def _connect_data(self, data: bytes) -> None:
        assert self._connect_reply is not None
        self._connect_reply += data
        end = self._connect_reply.find(b"\r\n\r\n")
        if end < 0:
            if len(self._connect_reply) > MAX_HEAD_BYTES:
                self.close()
            return
        if end + 4 != len(self._connect_reply):
            # Bytes before TLS started: the proxy's framing is off.
            self.close()
            return
        waiter = self._connect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(bytes(self._connect_reply))

    def _head_timeout(self) -> None:
        self.timer = None
        deadline = self.deadline
        if not deadline or self.closed:
            return  # the head came (or the connection is gone): nothing to check until the next send
        if self.loop.time() < deadline:
            # An exchange begun after the one this timer was set for: check at its deadline.
            self.timer = self.loop.call_at(deadline, self._head_timeout)
            return
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

    def raw_header_items(self) -> list[tuple[str, str]]:
        """Every response header as received, decoded (the handshake's included)."""
        return [(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in self.raw_headers]

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
        raw = self.raw_head
        if raw is not None and raw.startswith(b"HTTP/1.1 "):
            # The head as it came, less its hop-by-hop lines (Connection, usually alone).
            lower = raw.lower()
            if not seen & _HOP:
                start = lower.find(b"\r\nconnection:")
                while start >= 0:
                    end = raw.index(b"\r\n", start + 2)
                    raw, lower = raw[:start] + raw[end:], lower[:start] + lower[end:]
                    start = lower.find(b"\r\nconnection:", start)
                return raw
            pieces, last = [], 0
            for match in _HOP_LINE.finditer(lower):
                pieces.append(raw[last : match.start()])
                last = match.end()
            pieces.append(raw[last:])
            return b"".join(pieces)
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason.encode("ascii"))]
        for name, value in self.raw_headers:
            if len(name) not in _HOP_LENGTHS or name.lower() not in _HOP_BY_HOP:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        return b"".join(lines)

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.body_sent
            and not self.closed
            and not self.chunks
            and self.transport is not None
            and self.error is None
        )

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sender is not None and not self.sender.done():
            self.sender.cancel()
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


class ProxyConnectError(OSError):
    """The outbound proxy refused the CONNECT (its status and reason)."""


@dataclass(frozen=True)
class Via:
    """An outbound HTTP proxy: where it is, and its ``Proxy-Authorization`` (from its URL), if any."""

    host: str
    port: int
    authorization: str | None = None

    @staticmethod
    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1")).decode("ascii")


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme, host and port, and the outbound proxy on the way (or None)."""

    scheme: str
    host: str
    port: int
    via: Via | None = None
    #: host[:port] as a Host header or an authority names it.
    authority: str = field(default="", compare=False)
    #: The hash, computed once: an origin is the pool's key for every request.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.scheme, self.host, self.port, self.via)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def target(self, path_qs: str) -> str:
        """The request target for ``path_qs``: absolute-form to a plain-HTTP proxy, else origin-form."""
        if self.via is not None and not self.tls:
            return f"http://{self.authority or self.host}{path_qs}"
        return path_qs

    def proxy_headers(self) -> list[tuple[str, str]]:
        """Headers a plain-HTTP proxy gets with each request (its credentials)."""
        if self.via is not None and not self.tls and self.via.authorization:
            return [("Proxy-Authorization", self.via.authorization)]
        return []


#: A request body for the upstream: bytes sent with the head, or parts streamed as they come.
BodySource = bytes | AsyncIterator[bytes] | None


class Pool:
    """Keep-alive pools of upstream connections, one per origin."""

    def __init__(self) -> None:
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._ssl: ssl.SSLContext | None = None
        #: The read buffer every connection shares (see UpstreamConnection).
        self._read_buffer = memoryview(bytearray(_READ_SIZE))

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Created on first use: a process with only http upstreams never builds one. The
            # default context verifies the chain and the host name, and reads SSL_CERT_FILE/DIR.
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        via = origin.via
        if via is None:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(loop, self._read_buffer),
                origin.host,
                origin.port,
                ssl=self.ssl_context() if origin.tls else None,
                # The certificate must name the origin's host, whatever the client asked for.
                server_hostname=origin.host if origin.tls else None,
            )
            return conn
        _, conn = await loop.create_connection(lambda: UpstreamConnection(loop, self._read_buffer), via.host, via.port)
        if origin.tls:
            await conn.tunnel_through_proxy(origin, self.ssl_context())
        return conn

    async def exchange(
        self,
        origin: Origin,
        head: bytes,
        deadline: float,
        *,
        body: BodySource = None,
        chunked: bool = False,
        head_only: bool = False,
        upgrade: bool = False,
    ) -> UpstreamConnection:
        """Send ``head`` (and ``body``) upstream; return the connection once the response head is in.

        ``chunked`` frames a streamed body's parts. Failures raise OSError and ssl
        errors from connecting, Disconnected, UpstreamProtocolError, TimeoutError
        when no response head came by ``deadline`` (loop time), and whatever the
        body's source raised (the client's body failed) while it was being sent.
        """
        idle = self._idle.get(origin)
        # A request whose body streams cannot be sent twice: it takes only a pooled
        # connection that was in use a moment ago (an upstream rarely closes one that soon).
        resendable = body is None or isinstance(body, bytes)
        while idle and not upgrade:
            if not resendable and idle[-1].loop.time() - idle[-1].idle_since > _FRESH_SECONDS:
                break
            conn = idle.pop()
            if conn.closed or conn.loop.time() - conn.idle_since > _IDLE_SECONDS:
                conn.close()
                continue
            try:
                await conn.send(head, head_only, deadline, body, chunked)
                return conn
            except Disconnected as e:
                conn.close()
                # A pooled connection the upstream had closed: retry on a fresh one, as
                # aiohttp's client does (the request was not received).
                if e.received or not resendable:
                    raise
            except BaseException:
                conn.close()
                raise
        async with asyncio.timeout_at(deadline):
            conn = await self._connect(origin)
        conn.upgrade = upgrade
        await self._wait(conn, conn.send(head, head_only, deadline, body, chunked))
        return conn

    @staticmethod
    async def _wait(conn: UpstreamConnection, head: asyncio.Future[None]) -> None:
        try:
            await head
        except BaseException:
            conn.close()
            raise

    def release(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Return a connection whose exchange ended cleanly; close anything else."""
        if not conn.reusable():
            conn.close()
            return
        idle = self._idle.setdefault(origin, [])
        now = conn.loop.time()
        # The longest idle are first: those past their time go now, not only when reached.
        while idle and (idle[0].closed or now - idle[0].idle_since > _IDLE_SECONDS):
            idle.pop(0).close()
        if len(idle) >= _MAX_IDLE:
            conn.close()
            return
        conn.parser = None
        # What the last response left is not kept while the connection waits in the pool.
        conn.raw_headers = []
        conn.raw_head = None
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def request_head(method: str, target: str, headers: CIMultiDict[str] | list[tuple[str, str]]) -> bytes | None:
    """The request head as bytes, or None if a value would break the framing."""
    items = list(headers.items()) if isinstance(headers, CIMultiDict) else headers
    # "name: value" lines joined in C (str.join over each pair), no formatting per field.
    fields = f"{CRLF.join(map(COLON_SPACE.join, items))}\r\n" if items else ""
    text = f"{method} {target} HTTP/1.1\r\n{fields}\r\n"
    # One CR LF per line and no other CR or LF anywhere: no value or name splits a line.
    lines = len(items) + 2
    if text.count("\n") != lines or text.count("\r") != lines:
        return None
    return text.encode("utf-8", "surrogateescape")


CRLF = "\r\n"
COLON_SPACE = ": "


__all__ = [
    "METHODS",
    "PIPE_HIGH_WATER",
    "BodySource",
    "Disconnected",
    "Origin",
    "Pool",
    "ProxyConnectError",
    "UpstreamProtocolError",
    "Via",
    "request_head",
]
