"""Streams through the proxy: websockets (token on the upgrade, messages both ways,
close codes, subprotocols, shutdown) and server-sent events delivered as they come."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from proxy.server import close_websockets
from proxy.websocket import BAD_GATEWAY, sendable_code
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
    assert ws.close_code == 4002
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
