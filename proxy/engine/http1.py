"""The HTTP/1.1 server protocol: asyncio protocols and httptools (llhttp).

Shaped like uvicorn's ``httptools_impl``: the parser callbacks only record what
arrived; a per-request ``Cycle`` runs the service's handler in a task; requests
pipelined behind it wait their turn (reading pauses meanwhile); reading also
pauses while a request body waits unread, and writing backs off while the
client's write buffer is high. The head deadline and the keep-alive timeout are
loop timers on the connection, not tasks.

What a proxy holding a Google identity adds on top:

- Never trust lenient parsing: llhttp runs strict (no obs-fold, no bare LF, no
  Content-Length with Transfer-Encoding, ...), and on top of it a request with
  no Host (HTTP/1.1) or two is refused. A refused request gets a one-line 400
  that names the problem and never repeats the bytes sent, and the connection
  closes, since the framing of whatever follows is in doubt.
- Bounded heads: a request line or header field over ``MAX_FIELD_SIZE`` bytes,
  or more than ``MAX_HEADERS`` fields, is 431.
- A head deadline (``limits.header_timeout``): a partial head not complete in
  time is 408; a connection that sent nothing is closed silently (browsers open
  spare connections). Idle keep-alive connections close after
  ``limits.keepalive_timeout``.
- A connection cap (``limits.max_connections``): a connection beyond it gets a
  503 at once and is closed.
- A framing error in the body of a request already being handled fails that
  body (so the upstream request is aborted) instead of leaving it waiting.
- A client that goes away cancels its request's handler.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict

from ..config import Limits
from ..errors import FramingError
from .httpdate import http_date

log = logging.getLogger(__name__)

#: Bounds on a request head, as aiohttp's server had them: one line or field, and how many fields.
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
#: Unread request body bytes buffered before reading from the client pauses.
BODY_HIGH_WATER = 64 * 1024
#: The most read from a client socket at once, into one buffer all connections share.
READ_SIZE = 64 * 1024
#: Bytes waiting in the client's transport before writers are asked to wait (drain).
WRITE_HIGH_WATER = 64 * 1024
#: llhttp's own descriptions ("Invalid header value char"): words only, never the request's bytes.
_PHRASE = re.compile(r"[A-Za-z][A-Za-z0-9 ,.`'/-]{0,120}")
#: Seconds between two warnings about connections refused for the cap.
_WARN_EVERY = 10.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Seconds a connection closed with a request body left unread keeps reading (HTTP1Protocol._linger).
LINGER_SECONDS = 2.0
#: What an HTTP/2 client with prior knowledge sends first (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})
#: The versions llhttp reports most, as tuples made once.
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
CRLF = "\r\n"
#: The Server header of the proxy's own answers (an upstream's passes as it is).
SERVER_LINE = "Server: idtoken-proxy\r\n"


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class _DateCache:
    """The Date header's value, formatted once a second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = ""

    def get(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = http_date(now)
        return self.value


_DATE = _DateCache()


def plain_response(status: int, text: str, extra: str = "", *, close: bool = True) -> bytes:
    """A complete text/plain response as raw bytes (the engine's own refusals)."""
    body = text.encode()
    return (
        f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Date: {_DATE.get()}\r\n"
        f"{extra}"
        f"{'Connection: close' + CRLF if close else ''}\r\n"
    ).encode("latin-1") + body


class RequestHead:
    """A request as the exchange sees it, whatever the protocol."""

    __slots__ = ("headers", "keep_alive", "method", "remote", "target", "upgrade", "version")

    def __init__(
        self,
        method: str,
        target: str,
        version: tuple[int, int],
        headers: CIMultiDict[str],
        remote: str | None,
        keep_alive: bool,
        upgrade: bool,
    ) -> None:
        self.method = method
        #: The request target as sent (origin-form path and query, "*", absolute- or authority-form).
        self.target = target
        self.version = version
        self.headers = headers
        self.remote = remote
        self.keep_alive = keep_alive
        #: The client asked for a protocol switch (Upgrade), or sent CONNECT.
        self.upgrade = upgrade


class Body:
    """A request body as it arrives: ``read()`` the next part, b"" at the end.

    Reading from the client pauses while more than ``BODY_HIGH_WATER`` bytes
    wait here unread. ``Expect: 100-continue`` is answered at the first read.
    """

    __slots__ = ("_chunks", "_conn", "_continue", "_size", "_waiter", "complete", "error", "length", "total")

    def __init__(self, conn: HTTP1Protocol | None, length: int | None, present: bool, expect_continue: bool = False) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Content-Length, None when chunked (or absent).
        self.length = length
        self.complete = not present
        self.error: BaseException | None = None
        #: Body bytes received so far.
        self.total = 0
        self._continue = expect_continue and present

    @property
    def exists(self) -> bool:
        """Whether the request has a body (a length above 0, or chunked)."""
        return not self.complete or self.total > 0 or bool(self.length)

    # -- fed by the protocol ---------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.total += len(data)
        if self._size > BODY_HIGH_WATER and self._conn is not None:
            self._conn.pause_reading("body")
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.complete and self.error is None:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the handler ---------------------------------------------------------

    async def read(self) -> bytes:
        """The next part of the body (all that has arrived); b"" at its end."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            conn = self._conn
            if self._continue and conn is not None:
                # The client waits for this before it sends the body (RFC 9110 10.1.1).
                self._continue = False
                conn.write_raw(_CONTINUE)
            if conn is not None:
                conn.resume_reading("body")
                if conn.lost:
                    raise ConnectionResetError("the client went away")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.resume_reading("body")
        return data


class Response:
    """Writes one response on an HTTP/1.1 connection, framing it as its headers say."""

    __slots__ = ("_chunked", "_conn", "_head_only", "_version", "finished", "keep_alive", "reason", "sent", "started", "status")

    def __init__(self, conn: HTTP1Protocol, head: RequestHead) -> None:
        self._conn = conn
        self._head_only = head.method == "HEAD"
        self._version = head.version
        self._chunked = False
        self.keep_alive = head.keep_alive
        #: 0 until the head is sent.
        self.status = 0
        self.reason = ""
        #: Bytes written to the client, head included.
        self.sent = 0
        self.started = False
        self.finished = False

    @property
    def client_gone(self) -> bool:
        return self._conn.lost or self._conn.transport is None or self._conn.transport.is_closing()

    def close_after(self) -> None:
        """The connection closes after this response (framing in doubt, a body left unread)."""
        self.keep_alive = False

    def _head(self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None) -> bytes:
        self.status = status
        self.reason = reason or reason_phrase(status)
        if not self._conn.server.accepting:
            self.keep_alive = False
        cycle = self._conn.cycle
        if cycle is not None and cycle.body is not None and not cycle.body.complete:
            # An answer before the whole request body came: the rest cannot be skipped safely.
            self.keep_alive = False
        # An HTTP/1.0 client gets an HTTP/1.0 status line (as aiohttp's server answered it).
        lines = [f"HTTP/1.{1 if self._version >= (1, 1) else 0} {status} {self.reason}\r\n"]
        has_date = has_server = has_length = False
        for name, value in headers:
            if len(name) in (4, 6, 14):
                lower = name.lower()
                if lower == "date":
                    has_date = True
                elif lower == "server":
                    has_server = True
                elif lower == "content-length":
                    # The caller's own (an upstream's, in its place): it frames the body.
                    has_length = True
            lines.append(f"{name}: {value}\r\n")
        if not has_date:
            lines.append(f"Date: {_DATE.get()}\r\n")
        if not has_server:
            lines.append(SERVER_LINE)
        if self._head_only or status in _NO_BODY_STATUSES or status < 200 or has_length:
            pass  # no body whatever the headers say, or framed by the caller's Content-Length
        elif length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif self._version >= (1, 1):
            self._chunked = True
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            # HTTP/1.0 without a length: the end of the connection ends the body.
            self.keep_alive = False
        if status == 101:
            pass
        elif not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self._version < (1, 1):
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def start(self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None = None) -> None:
        """Send the head; the body follows with write() and end().

        The body is framed by a Content-Length among ``headers`` (it must be
        right), else by ``length``, else chunked (close-delimited for HTTP/1.0).
        """
        data = self._head(status, reason, headers, length)
        self._conn.write_raw(data)
        self.started = True
        self.sent += len(data)

    def send(self, status: int, headers: Iterable[tuple[str, str]], body: bytes = b"", reason: str = "") -> None:
        """A complete response in one write."""
        data = self._head(status, reason, headers, len(body))
        if not self._head_only and status not in _NO_BODY_STATUSES:
            data += body
        self._conn.write_raw(data)
        self.started = True
        self.sent += len(data)
        self._finish()

    def send_raw(self, status: int, reason: str, head: bytes, body: bytes) -> None:
        """A complete response whose head is ready-made (framed by its own Content-Length)."""
        self.status = status
        self.reason = reason
        if not self._conn.server.accepting:
            # Shutting down: the connection closes after this one.
            self.keep_alive = False
            head = head[:-2] + b"Connection: close\r\n\r\n"
        data = head + body
        self._conn.write_raw(data)
        self.started = True
        self.sent += len(data)
        self._finish()

    def write(self, data: bytes) -> bool:
        """Write body bytes; returns whether the client is behind (then await drain())."""
        if not data or self._head_only:
            return False
        if self._chunked:
            size = b"%x\r\n" % len(data)
            self.sent += len(size) + len(data) + 2
            return self._conn.write_parts((size, data, b"\r\n"))
        self.sent += len(data)
        return self._conn.write_raw(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def end(self, data: bytes = b"") -> None:
        if self.finished:
            return
        if data:
            self.write(data)
        if self._chunked and not self._head_only:
            self.sent += 5
            self._conn.write_raw(b"0\r\n\r\n")
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self._conn.response_done(self)

    def abort(self) -> None:
        """Cut the connection: the client must not take a truncated body for a complete one."""
        self.finished = True
        self.keep_alive = False
        self._conn.abort()

    def detach(self) -> tuple[HTTP1Protocol, asyncio.Transport, bytes]:
        """After a 101: the connection, its transport and any bytes the client sent after its head (the tunnel's)."""
        transport, pending = self._conn.detach()
        return self._conn, transport, pending


class Service(Protocol):
    """What serves a listener's requests."""

    async def handle(self, head: RequestHead, body: Body, response: Response) -> None: ...

    def refused(self, head: RequestHead | None, response: Response | None, status: int, reason: str, sent: int) -> None: ...


class H2Handoff(Protocol):
    """The HTTP/2 side of a listener (engine/h2server.py's H2Connections)."""

    @property
    def count(self) -> int: ...

    def take(self, transport: asyncio.Transport, data: bytes) -> None: ...

    def shutdown(self) -> None: ...

    def stream_tasks(self) -> set[asyncio.Future[None]]: ...

    def close(self) -> None: ...


class TunnelEnd(Protocol):
    """The other end of an upgraded connection (engine/tunnel.py)."""

    def client_data(self, data: bytes) -> None: ...

    def client_lost(self) -> None: ...

    def client_pause_writing(self) -> None: ...

    def client_resume_writing(self) -> None: ...


class ServerState:
    """One listener's connections, its limits and its shutdown."""

    def __init__(
        self,
        service: Service,
        limits: Limits,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        cancel_on_disconnect: bool = True,
        h2: H2Handoff | None = None,
    ) -> None:
        self.service = service
        #: Takes over a connection that opens with the HTTP/2 preface (the main listener's).
        self.h2 = h2
        #: Whether a client that goes away cancels its request's handler (else its next write fails).
        self.cancel_on_disconnect = cancel_on_disconnect
        self.limits = limits
        self.loop = loop or asyncio.get_event_loop()
        self.connections: set[HTTP1Protocol] = set()
        #: The read buffer every connection of this listener shares (see HTTP1Protocol).
        self.read_buffer = memoryview(bytearray(READ_SIZE))
        self.accepting = True
        #: Connections refused for the cap since start.
        self.refused = 0
        self._last_warning = -_WARN_EVERY

    def __call__(self) -> HTTP1Protocol:
        return HTTP1Protocol(self)

    @property
    def open_connections(self) -> int:
        """Client connections open now (refused ones until they are gone), HTTP/2 ones included."""
        return len(self.connections) + (self.h2.count if self.h2 is not None else 0)

    @property
    def busy(self) -> int:
        """Connections with a request being handled."""
        return sum(1 for c in self.connections if c.cycle is not None)

    def stop_accepting(self) -> None:
        """Shutdown, phase 2: idle keep-alive connections close, busy ones close after their response."""
        self.accepting = False
        for conn in list(self.connections):
            if conn.cycle is None and not conn.in_head and conn.tunnel is None:
                conn.close()
        if self.h2 is not None:
            # GOAWAY: streams in flight finish, none is opened after it.
            self.h2.shutdown()

    async def drain(self, timeout: float) -> None:
        """Shutdown, phase 4: wait up to ``timeout`` for requests in flight, then cancel them."""
        # No connection takes a new request now (stop_accepting): the ones in flight are all.
        tasks: set[asyncio.Future[None]] = {
            c.cycle.task for c in self.connections if c.cycle is not None and c.cycle.task is not None and not c.cycle.task.done()
        }
        if self.h2 is not None:
            tasks |= self.h2.stream_tasks()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.close()
        if self.h2 is not None:
            self.h2.close()

    def warn_refused(self, open_now: int) -> None:
        self.refused += 1
        now = self.loop.time()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning(
                "refusing connections: %d open, limits.max_connections is %d (%d refused so far)",
                open_now,
                self.limits.max_connections,
                self.refused,
            )


class Cycle:
    """One request on a connection: its head, body, response and the task handling it."""

    __slots__ = ("body", "head", "refusal", "response", "task")

    def __init__(self, head: RequestHead | None, body: Body | None, refusal: tuple[int, str] | None = None) -> None:
        self.head = head
        self.body = body
        self.refusal = refusal
        self.response: Response | None = None
        self.task: asyncio.Task[None] | None = None


class _Refused(Exception):
    """Raised from a parser callback: the request is refused with (status, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Nothing:
    """What a lost connection parses with: nothing arrives any more (data_received is not called)."""


#: A parser that holds no protocol: the one a connection has once it is lost.
_LOST_PARSER: httptools.HttpRequestParser = httptools.HttpRequestParser(_Nothing())


class HTTP1Protocol(asyncio.BufferedProtocol):
    """One client connection.

    A buffered protocol: the loop reads into the listener's one buffer and the
    parser takes the bytes out at once, so a read is at most ``READ_SIZE`` (a
    plain protocol gets whatever the loop reads, 256 KiB with uvloop, as a new
    object each time): under many large uploads that was memory for nothing.
    """

    # No per-connection __dict__: idle keep-alive connections stay small.
    __slots__ = (
        "_arrived", "_closing", "_drain_waiters", "_head_started", "_headers", "_idle_since", "_incoming", "_keepalive", "_pauses", "_requests", "_sniff", "_timer", "_upgraded",
        "_url", "_url_size", "_write_paused", "cycle", "in_head", "limits", "loop", "lost", "parser", "pipeline", "remote", "server", "transport",
        "tunnel",
    )

    def __init__(self, server: ServerState) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.lost = False
        # Parse state of the message being received.
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._incoming: Cycle | None = None
        self.in_head = False
        #: The request being handled, and the ones pipelined behind it.
        self.cycle: Cycle | None = None
        # Lists, not a deque and a set: empty, they take 56 bytes each where those take 600 and 200,
        # on every connection; a pipeline is a few requests long, the reasons to pause at most four.
        self.pipeline: list[Cycle] = []
        self._pauses: list[str] = []
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: The head deadline (or the lingering close's end).
        self._timer: asyncio.TimerHandle | None = None
        #: The keep-alive check, and since when the connection is idle (see _arm_keepalive).
        self._keepalive: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        #: Whether the head being waited for has started (408 then, else a silent close).
        self._head_started = False
        self._requests = 0
        self._upgraded: bytes | None = None
        self._arrived: list[Cycle] | None = None
        self.tunnel: TunnelEnd | None = None
        self._closing = False
        #: The first bytes, while they may still be the HTTP/2 preface (main listener only).
        self._sniff: bytes | None = b"" if server.h2 is not None else None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        server = self.server
        server.connections.add(self)
        cap = self.limits.max_connections
        if server.open_connections > cap:
            server.warn_refused(len(server.connections) - 1)
            reason = f"idtoken-proxy: 503 too many connections (limits.max_connections is {cap})\n"
            self.transport.write(plain_response(503, reason, "Retry-After: 1\r\n"))
            self.close()
            return
        # A new connection must deliver its first head in time, like Go's ReadHeaderTimeout.
        self._arm_head_deadline(started=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        # The parser holds this protocol's callbacks: without it the two would wait for the
        # cyclic garbage collector, which runs rarely while serving (server.tune_gc).
        self.parser = _LOST_PARSER
        self._cancel_timers()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the client went away"))
        self._drain_waiters.clear()
        if self.tunnel is not None:
            self.tunnel.client_lost()
        gone = ConnectionResetError("the client went away")
        if self._incoming is not None and self._incoming.body is not None:
            self._incoming.body.fail(gone)
        cycle = self.cycle
        if cycle is not None:
            if cycle.body is not None:
                cycle.body.fail(gone)
            response = cycle.response
            if (
                self.server.cancel_on_disconnect
                and cycle.task is not None
                and not cycle.task.done()
                and (response is None or not response.finished)
            ):
                # A client that goes away cancels its handler, and so the upstream request.
                cycle.task.cancel()
        self.pipeline.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.tunnel is not None:
            self.tunnel.client_pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self.tunnel is not None:
            self.tunnel.client_resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.tunnel is not None:
            self.tunnel.client_data(bytes(data))
            return
        if self._upgraded is not None:
            # Bytes after an upgrade request's head: the tunnel's, if there is one.
            self._upgraded += bytes(data)
            return
        if self._closing:
            return
        if self._sniff is not None:
            data = self._sniff + data
            if PREFACE.startswith(data[: len(PREFACE)]):
                if len(data) < len(PREFACE):
                    self._sniff = data
                    return
                # HTTP/2 with prior knowledge (h2c): the connection is the HTTP/2 side's from here.
                self._hand_over(data)
                return
            self._sniff = None
        if self._timer is not None:
            if self.cycle is None and not self.in_head:
                # An idle kept-alive connection: the keep-alive timer gives way to the head deadline.
                self._cancel_timer()
            else:
                self._head_started = True
        idle = self.cycle is None and not self.in_head and self._timer is None
        # Requests whose heads complete in this feed start only once llhttp has
        # accepted what follows their heads too (it checks Transfer-Encoding after them).
        arrived = self._arrived = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
            self._upgraded = bytes(data[offset:])
            self.pause_reading("upgrade")
        except _Refused as e:
            self._dispatch(arrived, failed=True)
            self._refuse(e.status, e.reason)
            return
        except httptools.HttpParserError as e:
            self._dispatch(arrived, failed=True)
            cause = e.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.reason)
            else:
                self._refuse(400, _describe(e), quiet=isinstance(e, httptools.HttpParserInvalidMethodError))
            return
        self._dispatch(arrived, failed=False)
        if self.in_head and self._timer is None and idle and not self._closing:
            self._arm_head_deadline(started=True)

    def _hand_over(self, data: bytes) -> None:
        assert self.server.h2 is not None and self.transport is not None
        self._cancel_timers()
        self.server.connections.discard(self)
        self.server.h2.take(self.transport, data)

    def _dispatch(self, arrived: list[Cycle], failed: bool) -> None:
        """Start (or queue) the requests whose heads arrived in one feed."""
        self._arrived = None
        if failed and arrived and arrived[-1] is self._incoming:
            # The parser gave up inside this request (its body's framing): it is refused, never run.
            arrived.pop()
            self._incoming = None
        for cycle in arrived:
            if self.cycle is None:
                self._start(cycle)
            else:
                # Pipelined: it waits its turn, and nothing more is read meanwhile.
                self.pipeline.append(cycle)
                self.pause_reading("pipeline")

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True
        if self._url:
            self._url = []
        self._url_size = 0
        if self._headers:
            self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_FIELD_SIZE:
            raise _Refused(431, f"request line or header field longer than {MAX_FIELD_SIZE} bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD_SIZE:
            raise _Refused(431, f"request line or header field longer than {MAX_FIELD_SIZE} bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise _Refused(431, "too many header fields")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._requests += 1
        self._cancel_timer()
        parser = self.parser
        headers: CIMultiDict[str] = CIMultiDict(
            [(name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in self._headers]
        )
        # The few fields the engine itself reads, looked up rather than tested field by field.
        hosts = len(headers.getall("Host", ()))
        declared = headers.getall("Content-Length", None)
        # llhttp accepted the request: Content-Length is digits, and any repeats of it agree.
        length = int(declared[-1]) if declared else None
        chunked = "Transfer-Encoding" in headers
        expect = "Expect" in headers and any(v.lower() == "100-continue" for v in headers.getall("Expect"))
        version_text = parser.get_http_version()
        version = _VERSIONS.get(version_text)
        if version is None:
            major, _, minor = version_text.partition(".")
            version = (int(major or 1), int(minor or 0))
        if hosts > 1:
            raise _Refused(400, "malformed request: duplicate Host header")
        if hosts == 0 and version >= (1, 1) and version[0] == 1:
            raise _Refused(400, "malformed request: no Host header in an HTTP/1.1 request")
        method = parser.get_method().decode("ascii", "replace")
        target = b"".join(self._url).decode("utf-8", "surrogateescape")
        # The raw parts are not kept while the connection waits for its next request.
        self._url = []
        self._headers = []
        upgrade = bool(parser.should_upgrade()) or method == "CONNECT"
        keep_alive = bool(parser.should_keep_alive()) and not upgrade
        head = RequestHead(method, target, version, headers, self.remote, keep_alive, upgrade)
        present = chunked or bool(length)
        body = Body(self, length if not chunked else None, present, expect)
        cycle = Cycle(head, body)
        self._incoming = cycle if present else None
        if self._arrived is not None:
            self._arrived.append(cycle)
        else:
            self._dispatch([cycle], failed=False)

    def on_body(self, body: bytes) -> None:
        incoming = self._incoming
        if incoming is not None and incoming.body is not None:
            incoming.body.feed(body)

    def on_message_complete(self) -> None:
        incoming = self._incoming
        self._incoming = None
        if incoming is not None and incoming.body is not None:
            incoming.body.finish()

    # -- cycles ------------------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        self.cycle = cycle
        if cycle.refusal is not None:
            status, reason = cycle.refusal
            self._write_refusal(None, status, reason)
            return
        assert cycle.head is not None and cycle.body is not None
        response = cycle.response = Response(self, cycle.head)
        cycle.task = self.loop.create_task(self._run(cycle, response))

    async def _run(self, cycle: Cycle, response: Response) -> None:
        assert cycle.head is not None and cycle.body is not None
        try:
            await self.server.service.handle(cycle.head, cycle.body, response)
        except asyncio.CancelledError:
            if not self.lost:
                raise
        except Exception:
            log.exception("unhandled error serving %s %s", cycle.head.method, cycle.head.target[:200])
            if not response.started and not self.lost:
                response.close_after()
                response.send(500, [("Content-Type", "text/plain; charset=utf-8")], b"idtoken-proxy: 500 internal error\n")
            else:
                self.abort()
        finally:
            if not response.finished and self.cycle is cycle and self.tunnel is None:
                # The handler ended without completing its response: nothing more can be framed.
                self.abort()

    def response_done(self, response: Response) -> None:
        """The current response is complete: next in the pipeline, keep-alive, or close."""
        cycle = self.cycle
        if cycle is None or cycle.response is not response:
            return
        self.cycle = None
        body = cycle.body
        keep = response.keep_alive and self.server.accepting and self._upgraded is None
        if body is not None and not body.complete and not self.lost:
            # The handler did not read the whole body (an early answer): the rest cannot be
            # skipped safely, and the client may still be sending it.
            self._linger()
            return
        if not keep:
            self.close()
            return
        if self.pipeline:
            self._start(self.pipeline.pop(0))
            if not self.pipeline:
                self.resume_reading("pipeline")
            return
        if self.in_head:
            # Part of the next head came while this request was served: its deadline runs now.
            self._arm_head_deadline(started=True)
        else:
            self._arm_keepalive()

    # -- refusals ------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str, quiet: bool = False) -> None:
        """The parser refused the bytes received: answer (in turn) and close."""
        self.pause_reading("refused")
        self._cancel_timer()
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "refused a request from %s: %d %s", self.remote, status, reason)
        incoming = self._incoming
        self._incoming = None
        self.in_head = False
        self._closing = True
        cycle = self.cycle
        if incoming is not None and incoming.body is not None and cycle is incoming and cycle.response is not None and not incoming.body.complete:
            # The request being handled: its body fails, and its handler answers the 400.
            cycle.response.close_after()
            incoming.body.fail(FramingError(f"{reason} (in the request body)"))
            return
        if cycle is None:
            self._write_refusal(None, status, reason)
        else:
            self.pipeline.append(Cycle(None, None, (status, reason)))

    def _write_refusal(self, head: RequestHead | None, status: int, reason: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = plain_response(status, f"idtoken-proxy: {status} {reason}\n")
        self.transport.write(data)
        self.server.service.refused(head, None, status, reason, len(data))
        self.close()

    # -- timers ----------------------------------------------------------------------------

    def _arm_head_deadline(self, started: bool) -> None:
        self._cancel_timer()
        self._head_started = started
        self._timer = self.loop.call_later(self.limits.header_timeout, self._head_deadline, self._requests)

    def _arm_keepalive(self) -> None:
        """The connection is idle from now: it closes after ``limits.keepalive_timeout`` unless a request comes.

        One timer outlives the requests it checks: when it fires on a connection that
        was busy since, it waits for the rest of the new idle time (nothing is made or
        cancelled per request, which at thousands of requests a second showed).
        """
        self._cancel_timer()
        self._idle_since = now = self.loop.time()
        if self._keepalive is None:
            self._keepalive = self.loop.call_at(now + self.limits.keepalive_timeout, self._keepalive_expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _head_deadline(self, requests: int) -> None:
        self._timer = None
        if self.transport is None or self._requests != requests or self.cycle is not None:
            return
        seconds = self.limits.header_timeout
        if self._head_started or self.in_head:
            log.info("closing connection from %s: request head not complete within %g s (408)", self.remote, seconds)
            reason = f"idtoken-proxy: 408 request head not complete within {seconds:g} s (limits.header_timeout)\n"
            data = plain_response(408, reason)
            self.transport.write(data)
            self.server.service.refused(None, None, 408, "request head not complete", len(data))
        else:
            log.debug("closing connection from %s: no request within %g s", self.remote, seconds)
        self.close()

    def _keepalive_expired(self) -> None:
        self._keepalive = None
        if self.cycle is not None or self.in_head or self._closing or self.lost:
            return  # busy: the response's end arms the check again
        due = self._idle_since + self.limits.keepalive_timeout
        if self.loop.time() < due:
            self._keepalive = self.loop.call_at(due, self._keepalive_expired)
            return
        self.close()

    # -- flow control -------------------------------------------------------------------------

    def pause_reading(self, why: str) -> None:
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        if why not in self._pauses:
            self._pauses.append(why)

    def resume_reading(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.remove(why)
        if not self._pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write_raw(self, data: bytes) -> bool:
        """Write bytes as they are; returns whether the client is behind."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closing")
        transport.write(data)
        return self._write_paused

    def write_parts(self, parts: tuple[bytes, ...]) -> bool:
        """write_raw for several pieces at once (a chunk and its framing), without joining them."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closing")
        transport.writelines(parts)
        return self._write_paused

    async def drain(self) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client's connection is closing")
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    # -- the end ----------------------------------------------------------------------------

    def close(self) -> None:
        self._closing = True
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _linger(self) -> None:
        """Close after the response, reading and dropping what the client still sends for a moment.

        Closing a socket with unread input makes the kernel answer with RST, which
        can destroy the response before the client reads it (nginx's lingering close).
        The client sees our FIN at once; its own close or LINGER_SECONDS ends it.
        """
        self._closing = True
        self._cancel_timers()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._pauses.clear()
        transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        self._closing = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Hand the connection to a tunnel (after a 101): the transport and the bytes already read."""
        assert self.transport is not None
        pending = self._upgraded or b""
        self._upgraded = b""
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and cycle.response is not None:
            cycle.response.finished = True
        return self.transport, pending

    def attach_tunnel(self, tunnel: TunnelEnd) -> None:
        self.tunnel = tunnel
        self._pauses.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def tunnel_done(self) -> None:
        """The tunnel ended: the connection's cycle is over."""
        self.cycle = None


def _describe(exc: BaseException) -> str:
    """The one-line reason for a parse error: llhttp's description if it is plain words, never bytes."""
    text = str(exc).split("\n", 1)[0].strip().rstrip(":")
    if text and _PHRASE.fullmatch(text):
        return "malformed request: " + text
    return "malformed request"


Handler = Callable[[RequestHead, Body, Response], Awaitable[None]]

__all__ = [
    "BODY_HIGH_WATER",
    "MAX_FIELD_SIZE",
    "MAX_HEADERS",
    "Body",
    "HTTP1Protocol",
    "RequestHead",
    "Response",
    "ServerState",
    "Service",
    "plain_response",
    "reason_phrase",
]

