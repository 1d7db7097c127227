"""Streams through the proxy: websockets (token on the upgrade, messages both ways,
close codes, subprotocols, shutdown, one retry after a 401, the upstream's 101
headers) and server-sent events delivered as they come."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from proxy.server import close_websockets
from proxy.auth.tokens import TokenCache
from proxy.websocket import BAD_GATEWAY, sendable_code, switching_headers
from tests.fakes import BackgroundServer
from tests.test_forward import raw_exchange


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


@pytest.fixture
async def client():
    async with aiohttp.ClientSession() as session:
        yield session


class Recorder:
    """An upstream that records how each websocket ended (it checks no token: the fake
    Cloud Run service does that in the other tests)."""

    def __init__(self) -> None:
        self.closes: list[int | None] = []
        self.upgrades: list[dict[str, str]] = []
        self.closed = threading.Event()
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/drop", self._drop)
        self.server = BackgroundServer(app)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.upgrades.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        # aiohttp ends the iteration at the peer's close frame and answers it.
        self.closes.append(ws.close_code)
        self.closed.set()
        return ws

    async def _drop(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        # Gone without a close frame.
        assert request.transport is not None
        request.transport.abort()
        return ws

    async def wait_closed(self) -> int | None:
        assert await asyncio.to_thread(self.closed.wait, 10), "the upstream websocket was never closed"
        return self.closes[-1]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    r.server.start()
    yield r
    r.server.stop()


# --------------------------------------------------------------------------- through the fake Cloud Run service


async def test_echo_both_ways_with_the_token_on_the_upgrade(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"prefix": "/svc", "upstream": private_service.url}))
    async with client.ws_connect(f"{proxy.url}/svc/ws", origin=f"http://127.0.0.1:{proxy.port}", max_msg_size=0) as ws:
        # Open while it is: the proxy knows it, so shutdown can close it.
        assert len(proxy.state.websockets) == 1
        await ws.send_str("hello")
        assert await ws.receive_str() == "hello"
        blob = bytes(range(256)) * 400
        await ws.send_bytes(blob)
        assert await ws.receive_bytes() == blob
        for i in range(20):
            await ws.send_str(f"m{i}")
        assert [await ws.receive_str() for _ in range(20)] == [f"m{i}" for i in range(20)]
    upgrade = private_service.last
    assert upgrade.raw_path == "/ws"
    assert upgrade.claims is not None and upgrade.claims["aud"] == private_service.url
    assert upgrade.checked_header == "Authorization"
    # The same-origin Origin was rewritten to the upstream's.
    assert upgrade.header_values("Origin") == [private_service.url]
    assert upgrade.header_values("Host") == [private_service.host]


async def test_close_code_from_the_upstream_reaches_the_client(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    async with client.ws_connect(f"{proxy.url}/ws", autoclose=False) as ws:
        await ws.send_str("close:4001")
        msg = await ws.receive()
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4001, "closed by server")
        await ws.close()


async def test_subprotocol_chosen_by_the_upstream_is_the_clients(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    async with client.ws_connect(f"{proxy.url}/ws", protocols=("chat.v2", "chat.v1")) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("x")
        assert await ws.receive_str() == "x"
    assert private_service.last.header("Sec-WebSocket-Protocol") == "chat.v2,chat.v1"
    async with client.ws_connect(f"{proxy.url}/ws") as ws:
        assert ws.protocol is None


async def test_upstream_refusals_keep_their_status(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(
            sa_key[0],
            {"prefix": "/ok", "upstream": private_service.url},
            # The service does not accept this audience: Cloud Run would answer 401.
            {"prefix": "/wrong", "upstream": private_service.url, "audience": "https://other.example"},
        )
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{proxy.url}/wrong/ws")
    assert e.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{proxy.url}/ok/status/404")
    assert e.value.status == 404
    assert private_service.requests[-1].raw_path == "/status/404"


async def test_malformed_upgrade_never_reaches_the_upstream(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    status, body = await raw_exchange(
        proxy.port, b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert b" 400 " in status and b"websocket upgrade" in body
    assert private_service.requests == []


async def test_unreachable_upstream_is_502(start_proxy, client, sa_key):
    from tests.test_forward import free_port

    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{proxy.url}/ws")
    assert e.value.status == 502


# --------------------------------------------------------------------------- close codes the other way, shutdown


async def test_close_code_from_the_client_reaches_the_upstream(start_proxy, client, sa_key, recorder):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": recorder.server.url}))
    ws = await client.ws_connect(f"{proxy.url}/ws")
    await ws.send_str("ping")
    assert await ws.receive_str() == "ping"
    await ws.close(code=4002, message=b"bye")
    assert await recorder.wait_closed() == 4002
    # The close handshake completes end to end: the client gets the upstream's own answer
    # to its close frame, relayed as it is (aiohttp's server answers any close with 1000).
    assert ws.close_code == 1000
    assert "Authorization" in recorder.upgrades[-1]


async def test_shutdown_closes_websockets_with_1001_on_both_sides(start_proxy, client, sa_key, recorder):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": recorder.server.url}))
    ws = await client.ws_connect(f"{proxy.url}/ws")
    await ws.send_str("x")
    assert await ws.receive_str() == "x"
    closing = asyncio.ensure_future(close_websockets(proxy.app))
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await asyncio.wait_for(closing, 10)
    assert await recorder.wait_closed() == 1001
    await ws.close()


async def test_upstream_gone_without_a_close_frame_is_1014(start_proxy, client, sa_key, recorder):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": recorder.server.url}))
    async with client.ws_connect(f"{proxy.url}/drop") as ws:
        await ws.send_str("x")
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, BAD_GATEWAY)


@pytest.mark.parametrize("received, sent", [(None, 1000), (0, 1000), (1000, 1000), (1001, 1001), (1005, 1000), (1006, 1014), (4001, 4001)])
def test_sendable_close_code(received, sent):
    assert sendable_code(received) == sent


# --------------------------------------------------------------------------- server-sent events


async def test_sse_events_arrive_before_the_stream_ends(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    # The upstream sends event 0 at once and event 1 an hour later: event 0 can only
    # arrive here if the proxy passes it on as it comes.
    async with client.get(f"{proxy.url}/sse", params={"n": "2", "interval": "3600"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        async with asyncio.timeout(30):
            first = await r.content.readuntil(b"\n\n")
        assert first == b"id: 0\ndata: event 0\n\n"
        assert not r.content.at_eof()


async def test_sse_all_events_in_order(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    async with client.get(f"{proxy.url}/sse", params={"n": "5", "interval": "0.01"}) as r:
        body = await r.read()
    assert body == b"".join(f"id: {i}\ndata: event {i}\n\n".encode() for i in range(5))


# --------------------------------------------------------------------------- 401 on the upgrade: one retry


class SkewedClock:
    """The token cache's clock, moved forward so the current token counts as a minute old."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def aged_token_proxy(start_proxy, sa_key, upstream: str, header: str = "authorization"):  # type: ignore[no-untyped-def]
    clock = SkewedClock()
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": upstream, "header": header}), tokens=TokenCache(clock=clock))
    # A forced refresh needs a current token over a minute old (tokens.py): no waiting for it.
    clock.offset = 61
    return proxy


async def cached_token(proxy) -> str:  # type: ignore[no-untyped-def]
    (route,) = proxy.state.router.routes
    return await proxy.state.tokens.get(route.token_key)


def upgrade_request(target: str, port: int, *extra: str) -> tuple[bytes, str]:
    """A valid upgrade request and the Sec-WebSocket-Accept it must be answered with."""
    key = base64.b64encode(os.urandom(16)).decode()
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


async def upgrade_head(port: int, request: bytes) -> tuple[int, list[tuple[str, str]]]:
    """Send an upgrade request; the status and header lines of the answer, as on the wire."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]
    return int(status_line.split()[1]), headers


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


async def test_upgrade_refused_with_401_is_retried_once_with_a_new_token(start_proxy, client, sa_key, google, private_service):
    proxy = await aged_token_proxy(start_proxy, sa_key, private_service.url)
    assert google.calls["token"] == 1
    revoked = await cached_token(proxy)
    private_service.revoke(revoked)
    # RS256 is deterministic: a token minted in the same second must still differ from the revoked one.
    google.token_lifetime -= 1
    async with client.ws_connect(f"{proxy.url}/ws") as ws:
        await ws.send_str("after one refetch")
        assert await ws.receive_str() == "after one refetch"
    assert google.calls["token"] == 2
    refused, accepted = private_service.requests
    assert refused.refused == (401, "401 Unauthorized: token revoked")
    assert refused.header("Authorization") == f"Bearer {revoked}"
    fresh = await cached_token(proxy)
    assert fresh != revoked
    assert accepted.refused is None and accepted.raw_path == "/ws"
    assert accepted.header_values("Authorization") == [f"Bearer {fresh}"]
    # The new token is the cache's: the next websocket needs neither a fetch nor a retry.
    async with client.ws_connect(f"{proxy.url}/ws") as ws:
        await ws.send_str("again")
        assert await ws.receive_str() == "again"
    assert google.calls["token"] == 2 and len(private_service.requests) == 3


async def test_upgrade_still_refused_after_the_retry_gets_the_refusal_without_looping(start_proxy, sa_key, google, private_service):
    proxy = await aged_token_proxy(start_proxy, sa_key, private_service.url)
    # The service no longer accepts the route's audience: every token is refused.
    private_service.audiences = ["https://rotated.example"]
    google.token_lifetime -= 1
    request, _ = upgrade_request("/ws", proxy.port)
    status, body = await raw_exchange(proxy.port, request)
    assert b" 401 " in status
    # The same one-line answer as a refusal without a retry.
    text = body.decode()
    assert text.startswith(f"idtoken-proxy: 401 {private_service.host}: upstream refused the websocket upgrade (401 ")
    assert text.endswith(")\n") and text.count("\n") == 1
    assert [r.refused[0] if r.refused else None for r in private_service.requests] == [401, 401]
    assert private_service.requests[0].header("Authorization") != private_service.requests[1].header("Authorization")
    assert google.calls["token"] == 2
    # At once again: one forced refresh per key per minute, so one attempt and no fetch.
    status, _ = await raw_exchange(proxy.port, request)
    assert b" 401 " in status
    assert len(private_service.requests) == 3 and google.calls["token"] == 2


async def test_upgrade_refused_with_401_is_not_retried_in_x_serverless_authorization_mode(start_proxy, client, sa_key, google, private_service):
    proxy = await aged_token_proxy(start_proxy, sa_key, private_service.url, header="x-serverless-authorization")
    private_service.revoke(await cached_token(proxy))
    google.token_lifetime -= 1
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{proxy.url}/ws")
    assert e.value.status == 401
    assert len(private_service.requests) == 1 and google.calls["token"] == 1


# --------------------------------------------------------------------------- the upstream's 101 headers


async def test_headers_of_the_upstreams_101_reach_the_client(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"prefix": "/svc", "upstream": private_service.url}))
    added = [
        "Set-Cookie: ws-session=abc; Domain=127.0.0.1; Path=/; HttpOnly",
        "Set-Cookie: ws-pref=dark; Path=/chat",
        "X-Ws-Session: 42",
        # Not the client's: hop-by-hop, an extension this hop did not negotiate, the upstream's Date and Server.
        "Keep-Alive: timeout=5",
        "Sec-WebSocket-Extensions: permessage-deflate",
        "Server: fake-cloud-run",
        "Date: Thu, 01 Jan 1970 00:00:00 GMT",
    ]
    target = "/svc/ws?" + "&".join("header=" + quote(h) for h in added)
    request, accept = upgrade_request(target, proxy.port, "Sec-WebSocket-Protocol: chat.v2, chat.v1")
    status, headers = await upgrade_head(proxy.port, request)
    assert status == 101
    # Cookies as on any response: the upstream's Domain dropped, the Path moved under the prefix.
    assert values(headers, "Set-Cookie") == ["ws-session=abc; Path=/svc; HttpOnly", "ws-pref=dark; Path=/svc/chat"]
    assert values(headers, "X-Ws-Session") == ["42"]
    assert values(headers, "Keep-Alive") == [] and values(headers, "Sec-WebSocket-Extensions") == []
    # The handshake is the proxy's own, each header once; the subprotocol is the upstream's choice.
    assert [v.lower() for v in values(headers, "Upgrade")] == ["websocket"]
    assert [v.lower() for v in values(headers, "Connection")] == ["upgrade"]
    assert values(headers, "Sec-WebSocket-Accept") == [accept]
    assert values(headers, "Sec-WebSocket-Protocol") == ["chat.v2"]
    assert len(values(headers, "Date")) == 1 and values(headers, "Date") != ["Thu, 01 Jan 1970 00:00:00 GMT"]
    assert len(values(headers, "Server")) == 1 and values(headers, "Server") != ["fake-cloud-run"]
    assert values(headers, "Content-Length") == [] and values(headers, "Transfer-Encoding") == []
    # And the websocket behind such a 101 works.
    async with client.ws_connect(f"{proxy.url}{target}", protocols=("chat.v2",)) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("with cookies")
        assert await ws.receive_str() == "with cookies"


@pytest.mark.parametrize(
    "upstream_101, prefix, expected",
    [
        ([("X-Custom", "1"), ("Cache-Control", "no-store")], "/", [("X-Custom", "1"), ("Cache-Control", "no-store")]),
        ([("Set-Cookie", "a=1; Domain=svc.run.app; Path=/")], "/", [("Set-Cookie", "a=1; Path=/")]),
        ([("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Domain=other.example")], "/p", [("Set-Cookie", "a=1; Path=/p"), ("Set-Cookie", "b=2; Domain=other.example")]),
        ([("Connection", "Upgrade, X-Hop"), ("X-Hop", "1"), ("Upgrade", "websocket"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked")], "/", []),
        ([("Sec-WebSocket-Accept", "x"), ("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Extensions", "permessage-deflate")], "/", []),
        ([("Content-Length", "0"), ("Date", "Thu, 01 Jan 1970 00:00:00 GMT"), ("Server", "upstream"), ("Via", "1.1 google")], "/", [("Via", "1.1 google")]),
        ([("Access-Control-Allow-Origin", "*"), ("access-control-allow-credentials", "true"), ("X-A", "1")], "/", [("X-A", "1")]),
    ],
)
def test_switching_headers(upstream_101, prefix, expected):
    out = switching_headers(CIMultiDict(upstream_101), upstream_host="svc.run.app", prefix=prefix, request_path=prefix.rstrip("/") + "/ws")
    assert list(out.items()) == expected
