"""One request's path, from the client's head to the access line, whatever the protocol.

Read top to bottom, as Go's ``ReverseProxy.ServeHTTP``:

1. the guard (Host, Origin, CORS preflights), before anything else;
2. the proxy's own pages (``/.proxy/...``);
3. the route, and the checks on the request's form and body size;
4. the route's token;
5. the upstream request head (headers.py's rules);
6. the transport (engine/upstream.py), with one retry on a 401 where that is safe;
7. a 101 becomes a tunnel (engine/tunnel.py);
8. the response head (Location, Set-Cookie, CORS) and the body relayed with flow control;
9. the access line, the metrics and the status page's counts.

It takes a request head, a body stream and a response writer (engine/http1.py),
so that another protocol's streams can take the same path. ``fail`` words
every failure, once: 400 for a target the proxy will not forward, 404 for no
route, 413 over ``max_body_bytes``, 502 when the upstream cannot be reached or
breaks off, 503 (with Retry-After) when no token can be had, 504 when the
upstream sends no response head within the route's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, cast

from multidict import CIMultiDict

from .auth import reauth
from .auth.tokens import TokenCache
from .config import RESERVED_PREFIX, Config
from .engine.h2lazy import LazyH2Pool
from .engine.h2stream import CONNECTION_SPECIFIC, H2Body, H2RequestHead, H2Response, response_headers
from .engine.http1 import Body, RequestHead, Response
from .engine.tunnel import Tunnel
from .engine.upstream import (
    PIPE_HIGH_WATER,
    BodySource,
    Disconnected,
    Origin,
    Pool,
    ProxyConnectError,
    UpstreamConnection,
    UpstreamProtocolError,
    request_head,
)
from .envproxy import UpstreamProxy, proxy_for
from .errors import (
    BadRequest,
    BodyTooLarge,
    FramingError,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
    error_headers,
    redact,
)
from .ops.logs import CLIENT_CLOSED_REQUEST, AccessLog
from .ops.status import RequestStats
from .policy import grpc
from .policy.guard import Guard, log_preflight, log_refusal, preflight_headers, refusal
from .policy.headers import rewrite_location, rewrite_same_origin, rewrite_set_cookies, upstream_request_headers
from .policy.router import CompiledRoute, Router, split_target
from .websocket import agreed_handshake, handshake_headers, switching_headers

# The HTTP/2 modules proper (h2, hpack) are imported by the first HTTP/2 connection (engine/h2lazy.py).
if TYPE_CHECKING:
    from .engine.h2server import ServerStream
    from .engine.h2upstream import UpstreamStream

log = logging.getLogger(__name__)

#: What a page handler returns: status, headers and body.
Page = tuple[int, list[tuple[str, str]], bytes]
#: A request body relayed as it comes (an HTTP/2 stream): it cannot be sent twice (reauth.py).
STREAMED = object()
#: Methods whose request carries a body by convention: Content-Length 0 when it has none.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class Context:
    """What one request's path learns on the way, for the access line and the status page."""

    __slots__ = ("body", "cors_origin", "error", "gone", "grpc_status", "head", "preflight", "response", "route", "started", "upstream_seconds")

    def __init__(self, head: RequestHead, body: Body, response: Response) -> None:
        self.head = head
        self.body = body
        self.response = response
        self.route = "-"
        self.error: str | None = None
        self.upstream_seconds: float | None = None
        self.cors_origin: str | None = None
        self.preflight = False
        self.gone = False
        #: A gRPC call's outcome, from the upstream's trailers (or the proxy's own refusal).
        self.grpc_status: str | None = None
        self.started = time.perf_counter()


class Exchange:
    """The request path of the main listener (``handle``), and the proxy's own pages on it."""

    def __init__(
        self,
        config: Config,
        router: Router,
        tokens: TokenCache,
        guard: Guard,
        stats: RequestStats,
        access: AccessLog,
        pages: dict[str, Callable[[], Page]],
        pool: Pool | None = None,
        proxies: dict[str, UpstreamProxy | None] | None = None,
        h2pool: LazyH2Pool | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.tokens = tokens
        self.guard = guard
        self.stats = stats
        self.access = access
        self.pages = pages
        self.pool = pool if pool is not None else Pool()
        #: HTTP/2 connections to upstreams, for requests that came over HTTP/2.
        self.h2pool = h2pool if h2pool is not None else LazyH2Pool()
        #: Each route's outbound proxy (HTTPS_PROXY/NO_PROXY), resolved once (envproxy.py).
        self.proxies: dict[str, UpstreamProxy | None] = (
            proxies if proxies is not None else {r.name: proxy_for(r.scheme, r.host, r.port) for r in router.routes}
        )
        #: Each route's origin for the transport (with its outbound proxy), by route name,
        #: with the route it was made for: a route table replaced at run time (a whole
        #: project's re-listing) brings routes made later.
        self.origins: dict[str, tuple[CompiledRoute, Origin]] = {}
        for r in router.routes:
            self.origin_for(r)
        #: Requests being handled now (the in-flight gauge; shutdown reports it).
        self.inflight = 0
        #: Open websocket tunnels; shutdown closes them with 1001 (going away).
        self.tunnels: set[Tunnel] = set()
        #: Relay a complete upstream response that needs no rewriting as its bytes (False: tests compare).
        self.plain_responses = True
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the path -----------------------------------------------------------------------

    async def handle(self, head: RequestHead, body: Body, response: Response) -> None:
        """Serve one request: answer it, log it, count it."""
        ctx = Context(head, body, response)
        self.inflight += 1
        try:
            try:
                await self._serve(ctx, body)
            except ProxyError as e:
                self.fail(ctx, e)
        except (asyncio.CancelledError, ConnectionError):
            if not response.client_gone:
                raise
            # The client went away: nobody gets an answer, but the request gets its line.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            self._log(ctx, gone=True)
            return
        finally:
            self.inflight -= 1
        self._log(ctx, gone=ctx.gone)

    async def _serve(self, ctx: Context, body: Body) -> None:
        head = ctx.head
        headers = head.headers
        response = ctx.response

        # 1. The browser guard runs first, before any token is fetched or upstream contacted.
        verdict = self.guard.decide(head.method, headers)
        if not verdict.allowed:
            log_refusal(head.method, head.target, verdict)
            error = refusal(verdict)
            ctx.error = error.reason
            out = CIMultiDict(error_headers(error))
            out["X-Content-Type-Options"] = "nosniff"
            self._send(ctx, error.status, out, redact(error.body()).encode())
            return
        ctx.cors_origin = verdict.cors_origin
        if verdict.preflight:
            ctx.preflight = True
            log_preflight(headers, head.target, verdict.cors_origin)
            self._send(ctx, 204, preflight_headers(headers), b"")
            return

        # 2. The proxy's own pages.
        target = head.target
        if target.startswith(RESERVED_PREFIX) and self._own_page(ctx):
            return

        # 3. The route, and what the request must look like to be forwarded.
        if head.method == "CONNECT":
            raise ProxyError("CONNECT is not supported: this is a reverse proxy", status=405)
        h2 = isinstance(head, H2RequestHead)
        if head.version[0] != 1 and not h2:
            # llhttp accepts "HTTP/2.0" in an HTTP/1 request line: HTTP/2 is a stream (engine/h2server.py).
            raise FramingError(f"HTTP/{head.version[0]}.{head.version[1]} is not supported here", status=505)
        if head.version < (1, 1) and "Transfer-Encoding" in headers:
            # RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding; treat the framing as faulty.
            raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
        split = split_target(target)
        route, rest = self.router.match(request_host(headers), split)
        ctx.route = route.name
        r = route.route
        upload: BodySource = None
        chunked = False
        length = body.length
        if body.exists:
            cap = r.max_body_bytes
            if cap is not None and length is not None and length > cap:
                response.close_after()
                raise BodyTooLarge(f"request body of {length} bytes exceeds max_body_bytes ({cap} bytes)")
            if reauth.should_buffer(r.header, length):
                # Small bodies are read first so that a 401 can be retried (reauth.py).
                upload = await _read_capped(body, cap)
            elif h2:
                pass  # relayed frame by frame, trailers included (_forward_h2)
            else:
                upload = _stream(body, cap if length is None else None)
                chunked = length is None

        # 4. The route's token.
        minted = self.tokens.peek(route.token_key)
        token = minted.token if minted is not None else await self.tokens.get(route.token_key)

        # 5. The upstream request head: strip first, inject last (headers.py).
        host_sent = headers.get("Host")
        out = upstream_request_headers(
            headers,
            host=route.host_header,
            token_header=r.header,
            token=token,
            client_ip=head.remote,
            forwarded_host=host_sent,
        )
        if host_sent and ("Origin" in out or "Referer" in out):
            # The upstream sees itself as the origin: CSRF checks compare Origin with their Host.
            rewrite_same_origin(out, proxy_host=host_sent, upstream_origin=route.origin, prefix=r.prefix, base_path=route.base_path)
        upgrade = head.upgrade and headers.get("Upgrade", "").lower() == "websocket"
        if upgrade:
            _check_upgrade(headers)
            # The handshake passes end to end: the upstream negotiates extensions and subprotocols.
            for name, value in handshake_headers(headers):
                out.add(name, value)
            out["Connection"] = "Upgrade"
            out["Upgrade"] = "websocket"
        if isinstance(upload, bytes):
            out["Content-Length"] = str(len(upload))
        elif chunked:
            out["Transfer-Encoding"] = "chunked"
        elif upload is None and not body.exists and head.method in _BODY_METHODS and "Content-Length" not in out:
            out["Content-Length"] = "0"
        if h2:
            await self._forward_h2(ctx, route, out, route.upstream_target(rest, split.query), cast(bytes | None, upload), token)
            return
        origin = self.origin_for(route)
        path_qs = route.upstream_target(rest, split.query)
        if origin.via is not None:
            path_qs = origin.target(path_qs)
            for name, value in origin.proxy_headers():
                out[name] = value

        # 6. The transport; at most one retry with a new token, and only where that is safe (reauth.py).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        started = loop.time()
        head_only = head.method == "HEAD"

        async def send(fresh: str | None) -> UpstreamConnection:
            sent = out if fresh is None else reauth.with_token(out, r.header, fresh)
            data = request_head(head.method, path_qs, sent)
            if data is None:
                raise UpstreamError(f"{route.name}: a request header value would break the request's framing", status=400)
            try:
                # The route's timeout bounds the wait for the response head.
                return await self.pool.exchange(
                    origin, data, loop.time() + r.timeout, body=upload, chunked=chunked, head_only=head_only, upgrade=upgrade
                )
            except ConnectionError as e:
                if ctx.response.client_gone:
                    raise  # the client's body broke off: the client left, not the upstream
                raise upstream_error(route, e) from None
            except TimeoutError:
                if upgrade:
                    raise UpstreamTimeout(f"{route.name}: no websocket handshake from {route.origin} within {r.timeout:g} s") from None
                raise UpstreamTimeout(f"{route.name}: no response from {route.origin} within {r.timeout:g} s") from None
            except (OSError, Disconnected, UpstreamProtocolError) as e:
                raise upstream_error(route, e) from None

        conn = await send(None)
        if conn.status == 401:
            conn = await reauth.retry_on_401(self.tokens, route.token_key, r.header, upload, token, conn, send)
        # Time to response headers, for the access log and the latency histogram.
        ctx.upstream_seconds = loop.time() - started
        try:
            if upgrade:
                await self._tunnel(ctx, route, conn)
            else:
                await self._relay(ctx, route, conn, head_only)
        finally:
            if not upgrade:
                self.pool.release(origin, conn)

    # -- 6 to 8 for an HTTP/2 stream -----------------------------------------------------------

    async def handle_h2(self, stream: ServerStream) -> None:
        """Serve one HTTP/2 stream: the same path as any request, to the upstream over HTTP/2."""
        self.stats.http2_streams += 1
        head = H2RequestHead(stream, stream.remote)
        declared = head.headers.get("Content-Length")
        body = H2Body(stream, int(declared) if declared is not None and declared.isdigit() else None)
        response = H2Response(stream, grpc.refusal if head.grpc else None)
        await self.handle(head, cast(Body, body), cast(Response, response))
        await response.finish()

    async def _forward_h2(
        self, ctx: Context, route: CompiledRoute, out: CIMultiDict[str], path_qs: str, upload: bytes | None, token: str
    ) -> None:
        # Loaded already (an HTTP/2 connection brought this request), cached after the first call.
        import h2.errors

        from .engine.h2common import StreamReset
        from .engine.h2relay import link_resets, pump_request, pump_response
        from .engine.h2upstream import H2UpstreamError
        from .engine.h2upstream import Origin as H2Origin

        head = cast(H2RequestHead, ctx.head)
        client = head.stream
        body = cast(H2Body, ctx.body)
        r = route.route
        if self.proxies.get(route.name) is not None:
            raise UpstreamError(f"{route.name}: HTTP/2 through an outbound proxy (HTTPS_PROXY) is not supported; use HTTP/1.1")
        # The upstream head: pseudo-headers first, then the fields headers.py kept and injected.
        fields = [
            (b":method", head.method.encode()),
            (b":scheme", route.scheme.encode()),
            (b":authority", route.host_header.encode()),
            (b":path", path_qs.encode("utf-8", "surrogateescape")),
        ]
        for name, value in out.items():
            lower = name.lower()
            if lower != "host" and lower not in CONNECTION_SPECIFIC:
                fields.append((lower.encode("latin-1"), value.encode("utf-8", "surrogateescape")))
        if head.headers.get("te", "").lower() == "trailers":
            # The one TE value HTTP/2 allows; gRPC servers require it.
            fields.append((b"te", b"trailers"))
        streamed = body.exists and upload is None
        loop = asyncio.get_running_loop()
        started = loop.time()
        h2origin = H2Origin(route.scheme, route.host, route.port)

        async def send(fresh: str | None) -> _H2Attempt:
            sent = fields if fresh is None else [(k, v) if k != r.header.encode() else (k, f"Bearer {fresh}".encode()) for k, v in fields]
            attempt: _H2Attempt | None = None
            try:
                async with asyncio.timeout(r.timeout):
                    upstream = await self.h2pool.open_stream(h2origin, sent, end_stream=not streamed and not upload)
                    attempt = _H2Attempt(upstream)
                    if upload:
                        await upstream.send_data(upload, end_stream=True)
                    elif streamed:
                        attempt.sending = asyncio.ensure_future(pump_request(client, upstream))
                    attempt.took(await upstream.response)
            except BaseException as e:
                # Whatever ends the wait (the client's cancel, the timeout) ends the upstream stream too.
                if attempt is not None:
                    attempt.release()
                if isinstance(e, TimeoutError):
                    raise UpstreamTimeout(f"{route.name}: no response from {route.origin} within {r.timeout:g} s") from None
                if isinstance(e, H2UpstreamError):
                    raise UpstreamError(f"{route.name}: {e}") from None
                if isinstance(e, StreamReset) and client.reset is None:
                    raise UpstreamError(f"{route.name}: upstream {route.origin} reset the stream ({e})") from None
                raise
            return attempt

        attempt = await send(None)
        attempt = await reauth.retry_on_401(
            self.tokens, route.token_key, r.header, STREAMED if streamed else upload, token, attempt, send
        )
        ctx.upstream_seconds = loop.time() - started
        upstream = attempt.upstream
        link_resets(client, upstream)
        response = cast(H2Response, ctx.response)
        status = attempt.status
        headers = self._response_headers(
            ctx,
            route,
            CIMultiDict((k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in attempt.head if not k.startswith(b":")),
        )
        self.guard.finish_headers(headers, status, ctx.cors_origin)
        self._count(ctx, status, "")
        response.status, response.started = status, True
        try:
            if upstream.next_is_end():
                # A trailers-only answer (a gRPC error) stays one HEADERS frame with END_STREAM.
                await upstream.read()
                client.send_headers(response_headers(status, headers.items()), end_stream=True)
                trailers: list[tuple[bytes, bytes]] | None = attempt.head
            else:
                client.send_headers(response_headers(status, headers.items()))
                sent, trailers = await pump_response(upstream, client)
                response.sent += sent
            if head.grpc and trailers is not None:
                ctx.grpc_status = next((v.decode("latin-1") for k, v in trailers if k == b"grpc-status"), None)
            response.finished = True
            if attempt.sending is not None and not attempt.sending.done():
                # Answered in full before the request ended (a gRPC server may): stop the upload.
                attempt.sending.cancel()
                upstream.cancel(h2.errors.ErrorCodes.NO_ERROR)
        except StreamReset as e:
            if client.reset is not None:
                raise ConnectionResetError("the client reset the stream") from None
            # The upstream reset it: the client got the same RST_STREAM (link_resets).
            ctx.error = f"upstream {route.origin} reset the stream ({e})"
            response.finished = True
        except BaseException:
            attempt.release()
            raise
        finally:
            if attempt.sending is not None:
                if not attempt.sending.done():
                    attempt.sending.cancel()
                await asyncio.gather(attempt.sending, return_exceptions=True)

    def origin_for(self, route: CompiledRoute) -> Origin:
        """The transport's origin for ``route``, made once per route object."""
        cached = self.origins.get(route.name)
        if cached is not None and cached[0] is route:
            return cached[1]
        if cached is not None or route.name not in self.proxies:
            # A route made after startup (or made anew): its outbound proxy as the environment says.
            self.proxies[route.name] = proxy_for(route.scheme, route.host, route.port)
        via = self.proxies[route.name]
        origin = Origin(route.scheme, route.host, route.port, via.via() if via else None, authority=route.host_header)
        self.origins[route.name] = (route, origin)
        return origin

    # -- 7. upgrades -------------------------------------------------------------------------

    async def _tunnel(self, ctx: Context, route: CompiledRoute, conn: UpstreamConnection) -> None:
        response = ctx.response
        if conn.status != 101:
            # An upstream refusal (401 wrong audience, 404, ...) keeps its status; a broken handshake is 502.
            conn.close()
            status = conn.status if 400 <= conn.status < 600 else 502
            raise ProxyError(f"{route.name}: upstream refused the websocket upgrade ({conn.status} {conn.reason})", status=status)
        upstream_headers = conn.client_headers()
        out = switching_headers(
            upstream_headers,
            upstream_host=route.host,
            prefix=route.route.prefix,
            base_path=route.base_path,
            request_path=ctx.head.target.partition("?")[0],
        )
        # The handshake's answer (accept key, chosen subprotocol and extensions) is the upstream's,
        # as far as it answers what the client offered.
        for name, value in agreed_handshake(ctx.head.headers, handshake_headers(conn.raw_header_items())):
            out.add(name, value)
        out["Connection"] = "Upgrade"
        out["Upgrade"] = "websocket"
        response.start(101, "Switching Protocols", out.items())
        protocol, transport, pending = response.detach()
        tunnel = Tunnel(protocol, transport, pending, conn, route.name, self.tunnels.discard)
        self.tunnels.add(tunnel)
        try:
            await asyncio.shield(tunnel.done)
        except asyncio.CancelledError:
            tunnel.abort()
            raise
        finally:
            protocol.tunnel_done()
        response.sent += tunnel.bytes_down
        if tunnel.client_vanished:
            # Gone without a close frame: the line says so, as for any request whose client left.
            ctx.gone = True

    # -- 8. the response ---------------------------------------------------------------------

    async def _relay(self, ctx: Context, route: CompiledRoute, conn: UpstreamConnection, head_only: bool) -> None:
        response = ctx.response
        head = ctx.head
        if (
            conn.complete
            and self.plain_responses
            and not head_only
            and conn.status not in (204, 304)
            and head.version == (1, 1)
            and response.keep_alive
            and self.guard.adds_nothing(ctx.cors_origin)
        ):
            plain = conn.plain_head()
            if plain is not None:
                # Nothing to rewrite: the upstream's head goes as it came, with the body, in one write.
                response.send_raw(conn.status, conn.reason, plain, conn.take())
                self._count(ctx, conn.status, conn.reason)
                return
        headers = self._response_headers(ctx, route, conn.client_headers())
        self.guard.finish_headers(headers, conn.status, ctx.cors_origin)
        # The upstream's Content-Length (llhttp checked it) frames the body for the client too.
        declared = headers.get("Content-Length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and length is None:
            del headers["Content-Length"]
        self._count(ctx, conn.status, conn.reason)
        if conn.complete:
            # A body that came complete with the head (most small ones) leaves in the same write.
            response.send(conn.status, headers.items(), conn.take(), conn.reason)
            return
        response.start(conn.status, conn.reason, headers.items(), length)
        try:
            if length is not None:
                # A body of known length is written as it is parsed, from inside the read callback.
                def sink(part: bytes) -> bool:
                    return response.write(part) or False

                await conn.pipe(sink, response.drain)
            else:
                while True:
                    data = await conn.read()
                    if not data:
                        break
                    if response.write(data):
                        await response.drain()
            response.end()
        except (Disconnected, UpstreamProtocolError) as e:
            # Headers are sent: the only honest signal left is to cut the connection,
            # so the client never mistakes a truncated body for a complete one.
            log.warning("%s: upstream broke off the response body (%s); aborting the client connection", route.name, _describe(e))
            response.abort()

    def _response_headers(self, ctx: Context, route: CompiledRoute, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """The upstream's response headers (hop-by-hop ones already dropped) as the client gets them."""
        location = headers.get("Location")
        if location is not None:
            headers["Location"] = rewrite_location(
                location,
                upstream=route.route.upstream,
                prefix=route.route.prefix,
                proxy_origin=f"http://{ctx.head.headers.get('Host', '')}",
            )
        if "Set-Cookie" in headers:
            # Cookies for the upstream's domain would be refused by a browser on the proxy,
            # and an upstream Path is mapped under the route's prefix (shared origin).
            rewrite_set_cookies(
                headers,
                upstream_host=route.host,
                prefix=route.route.prefix,
                base_path=route.base_path,
                request_path=ctx.head.target.partition("?")[0],
            )
        return headers

    # -- the proxy's own answers ---------------------------------------------------------------

    def _own_page(self, ctx: Context) -> bool:
        """Answer a request for one of the proxy's own pages; False if the path is none of them."""
        path = ctx.head.target.partition("?")[0]
        page = self.pages.get(path)
        if page is None:
            return False
        if ctx.head.method not in ("GET", "HEAD"):
            self._send(ctx, 405, CIMultiDict({"Allow": "GET, HEAD", "Content-Type": "text/plain; charset=utf-8"}), b"405: Method Not Allowed")
            return True
        status, headers, body = page()
        self._send(ctx, status, CIMultiDict(headers), body)
        return True

    def _send(self, ctx: Context, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.guard.finish_headers(headers, status, ctx.cors_origin, ctx.preflight)
        self._count(ctx, status, "")
        ctx.response.send(status, headers.items(), body)

    def fail(self, ctx: Context, exc: ProxyError) -> None:
        """The one place a failure becomes an answer: its status and one-line reason (errors.py)."""
        ctx.error = exc.reason
        response = ctx.response
        if response.started:
            # Too late for an answer: cut the connection rather than let a partial one pass for whole.
            response.abort()
            return
        if isinstance(exc, (BodyTooLarge, FramingError)):
            # The rest of the body was not read: the connection cannot be reused.
            response.close_after()
        self._send(ctx, exc.status, CIMultiDict(error_headers(exc)), redact(exc.body()).encode())

    # -- 9. the access line and the counts ---------------------------------------------------------

    def _count(self, ctx: Context, status: int, reason: str) -> None:
        self.stats.count(ctx.head.method, ctx.head.target, ctx.route, status, reason, ctx.error)

    def _log(self, ctx: Context, gone: bool = False) -> None:
        response = ctx.response
        status = response.status if response.started else CLIENT_CLOSED_REQUEST
        head = ctx.head
        self.access.log(
            head.method,
            head.target,
            status,
            ctx.body.total,
            response.sent if response.started else 0,
            time.perf_counter() - ctx.started,
            ctx.route,
            ctx.upstream_seconds,
            head.remote,
            head.version,
            head.headers.get("User-Agent"),
            gone,
            ctx.grpc_status or (response.grpc_status if isinstance(response, H2Response) else None),
        )

    def refused(self, head: RequestHead | None, response: Response | None, status: int, reason: str, sent: int) -> None:
        """A request the engine refused before it had a head (malformed, too large, too slow)."""
        self.access.log("-", "-", status, 0, sent, 0.0, "-", None, None, (1, 1), None, False)

    # -- shutdown -------------------------------------------------------------------------------------

    async def close_tunnels(self, timeout: float) -> None:
        """Send every open websocket a 1001 (going away) close frame, and wait for them to end."""
        tunnels = list(self.tunnels)
        if not tunnels:
            return
        log.info("closing %d websocket%s (1001 going away)", len(tunnels), "s" * (len(tunnels) != 1))
        for tunnel in tunnels:
            tunnel.going_away()
        # A peer that never answers the close frame must not hold up the shutdown.
        done, _ = await asyncio.wait([t.done for t in tunnels], timeout=max(0.1, timeout))
        if len(done) < len(tunnels):
            log.warning("websocket peers did not acknowledge the close in time")
            for tunnel in tunnels:
                tunnel.abort()

    def close(self) -> None:
        self.pool.close()
        self.h2pool.close()


class _H2Attempt:
    """One upstream stream of an HTTP/2 request, as reauth.retry_on_401 sees a response."""

    __slots__ = ("head", "sending", "status", "upstream")

    def __init__(self, upstream: UpstreamStream) -> None:
        self.upstream = upstream
        self.head: list[tuple[bytes, bytes]] = []
        self.status = 0
        #: The client's body going upstream, frame by frame.
        self.sending: asyncio.Future[None] | None = None

    def took(self, head: list[tuple[bytes, bytes]]) -> None:
        self.head = head
        for k, v in head:
            if k == b":status":
                self.status = int(v)

    def release(self) -> None:
        import h2.errors  # loaded already: the stream exists

        if self.sending is not None:
            self.sending.cancel()
        self.upstream.cancel(h2.errors.ErrorCodes.CANCEL)


def request_host(headers: CIMultiDict[str]) -> str | None:
    """The Host header's name, lower-cased, without port."""
    host = headers.get("Host")
    if not host:
        return None
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if ":" in host else host


async def _read_capped(body: Body, cap: int | None) -> bytes:
    """The whole body (an HTTP/1.1 or HTTP/2 one: both read() to b"" at the end), within ``cap``."""
    parts: list[bytes] = []
    while part := await body.read():
        parts.append(part)
    data = b"".join(parts)
    if cap is not None and len(data) > cap:
        raise BodyTooLarge(f"request body exceeds max_body_bytes ({cap} bytes)")
    return data


async def _stream(body: Body, cap: int | None) -> AsyncIterator[bytes]:
    """The client's body as it arrives, failing once it grows past ``cap`` (chunked bodies)."""
    seen = 0
    while True:
        part = await body.read()
        if not part:
            return
        seen += len(part)
        if cap is not None and seen > cap:
            raise BodyTooLarge(f"request body exceeds max_body_bytes ({cap} bytes)")
        yield part


def _check_upgrade(headers: CIMultiDict[str]) -> None:
    """A malformed websocket upgrade is refused here, before a connection upstream is opened."""
    key = headers.get("Sec-WebSocket-Key", "")
    if headers.get("Sec-WebSocket-Version", "") != "13" or len(key) != 24 or "upgrade" not in headers.get("Connection", "").lower():
        raise BadRequest("not a valid websocket upgrade request")


def _describe(e: BaseException) -> str:
    if isinstance(e, Disconnected):
        return "ServerDisconnectedError: Server disconnected"
    return redact(f"{type(e).__name__}: {str(e)[:160]}" if str(e) else type(e).__name__)


def upstream_error(route: CompiledRoute, e: BaseException) -> UpstreamError:
    """The 502 for a transport failure: each kind worded once."""
    if isinstance(e, ssl.SSLCertVerificationError):
        # OpenSSL's own words say what is wrong: the name, the date, or the issuer.
        why = (e.verify_message or type(e).__name__).rstrip(".")
        return UpstreamError(f"{route.name}: TLS certificate of {route.origin} not trusted ({why})")
    if isinstance(e, ssl.SSLError):
        return UpstreamError(f"{route.name}: TLS failure talking to {route.origin} ({type(e).__name__})")
    if isinstance(e, ProxyConnectError):
        return UpstreamError(f"{route.name}: cannot connect to {route.origin} through the outbound proxy ({e})")
    if isinstance(e, OSError):
        return UpstreamError(f"{route.name}: cannot connect to {route.origin} ({e.strerror or type(e).__name__})")
    if isinstance(e, Disconnected):
        return UpstreamError(f"{route.name}: upstream {route.origin} failed (ServerDisconnectedError: Server disconnected)")
    # Redacted at the source: whatever the exception says, no token leaves in a 502 body.
    return UpstreamError(redact(f"{route.name}: upstream {route.origin} failed ({e})"))


__all__ = ["PIPE_HIGH_WATER", "Context", "Exchange", "Page", "request_host", "upstream_error"]
