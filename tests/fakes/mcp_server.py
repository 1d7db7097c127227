"""PrivateMCPServer: the MCP Python SDK's own streamable-HTTP server behind a Cloud Run front.

The SDK's ``MCPServer`` (its streamable-HTTP Starlette app, served by uvicorn in a
background thread) with three tools: ``echo``, ``whoami`` (the caller's email from
the verified token) and ``countdown`` (log and progress notifications streamed
before the result). In front, an ASGI wrapper checks each request's ID token as
Cloud Run does (the same rules as :class:`~tests.fakes.private_service.PrivateService`:
403 without a token, 401 for a bad one, ``google.auth.jwt.decode`` against the fake
Google's certs) and records each accepted request's token and ``Mcp-Session-Id``.

Needs the ``mcp`` package (the ``test`` extra installs it); import this module only where
it is wanted.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import google.auth.exceptions
import google.auth.jwt

# Tool signatures are evaluated by the SDK: Context must be a module-level name.
from mcp import MCPDeprecationWarning
from mcp.server.mcpserver import Context, MCPServer

from .private_service import GOOGLE_ISSUERS, WWW_AUTHENTICATE, XSA, _reason

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Seen:
    """One request the front let through."""

    method: str
    token: str
    session_id: str | None
    email: str | None


def _build_mcp_app() -> ASGIApp:
    server = MCPServer("private-mcp-test")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text."""
        return text

    @server.tool()
    def whoami(ctx: Context) -> str:
        """The email in the caller's (already verified) ID token."""
        headers = ctx.headers or {}
        value = headers.get(XSA.lower()) or headers.get("authorization") or ""
        claims = google.auth.jwt.decode(value.partition(" ")[2], verify=False)
        return str(claims.get("email"))

    @server.tool()
    async def countdown(n: int, ctx: Context) -> str:
        """Send n log and progress notifications, then answer."""
        for i in range(n):
            # Log messages are deprecated from protocol 2026-07-28 on; 2025 clients still get them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await ctx.info(f"tick {i + 1} of {n}")
            await ctx.report_progress(i + 1, n)
        return f"counted {n}"

    app: ASGIApp = server.streamable_http_app()
    return app


class PrivateMCPServer:
    """The SDK's streamable-HTTP MCP server at ``/mcp`` on 127.0.0.1, behind a token check."""

    def __init__(self, certs_url: str) -> None:
        self._certs_url = certs_url
        self._certs: dict[str, str] = {}
        self._lock = threading.Lock()
        self.seen: list[Seen] = []
        #: (status, reason) of each refused request.
        self.refused: list[tuple[int, str]] = []
        #: Refuse every request with this status (403 or 401) while set.
        self.refuse_all: int | None = None
        self._inner = _build_mcp_app()
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """The service URL (also the audience)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    def start(self) -> Self:
        import uvicorn

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self._certs_url, timeout=10) as response:
            self._certs = json.load(response)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self._front, log_level="warning", lifespan="on", interface="asgi3", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the MCP test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def tokens(self) -> list[str]:
        with self._lock:
            return [s.token for s in self.seen]

    def _verify(self, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = XSA.lower() if XSA.lower() in headers else "authorization"
        value = headers.get(name)
        if value is None:
            raise _Refusal(403, "403 Forbidden: no identity token")
        scheme, _, token = value.partition(" ")
        if scheme != "Bearer" or token.count(".") != 2:
            raise _Refusal(401, f"401 Unauthorized: {name} is not 'Bearer <jwt>'")
        try:
            claims = google.auth.jwt.decode(token, certs=self._certs, audience=self.url)
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise _Refusal(401, f"401 Unauthorized: {_reason(str(exc))}") from None
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise _Refusal(401, "401 Unauthorized: not issued by Google")
        return token, claims

    async def _front(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._inner(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if self.refuse_all is not None:
                raise _Refusal(self.refuse_all, f"{self.refuse_all} refused by the test")
            token, claims = self._verify(headers)
        except _Refusal as r:
            with self._lock:
                self.refused.append((r.status, r.reason))
            extra = [(b"www-authenticate", WWW_AUTHENTICATE.encode())] if r.status == 401 else []
            body = (r.reason + "\n").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": r.status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()), *extra],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        with self._lock:
            self.seen.append(Seen(scope["method"], token, headers.get("mcp-session-id"), claims.get("email")))
        await self._inner(scope, receive, send)


class _Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
