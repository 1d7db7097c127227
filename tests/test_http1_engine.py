"""What the proxy's own HTTP/1.1 engine newly owns, through real sockets.

Pipelined requests answered in order, ``Expect: 100-continue``, request bodies
streamed to the upstream (chunked, and to an upstream that answers before the
body is all sent), an ``https://`` upstream reached through a local outbound
proxy by CONNECT, and websocket extensions negotiated end to end.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.rawhttp import RawConnection, request
from tests.test_perf_upstream import Upstream


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


async def test_pipelined_requests_are_answered_in_order(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    conn = await RawConnection.open(proxy.port)
    try:
        # The first waits upstream; the ones behind it arrive in the same write and must wait their turn.
        await conn.send(request("GET", "/slow?seconds=0.3") + request("GET", "/p/2") + request("GET", "/status/404") + request("GET", "/p/4"))
        replies = [await conn.response(timeout=15) for _ in range(4)]
    finally:
        await conn.close()
    assert [r.status for r in replies] == [200, 200, 404, 200]
    assert json.loads(replies[1].body)["path"] == "/p/2"
    assert json.loads(replies[3].body)["path"] == "/p/4"
    assert [r.raw_path for r in private_service.requests][1:] == ["/p/2", "/status/404", "/p/4"]


async def test_expect_100_continue_gets_a_100_before_the_body_is_sent(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    conn = await RawConnection.open(proxy.port)
    try:
        body = b"z" * 100_000
        await conn.send(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 15)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(body)
        reply = await conn.response(timeout=15)
    finally:
        await conn.close()
    assert reply.status == 200 and json.loads(reply.body)["len"] == len(body)
    assert private_service.last.header("Expect") is None


async def test_a_chunked_upload_streams_to_the_upstream(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"a" * 70_000, b"b" * 5, b"c" * 300_000):
            await conn.send(b"%x\r\n%b\r\n" % (len(part), part))
        await conn.send(b"0\r\n\r\n")
        reply = await conn.response(timeout=15)
    finally:
        await conn.close()
    assert reply.status == 200 and json.loads(reply.body)["len"] == 370_005


async def test_an_upstream_answering_before_the_upload_ends_is_relayed(start_proxy, sa_key):
    async def serve(reader, writer, n):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(10)  # some of the body, then the answer
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n")
        await writer.drain()
        writer.close()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(sa_config(sa_key[0], {"upstream": f"http://127.0.0.1:{up.port}"}))
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(b"POST /big HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n" + b"10\r\n" + b"x" * 16 + b"\r\n")
            reply = await conn.response(timeout=15)
            assert (reply.status, reply.body) == (413, b"too big\n")
            # The rest of the upload was never read: the connection cannot carry another request.
            assert reply.header("Connection") == "close"
            assert await conn.closed_by_server()
        finally:
            await conn.close()
    finally:
        await up.stop()


class ConnectProxy:
    """An outbound proxy on loopback that only tunnels CONNECT, recording each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.authorizations: list[str | None] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://user:s3cret@127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *fields = head.split("\r\n")
        method, target, _ = line.split(" ")
        self.targets.append(f"{method} {target}")
        self.authorizations.append(next((f.split(":", 1)[1].strip() for f in fields if f.lower().startswith("proxy-authorization:")), None))
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def tls_upstream(tmp_path) -> AsyncIterator[tuple[int, str]]:
    """An HTTPS upstream with a certificate for localhost from a test CA: (port, CA file)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls {request.headers.get('Authorization', '')[:10]} {request.host}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield runner.addresses[0][1], str(ca_file)
    await runner.cleanup()


async def test_an_https_upstream_through_a_connect_proxy(start_proxy, sa_key, tls_upstream, monkeypatch, clean_env):
    port, ca_file = tls_upstream
    via = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", await via.start())
    # The token endpoint (127.0.0.1) stays direct; the route names its upstream "localhost".
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    # The proxy trusts the test CA the standard way: OpenSSL reads SSL_CERT_FILE.
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    try:
        proxy = await start_proxy(sa_config(sa_key[0], {"upstream": f"https://localhost:{port}", "audience": "https://aud.example"}))
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.get(f"{proxy.url}/through") as r:
                    assert r.status == 200, await r.text()
                    assert await r.text() == f"tls Bearer eyJ localhost:{port}"
        # One tunnel, reused: the pooled TLS connection carried both requests.
        assert via.targets == [f"CONNECT localhost:{port}"]
        assert via.authorizations == ["Basic dXNlcjpzM2NyZXQ="]
    finally:
        await via.stop()


async def test_permessage_deflate_is_negotiated_end_to_end(start_proxy, sa_key):
    negotiated: list[str | None] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(compress=True)
        await socket.prepare(request)
        negotiated.append(socket.headers.get("Sec-WebSocket-Extensions"))
        async for message in socket:
            await socket.send_str(message.data * 2)
        return socket

    app = web.Application()
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        proxy = await start_proxy(sa_config(sa_key[0], {"upstream": f"http://127.0.0.1:{runner.addresses[0][1]}"}))
        async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url}/ws", compress=15) as socket:
            assert socket.compress == 15  # the client's extension was accepted (by the upstream)
            await socket.send_str("compressible " * 100)
            assert await socket.receive_str() == "compressible " * 200
        assert negotiated and negotiated[0] is not None and "permessage-deflate" in negotiated[0]
    finally:
        await runner.cleanup()


def test_the_proxy_never_imports_aiohttp():
    # aiohttp is the tests' client and the fakes' server only: the proxy's own engine serves.
    import subprocess
    import sys

    code = (
        "import sys, proxy.__main__, proxy.app, proxy.server, proxy.exchange;"
        "print(sorted(m for m in sys.modules if m == 'aiohttp' or m.startswith('aiohttp.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
