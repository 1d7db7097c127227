"""PrivateService: a fake private Cloud Run service that really checks ID tokens.

The front (a middleware) behaves like Cloud Run's:

- If ``X-Serverless-Authorization`` is present only it is checked, else
  ``Authorization``.  No token: 403.  Not ``Bearer <jwt>`` (the scheme is
  matched exactly), unknown key, bad signature, expired (no clock skew), wrong
  issuer or wrong ``aud``: 401 with ``WWW-Authenticate`` and a one-line reason.
- Accepted audiences: :attr:`PrivateService.audiences` (default: the service's
  URL) and the OAuth client ids registered with :meth:`accept_client_id` (user
  tokens).
- A token passed to :meth:`revoke` is refused from then on (401), valid or not.
- With ``iap=True``, ``Proxy-Authorization`` (when present) is the one checked,
  as IAP does when the app uses ``Authorization`` for itself.
- When XSA was checked the app sees it with the signature replaced by
  ``SIGNATURE_REMOVED_BY_GOOGLE``; ``Authorization`` passes through intact.

Signatures are verified with ``google.auth.jwt.decode`` against certs fetched
once at start (never per request).  Every request, refused or not, is recorded.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import google.auth.exceptions
import google.auth.jwt
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict

from .server import BackgroundServer

XSA = "X-Serverless-Authorization"
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
#: ``Cloud Run``'s answer header on 401.
WWW_AUTHENTICATE = (
    'Bearer error="invalid_token" error_description="The access token could not be verified"'
)
#: The plain text behind ``/gzip`` (served compressed, never decompressed by the fake).
GZIP_PLAIN = b"compressed by the upstream; a proxy must pass these bytes through untouched.\n" * 64
APP_JS = 'document.title = "app.js loaded";\n'

_PATTERN_PERIOD = 251  # prime, so chunk boundaries never line up with the pattern
_PATTERN = bytes(range(_PATTERN_PERIOD)) * (65536 // _PATTERN_PERIOD + 2)
_CHUNK = 65536 - _PATTERN_PERIOD


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """The bytes ``/bytes/{n}`` serves from ``offset`` (byte i is ``i % 251``)."""
    out = bytearray()
    while len(out) < n:
        start = (offset + len(out)) % _PATTERN_PERIOD
        take = min(n - len(out), _CHUNK)
        out += _PATTERN[start : start + take]
    return bytes(out)


def pattern_sha256(n: int) -> str:
    """sha256 hex of ``pattern_bytes(n)``, computed without holding it in memory."""
    digest = hashlib.sha256()
    for start in range(0, n, _CHUNK):
        digest.update(pattern_bytes(min(_CHUNK, n - start), start))
    return digest.hexdigest()


@dataclass
class RecordedRequest:
    """One request as the service received it (headers after Cloud Run's XSA rewrite)."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    #: Claims of the token that was checked, if it verified.
    claims: dict[str, Any] | None = None
    #: ``X-Serverless-Authorization`` or ``Authorization``: the header Cloud Run checked.
    checked_header: str | None = None
    #: Status and reason when the front refused the request; None when the app got it.
    refused: tuple[int, str] | None = None
    #: Filled in once the body has been read (None for refused requests and websockets).
    body_len: int | None = None
    body_sha256: str | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """All values of header ``name`` in order (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


_RECORD = web.RequestKey("record", RecordedRequest)


class _Refusal(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class PrivateService:
    """A fake private Cloud Run service on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        certs: Mapping[str, str] | None = None,
        certs_url: str | None = None,
        *,
        audiences: Iterable[str] | None = None,
        client_ids: Iterable[str] = (),
        require_auth: bool = True,
        cookie_domain: str = "127.0.0.1",
        iap: bool = False,
    ) -> None:
        if require_auth and certs is None and certs_url is None:
            raise ValueError("pass certs or certs_url (or require_auth=False)")
        self._certs: dict[str, str] = dict(certs or {})
        self._certs_url = certs_url
        self._audiences = list(audiences) if audiences is not None else None
        self._client_ids = set(client_ids)
        self._revoked: set[str] = set()
        self.require_auth = require_auth
        #: In front like IAP: ``Proxy-Authorization``, when present, carries the token
        #: and ``Authorization`` is the app's own (see README "IAP").
        self.iap = iap
        #: ``Domain=`` of the cookie ``/set-cookie`` sets (the service's public host).
        self.cookie_domain = cookie_domain
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._server = BackgroundServer(self._make_app())

    # -- lifecycle and settings ---------------------------------------------

    def start(self) -> Self:
        """Fetch the certs once (if a URL was given), then start serving."""
        if self._certs_url is not None:
            self.refresh_certs()
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def refresh_certs(self) -> None:
        """Fetch the certs from ``certs_url`` again."""
        assert self._certs_url is not None
        # No proxies: the fake Google is on loopback whatever http_proxy says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self._certs_url, timeout=10) as response:
            self._certs = json.load(response)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; also the default audience."""
        return self._server.url

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the ``Host`` header the service expects."""
        return f"127.0.0.1:{self.port}"

    @property
    def audiences(self) -> list[str]:
        """Accepted ``aud`` values for service tokens (default: ``[self.url]``)."""
        return list(self._audiences) if self._audiences is not None else [self.url]

    @audiences.setter
    def audiences(self, value: Iterable[str]) -> None:
        self._audiences = list(value)

    def accept_client_id(self, client_id: str) -> None:
        """Also accept user tokens whose ``aud`` is this OAuth client id."""
        with self._lock:
            self._client_ids.add(client_id)

    def revoke(self, token: str) -> None:
        """Refuse ``token`` (401) from now on, as if it had been revoked."""
        with self._lock:
            self._revoked.add(token)

    # -- records -------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last(self) -> RecordedRequest:
        """The most recent request (AssertionError if none)."""
        with self._lock:
            assert self._requests, "the private service received no request"
            return self._requests[-1]

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    # -- Cloud Run front -----------------------------------------------------

    def _verify(self, headers: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        """Check the token as Cloud Run does; returns (checked header, claims)."""
        name = XSA if XSA in headers else hdrs.AUTHORIZATION
        if self.iap and hdrs.PROXY_AUTHORIZATION in headers:
            name = hdrs.PROXY_AUTHORIZATION
        value = headers.get(name)
        if value is None:
            raise _Refusal(403, "403 Forbidden: no identity token")
        scheme, _, token = value.partition(" ")
        if scheme != "Bearer" or not token or token.count(".") != 2:
            raise _Refusal(401, f"401 Unauthorized: {name} is not 'Bearer <jwt>'")
        try:
            claims = google.auth.jwt.decode(token, certs=self._certs)
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise _Refusal(401, f"401 Unauthorized: {_reason(str(exc))}") from None
        with self._lock:
            accepted = set(self.audiences) | self._client_ids
            revoked = token in self._revoked
        if revoked:
            raise _Refusal(401, "401 Unauthorized: token revoked")
        if claims.get("aud") not in accepted:
            raise _Refusal(401, f"401 Unauthorized: wrong audience {claims.get('aud')!r}")
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise _Refusal(401, "401 Unauthorized: not issued by Google")
        return name, claims

    @web.middleware
    async def _front(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        record = RecordedRequest(request.method, request.raw_path, headers)
        if self.require_auth:
            try:
                record.checked_header, record.claims = self._verify(request.headers)
            except _Refusal as refusal:
                record.refused = (refusal.status, refusal.reason)
                self._record(record)
                extra = {hdrs.WWW_AUTHENTICATE: WWW_AUTHENTICATE} if refusal.status == 401 else {}
                return web.Response(
                    status=refusal.status, text=refusal.reason + "\n", headers=extra
                )
            if record.checked_header == XSA:
                record.headers = [
                    (k, _strip_signature(v) if k.lower() == XSA.lower() else v) for k, v in headers
                ]
                request = request.clone(headers=CIMultiDict(record.headers))
        self._record(record)
        request[_RECORD] = record
        if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
            # Hash the body as it streams in, before the handler answers, so the
            # record is complete by the time the client sees a response.
            digest, size = hashlib.sha256(), 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            record.body_len, record.body_sha256 = size, digest.hexdigest()
        return await handler(request)

    # -- the app -------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._front])
        r = app.router
        r.add_get("/bytes/{n:\\d+}", _bytes)
        r.add_route("POST", "/upload", _upload)
        r.add_route("PUT", "/upload", _upload)
        r.add_get("/redirect", _redirect)
        r.add_route("*", "/status/{code:\\d{3}}", _status)
        r.add_get("/slow", _slow)
        r.add_get("/slow-body", _slow_body)
        r.add_get("/sse", _sse)
        r.add_get("/ws", _websocket)
        r.add_get("/set-cookie", self._set_cookie)
        r.add_get("/reset-mid-body", _reset_mid_body)
        r.add_route("*", "/cors", _cors)
        r.add_get("/page", _page)
        r.add_get("/static/app.js", _app_js)
        r.add_get("/gzip", _gzip)
        r.add_route("*", "/{tail:.*}", _echo)
        return app

    async def _set_cookie(self, request: web.Request) -> web.Response:
        response = web.Response(text="cookie set\n")
        paths = request.query.getall("path", [])
        if paths:
            # ?path=P (repeatable): one cookie per value, session, session1, ... with
            # Path=P, or no Path attribute at all for an empty value.
            for i, path in enumerate(paths):
                name = "session" if i == 0 else f"session{i}"
                cookie = f"{name}=fake-session; Domain={self.cookie_domain}; HttpOnly"
                response.headers.add(hdrs.SET_COOKIE, cookie + (f"; Path={path}" if path else ""))
            return response
        response.set_cookie(
            "session", "fake-session", domain=self.cookie_domain, path="/", httponly=True
        )
        return response


def _reason(message: str) -> str:
    """A one-line reason for a failed ``jwt.decode`` that never repeats the token."""
    lowered = message.lower()
    for needle, reason in (
        ("certificate for key id", "unknown signing key"),
        ("signature", "invalid signature"),
        ("expired", "token expired"),
        ("too early", "token used before its iat"),
    ):
        if needle in lowered:
            return reason
    return "malformed token"


def _strip_signature(value: str) -> str:
    scheme, _, token = value.partition(" ")
    header_and_payload = token.rsplit(".", 1)[0]
    return f"{scheme} {header_and_payload}.{SIGNATURE_REMOVED}"


def _float(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"bad {name}\n") from None


async def _echo(request: web.Request) -> web.Response:
    record = request[_RECORD]
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "query": [[k, v] for k, v in request.query.items()],
            "headers": [[k, v] for k, v in record.headers],
            "body_len": record.body_len,
            "body_sha256": record.body_sha256,
        }
    )


async def _upload(request: web.Request) -> web.Response:
    record = request[_RECORD]
    return web.json_response({"len": record.body_len, "sha256": record.body_sha256})


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = int(request.match_info["n"])
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
    if request.query.get("cl") == "1":
        response.content_length = n
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    if request.method == hdrs.METH_HEAD:
        # aiohttp's server would put written bytes on the wire even for HEAD.
        await response.write_eof()
        return response
    for start in range(0, n, _CHUNK):
        await response.write(pattern_bytes(min(_CHUNK, n - start), start))
    await response.write_eof()
    return response


async def _redirect(request: web.Request) -> web.Response:
    to = request.query.get("to")
    if to is None:
        raise web.HTTPBadRequest(text="to= is required\n")
    status = int(request.query.get("status", "302"))
    return web.Response(status=status, headers={hdrs.LOCATION: to}, text=f"redirect to {to}\n")


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if code < 200 or code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}\n")


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(_float(request, "seconds", 1.0))
    return web.Response(text="slow\n")


async def _slow_body(request: web.Request) -> web.StreamResponse:
    seconds = _float(request, "seconds", 1.0)
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)  # StreamResponse sends the headers right away
    await asyncio.sleep(seconds)
    await response.write(b"slow body\n")
    await response.write_eof()
    return response


async def _sse(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("n", "3"))
    interval = _float(request, "interval", 0.1)
    response = web.StreamResponse(
        headers={hdrs.CONTENT_TYPE: "text/event-stream", hdrs.CACHE_CONTROL: "no-cache"}
    )
    await response.prepare(request)
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        # write() hands each event to the transport at once: one chunk per event.
        await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
    await response.write_eof()
    return response


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    # Agree to the first subprotocol offered, so tests can see it pass through.
    offered = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "")
    protocols = [p.strip() for p in offered.split(",") if p.strip()][:1]
    ws = web.WebSocketResponse(protocols=protocols)
    # ?header=Name:Value (repeatable) adds a header to the 101; aiohttp's own handshake
    # headers replace any of the same name, Date and Server given here are kept.
    for item in request.query.getall("header", []):
        name, _, value = item.partition(":")
        ws.headers.add(name.strip(), value.strip())
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data.startswith("close:"):
                await ws.close(code=int(message.data.split(":", 1)[1]), message=b"closed by server")
                break
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _reset_mid_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
    response.content_length = 100_000
    await response.prepare(request)
    await response.write(pattern_bytes(1000))
    assert request.transport is not None
    request.transport.abort()
    # Nothing more can be sent; let aiohttp see the connection is gone.
    raise asyncio.CancelledError


async def _cors(request: web.Request) -> web.Response:
    return web.Response(text="cors\n", headers={hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*"})


async def _page(request: web.Request) -> web.Response:
    html = (
        "<!doctype html>\n<html><head><title>page</title>"
        '<script src="/static/app.js"></script></head>'
        "<body><p>fake private service</p></body></html>\n"
    )
    return web.Response(text=html, content_type="text/html")


async def _app_js(request: web.Request) -> web.Response:
    return web.Response(text=APP_JS, content_type="application/javascript")


async def _gzip(request: web.Request) -> web.Response:
    # Pre-compressed bytes with Content-Encoding set; aiohttp does not touch them.
    return web.Response(
        body=gzip.compress(GZIP_PLAIN, mtime=0),
        headers={hdrs.CONTENT_TYPE: "text/plain", hdrs.CONTENT_ENCODING: "gzip"},
    )
