"""The proxy handler: match a route, attach its token, stream both ways.

Failures map to statuses a client can act on: 400 for a target the proxy will
not forward, 404 for no route, 502 when the upstream cannot be reached or breaks
off, 503 (with Retry-After) when no token can be had, 504 when the upstream
sends no response headers within the route's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from yarl import URL

from .auth import reauth
from . import websocket
from .envproxy import UpstreamProxy, proxy_for
from .errors import BadRequest, FramingError, ProxyError, TokenUnavailable, UpstreamError, UpstreamTimeout, redact
from .policy.headers import (
    downstream_response_headers,
    rewrite_location,
    rewrite_same_origin,
    rewrite_set_cookies,
    upstream_request_headers,
)
from .ops.logs import ROUTE, UPSTREAM_SECONDS, client_gone
from .policy.router import CompiledRoute, Router, split_target
from .auth.tokens import TokenCache
from .truncation import LostBodyWatch
from .upstream import METHODS as LEAN_METHODS
from .upstream import PIPE_HIGH_WATER
from .upstream import Disconnected, LeanClient, UpstreamProtocolError, request_head, timeout_error, upstream_error

log = logging.getLogger(__name__)

#: Headers aiohttp's client would otherwise add on its own.
SKIP_AUTO_HEADERS = frozenset({hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.ACCEPT, hdrs.CONTENT_TYPE})

ROUTE_KEY = ROUTE
#: The one-line reason of a request the proxy refused or failed (for the status page).
ERROR_KEY = web.RequestKey("error", str)


def error_response(exc: ProxyError) -> web.Response:
    headers = {hdrs.CONTENT_TYPE: "text/plain; charset=utf-8", "Cache-Control": "no-store"}
    if isinstance(exc, TokenUnavailable):
        headers[hdrs.RETRY_AFTER] = str(exc.retry_after)
    return web.Response(status=exc.status, text=redact(exc.body()), headers=headers)


class BodyTooLarge(ProxyError):
    status = 413


async def _capped(stream: aiohttp.StreamReader, cap: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream.iter_any():
        seen += len(chunk)
        if seen > cap:
            raise BodyTooLarge(f"request body exceeds max_body_bytes ({cap} bytes)")
        yield chunk


class _WholeResponse(web.StreamResponse):
    """A relayed response whose whole body is already in hand: head and body in one write.

    aiohttp's StreamResponse writes its head at prepare(), right for a body that
    may take a while (a stream, server-sent events), and one more system call per
    response than needed when the body came with the head. web.Response holds its
    head for the body by this class attribute, which aiohttp offers no public
    switch for; it is set only here, and only for bodies that have fully arrived.
    """

    _send_headers_immediately = False


class _PlainResponse(web.StreamResponse):
    """A complete upstream response relayed as the bytes it came in, less hop-by-hop headers.

    Only where aiohttp would write the same bytes from the decoded headers
    (_Connection.plain_head, and the request's side checked in _forward_lean):
    that path decodes every header, builds a multidict, fills in defaults that
    are already there and serialises it all again, several coroutines deep,
    which was about a fifth of the proxy's CPU per small response. aiohttp has
    no public way to send a ready head: prepare() here does what
    StreamResponse's does for a response it has nothing to add to, setting the
    same attributes (the writer, the request, keep-alive) so that write_eof,
    keep_alive and body_length behave as for any response.
    """

    def __init__(self, status: int, reason: str, head: bytes, body: bytes) -> None:
        super().__init__(status=status, reason=reason)
        self._head = head
        self._relayed = body

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        self._req = request
        writer = self._payload_writer = request.writer
        self._keep_alive = True  # an HTTP/1.1 keep-alive request (checked by the caller)
        await request._prepare_hook(self)
        head = self._head
        if self.headers:
            # Something the hook added after all: it goes out too, as aiohttp would write it.
            head = head[:-2] + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()).encode() + b"\r\n"
        await writer.write(head + self._relayed)
        return writer


class Forwarder:
    """Forwards requests for a router's routes through one shared ClientSession."""

    def __init__(
        self,
        router: Router,
        tokens: TokenCache,
        session: aiohttp.ClientSession,
        websockets: weakref.WeakSet[web.WebSocketResponse] | None = None,
        proxies: dict[str, UpstreamProxy | None] | None = None,
        lean: LeanClient | None = None,
    ) -> None:
        self.router = router
        self.tokens = tokens
        self.session = session
        #: Open client websockets (shutdown closes them).
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = websockets if websockets is not None else weakref.WeakSet()
        #: Requests being handled now (the in-flight gauge; shutdown reports it).
        self.inflight = 0
        #: Each route's outbound proxy (HTTPS_PROXY/NO_PROXY), resolved once: the session
        #: does not read the environment (or ~/.netrc) per request (envproxy.py).
        self.proxies: dict[str, UpstreamProxy | None] = (
            proxies if proxies is not None else {r.name: proxy_for(r.scheme, r.host, r.port) for r in router.routes}
        )
        #: The lean client for GET/HEAD without a body (upstream.py); None: the session only.
        self.lean = lean
        #: Fails a relayed body whose upstream connection is lost mid-way (truncation.py).
        self.lost_bodies = LostBodyWatch()
        #: Relay a complete upstream response that needs no rewriting as its bytes
        #: (_PlainResponse); False: always through aiohttp's StreamResponse (tests compare).
        self.plain_responses = True
        #: The loop serving the app, from its first request (asyncio.get_running_loop
        #: makes a system call, getpid, each time on Python 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.inflight += 1
        try:
            return await self.forward(request)
        except ProxyError as e:
            request[ERROR_KEY] = e.reason
            gone = client_gone(request, None)
            if gone is not None:
                # The client left first (its body cut mid-upload, say): nobody gets this answer.
                return gone
            if isinstance(e, (BodyTooLarge, FramingError)):
                # The rest of the body was not read: the connection cannot be reused.
                resp = error_response(e)
                resp.force_close()
                return resp
            return error_response(e)
        except (asyncio.CancelledError, ConnectionError) as e:
            # The client went away before a response head was sent: aiohttp cancels the
            # handler when the connection is lost, and a write finds it closing. The body
            # paths (_relay, _forward_lean) answer for a client that leaves after the head;
            # a websocket whose client vanishes after its 101 is cancelled out of the relay.
            switched = isinstance(e, asyncio.CancelledError) and request.writer.output_size > 0 and websocket.is_upgrade(request)
            gone = client_gone(request, 101 if switched else None)
            if gone is None:
                raise
            return gone
        finally:
            self.inflight -= 1

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.method == hdrs.METH_CONNECT:
            raise ProxyError("CONNECT is not supported: this is a reverse proxy", status=405)
        if request.version.major != 1:
            # llhttp accepts "HTTP/2.0" in an HTTP/1 request line; this port speaks HTTP/1.x only.
            raise FramingError(f"HTTP/{request.version.major}.{request.version.minor} is not supported here", status=505)
        if request.version < aiohttp.HttpVersion11 and hdrs.TRANSFER_ENCODING in request.headers:
            # RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding; treat the framing as faulty.
            raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
        target = split_target(request.raw_path)
        host = request_host(request)
        route, rest = self.router.match(host, target)
        request[ROUTE_KEY] = route.name
        r = route.route

        body: object = None
        if request.body_exists:
            cap = r.max_body_bytes
            length = request.content_length
            if cap is not None and length is not None and length > cap:
                raise BodyTooLarge(f"request body of {length} bytes exceeds max_body_bytes ({cap} bytes)")
            body = request.content if cap is None or length is not None else _capped(request.content, cap)
            if reauth.should_buffer(r.header, length):
                # Small bodies are read first so that a 401 can be retried (reauth.py).
                body = await request.read()

        token = await self.tokens.get(route.token_key)
        headers = upstream_request_headers(
            request.headers,
            host=route.host_header,
            token_header=r.header,
            token=token,
            client_ip=request.remote,
            forwarded_host=request.headers.get(hdrs.HOST),
        )
        proxy_host = request.headers.get(hdrs.HOST)
        if proxy_host and (hdrs.ORIGIN in headers or hdrs.REFERER in headers):
            # The upstream sees itself as the origin: CSRF checks compare Origin with their Host.
            rewrite_same_origin(headers, proxy_host=proxy_host, upstream_origin=route.origin, prefix=r.prefix, base_path=route.base_path)
        upgrade = websocket.is_upgrade(request)
        if not upgrade and body is None and self.lean is not None and request.method in LEAN_METHODS and self.proxies.get(route.name) is None:
            path_qs = route.upstream_target(rest, target.query)
            head = request_head(request.method, path_qs, headers)
            if head is not None:
                return await self._forward_lean(request, route, path_qs, head, headers, token)
        url = route.upstream_url(rest, target.query)
        if upgrade:
            return await websocket.relay(
                request, self.session, url, headers, route, self.websockets, self.proxies.get(route.name), tokens=self.tokens, token=token
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        upstream = await self._send(route, request.method, url, headers, body)
        if upstream.status == 401:
            # At most one retry with a new token, and only where that is safe (reauth.py).
            upstream = await reauth.retry_on_401(
                self.tokens,
                route.token_key,
                r.header,
                body,
                token,
                upstream,
                lambda fresh: self._send(route, request.method, url, reauth.with_token(headers, r.header, fresh), body),
            )
        # Time to response headers, for the access log and the latency histogram.
        request[UPSTREAM_SECONDS] = loop.time() - started
        return await self._relay(request, route, upstream)

    async def _send(
        self, route: CompiledRoute, method: str, url: URL, headers: CIMultiDict[str], body: object
    ) -> aiohttp.ClientResponse:
        """Send one request upstream and wait (bounded) for its response headers."""
        r = route.route
        via = self.proxies.get(route.name)
        try:
            async with asyncio.timeout(r.timeout):
                return await self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    skip_auto_headers=SKIP_AUTO_HEADERS,
                    proxy=via.url if via else None,
                    proxy_headers=via.headers if via else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"{route.name}: no response from {route.origin} within {r.timeout:g} s") from None
        except BodyTooLarge:
            raise
        except aiohttp.ClientConnectorCertificateError as e:
            raise UpstreamError(f"{route.name}: TLS certificate of {route.origin} not trusted ({type(e.certificate_error).__name__})") from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as e:
            raise UpstreamError(f"{route.name}: TLS failure talking to {route.origin} ({type(e).__name__})") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(f"{route.name}: cannot connect to {route.origin} ({e.os_error.strerror or type(e.os_error).__name__})") from None
        except aiohttp.ClientError as e:
            if isinstance(e.__cause__, ProxyError):
                # The client's body failed while it streamed up (over max_body_bytes, broken
                # framing): aiohttp's client wraps the error and aborts the upstream request.
                raise e.__cause__ from None
            raise UpstreamError(f"{route.name}: upstream {route.origin} failed ({_client_error(e)})") from None

    async def _forward_lean(
        self, request: web.Request, route: CompiledRoute, path_qs: str, head: bytes, headers: CIMultiDict[str], token: str
    ) -> web.StreamResponse:
        """GET/HEAD without a body through the lean client (upstream.py); same behaviour."""
        assert self.lean is not None
        lean = self.lean
        r = route.route
        head_only = request.method == hdrs.METH_HEAD
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        started = loop.time()

        async def send(head: bytes) -> Any:
            try:
                # The route's timeout bounds the wait for the response head, as on the session path.
                return await lean.exchange(route, head, head_only, loop.time() + r.timeout)
            except TimeoutError:
                raise timeout_error(route) from None
            except (OSError, Disconnected, UpstreamProtocolError) as e:
                raise upstream_error(route, e) from None

        def resend(fresh: str) -> Any:
            again = request_head(request.method, path_qs, reauth.with_token(headers, r.header, fresh))
            assert again is not None
            return send(again)

        conn = await send(head)
        if conn.status == 401:
            # At most one retry with a new token, and only where that is safe (reauth.py).
            conn = await reauth.retry_on_401(self.tokens, route.token_key, r.header, None, token, conn, resend)
        # Time to response headers, for the access log and the latency histogram.
        request[UPSTREAM_SECONDS] = loop.time() - started
        try:
            if (
                conn.complete
                and self.plain_responses
                and not head_only
                and conn.status not in (204, 304)
                and request.version == aiohttp.HttpVersion11
                and request.keep_alive
                and getattr(request, "plain_response", False)
            ):
                plain = conn.plain_head()
                if plain is not None:
                    done = _PlainResponse(conn.status, conn.reason, plain, conn.take())
                    await done.prepare(request)
                    await done.write_eof()
                    return done
            # A body that came complete with the head (most small ones) leaves in the same write.
            kind = _WholeResponse if conn.complete else web.StreamResponse
            out = kind(status=conn.status, reason=conn.reason, headers=self._response_headers(request, route, conn.client_headers()))
            await out.prepare(request)
            writer, transport = request.writer, request.transport
            try:
                if not conn.complete and not getattr(writer, "chunked", True) and transport is not None:
                    # A body still coming, sent as it is (no chunked framing to add): the head and
                    # what came with it go through aiohttp's writer, the rest straight from the
                    # upstream connection to the client's (upstream.py, pipe), counted as aiohttp counts.
                    await out.write(conn.take())

                    def sink(part: bytes) -> bool:
                        if transport.is_closing():
                            raise ConnectionResetError("the client's connection is closing")
                        transport.write(part)
                        writer.output_size += len(part)
                        return transport.get_write_buffer_size() > PIPE_HIGH_WATER

                    await conn.pipe(sink, writer.drain)
                    data = b""
                else:
                    while True:
                        data = await conn.read()
                        if not data or (conn.complete and not conn.chunks):
                            break
                        await out.write(data)
                # A body that came complete goes out here, with the head if it is still held.
                await out.write_eof(data)
            except (Disconnected, UpstreamProtocolError) as e:
                # Headers are sent: the only honest signal left is to cut the connection,
                # so the client never mistakes a truncated body for a complete one.
                log.warning("%s: upstream broke off the response body (%s); aborting the client connection", route.name, _client_error(e))
                if request.transport is not None:
                    request.transport.abort()
                return out
            except (asyncio.CancelledError, ConnectionError):
                # The client went away: a StreamResponse's head went out at prepare; a
                # _WholeResponse's goes with its body in write_eof, one write, all or nothing.
                gone = client_gone(request, out.status if kind is web.StreamResponse else None)
                if gone is None:
                    raise
                return gone
            return out
        finally:
            lean.release(route, conn)

    def _response_headers(self, request: web.Request, route: CompiledRoute, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """The upstream's response headers (hop-by-hop ones already dropped) as the client gets them."""
        location = headers.get(hdrs.LOCATION)
        if location is not None:
            headers[hdrs.LOCATION] = rewrite_location(
                location,
                upstream=route.route.upstream,
                prefix=route.route.prefix,
                proxy_origin=f"http://{request.host}",
            )
        if hdrs.SET_COOKIE in headers:
            # Cookies for the upstream's domain would be refused by a browser on the proxy,
            # and an upstream Path is mapped under the route's prefix (shared origin).
            rewrite_set_cookies(
                headers,
                upstream_host=route.host,
                prefix=route.route.prefix,
                base_path=route.base_path,
                request_path=request.raw_path.partition("?")[0],
            )
        return headers

    async def _relay(self, request: web.Request, route: CompiledRoute, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Send the upstream's response to the client, streaming the body."""
        watch = self.lost_bodies.start(upstream)
        try:
            headers = self._response_headers(request, route, downstream_response_headers(upstream.headers))
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            await out.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
            except aiohttp.ClientError as e:
                gone = client_gone(request, out.status)
                if gone is not None:
                    # A write that found the client's connection closing (aiohttp's
                    # ClientConnectionResetError is a ClientError): the client left, not the upstream.
                    return gone
                # Headers are sent: the only honest signal left is to cut the connection,
                # so the client never mistakes a truncated body for a complete one.
                log.warning("%s: upstream broke off the response body (%s); aborting the client connection", route.name, _client_error(e))
                if request.transport is not None:
                    request.transport.abort()
                return out
            except (asyncio.CancelledError, ConnectionError):
                # The client went away mid-body (the head went out at prepare).
                gone = client_gone(request, out.status)
                if gone is None:
                    raise
                return gone
            return out
        finally:
            LostBodyWatch.stop(watch, upstream)
            upstream.release()


def request_host(request: web.Request) -> str | None:
    """The Host header's name, lower-cased, without port."""
    host = request.headers.get(hdrs.HOST)
    if not host:
        return None
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if ":" in host else host


def _client_error(e: BaseException) -> str:
    # aiohttp's ClientResponseError carries request_info with our headers: never format it.
    if isinstance(e, aiohttp.ClientResponseError):
        return f"{type(e).__name__} {e.status}"
    text = str(e).splitlines()[0] if str(e) else ""
    return redact(f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__)


__all__ = ["Forwarder", "BadRequest", "ERROR_KEY", "ROUTE_KEY", "error_response", "request_host"]
