"""Websocket proxying: the upgrade goes upstream with the token, then messages flow both ways.

The upgrade request gets the same treatment as any request (guard, route,
token, header rules) and is checked before the upstream is contacted. Once
both sides are open, text and binary messages are relayed as they come; a
close from either side is passed to the other with its code and reason. Pings
are answered on each hop. The client's socket is registered in the app's set
of open websockets, so shutdown can close it with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from multidict import CIMultiDict
from yarl import URL

from .envproxy import UpstreamProxy
from .errors import BadRequest, ProxyError, UpstreamError, UpstreamTimeout
from .router import CompiledRoute

log = logging.getLogger(__name__)

#: Handshake headers each hop makes for itself.
_HANDSHAKE = (
    hdrs.SEC_WEBSOCKET_KEY,
    hdrs.SEC_WEBSOCKET_VERSION,
    hdrs.SEC_WEBSOCKET_EXTENSIONS,
    hdrs.SEC_WEBSOCKET_PROTOCOL,
    hdrs.SEC_WEBSOCKET_ACCEPT,
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


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    route: CompiledRoute,
    sockets: weakref.WeakSet[web.WebSocketResponse],
    via: UpstreamProxy | None = None,
) -> web.StreamResponse:
    """Proxy one websocket: ``headers`` are the upstream-bound ones (token included)."""
    # A malformed upgrade is refused here, before a connection upstream is opened.
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise BadRequest("not a valid websocket upgrade request")
    protocols = offered_protocols(request.headers)
    upstream_headers = CIMultiDict(headers)
    for name in _HANDSHAKE:
        upstream_headers.popall(name, None)

    timeout = route.route.timeout
    try:
        async with asyncio.timeout(timeout):
            upstream = await session.ws_connect(
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
        # An upstream refusal (401 wrong audience, 404, ...) keeps its status; a broken handshake is 502.
        status = e.status if 400 <= e.status < 600 else 502
        raise ProxyError(f"{route.name}: upstream refused the websocket upgrade ({e.status} {e.message})", status=status) from None
    except TimeoutError:
        raise UpstreamTimeout(f"{route.name}: no websocket handshake from {route.origin} within {timeout:g} s") from None
    except aiohttp.ClientConnectorError as e:
        raise UpstreamError(f"{route.name}: cannot connect to {route.origin} ({e.os_error.strerror or type(e.os_error).__name__})") from None
    except aiohttp.ClientError as e:
        raise UpstreamError(f"{route.name}: websocket to {route.origin} failed ({type(e).__name__})") from None

    try:
        # Agree to exactly the subprotocol the upstream chose (or none).
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            max_msg_size=0,
            compress=False,
        )
        await client.prepare(request)
        sockets.add(client)
        await _pump_both(client, upstream, route.name)
        return client
    finally:
        if not upstream.closed:
            await upstream.close(code=WSCloseCode.GOING_AWAY)


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
