"""The upstream transport (proxy/engine/upstream.py) on the wire.

GET and HEAD without a body go through a keep-alive pool of asyncio Protocols
with httptools parsing the response; these tests pin what that path must do
that the ClientSession path did: reuse connections, survive a pooled
connection the upstream closed, skip informational responses, read bodies
delimited by the connection's end, frame HEAD correctly, and refuse an
untrusted TLS upstream with the same reason.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Upstream:
    """A raw HTTP upstream on loopback: ``serve(reader, writer, connection_number)``."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.serve(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _config(key: Path, upstream: str) -> dict[str, object]:
    return {"credentials": {"source": "service_account", "key_file": str(key)}, "routes": [{"prefix": "/", "upstream": upstream}]}


async def test_keep_alive_connection_is_reused_and_the_lean_path_is_taken(start_proxy, sa_key):
    up: Upstream

    async def serve(reader, writer, n):
        while True:
            await up.head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(f"{proxy.url}/x?y=1") as r:
                    assert (r.status, await r.read()) == (200, b"hello")
        assert up.connections == 1
        # The head the lean path wrote: token injected, the client's extras absent.
        first = up.heads[0].decode()
        assert first.startswith("GET /x?y=1 HTTP/1.1\r\n")
        assert "\r\nAuthorization: Bearer ey" in first or "\r\nauthorization: Bearer ey" in first
        # Every request goes through the one keep-alive pool.
        from proxy.engine.upstream import Pool

        assert isinstance(proxy.state.forwarder.pool, Pool)
    finally:
        await up.stop()


async def test_a_pooled_connection_the_upstream_closed_is_replaced(start_proxy, sa_key):
    async def serve(reader, writer, n):
        await up.head(reader)
        # One response per connection, then close: the pooled connection is dead when reused.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(f"{proxy.url}/x") as r:
                    assert (r.status, await r.read()) == (200, b"ok")
                await asyncio.sleep(0.2)
        assert up.connections == 3
    finally:
        await up.stop()


async def test_informational_response_is_skipped_and_eof_delimited_body_read_whole(start_proxy, sa_key):
    body = b"x" * 200_000

    async def serve(reader, writer, n):
        await up.head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Kind: eof\r\n\r\n" + body)
        await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/x") as r:
            assert r.status == 200 and r.headers["X-Kind"] == "eof"
            assert await r.read() == body
    finally:
        await up.stop()


async def test_head_then_get_on_one_client_connection(start_proxy, sa_key):
    async def serve(reader, writer, n):
        while True:
            head = await up.head(reader)
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Head: 1\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
            await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            async with client.head(f"{proxy.url}/h") as r:
                assert r.status == 200 and r.headers["X-Head"] == "1" and r.headers["Content-Length"] == "10"
                assert await r.read() == b""
            async with client.get(f"{proxy.url}/g") as r:
                assert (r.status, await r.read()) == (200, b"get")
    finally:
        await up.stop()


async def test_mid_body_close_aborts_the_client_connection(start_proxy, sa_key):
    async def serve(reader, writer, n):
        await up.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"y" * 1000)
        await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.get(f"{proxy.url}/x") as r:
                    assert r.status == 200
                    await r.read()
    finally:
        await up.stop()


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_untrusted_tls_upstream_is_a_502_naming_the_certificate(start_proxy, sa_key, self_signed):
    async def serve(reader, writer, n):
        await up.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await Upstream(serve).start(self_signed)
    try:
        proxy = await start_proxy(_config(sa_key[0], f"https://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/x") as r:
            text = await r.text()
            assert r.status == 502, text
            assert f"TLS certificate of https://127.0.0.1:{up.port} not trusted (self-signed certificate)" in text
        assert up.heads == []
    finally:
        await up.stop()


async def test_an_unsolicited_second_response_closes_the_upstream_connection(start_proxy, sa_key):
    async def serve(reader, writer, n):
        while True:
            await up.head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none" + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
            await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.get(f"{proxy.url}/x") as r:
                    # Each request gets the first answer of a fresh connection, never the stray one.
                    assert (r.status, await r.read()) == (200, b"one")
        assert up.connections == 2
    finally:
        await up.stop()


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Big: " + b"a" * 200_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(5000)),
    ],
    ids=["one-huge-header", "five-thousand-headers"],
)
async def test_an_oversized_response_head_is_a_502(start_proxy, sa_key, extra):
    async def serve(reader, writer, n):
        await up.head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{proxy.url}/x") as r:
                assert r.status == 502
                assert "response headers too large" in await r.text()
    finally:
        await up.stop()


async def test_a_body_that_came_with_its_head_leaves_in_one_write_and_a_late_one_does_not_wait(start_proxy, sa_key, monkeypatch):
    from proxy.engine.http1 import HTTP1Protocol

    # Counts what the proxy's server protocol hands to the client's transport (every
    # response byte goes through write_raw). Observation only: the calls go through unchanged.
    writes: list[bytes] = []
    original_write = HTTP1Protocol.write_raw

    def write(self, data):
        writes.append(bytes(data))
        return original_write(self, data)

    monkeypatch.setattr(HTTP1Protocol, "write_raw", write)
    release = asyncio.Event()

    async def serve(reader, writer, n):
        while True:
            head = await up.head(reader)
            if head.startswith(b"GET /late "):
                # The head now, the body (chunked: relayed as it comes, no write before
                # its first part) only once the client has seen the head.
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await writer.drain()
                await release.wait()
                writer.write(b"4\r\nlate\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    up = await Upstream(serve).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        async with aiohttp.ClientSession() as client:
            writes.clear()  # the token endpoint's answers, while the proxy started
            async with client.get(f"{proxy.url}/whole") as r:
                assert (r.status, await r.read()) == (200, b"hello")
            assert len(writes) == 1, writes
            assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nhello")
            writes.clear()
            async with asyncio.timeout(10):
                async with client.get(f"{proxy.url}/late") as r:
                    # The head came while the upstream still holds the body back.
                    assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
                    assert writes and writes[0].endswith(b"\r\n\r\n")
                    release.set()
                    assert await r.read() == b"late"
    finally:
        release.set()
        await up.stop()
