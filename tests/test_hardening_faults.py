"""Faults: upstreams that break, stall or talk nonsense; token sources that hang.

Each case checks three things: the client gets an honest answer (502/504 with a
one-line reason, or an aborted connection once a body is under way), no token
shows up in that answer or the logs, and the proxy keeps serving other routes.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.auth.tokens import TokenCache
from tests.rawhttp import Listener, RawConnection, exchange, request
from tests.test_forward import free_port


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


async def eventually(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.1)


def tokens_sent(listener_bytes: bytes) -> list[str]:
    """The bearer tokens an upstream received (from its raw request bytes)."""
    out = []
    for line in listener_bytes.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization" and value.strip().startswith(b"Bearer "):
            out.append(value.strip()[7:].decode())
    return out


async def assert_still_serving(port: int, service) -> None:
    service.clear()
    reply, _ = await exchange(port, request("GET", "/ok/still"), wait_close=False)
    assert reply.status == 200, reply
    assert service.last.raw_path == "/still"


# --------------------------------------------------------------------------- broken bodies


async def test_upstream_reset_mid_body_aborts_the_client_connection(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(request("GET", "/reset-mid-body"))
        reply = await conn.response()
        assert reply.status == 200 and reply.header("Content-Length") == "100000"
        # Fewer bytes than announced, then the connection is gone: never a complete response.
        assert reply.truncated and len(reply.body) < 100_000
    finally:
        await conn.close()


def upstream_writing(*pieces: bytes, abort: bool):
    """An upstream that reads the request head, writes ``pieces``, then closes or resets."""

    async def serve(reader, writer, listener):
        listener.received += await reader.readuntil(b"\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        if abort:
            writer.transport.abort()
        elif abort is None:
            # Keep the connection open: the proxy must give up on its own.
            while await reader.read(65536):
                pass
        else:
            writer.close()

    return serve


BROKEN_BODIES = {
    "chunked, reset after one chunk": (
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nfirst\r\n"),
        True,
    ),
    "chunked, clean close after one chunk": (
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nfirst\r\n"),
        False,
    ),
    "content-length, clean close before the end": (
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only twenty bytes..."),
        False,
    ),
    "chunked, garbage instead of the next chunk": (
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nfirst\r\n", b"zz\r\nnonsense\r\n"),
        False,
    ),
    "chunked, garbage as the first chunk": (
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",),
        False,
    ),
    "chunked, garbage after one chunk, connection left open": (
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nfirst\r\n", b"zz\r\nnonsense\r\n"),
        None,
    ),
}


# GET without a body and POST with one take different upstream clients (upstream.py, aiohttp).
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("pieces, abort", BROKEN_BODIES.values(), ids=BROKEN_BODIES.keys())
async def test_upstream_breaking_off_a_body_never_looks_complete(start_proxy, sa_key, private_service, pieces, abort, method):
    listener = await Listener(upstream_writing(*pieces, abort=abort)).start()
    try:
        proxy = await start_proxy(
            sa_config(sa_key[0], {"prefix": "/bad", "upstream": listener.url}, {"prefix": "/ok", "upstream": private_service.url})
        )
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(request(method, "/bad/body", body=b"payload" if method == "POST" else b""))
            reply = await conn.response()
            if reply.status == 502:
                # The break came with the headers (one read): nothing had been sent yet.
                assert reply.text.startswith("idtoken-proxy: 502 "), reply
            else:
                assert reply.status == 200
                assert reply.truncated, reply
                assert await conn.closed_by_server()
        finally:
            await conn.close()
        await assert_still_serving(proxy.port, private_service)
    finally:
        await listener.stop()


# --------------------------------------------------------------------------- no usable response

GARBAGE = {
    "not HTTP at all": b"this is not http\r\n\r\n",
    "binary junk": bytes(range(256)) * 4,
    "invalid status code": b"HTTP/1.1 abc OK\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "content-length with transfer-encoding": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "closed without a response": b"",
}


def upstream_echoing_garbage(junk: bytes):
    """Reads the request head, then answers ``junk`` followed by the request it got (token included)."""

    async def serve(reader, writer, listener):
        head = await reader.readuntil(b"\r\n\r\n")
        listener.received += head
        if junk:
            writer.write(junk + head)
            await writer.drain()
        writer.close()

    return serve


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("junk", GARBAGE.values(), ids=GARBAGE.keys())
async def test_upstream_garbage_is_502_with_a_reason_and_no_token(start_proxy, sa_key, private_service, caplog, junk, method):
    listener = await Listener(upstream_echoing_garbage(junk)).start()
    try:
        proxy = await start_proxy(
            sa_config(sa_key[0], {"prefix": "/bad", "upstream": listener.url}, {"prefix": "/ok", "upstream": private_service.url})
        )
        reply, _ = await exchange(proxy.port, request(method, "/bad/x", body=b"payload" if method == "POST" else b""), wait_close=False)
        assert reply.status == 502, reply
        assert reply.text.startswith(f"idtoken-proxy: 502 127.0.0.1:{listener.port}") and reply.text.count("\n") == 1, reply.text
        # The upstream echoed the request with its token: it must not travel any further.
        # (aiohttp's client retries an idempotent request once on a dropped connection.)
        (token,) = set(tokens_sent(bytes(listener.received)))
        for part in [token, *token.split(".")]:
            assert part.encode() not in reply.body
            assert part not in caplog.text
        await assert_still_serving(proxy.port, private_service)
    finally:
        await listener.stop()


async def test_upstream_refusing_connections_is_502_and_other_routes_serve(start_proxy, sa_key, private_service):
    port = free_port()
    proxy = await start_proxy(
        sa_config(sa_key[0], {"prefix": "/down", "upstream": f"http://127.0.0.1:{port}"}, {"prefix": "/ok", "upstream": private_service.url})
    )
    reply, _ = await exchange(proxy.port, request("GET", "/down/x"), wait_close=False)
    assert reply.status == 502
    assert f"cannot connect to http://127.0.0.1:{port}" in reply.text
    await assert_still_serving(proxy.port, private_service)


async def test_upstream_that_never_answers_is_504_and_its_connection_is_dropped(start_proxy, sa_key, private_service):
    silent = await Listener().start()
    try:
        proxy = await start_proxy(
            sa_config(
                sa_key[0],
                {"prefix": "/stuck", "upstream": silent.url, "timeout": 0.5},
                {"prefix": "/ok", "upstream": private_service.url},
            )
        )
        replies = await asyncio.gather(
            exchange(proxy.port, request("GET", "/stuck/x"), wait_close=False),
            # Other routes are served while the stuck one waits.
            exchange(proxy.port, request("GET", "/ok/meanwhile"), wait_close=False),
        )
        stuck, ok = (r for r, _ in replies)
        assert stuck.status == 504 and "no response from" in stuck.text and "within 0.5 s" in stuck.text
        assert ok.status == 200
        # The proxy does not keep the stuck upstream connection around.
        await asyncio.wait_for(silent.closed.wait(), 10)
        await assert_still_serving(proxy.port, private_service)
    finally:
        await silent.stop()


# --------------------------------------------------------------------------- token sources


async def test_a_hanging_token_source_answers_503_in_bounded_time_and_other_routes_serve(start_proxy, sa_key, google, private_service):
    """The metadata server hangs from the start: its route fails fast, the key-file route is untouched."""
    google.hang("metadata", 120)
    proxy = await start_proxy(
        {
            "routes": [
                {"prefix": "/meta", "upstream": private_service.url, "credentials": {"source": "metadata"}},
                {"prefix": "/ok", "upstream": private_service.url, "credentials": {"source": "service_account", "key_file": str(sa_key[0])}},
            ]
        },
        ready=False,
        tokens=TokenCache(wait=1.0),
    )
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as client:

        async def status(path: str) -> int:
            async with client.get(proxy.url + path) as r:
                await r.read()
                return r.status

        results = await asyncio.gather(*(status("/meta/x") for _ in range(5)), *(status("/ok/y") for _ in range(5)))
        assert results[:5] == [503] * 5, results
        # The other identity's route needs its own first token, then serves.
        await eventually(lambda: _is(status("/ok/y"), 200), what="the key-file route")
        async with client.get(proxy.url + "/.proxy/healthz") as r:
            assert r.status == 200
        assert all(rec.raw_path == "/y" for rec in private_service.requests)
        # Recovery without a restart.
        google.heal()
        await eventually(lambda: _is(status("/meta/x"), 200), what="the metadata route after healing")


async def test_cached_token_keeps_serving_while_its_refresh_hangs(start_proxy, sa_key, google, private_service):
    google.token_lifetime = 20  # a refresh ~7 s after the first mint
    proxy = await start_proxy(
        {
            "routes": [
                {"prefix": "/meta", "upstream": private_service.url, "credentials": {"source": "metadata"}},
                {"prefix": "/ok", "upstream": private_service.url, "credentials": {"source": "service_account", "key_file": str(sa_key[0])}},
            ]
        }
    )
    meta_key = next(k for k in proxy.state.tokens.keys() if proxy.state.tokens.status(k)["source"] == "metadata")
    first = proxy.state.tokens.peek(meta_key)
    calls = google.calls["metadata"]
    google.hang("metadata", 120)
    statuses: list[int] = []
    async with aiohttp.ClientSession() as client:
        # Wait for the refresh to start hanging, serving all along.
        while google.calls["metadata"] == calls:
            for path in ("/meta/a", "/ok/b"):
                async with client.get(proxy.url + path) as r:
                    statuses.append(r.status)
            await asyncio.sleep(0.2)
        for _ in range(10):
            for path in ("/meta/a", "/ok/b"):
                async with client.get(proxy.url + path) as r:
                    statuses.append(r.status)
        assert set(statuses) == {200}, statuses
        assert proxy.state.tokens.peek(meta_key).token == first.token
        google.heal()
        await eventually(
            lambda: _true(proxy.state.tokens.status(meta_key)["refreshes"]["ok"] >= 2), what="a new metadata token"
        )
        async with client.get(proxy.url + "/meta/after") as r:
            assert r.status == 200
    assert proxy.state.tokens.peek(meta_key).token != first.token


async def _is(awaitable, expected) -> bool:
    return (await awaitable) == expected


async def _true(value: bool) -> bool:
    return value
