"""Complete upstream responses relayed as bytes (exchange.py, ``Response.send_raw``).

Where a response came whole and needs nothing changed, the request path sends
the upstream's head as it came (less hop-by-hop headers) instead of decoding it
and serialising it again. These tests send each response both ways, with
``Exchange.plain_responses`` on and off, and compare the bytes the client
reads: equal for every case, and the bytes path taken exactly where the case
says it may be.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from proxy.engine.http1 import Response
from tests.test_perf_upstream import Upstream

DATE = b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
#: A head aiohttp would add nothing to, before the case's own headers.
BASE = b"HTTP/1.1 200 OK\r\nServer: upstream/1\r\n" + DATE + b"Content-Type: text/plain\r\nContent-Length: 5\r\n"

# name, upstream response (head and body as sent), whether the bytes path may take it
CASES: list[tuple[str, bytes, bool]] = [
    ("typical", BASE + b"Connection: keep-alive\r\nETag: \"1\"\r\n\r\nhello", True),
    (
        "names as the upstream spells them, repeated headers, another status",
        b"HTTP/1.1 201 Created\r\nserver: x\r\nDATE: Thu, 01 Jan 2026 00:00:00 GMT\r\ncontent-TYPE: a/b\r\n"
        b"X-Custom: 1\r\nx-custom: 2\r\nCache-Control: no-store\r\nVary: Accept-Encoding\r\nContent-Length: 5\r\n\r\nhello",
        True,
    ),
    (
        "hop-by-hop headers dropped",
        BASE + b"Keep-Alive: timeout=5\r\nConnection: Keep-Alive, close\r\nProxy-Connection: x\r\nTrailer: X-T\r\nTE: trailers\r\n\r\nhello",
        True,
    ),
    ("empty body", BASE.replace(b"Content-Length: 5", b"Content-Length: 0") + b"\r\n", True),
    # A response that comes in one read goes with its head as sent, less hop-by-hop lines
    # (UpstreamConnection.raw_head); these take the other ways to the same bytes.
    ("Connection twice, spelled two ways", BASE + b"Connection: keep-alive\r\nX-A: 1\r\nconnection: Keep-Alive\r\n\r\nhello", True),
    ("an HTTP/1.0 status line", BASE.replace(b"HTTP/1.1 200", b"HTTP/1.0 200") + b"Connection: keep-alive\r\n\r\nhello", True),
    ("103 Early Hints first", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + BASE + b"\r\nhello", True),
    ("an error status", BASE.replace(b"200 OK", b"503 Service Unavailable") + b"\r\nhello", True),
    ("no reason phrase", BASE.replace(b"200 OK", b"299 ") + b"\r\nhello", True),
    ("no Date (aiohttp adds one)", BASE.replace(DATE, b"") + b"\r\nhello", False),
    ("no Server (aiohttp adds its own)", BASE.replace(b"Server: upstream/1\r\n", b"") + b"\r\nhello", False),
    ("no Content-Type (aiohttp adds one)", BASE.replace(b"Content-Type: text/plain\r\n", b"") + b"\r\nhello", False),
    (
        "chunked",
        BASE.replace(b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n") + b"\r\n5\r\nhello\r\n0\r\n\r\n",
        False,
    ),
    ("a cookie (rewritten)", BASE + b"Set-Cookie: a=1; Domain=127.0.0.1; Path=/\r\n\r\nhello", False),
    ("a Location (rewritten)", BASE + b"Location: /elsewhere\r\n\r\nhello", False),
    ("upstream CORS (removed)", BASE + b"Access-Control-Allow-Origin: *\r\n\r\nhello", False),
    ("Connection naming another header", BASE + b"Connection: X-Drop\r\nX-Drop: 1\r\n\r\nhello", False),
    ("a value that is not ASCII", BASE + "X-Name: caf\u00e9\r\n\r\nhello".encode(), False),
    ("a reason that is not ASCII", BASE.replace(b"200 OK", b"200 \xe9t\xe9") + b"\r\nhello", False),
    ("no content", BASE.replace(b"200 OK", b"204 No Content").replace(b"Content-Length: 5\r\n", b"") + b"\r\n", False),
]


async def serve_cases(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answers ``GET /case/N`` with CASES[N]'s bytes, keeping the connection alive."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1].decode()
        writer.write(CASES[int(target.rsplit("/", 1)[1])][1])
        await writer.drain()


async def read_response(reader: asyncio.StreamReader, method: str) -> bytes:
    """One response exactly as it came: the head, then the body as its framing says."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    status = int(head.split(b" ", 2)[1])
    if method == "HEAD" or status in (204, 304):
        return head
    if b"\r\ntransfer-encoding: chunked\r\n" in lower:
        body = b""
        while not body.endswith(b"\r\n0\r\n\r\n") and body != b"0\r\n\r\n":
            body += await reader.readuntil(b"\r\n")
        return head + body
    length = re.search(rb"\r\ncontent-length: *(\d+)\r\n", lower)
    if length is None:
        return head + await reader.read()
    return head + await reader.readexactly(int(length.group(1)))


async def fetch(port: int, request: bytes, method: str = "GET") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(read_response(reader, method), 10)
    finally:
        writer.close()


def _config(key: Path, upstream: str, **extra: object) -> dict[str, object]:
    return {
        "credentials": {"source": "service_account", "key_file": str(key)},
        "routes": [{"prefix": "/", "upstream": upstream}],
        **extra,
    }


@pytest.fixture
def plain_taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many responses took the bytes path (the calls pass through unchanged)."""
    taken: list[int] = []
    original = Response.send_raw

    def send_raw(self: Response, *args: object) -> None:
        taken.append(1)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Response, "send_raw", send_raw)
    return taken


async def both_ways(proxy: object, request: bytes, method: str, taken: list[int]) -> tuple[bytes, bytes, int]:
    """(bytes with the bytes path allowed, bytes without it, responses that took it)."""
    forwarder = proxy.state.forwarder  # type: ignore[attr-defined]
    before = len(taken)
    forwarder.plain_responses = True
    plain = await fetch(proxy.port, request, method)  # type: ignore[attr-defined]
    used = len(taken) - before
    forwarder.plain_responses = False
    try:
        normal = await fetch(proxy.port, request, method)  # type: ignore[attr-defined]
    finally:
        forwarder.plain_responses = True
    assert len(taken) - before == used  # none when switched off
    return plain, normal, used


def _same_but_date(data: bytes) -> bytes:
    # aiohttp fills in the current time where the upstream sent no Date.
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", data)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
async def test_the_bytes_path_sends_what_aiohttp_would(start_proxy, sa_key, plain_taken, index):
    name, _, eligible = CASES[index]
    up = await Upstream(serve_cases).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        request = f"GET /case/{index} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode()
        plain, normal, used = await both_ways(proxy, request, "GET", plain_taken)
        assert _same_but_date(plain) == _same_but_date(normal), name
        assert used == (1 if eligible else 0), name
        assert plain.startswith(b"HTTP/1.1 ")
    finally:
        await up.stop()


@pytest.mark.parametrize(
    "method, extra",
    [
        ("HEAD", ""),
        ("GET", "Connection: close\r\n"),
    ],
    ids=["HEAD", "client asks to close"],
)
async def test_requests_the_bytes_path_leaves_alone(start_proxy, sa_key, plain_taken, method, extra):
    up = await Upstream(serve_cases).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        request = f"{method} /case/0 HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n{extra}\r\n".encode()
        plain, normal, used = await both_ways(proxy, request, method, plain_taken)
        assert plain == normal and used == 0
    finally:
        await up.stop()


async def test_http_1_0_client_gets_aiohttps_answer(start_proxy, sa_key, plain_taken):
    up = await Upstream(serve_cases).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}"))
        request = f"GET /case/0 HTTP/1.0\r\nHost: 127.0.0.1:{proxy.port}\r\nConnection: keep-alive\r\n\r\n".encode()
        plain, normal, used = await both_ways(proxy, request, "GET", plain_taken)
        assert plain == normal and used == 0
        assert plain.startswith(b"HTTP/1.0 200 OK\r\n")
    finally:
        await up.stop()


async def test_cors_answers_take_aiohttps_path(start_proxy, sa_key, plain_taken):
    # With allowed_origins the guard adds Vary (and CORS headers for an allowed Origin).
    up = await Upstream(serve_cases).start()
    try:
        proxy = await start_proxy(_config(sa_key[0], f"http://127.0.0.1:{up.port}", allowed_origins=["http://localhost:3000"]))
        for origin in ("", "Origin: http://localhost:3000\r\n"):
            request = f"GET /case/0 HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n{origin}\r\n".encode()
            plain, normal, used = await both_ways(proxy, request, "GET", plain_taken)
            assert plain == normal and used == 0
            assert b"\r\nVary: Origin\r\n" in plain
    finally:
        await up.stop()


async def test_a_private_service_answer_takes_the_bytes_path(start_proxy, sa_key, private_service, plain_taken):
    # aiohttp's own server as the upstream (Date, Server, Content-Type, Content-Length):
    # the token is verified there, the answer comes back as sent.
    proxy = await start_proxy(_config(sa_key[0], private_service.url))
    request = f"GET /status/418 HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode()
    plain, normal, used = await both_ways(proxy, request, "GET", plain_taken)
    assert used == 1
    assert _same_but_date(plain) == _same_but_date(normal)
    assert plain.startswith(b"HTTP/1.1 418 ") and plain.endswith(b"\r\n\r\nstatus 418\n")
    assert private_service.last.claims["aud"] == private_service.url
