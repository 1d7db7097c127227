"""Websocket proxying: the upgrade goes upstream with the token, then messages flow both ways.

The upgrade request gets the same treatment as any request (guard, route,
token, header rules) and is checked before the upstream is contacted. Once
both sides are open, text and binary messages are relayed as they come; a
close from either side is passed to the other with its code and reason. Pings
are answered on each hop. The client's socket is registered in the app's set
of open websockets, so shutdown can close it with 1001 (going away).

An upgrade the upstream refuses with 401 is tried once more with a new token,
under the same rules as any request (reauth.py). The headers of the upstream's
101 reach the client except those of the handshake itself, which each hop makes
for itself; its cookies are rewritten as on any response (headers.py).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .auth import reauth
from .envproxy import UpstreamProxy
from .errors import BadRequest, ProxyError, UpstreamError, UpstreamTimeout
from .policy.headers import Headers, downstream_response_headers, rewrite_set_cookies
from .policy.router import CompiledRoute
from .auth.tokens import TokenCache

log = logging.getLogger(__name__)

#: Handshake headers each hop makes for itself.
_HANDSHAKE = (
    hdrs.SEC_WEBSOCKET_KEY,
    hdrs.SEC_WEBSOCKET_VERSION,
    hdrs.SEC_WEBSOCKET_EXTENSIONS,
    hdrs.SEC_WEBSOCKET_PROTOCOL,
    hdrs.SEC_WEBSOCKET_ACCEPT,
)
#: Headers of the upstream's 101 the client does not get, besides hop-by-hop ones: the
#: client's handshake (aiohttp's WebSocketResponse) writes its own, and a 101 has no body.
_NOT_RELAYED_101 = frozenset(
    name.lower() for name in (*_HANDSHAKE, hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING, hdrs.DATE, hdrs.SERVER)
)
#: 1014 (Bad Gateway, IANA registry): the upstream's connection ended without a close frame.
BAD_GATEWAY = 1014
#: Seconds the second direction gets to wind down once the first has closed.
_WIND_DOWN = 5.0


def is_upgrade(request: web.Request) -> bool:
    """Whether a request asks for a websocket."""
    return request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"


def offered_protocols(headers: CIMultiDict[str] | Any) -> list[str]:
    """The subprotocols a client offers, in its order of preference."""
    out: list[str] = []
    for value in headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ()):
        out.extend(p.strip() for p in value.split(",") if p.strip())
    return out


def sendable_code(code: int | None) -> int:
    """A close code that may go on the wire for one received (1005/1006 may not)."""
    if code is None or code in (0, WSCloseCode.OK, 1005):
        return WSCloseCode.OK
    if code in (1006, 1015):
        return BAD_GATEWAY
    return code


def switching_headers(
    upstream_101: Headers, *, upstream_host: str, prefix: str = "/", base_path: str = "", request_path: str = "/"
) -> CIMultiDict[str]:
    """The headers of the upstream's 101 that go into the client's 101.

    End-to-end headers pass (Set-Cookie rewritten as on any response:
    :func:`~proxy.headers.rewrite_set_cookies`); hop-by-hop ones do not, nor the
    handshake's own, framing, Date and Server, which the client's hop writes itself,
    nor CORS headers (the proxy's guard decides CORS; browsers ignore it on a 101).
    """
    out = downstream_response_headers(upstream_101)
    for name in _NOT_RELAYED_101:
        out.popall(name, None)
    for name in [n for n in out if n.lower().startswith("access-control-")]:
        out.popall(name, None)
    if hdrs.SET_COOKIE in out:
        rewrite_set_cookies(out, upstream_host=upstream_host, prefix=prefix, base_path=base_path, request_path=request_path)
    return out


@dataclass
class _Attempt:
    """One upgrade attempt upstream: the open websocket, or the status it was refused with."""

    status: int
    upstream: aiohttp.ClientWebSocketResponse | None = None
    reason: str = ""

    def release(self) -> None:
        # Nothing to release: aiohttp closed a refused handshake's response itself.
        pass


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    route: CompiledRoute,
    sockets: weakref.WeakSet[web.WebSocketResponse],
    via: UpstreamProxy | None = None,
    *,
    tokens: TokenCache | None = None,
    token: str | None = None,
) -> web.StreamResponse:
    """Proxy one websocket: ``headers`` are the upstream-bound ones (token included).

    With ``tokens`` and the ``token`` in ``headers``, an upgrade refused with 401
    is retried once with a new token where reauth.py allows it.
    """
    # A malformed upgrade is refused here, before a connection upstream is opened.
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise BadRequest("not a valid websocket upgrade request")
    protocols = offered_protocols(request.headers)
    upstream_headers = CIMultiDict(headers)
    for name in _HANDSHAKE:
        upstream_headers.popall(name, None)

    timeout = route.route.timeout

    async def connect(upstream_headers: CIMultiDict[str]) -> _Attempt:
        try:
            async with asyncio.timeout(timeout):
                ws = await session.ws_connect(
                    url,
                    headers=upstream_headers,
                    protocols=protocols,
                    autoclose=False,
                    max_msg_size=0,
                    proxy=via.url if via else None,
                    proxy_headers=via.headers if via else None,
                    # No read timeout: a quiet websocket is not a broken one.
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_WIND_DOWN),
                )
        except aiohttp.WSServerHandshakeError as e:
            return _Attempt(e.status, reason=e.message)
        except TimeoutError:
            raise UpstreamTimeout(f"{route.name}: no websocket handshake from {route.origin} within {timeout:g} s") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(f"{route.name}: cannot connect to {route.origin} ({e.os_error.strerror or type(e.os_error).__name__})") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"{route.name}: websocket to {route.origin} failed ({type(e).__name__})") from None
        return _Attempt(101, ws)

    attempt = await connect(upstream_headers)
    if attempt.status == 401 and tokens is not None and token is not None:
        # At most one retry with a new token, under the rules plain requests follow (reauth.py);
        # nothing has been sent to the client yet, and an upgrade has no body to send again.
        mode = route.route.header
        attempt = await reauth.retry_on_401(
            tokens,
            route.token_key,
            mode,
            None,
            token,
            attempt,
            lambda fresh: connect(reauth.with_token(upstream_headers, mode, fresh)),
        )
    upstream = attempt.upstream
    if upstream is None:
        # An upstream refusal (401 wrong audience, 404, ...) keeps its status; a broken handshake is 502.
        status = attempt.status if 400 <= attempt.status < 600 else 502
        raise ProxyError(f"{route.name}: upstream refused the websocket upgrade ({attempt.status} {attempt.reason})", status=status)

    try:
        # Agree to exactly the subprotocol the upstream chose (or none).
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            max_msg_size=0,
            compress=False,
        )
        # The upstream's own 101 headers (cookies, custom ones) go along; aiohttp adds the handshake's.
        client.headers.extend(
            switching_headers(
                _handshake_response_headers(upstream),
                upstream_host=route.host,
                prefix=route.route.prefix,
                base_path=route.base_path,
                request_path=request.raw_path.partition("?")[0],
            )
        )
        await client.prepare(request)
        sockets.add(client)
        await _pump_both(client, upstream, route.name)
        return client
    finally:
        if not upstream.closed:
            await upstream.close(code=WSCloseCode.GOING_AWAY)


def _handshake_response_headers(upstream: aiohttp.ClientWebSocketResponse) -> CIMultiDictProxy[str]:
    """The headers of the upstream's 101 response."""
    # aiohttp (3.14) offers no public accessor for the handshake response of a client
    # websocket (aio-libs/aiohttp#2053; a public ``response`` is proposed in #8572, #12903):
    # read the private attribute where the public one is missing.
    response: aiohttp.ClientResponse | None = getattr(upstream, "response", None)
    if response is None:
        response = upstream._response
    return response.headers


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> aiohttp.WSMessage:
    """Relay data messages until ``source`` closes; return the message that ended it."""
    while True:
        message = await source.receive()
        kind = message.type
        try:
            if kind is WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif kind is WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return message
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            # The sink went away mid-send: the other direction reports why.
            return aiohttp.WSMessage(WSMsgType.CLOSED, None, None)


async def _pump_both(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, name: str) -> None:
    up = asyncio.create_task(_pump(client, upstream))
    down = asyncio.create_task(_pump(upstream, client))
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        if up in done:
            message = up.result()
            if message.type is WSMsgType.CLOSE:
                # The client closed: pass its code on, then complete its handshake with the same.
                code = sendable_code(message.data)
                reason = (message.extra or "").encode()
                await upstream.close(code=code, message=reason)
                await client.close(code=code, message=reason)
            else:
                # The client's connection broke, or the proxy closed it (shutdown): going away.
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        else:
            message = down.result()
            if message.type is WSMsgType.CLOSE:
                code = sendable_code(message.data)
                reason = (message.extra or "").encode()
                await client.close(code=code, message=reason)
                await upstream.close(code=code, message=reason)
            else:
                # The upstream went away without a close frame.
                log.info("%s: upstream websocket ended without a close frame; closing the client's with %d", name, BAD_GATEWAY)
                await client.close(code=BAD_GATEWAY, message=b"upstream connection lost")
        # Closing both sides ends the other direction's receive; give it a moment to notice.
        await asyncio.wait((up, down), timeout=_WIND_DOWN)
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
