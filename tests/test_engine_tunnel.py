"""Websockets through the proxy's tunnel, from outside: close codes both ways, 1001 when the
proxy shuts down (the CLI, SIGTERM), 1014 when the upstream vanishes, and
permessage-deflate negotiated end to end. Real aiohttp clients and servers on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.fakes import BackgroundServer
from tests.rawhttp import RawConnection
from tests.test_sidecar_support import ProxyProcess, clean_env, mint_jwt

TOKEN_ENV = "TUNNEL_TEST_TOKEN"


class WsUpstream:
    """``/ws``: echoes messages; ``close:CODE:REASON`` closes with them; ``vanish`` drops the
    TCP connection without a close frame. Records the offered extensions, what was
    negotiated, and each client close (code, reason)."""

    def __init__(self) -> None:
        self.offers: list[str | None] = []
        self.compress: list[int] = []
        self.authorizations: list[str | None] = []
        self.closes: list[tuple[int | None, str]] = []
        self.opened = threading.Event()
        self.closed = threading.Event()
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        self.server = BackgroundServer(app)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self.offers.append(request.headers.get("Sec-WebSocket-Extensions"))
        self.authorizations.append(request.headers.get("Authorization"))
        # compress=True: permessage-deflate is accepted when offered (aiohttp's default).
        ws = web.WebSocketResponse(compress=True, max_msg_size=0)
        await ws.prepare(request)
        self.compress.append(ws.compress)
        self.opened.set()
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                if msg.data == "vanish":
                    assert request.transport is not None
                    request.transport.abort()
                    break
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            else:
                if msg.type is WSMsgType.CLOSE:
                    self.closes.append((msg.data, msg.extra or ""))
                self.closed.set()
                break
        return ws

    @property
    def url(self) -> str:
        return self.server.url

    async def wait_closed(self) -> tuple[int | None, str]:
        assert await asyncio.to_thread(self.closed.wait, 15), "the upstream websocket was never closed"
        assert self.closes, "the upstream saw no close frame"
        return self.closes[-1]


@pytest.fixture
def ws_upstream() -> Iterator[WsUpstream]:
    upstream = WsUpstream()
    upstream.server.start()
    yield upstream
    upstream.server.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def proxy(start_proxy, ws_upstream, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(TOKEN_ENV, mint_jwt(ws_upstream.url))
    return await start_proxy({"credentials": {"source": "static", "token_env": TOKEN_ENV}, "routes": [{"prefix": "/", "upstream": ws_upstream.url}]})


# --------------------------------------------------------------------------- close codes


async def test_client_close_1000_reaches_the_upstream_and_is_answered(proxy, client, ws_upstream):
    ws = await client.ws_connect(f"{proxy.url}/ws", autoclose=False)
    await ws.send_str("hello")
    assert (await ws.receive_str(timeout=10)) == "hello"
    await ws.close(code=1000, message=b"all done")
    assert await ws_upstream.wait_closed() == (1000, "all done")
    assert ws.close_code == 1000
    assert ws_upstream.authorizations == [f"Bearer {os.environ[TOKEN_ENV]}"]


@pytest.mark.parametrize(("code", "reason"), [(1000, "normal closure"), (1008, "policy violated"), (4000, "app says bye"), (4999, "r" * 100)])
async def test_upstream_close_code_and_reason_reach_the_client(proxy, client, code, reason):
    async with client.ws_connect(f"{proxy.url}/ws", autoclose=False) as ws:
        await ws.send_str(f"close:{code}:{reason}")
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, code, reason)
        await ws.close()


async def test_upstream_vanishing_gives_the_client_1014(proxy, client, ws_upstream):
    async with client.ws_connect(f"{proxy.url}/ws", autoclose=False) as ws:
        await ws.send_str("before")
        assert (await ws.receive_str(timeout=10)) == "before"
        await ws.send_str("vanish")
        msg = await ws.receive(timeout=15)
        # 1014 (bad gateway): the upstream's connection broke off without a close frame.
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1014), msg
        await ws.close()


async def test_shutdown_closes_websockets_with_1001(tmp_path, client, ws_upstream):
    token = mint_jwt(ws_upstream.url)
    config = {
        "credentials": {"source": "static", "token_env": TOKEN_ENV},
        "listen": {"port": 0},
        "shutdown_timeout": 5,
        "routes": [{"prefix": "/", "upstream": ws_upstream.url}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    cli = await ProxyProcess(["--config", str(path)], clean_env(tmp_path, **{TOKEN_ENV: token})).start()
    try:
        await cli.wait_listening(admin=False)
        ws = await client.ws_connect(f"{cli.url}/ws", autoclose=False)
        await ws.send_str("open")
        assert (await ws.receive_str(timeout=10)) == "open"
        cli.signal()
        msg = await ws.receive(timeout=20)
        # The client is told the proxy is going away; and so is the upstream.
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001), (msg, cli.stderr)
        await ws.close()
        code, _ = await ws_upstream.wait_closed()
        assert code == 1001
        assert await cli.wait_exit() == 0, cli.stderr
    finally:
        await cli.stop()


# --------------------------------------------------------------------------- permessage-deflate


def upgrade(port: int, extensions: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {extensions}\r\n\r\n"
    ).encode()


async def test_permessage_deflate_is_negotiated_end_to_end(proxy, client, ws_upstream):
    offer = "permessage-deflate; client_max_window_bits"
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(upgrade(proxy.port, offer))
        head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        await conn.close()
    assert head.startswith(b"HTTP/1.1 101"), head
    # The upstream records what it negotiated just after its 101 went out.
    assert await asyncio.to_thread(ws_upstream.opened.wait, 10)
    # The upstream saw the client's offer and accepted it; the client sees the upstream's answer.
    assert ws_upstream.offers[-1] == offer
    assert ws_upstream.compress[-1] > 0
    assert b"permessage-deflate" in head.lower(), head

    # And a real client: negotiated, and compressed messages round-trip both ways.
    async with client.ws_connect(f"{proxy.url}/ws", compress=15, autoclose=False) as ws:
        assert ws.compress == 15
        text = "compressible " * 10_000
        await ws.send_str(text)
        assert (await ws.receive_str(timeout=10)) == text
        data = bytes(range(256)) * 400
        await ws.send_bytes(data)
        assert (await ws.receive_bytes(timeout=10)) == data
        await ws.close()
