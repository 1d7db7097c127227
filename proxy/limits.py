"""Connection-level limits and the answer to malformed requests.

aiohttp offers no option for three things a proxy holding a Google identity
needs, so this module adds them to the server that accepts client connections:

- A deadline for the request head (``limits.header_timeout``): a client that
  starts a request must finish its head within it (slowloris), and a new
  connection must deliver its first head within it. A partial head is answered
  with 408 and the connection closed; a connection that sent nothing is closed
  silently (browsers open spare connections and cope with that). Between
  requests, aiohttp's own keep-alive timer (``limits.keepalive_timeout``) closes
  idle connections.
- A cap on concurrent client connections (``limits.max_connections``): a
  connection beyond it gets a 503 at once and is closed, before anything is
  read from it. (asyncio has no public way to stop accepting for a while, which
  would leave the extra connections waiting in the kernel's backlog instead.)
- A one-line answer to a request aiohttp's parser refuses, naming what was
  wrong but never echoing the offending bytes: aiohttp's own 400 page, and the
  ERROR line its server logger prints, quote the offending header line, value
  included, so a malformed ``Authorization`` header would land in the response
  and the logs. A framing error in the body of a request already being
  forwarded fails that body (the upstream request is aborted) instead of
  leaving the handler waiting for bytes aiohttp will never parse.

An application may also name its own request handler and request factory for
the server (``FRONT_DOOR``; app.py's proxy path), used instead of the
Application's router and middlewares.

aiohttp has no hook for the request handler class, so ``HardenedRunner``
rebuilds the ``web.Server`` that ``AppRunner`` creates as a ``HardenedServer``,
whose connections are ``HardenedRequestHandler``s. That subclass overrides
``handle_error`` (a public method) and wraps ``connection_made`` and
``data_received``, reading private attributes of aiohttp's ``RequestHandler``
(``_waiter``, ``_request_count``, ``_messages``, ``_current_request``,
``_lingering_time``): tests/test_hardening_*.py exercise each path, and fail
loudly if aiohttp changes them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .config import Limits
from .errors import FramingError

log = logging.getLogger(__name__)

#: llhttp's own descriptions ("Invalid header value char", "Content-Length can't be
#: present with Transfer-Encoding"): words only, never the request's bytes.
_PHRASE = re.compile(r"[A-Za-z][A-Za-z0-9 ,.`'-]{0,120}")
#: Seconds between two warnings about connections refused for the cap.
_WARN_EVERY = 10.0


class FrontDoor(Protocol):
    """A server-level request handler an application installs under ``FRONT_DOOR``."""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse: ...

    def make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest: ...


#: Set on an application whose requests the server should hand to a FrontDoor.
FRONT_DOOR = web.AppKey("front_door", FrontDoor)


def describe_parse_error(exc: BaseException | None, status: int) -> tuple[int, str]:
    """(status, one-line reason) for a request aiohttp's parser refused.

    The reason names the problem and never contains bytes of the request: the
    parser's messages quote the offending line (a header value with it), so only
    their fixed description is kept, and only when it reads as plain words.
    """
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the"
        return 431, f"request line or header field longer than {limit} bytes"
    if not isinstance(exc, HttpProcessingError):
        return status, "malformed request"
    message = exc.message or ""
    if "Too many headers" in message:
        return 431, "too many header fields"
    # llhttp's shape: "<description>:\n\n  b'<offending bytes>'\n  ^", and for the
    # request line "Bad status line:\n  <description>:\n\n  ...".
    head = message.split("\n\n", 1)[0]
    lines = [line.strip().rstrip(":") for line in head.splitlines() if line.strip()]
    if lines and all(_PHRASE.fullmatch(line) for line in lines):
        return status, "malformed request: " + ": ".join(lines)
    return status, "malformed request"


def _plain_response(status: int, reason_phrase: str, text: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, as raw bytes."""
    body = text.encode()
    return (
        f"HTTP/1.1 {status} {reason_phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1") + body


class HardenedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a head deadline and a safe 400 page."""

    __slots__ = ("_limits", "_head_timer", "_head_count", "_head_started")

    def __init__(self, manager: web.Server, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        #: Heads parsed when the deadline was armed: a new one disarms it.
        self._head_count = 0
        #: Whether any byte of the awaited head has arrived (408 then, else a silent close).
        self._head_started = False

    # -- the head deadline ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A new connection must deliver its first head in time, like Go's ReadHeaderTimeout.
        if self.transport is not None:
            self._arm_head_deadline(started=False)

    def data_received(self, data: bytes) -> None:
        # The first bytes of a head on an idle kept-alive connection start the clock,
        # unless they hold the whole head (most do): no timer to make and cancel then.
        awaited = bool(data) and self._head_timer is None and self._waiter is not None and not self._waiter.done()
        if data and self._head_timer is not None:
            self._head_started = True
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            # A complete head (or a parse error, which closes the connection anyway).
            self._cancel_head_deadline()
            self._fail_streaming_body()
        elif awaited and self.transport is not None and not self.transport.is_closing():
            self._arm_head_deadline(started=True)

    def _fail_streaming_body(self) -> None:
        """Fail the body of the request being handled if the parser just gave up on it.

        aiohttp queues a parse error as a new message and leaves the current
        request's body waiting for bytes that will never be parsed: the handler (and
        its upstream request) would hang until the client went away. Failing the
        body aborts the upstream request and lets the handler answer 400.
        """
        request = self._current_request
        if request is None or request.content.is_eof() or not self._messages:
            return
        error = getattr(self._messages[-1][0], "exc", None)
        if error is None:
            return
        _, reason = describe_parse_error(error, 400)
        request.content.set_exception(FramingError(f"{reason} (in the request body)"))
        # The rest cannot be framed: no lingering read of it after the answer.
        self._lingering_time = 0.0

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self, started: bool) -> None:
        self._head_count = self._request_count
        self._head_started = started
        self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_deadline)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._request_count != self._head_count:
            return
        seconds = self._limits.header_timeout
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else "?"
        if self._head_started:
            log.info("closing connection from %s: request head not complete within %g s (408)", client, seconds)
            reason = f"idtoken-proxy: 408 request head not complete within {seconds:g} s (limits.header_timeout)\n"
            transport.write(_plain_response(408, "Request Timeout", reason))
        else:
            log.debug("closing connection from %s: no request within %g s", client, seconds)
        self.force_close()

    # -- malformed requests -------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request the parser refused with a one-line reason and no echo.

        aiohttp's default quotes the offending line in the body and logs it with
        a traceback at ERROR. Other errors (a handler's 500) keep aiohttp's answer.
        """
        if isinstance(exc, ConnectionError) and (request.transport is None or request.transport.is_closing()):
            # The client went away while its response was being written: not a server
            # error, and nothing can be sent (aiohttp drops this response).
            log.debug("client %s went away before its response was sent (%s)", request.remote, type(exc).__name__)
            resp = web.Response(status=499)
            resp.force_close()
            return resp
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        status, reason = describe_parse_error(exc, status)
        # Scanners and TLS clients hitting the HTTP port are noise, as aiohttp itself treats them.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
        log.log(level, "refused a request from %s: %d %s", request.remote, status, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        resp = web.Response(
            status=status,
            text=f"idtoken-proxy: {status} {reason}\n",
            headers={"Cache-Control": "no-store"},
        )
        # The framing of whatever follows is in doubt: close the connection.
        resp.force_close()
        return resp


class HardenedServer(web.Server):
    """aiohttp's low-level server with the connection cap and hardened connections."""

    def __init__(self, handler: Any, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        #: Client connections open now (refused ones until they are gone).
        self.open_connections = 0
        #: Connections refused for the cap since start.
        self.refused = 0
        self._last_warning = -_WARN_EVERY

    @classmethod
    def adopt(cls, server: web.Server, limits: Limits, door: FrontDoor | None = None) -> HardenedServer:
        """A HardenedServer with the handler, factory and settings of ``server`` (or ``door``'s)."""
        # aiohttp's AppRunner builds its Server inside Application._make_handler and
        # offers no way to pass another class: rebuild it with the same arguments.
        return cls(
            door.handle if door is not None else server.request_handler,
            limits=limits,
            request_factory=door.make_request if door is not None else server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )

    def __call__(self) -> RequestHandler:
        return HardenedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1
        cap = self.limits.max_connections
        if self.open_connections <= cap:
            return
        self.refused += 1
        now = self._loop.time()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning(
                "refusing connections: %d open, limits.max_connections is %d (%d refused so far)",
                self.open_connections - 1,
                cap,
                self.refused,
            )
        reason = f"idtoken-proxy: 503 too many connections (limits.max_connections is {cap})\n"
        transport.write(_plain_response(503, "Service Unavailable", reason, "Retry-After: 1\r\n"))
        handler.force_close()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open_connections -= 1
        super().connection_lost(handler, exc)


class HardenedRunner(web.AppRunner):
    """``web.AppRunner`` whose server enforces ``limits`` (see the module docstring)."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return HardenedServer.adopt(await super()._make_server(), self._limits, self.app.get(FRONT_DOOR))


__all__ = ["FRONT_DOOR", "FrontDoor", "HardenedRequestHandler", "HardenedRunner", "HardenedServer", "describe_parse_error"]
