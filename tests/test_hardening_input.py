"""Bad input on the wire: smuggling, hostile request targets, header tricks, size limits.

Every request is sent as raw bytes to a running proxy (an HTTP client library
would refuse or normalise most of them). For each refusal: the stated status,
the connection closed where the framing is in doubt, and the upstream never
contacted.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from tests.fakes import PrivateService
from tests.rawhttp import Listener, RawConnection, exchange, request

REPO = Path(__file__).resolve().parent.parent
#: A JWT-shaped value a client might send; it must never come back or be logged.
CLIENT_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjbGllbnQtc2VjcmV0In0.c2lnbmF0dXJlLW9mLXRoZS1jbGllbnQ"


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


@pytest.fixture
async def proxy(start_proxy, sa_key, private_service):
    return await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))


@pytest.fixture
async def evil():
    """A listener on loopback that the proxy must never contact."""
    listener = await Listener().start()
    yield listener
    await listener.stop()


def header_values(raw: bytes) -> list[bytes]:
    """The values of a raw request's header lines (at least 5 bytes long)."""
    values = []
    for line in re.split(rb"\r\n|\n|\r", raw.split(b"\r\n\r\n", 1)[0])[1:]:
        _, sep, value = line.partition(b":")
        if sep and len(value.strip()) >= 5:
            values.append(value.strip())
    return values


# --------------------------------------------------------------------------- smuggling

H = b"Host: localhost\r\n"
SMUGGLING = {
    "content-length with transfer-encoding": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding with content-length": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate content-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "duplicate equal content-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na",
    "content-length list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\na",
    "content-length with sign": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\na",
    "transfer-encoding chunked123": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked123\r\n\r\n0\r\n\r\n",
    "transfer-encoding chunked, identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "transfer-encoding identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc",
    "duplicate transfer-encoding": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding in HTTP/1.0": b"POST / HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nA\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-Long: first\r\n second-line\r\n\r\n",
    "obs-fold hiding transfer-encoding": b"POST / HTTP/1.1\r\n" + H + b"X-A: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "space before colon": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "tab before colon": b"POST / HTTP/1.1\r\n" + H + b"Content-Length\t: 1\r\n\r\na",
    "bare LF line endings": b"GET / HTTP/1.1\nHost: localhost\n\n",
    "bare LF after a header": b"GET / HTTP/1.1\r\n" + b"Host: localhost\nX-Smuggled: yes\r\n\r\n",
    "bare CR in a header value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rTransfer-Encoding: chunked\r\n\r\n",
    "NUL in a header value": b"GET / HTTP/1.1\r\n" + H + b"X-A: before\x00after\r\n\r\n",
    "NUL in a header name": b"GET / HTTP/1.1\r\n" + H + b"X\x00A: value\r\n\r\n",
    "LF in a chunk extension": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1;a\nb\r\nx\r\n0\r\n\r\n",
    "invalid chunk size": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1g\r\nx\r\n0\r\n\r\n",
    "chunk size overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk data longer than its size": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n",
    "duplicate Host": b"GET / HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n",
    "no Host in HTTP/1.1": b"GET / HTTP/1.1\r\nX-A: value\r\n\r\n",
    "whitespace before the first header": b"GET / HTTP/1.1\r\n Host: localhost\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\n" + H + b"\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "invalid method": b"G(T / HTTP/1.1\r\n" + H + b"\r\n",
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_corpus_is_refused_and_the_connection_closed(proxy, private_service, raw):
    reply, closed = await exchange(proxy.port, raw)
    assert reply.status == 400, (reply.status, reply.body)
    assert closed, "the connection must be closed when the framing is in doubt"
    # One line, written by the proxy, that never echoes what the client sent.
    assert reply.text.startswith("idtoken-proxy: 400 ") and reply.text.count("\n") == 1, reply.body
    for value in header_values(raw):
        assert value not in reply.body, (value, reply.body)
    assert private_service.requests == []


async def test_an_http2_version_in_an_http1_request_line_is_505(proxy, private_service):
    # llhttp parses "HTTP/2.0" in a request line; the proxy forwards HTTP/1.x only.
    reply, closed = await exchange(proxy.port, b"GET /x HTTP/2.0\r\nHost: localhost\r\n\r\n")
    assert reply.status == 505 and "HTTP/2.0 is not supported" in reply.text
    assert closed
    assert private_service.requests == []


async def test_smuggled_second_request_never_reaches_the_upstream(proxy, private_service):
    # CL.TE: a front end going by Content-Length would forward the whole thing as one
    # request; a back end going by chunked would see a second request to /smuggled.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    raw = b"POST /first HTTP/1.1\r\n" + H + f"Content-Length: {len(body)}\r\n".encode() + b"Transfer-Encoding: chunked\r\n\r\n" + body
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(raw)
        reply = await conn.response()
        assert reply.status == 400
        assert await conn.closed_by_server()
    finally:
        await conn.close()
    assert [r.raw_path for r in private_service.requests] == []


async def test_a_bad_chunk_after_the_request_was_forwarded_aborts_the_upstream_request(start_proxy, sa_key, caplog):
    """The head is fine, so the request goes upstream; the body then breaks its framing."""
    seen = bytearray()

    async def upstream(reader, writer, listener):
        # Read whatever the proxy sends; answer only if a complete chunked body arrives.
        while chunk := await reader.read(65536):
            seen.extend(chunk)
            if seen.endswith(b"0\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    listener = await Listener(upstream).start()
    try:
        proxy = await start_proxy(sa_config(sa_key[0], {"upstream": listener.url}))
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(b"POST /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.wait_for(listener.connected.wait(), 10)
            await conn.send(b"1;ext\nsmuggled\r\nx\r\n0\r\n\r\n")
            reply = await conn.response()
            assert reply.status == 400, reply
            assert reply.text.startswith("idtoken-proxy: 400 malformed request") and "request body" in reply.text
            assert b"smuggled" not in reply.body
            assert await conn.closed_by_server()
        finally:
            await conn.close()
        # The upstream saw its request cut off, never a complete body.
        await asyncio.wait_for(listener.closed.wait(), 10)
        assert b"hello" in seen and not seen.endswith(b"0\r\n\r\n"), bytes(seen)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        await listener.stop()


# --------------------------------------------------------------------------- request targets


def hostile_targets(evil_port: int) -> list[tuple[str, str]]:
    e = f"127.0.0.1:{evil_port}"
    return [
        ("GET", f"http://{e}/x"),
        ("GET", f"https://{e}/x"),
        ("GET", f"http://localhost@{e}/x"),
        ("CONNECT", e),
        ("OPTIONS", "*"),
        ("GET", f"//{e}/x"),
        ("GET", f"///{e}/x"),
        ("GET", f"/http://{e}/x"),
        ("GET", f"/%2F%2F{e}/x"),
        ("GET", f"/%2f%2f{e}/x"),
        ("GET", f"/@{e}/x"),
        ("GET", f"/x?next=http://{e}/"),
        ("GET", "/a/../b"),
        ("GET", "/a/%2e%2e/b"),
        ("GET", "/a/%2E%2E/b"),
        ("GET", "/a/.%2e/b"),
        ("GET", "/a/%2e./b"),
        ("GET", "/%2e%2e%2f%2e%2e%2fetc"),
        ("GET", "/a%2f..%2fb"),
        ("GET", "/a/./b"),
        ("GET", "/a\\..\\b"),
    ]


async def test_hostile_request_targets_never_change_the_upstream_host(start_proxy, sa_key, private_service, evil):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    for method, target in hostile_targets(evil.port):
        private_service.clear()
        reply, _ = await exchange(proxy.port, f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), wait_close=False)
        if reply.status == 200:
            # Forwarded as a path on the configured upstream, byte for byte.
            rec = private_service.last
            assert rec.header("Host") == private_service.host, (target, rec.headers)
            assert rec.raw_path == target, (target, rec.raw_path)
            assert rec.claims is not None and rec.claims["aud"] == private_service.url
        else:
            assert reply.status in (400, 403, 405), (target, reply.status, reply.body)
            assert reply.text.startswith("idtoken-proxy: "), (target, reply.body)
            assert private_service.requests == [], target
    assert evil.connections == 0


async def test_dot_segments_and_absolute_form_are_refused_not_normalised(proxy, private_service):
    # Matching and forwarding use the raw path: a target whose meaning depends on
    # normalisation is refused rather than guessed at.
    for target in ("/a/../b", "/a/%2e%2e/b", "/a/.%2E/b", "/a/%2e/b", "http://localhost/x", "*"):
        method = "OPTIONS" if target == "*" else "GET"
        reply, _ = await exchange(proxy.port, f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), wait_close=False)
        assert reply.status == 400, (target, reply.status, reply.body)
    assert private_service.requests == []


async def test_host_and_forwarding_headers_cannot_redirect_the_request(proxy, private_service, evil):
    e = f"127.0.0.1:{evil.port}"
    raw = request(
        "GET",
        "/where",
        [
            ("X-Forwarded-Host", e),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", f"host={e};proto=https"),
            ("X-Original-URL", f"http://{e}/"),
            ("X-Rewrite-URL", f"http://{e}/"),
        ],
        host=e,
    )
    reply, _ = await exchange(proxy.port, raw, wait_close=False)
    # 127.0.0.1 with any port is a local Host name: the guard lets it through,
    # and the upstream host comes from the configuration alone.
    assert reply.status == 200, reply.body
    rec = private_service.last
    assert rec.header("Host") == private_service.host
    assert rec.header_values("X-Forwarded-Host") == [e]  # the proxy's own, describing the client's Host
    assert rec.header_values("X-Forwarded-Proto") == ["http"]
    assert rec.header("Forwarded") is None
    assert evil.connections == 0


# --------------------------------------------------------------------------- header tricks


@pytest.mark.parametrize("mode", ["authorization", "x-serverless-authorization"])
async def test_connection_naming_the_token_headers_does_not_strip_the_token(start_proxy, sa_key, private_service, mode):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url, "header": mode}))
    for connection in ("Authorization, X-Serverless-Authorization", "close, authorization", "X-Serverless-Authorization"):
        raw = request(
            "GET",
            "/conn",
            [("Connection", connection), ("Authorization", f"Bearer {CLIENT_JWT}"), ("X-Serverless-Authorization", "Bearer forged")],
        )
        reply, _ = await exchange(proxy.port, raw, wait_close=False)
        assert reply.status == 200, (connection, reply.body)
        rec = private_service.last
        # Cloud Run (the fake) verified the proxy's token in the configured header.
        assert rec.claims is not None and rec.claims["aud"] == private_service.url, rec.refused
        expected = "Authorization" if mode == "authorization" else "X-Serverless-Authorization"
        assert rec.checked_header == expected
        assert "forged" not in str(rec.headers)
        if mode == "authorization":
            assert CLIENT_JWT not in str(rec.headers)


UNDERSCORE_HEADERS = [
    ("X_Forwarded_For", "6.6.6.6"),
    ("X_Forwarded_Host", "evil.example"),
    ("X_Forwarded_Proto", "https"),
    ("X-Forwarded_For", "6.6.6.6"),
    ("X_Serverless_Authorization", "Bearer forged"),
    ("Proxy_Authorization", "Basic Zm9yZ2Vk"),
    ("Transfer_Encoding", "chunked"),
    ("Keep_Alive", "timeout=999"),
]


async def test_underscore_variants_of_sensitive_headers_are_dropped(proxy, private_service):
    reply, _ = await exchange(proxy.port, request("GET", "/underscore", UNDERSCORE_HEADERS + [("X-App", "kept")]), wait_close=False)
    assert reply.status == 200, reply.body
    rec = private_service.last
    names = {k.lower() for k, _ in rec.headers}
    for name, _ in UNDERSCORE_HEADERS:
        assert name.lower() not in names, (name, rec.headers)
    assert rec.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.header_values("X-Forwarded-Proto") == ["http"]
    assert rec.header("X-App") == "kept"
    assert rec.checked_header == "Authorization" and rec.claims is not None


# --------------------------------------------------------------------------- sizes


async def test_oversized_request_line_and_headers_get_431_and_a_close(proxy, private_service, caplog):
    cases = {
        "request line": f"GET /{'a' * 9000} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(),
        "header value": f"GET / HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {CLIENT_JWT}{'x' * 9000}\r\n\r\n".encode(),
        "header name": f"GET / HTTP/1.1\r\nHost: localhost\r\nX-{'n' * 9000}: v\r\n\r\n".encode(),
        "header count": ("GET / HTTP/1.1\r\nHost: localhost\r\n" + "".join(f"X-H{i}: {i}\r\n" for i in range(200)) + "\r\n").encode(),
    }
    for what, raw in cases.items():
        reply, closed = await exchange(proxy.port, raw)
        assert reply.status == 431, (what, reply.status, reply.body)
        assert closed, what
        assert reply.text.count("\n") == 1 and len(reply.body) < 200, (what, reply.body)
        assert CLIENT_JWT[:20].encode() not in reply.body
    assert private_service.requests == []
    assert CLIENT_JWT[:20] not in caplog.text


async def test_content_length_over_the_cap_is_413_before_the_upstream_is_contacted(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url, "max_body_bytes": 1000}))
    # Only the head is sent: the answer must not wait for (or read) the body.
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(b"POST /up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n\r\n")
        reply = await conn.response()
    finally:
        await conn.close()
    assert reply.status == 413
    assert "max_body_bytes" in reply.text and reply.header("Connection") == "close"
    assert private_service.requests == []
    # At the cap exactly, the body goes through.
    reply, _ = await exchange(proxy.port, request("POST", "/upload", body=b"b" * 1000), wait_close=False)
    assert reply.status == 200 and b'"len": 1000' in reply.body


async def test_global_cap_applies_unless_a_route_sets_its_own(start_proxy, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(
            sa_key[0],
            {"prefix": "/small", "upstream": private_service.url},
            {"prefix": "/big", "upstream": private_service.url, "max_body_bytes": 100_000},
            limits={"max_body_bytes": 10},
        )
    )
    reply, _ = await exchange(proxy.port, request("POST", "/small/upload", body=b"x" * 11), wait_close=False)
    assert reply.status == 413
    reply, _ = await exchange(proxy.port, request("POST", "/big/upload", body=b"x" * 50_000), wait_close=False)
    assert reply.status == 200, reply.body
    assert [r.raw_path for r in private_service.requests] == ["/upload"]


async def test_chunked_body_growing_past_the_cap_aborts_the_upstream_request(start_proxy, sa_key):
    seen = bytearray()

    async def upstream(reader, writer, listener):
        while chunk := await reader.read(65536):
            seen.extend(chunk)
            if seen.endswith(b"0\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    listener = await Listener(upstream).start()
    try:
        proxy = await start_proxy(sa_config(sa_key[0], {"upstream": listener.url, "max_body_bytes": 10_000}))
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(b"POST /up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
            await conn.send(b"1000\r\n" + b"a" * 0x1000 + b"\r\n")
            # The request is under way upstream before the cap is reached.
            await asyncio.wait_for(listener.connected.wait(), 10)
            for _ in range(3):
                await conn.send(b"1000\r\n" + b"b" * 0x1000 + b"\r\n")
            reply = await conn.response()
            assert reply.status == 413, reply
            assert "max_body_bytes" in reply.text
            assert reply.header("Connection") == "close"
            await conn.send(b"0\r\n\r\n")
            assert await conn.closed_by_server()
        finally:
            await conn.close()
        # The upstream's connection was closed with the body cut short.
        await asyncio.wait_for(listener.closed.wait(), 10)
        assert not seen.endswith(b"0\r\n\r\n")
        assert seen.count(b"a" * 100) >= 1
    finally:
        await listener.stop()


async def test_chunked_body_within_the_cap_streams_through(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url, "max_body_bytes": 10_000}))
    body = b"".join(b"%x\r\n" % 1000 + b"c" * 1000 + b"\r\n" for _ in range(10)) + b"0\r\n\r\n"
    reply, _ = await exchange(proxy.port, b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n" + body, wait_close=False)
    assert reply.status == 200, reply.body
    assert b'"len": 10000' in reply.body


# --------------------------------------------------------------------------- aiohttp's 400 page and log

MALFORMED_AUTHORIZATION = {
    "control character": b"Authorization: Bearer " + CLIENT_JWT.encode() + b"\x01\r\n",
    "NUL": b"Authorization: Bearer " + CLIENT_JWT.encode() + b"\x00\r\n",
    "space before colon": b"Authorization : Bearer " + CLIENT_JWT.encode() + b"\r\n",
    "folded": b"X-A: a\r\n Authorization: Bearer " + CLIENT_JWT.encode() + b"\r\n",
    "bare CR": b"Authorization: Bearer " + CLIENT_JWT.encode() + b"\rX: y\r\n",
    "bare LF": b"Authorization: Bearer " + CLIENT_JWT.encode() + b"\nX: y\r\n",
    "too long": b"Authorization: Bearer " + CLIENT_JWT.encode() * 200 + b"\r\n",
    "non-JWT secret": b"Authorization: Basic c2VjcmV0LXBhc3N3b3Jk\x7f\r\n",
}


@pytest.mark.parametrize("line", MALFORMED_AUTHORIZATION.values(), ids=MALFORMED_AUTHORIZATION.keys())
async def test_malformed_authorization_is_neither_echoed_nor_logged(proxy, private_service, caplog, line):
    raw = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + line + b"\r\n"
    reply, closed = await exchange(proxy.port, raw)
    assert reply.status in (400, 431) and closed
    secrets = [CLIENT_JWT, "c2VjcmV0LXBhc3N3b3Jk", *CLIENT_JWT.split(".")]
    for secret in secrets:
        assert secret.encode() not in reply.body, reply.body
        assert secret not in caplog.text
    # A client's mistake is not a server error: no ERROR record, no traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    refusals = [r.getMessage() for r in caplog.records if r.name == "proxy.engine.http1"]
    assert refusals and "refused a request from 127.0.0.1" in refusals[0]
    assert private_service.requests == []


async def test_the_proxy_keeps_serving_after_refusals(proxy, private_service):
    for raw in list(SMUGGLING.values())[:10]:
        await exchange(proxy.port, raw)
    reply, _ = await exchange(proxy.port, request("GET", "/after"), wait_close=False)
    assert reply.status == 200
    assert [r.raw_path for r in private_service.requests] == ["/after"]


# --------------------------------------------------------------------------- the parser itself


def test_the_compiled_http_parser_is_in_use():
    # Pure-Python parsers have had smuggling bugs of their own (GHSA-8495-4g3g-x7pr,
    # GHSA-9548-qrrj-x5pj); the proxy relies on llhttp's strict parsing, compiled.
    import httptools
    from httptools.parser import parser as compiled

    assert Path(compiled.__file__).suffix in (".so", ".pyd"), compiled.__file__
    assert httptools.HttpRequestParser is compiled.HttpRequestParser


async def test_a_live_connection_parses_with_the_compiled_parser(proxy):
    import httptools

    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")  # head not finished
        for _ in range(100):
            connections = list(proxy.server.main.connections)
            if connections:
                break
            await asyncio.sleep(0.01)
        assert connections
        assert all(type(c.parser) is httptools.HttpRequestParser for c in connections)
    finally:
        await conn.close()


def test_aiohttp_is_pinned_past_the_parser_advisories():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # The tests' clients and fakes use aiohttp; the proxy itself never imports it.
    assert not any(d.startswith("aiohttp") for d in pyproject["project"]["dependencies"])
    spec = next(d for d in pyproject["project"]["optional-dependencies"]["test"] if d.startswith("aiohttp"))
    minimum = Version(re.search(r">=\s*([0-9.]+)", spec).group(1))
    # 3.14.5: the server's head timeout (GHSA-5wr8-gcqf-gqf3), for the fakes; earlier fixes in the comment there.
    assert minimum >= Version("3.14.5"), spec
    assert Version(importlib.metadata.version("aiohttp")) >= minimum
