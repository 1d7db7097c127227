"""Slow and hostile clients: head deadline, idle keep-alive, connection cap, disconnects.

No assertion here is about how long something took: each test sets limits that
only one mechanism can explain (a 408 carries the proxy's reason; the keep-alive
close is silent) and waits generously for the outcome.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.engine.http1 import ServerState
from tests.rawhttp import ConnectionClosed, Listener, RawConnection, request


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


def server_of(proxy) -> ServerState:
    server = proxy.server.main
    assert isinstance(server, ServerState)
    return server


async def eventually(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the head deadline


async def test_slowloris_gets_408_and_the_connection_closed(start_proxy, sa_key, private_service, caplog):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 1, "keepalive_timeout": 300})
    )
    conn = await RawConnection.open(proxy.port)
    sent = 0
    reply = None
    try:
        await conn.send(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n")
        # One header line every 0.2 s, never finishing the head.
        for sent in range(1, 300):
            try:
                await conn.send(f"X-Slow-{sent}: {'v' * 20}\r\n".encode())
            except ConnectionError:
                break
            try:
                reply = await asyncio.wait_for(conn.response(), 0.2)
                break
            except TimeoutError:
                continue
            except ConnectionClosed:
                break
        assert reply is not None, f"no 408 after {sent} header lines"
        assert reply.status == 408
        assert "limits.header_timeout" in reply.text and reply.header("Connection") == "close"
        assert await conn.closed_by_server()
    finally:
        await conn.close()
    assert private_service.requests == []
    assert any("request head not complete within 1 s (408)" in r.getMessage() for r in caplog.records)


async def test_a_connection_that_sends_nothing_is_closed_silently(start_proxy, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 0.5, "keepalive_timeout": 300})
    )
    conn = await RawConnection.open(proxy.port)
    try:
        data = await asyncio.wait_for(conn.reader.read(), 10)
    finally:
        await conn.close()
    # Closed by the head deadline (keep-alive is 300 s), without a response: a browser's
    # spare connection that was never used is not an error.
    assert data == b""


async def test_idle_keepalive_is_bounded_by_keepalive_timeout_not_the_head_deadline(start_proxy, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 0.3, "keepalive_timeout": 2})
    )
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(request("GET", "/one"))
        assert (await conn.response()).status == 200
        # Idle for longer than the head deadline: the connection stays usable...
        await asyncio.sleep(1.0)
        await conn.send(request("GET", "/two"))
        assert (await conn.response()).status == 200
        # ...until the keep-alive timeout closes it, silently.
        data = await asyncio.wait_for(conn.reader.read(), 15)
        assert data == b""
    finally:
        await conn.close()
    assert [r.raw_path for r in private_service.requests] == ["/one", "/two"]


async def test_the_head_deadline_applies_again_to_each_request_on_a_connection(start_proxy, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 0.5, "keepalive_timeout": 300})
    )
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(request("GET", "/first"))
        assert (await conn.response()).status == 200
        await asyncio.sleep(1.0)  # idle, longer than the deadline: fine
        await conn.send(b"GET /second HTTP/1.1\r\nHost: localhost\r\n")  # and never finished
        reply = await conn.response(timeout=15)
        assert reply.status == 408
        assert await conn.closed_by_server()
    finally:
        await conn.close()
    assert [r.raw_path for r in private_service.requests] == ["/first"]


async def test_a_slow_body_is_not_cut_by_the_head_deadline(start_proxy, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 0.3, "keepalive_timeout": 300})
    )
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0.3)
            await conn.send(b"4\r\nslow\r\n")
        await conn.send(b"0\r\n\r\n")
        reply = await conn.response()
    finally:
        await conn.close()
    assert reply.status == 200, reply
    assert b'"len": 20' in reply.body


async def test_a_head_split_across_packets_within_the_deadline_is_served(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 30}))
    conn = await RawConnection.open(proxy.port)
    try:
        for piece in (b"GET /sp", b"lit HTTP/1.1\r\nHo", b"st: localhost\r\nX-A: ", b"b\r\n", b"\r\n"):
            await conn.send(piece)
            await asyncio.sleep(0.05)
        reply = await conn.response()
    finally:
        await conn.close()
    assert reply.status == 200
    assert private_service.last.raw_path == "/split"


async def test_production_server_carries_the_limits(sa_key, private_service):
    """server.ProxyServer (what the CLI runs) serves with the config's limits, not only the tests' fixture."""
    from proxy.app import make_app
    from proxy.config import parse_config
    from proxy.server import ProxyServer

    config = parse_config(
        sa_config(sa_key[0], {"upstream": private_service.url}, listen={"port": 0}, limits={"header_timeout": 3, "keepalive_timeout": 7})
    )
    server = ProxyServer(make_app(config), config)
    await server.start()
    try:
        assert isinstance(server.main, ServerState)
        assert server.main.limits.header_timeout == 3
        assert server.main.limits.keepalive_timeout == 7
        # And a request is served through it.
        conn = await RawConnection.open(server.addresses[0][1])
        try:
            await conn.send(request("GET", "/limits"))
            assert (await conn.response()).status == 200
        finally:
            await conn.close()
    finally:
        await server.stop()


# --------------------------------------------------------------------------- connection cap


async def test_connections_beyond_the_cap_get_503_and_are_closed(start_proxy, sa_key, private_service, caplog):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"max_connections": 3, "header_timeout": 60})
    )
    server = server_of(proxy)
    held = [await RawConnection.open(proxy.port) for _ in range(3)]
    try:
        await eventually(lambda: server.open_connections == 3, what="3 open connections")
        extra = await RawConnection.open(proxy.port)
        try:
            reply = await extra.response()
            assert reply.status == 503 and reply.header("Retry-After") == "1"
            assert "limits.max_connections is 3" in reply.text
            assert await extra.closed_by_server()
        finally:
            await extra.close()
        # The held connections still work.
        await held[0].send(request("GET", "/held"))
        assert (await held[0].response()).status == 200
        # One goes away: a new connection is served again.
        await held[1].close()
        await eventually(lambda: server.open_connections == 2, what="the closed connection to be counted out")
        fresh = await RawConnection.open(proxy.port)
        try:
            await fresh.send(request("GET", "/fresh"))
            assert (await fresh.response()).status == 200
        finally:
            await fresh.close()
    finally:
        for conn in held:
            await conn.close()
    await eventually(lambda: server.open_connections == 0, what="all connections counted out")
    assert server.refused == 1
    assert [r.raw_path for r in private_service.requests] == ["/held", "/fresh"]
    assert [r.levelno for r in caplog.records if "refusing connections" in r.getMessage()] == [logging.WARNING]


async def test_connection_count_returns_to_zero_after_churn(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, limits={"max_connections": 5}))
    server = server_of(proxy)

    async def one(i: int) -> int:
        conn = await RawConnection.open(proxy.port)
        try:
            await conn.send(request("GET", f"/c{i}"))
            return (await conn.response()).status
        except ConnectionClosed:
            return 0
        finally:
            await conn.close()

    statuses = []
    for _ in range(10):
        statuses += await asyncio.gather(*(one(i) for i in range(8)))
    await eventually(lambda: server.open_connections == 0, what="all connections counted out")
    # Some of each burst of 8 were over the cap of 5; every one got an answer.
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    assert statuses.count(503) == server.refused


# --------------------------------------------------------------------------- client goes away


@pytest.fixture
async def stalling_upstream():
    """An upstream that answers the head and one body chunk, then stalls; records its close."""

    async def serve(reader, writer, listener):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        # Stall; the read returns when the proxy closes its end.
        while await reader.read(65536):
            pass

    listener = await Listener(serve).start()
    yield listener
    await listener.stop()


@pytest.fixture
async def silent_upstream():
    """An upstream that reads the request (head and body) and never answers."""
    listener = await Listener().start()
    yield listener
    await listener.stop()


async def test_client_leaving_mid_response_closes_the_upstream_request(start_proxy, sa_key, stalling_upstream):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": stalling_upstream.url}))
    conn = await RawConnection.open(proxy.port)
    await conn.send(request("GET", "/stream"))
    head = await asyncio.wait_for(conn.reader.readuntil(b"first\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    assert not stalling_upstream.closed.is_set()
    loop = asyncio.get_running_loop()
    left = loop.time()
    await conn.close()
    # The upstream sends nothing more, so only the cancelled handler can close it.
    await asyncio.wait_for(stalling_upstream.closed.wait(), 10)
    print(f"\nupstream closed {loop.time() - left:.3f} s after the client left mid-response")


async def test_client_leaving_while_waiting_for_the_upstream_closes_the_upstream_request(start_proxy, sa_key, silent_upstream):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": silent_upstream.url}))  # route timeout 300 s
    conn = await RawConnection.open(proxy.port)
    await conn.send(request("GET", "/wait"))
    await asyncio.wait_for(silent_upstream.connected.wait(), 10)
    await eventually(lambda: b"\r\n\r\n" in silent_upstream.received, what="the request head upstream")
    loop = asyncio.get_running_loop()
    left = loop.time()
    await conn.close()
    await asyncio.wait_for(silent_upstream.closed.wait(), 10)
    print(f"\nupstream closed {loop.time() - left:.3f} s after the client left before the response")
    assert proxy.state.forwarder.inflight == 0


async def test_client_leaving_mid_upload_closes_the_upstream_request(start_proxy, sa_key, silent_upstream):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": silent_upstream.url}))
    conn = await RawConnection.open(proxy.port)
    await conn.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await eventually(lambda: b"hello" in silent_upstream.received, what="the first chunk upstream")
    loop = asyncio.get_running_loop()
    left = loop.time()
    await conn.close()
    await asyncio.wait_for(silent_upstream.closed.wait(), 10)
    print(f"\nupstream closed {loop.time() - left:.3f} s after the client left mid-upload")
    # The upstream never saw the body's end: it cannot mistake the cut for a complete upload.
    assert not silent_upstream.received.endswith(b"0\r\n\r\n")


async def test_the_admin_listener_has_the_same_limits_and_400_page(sa_key, private_service, caplog):
    """The admin listener may bind the pod address: it gets the hardened server too."""
    from proxy.app import make_app
    from proxy.config import parse_config
    from proxy.server import ProxyServer
    from tests.rawhttp import exchange

    config = parse_config(
        sa_config(
            sa_key[0],
            {"upstream": private_service.url},
            listen={"port": 0},
            admin={"port": 0},
            limits={"header_timeout": 0.5, "keepalive_timeout": 300},
        )
    )
    server = ProxyServer(make_app(config), config)
    await server.start()
    try:
        admin_port = server.admin_addresses[0][1]
        assert isinstance(server.admin, ServerState) and server.admin.limits == config.limits
        secret = b"Basic c2VjcmV0LWFkbWluLXZhbHVl"
        reply, closed = await exchange(admin_port, b"GET /.proxy/healthz HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + secret + b"\x01\r\n\r\n")
        assert reply.status == 400 and closed
        assert secret not in reply.body and secret.decode() not in caplog.text
        conn = await RawConnection.open(admin_port)
        try:
            await conn.send(b"GET /.proxy/healthz HTTP/1.1\r\n")  # and nothing more
            reply = await conn.response(timeout=15)
            assert reply.status == 408
        finally:
            await conn.close()
    finally:
        await server.stop()


async def test_a_connection_in_use_past_the_keepalive_timeout_is_not_closed_under_it(start_proxy, sa_key, private_service):
    # One keep-alive check per connection outlives the requests it watches (engine/http1.py):
    # when it fires on a connection that was busy since it was set, it must wait for the new
    # idle time, not close the connection between two requests.
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, limits={"header_timeout": 5, "keepalive_timeout": 1})
    )
    conn = await RawConnection.open(proxy.port)
    try:
        for i in range(30):  # about 3 s of use, three keep-alive timeouts, never idle 1 s
            await conn.send(request("GET", f"/r{i}"))
            assert (await conn.response()).status == 200
            await asyncio.sleep(0.1)
        # Idle at last: closed, silently.
        data = await asyncio.wait_for(conn.reader.read(), 15)
        assert data == b""
    finally:
        await conn.close()
    assert len(private_service.requests) == 30


async def test_a_shorter_route_timeout_on_a_pooled_connection_is_kept(start_proxy, sa_key, private_service):
    # Two routes to one upstream share its pooled connections, and each connection has one
    # head-deadline check (engine/upstream.py): a request with a shorter timeout than the
    # check was set for must still get its 504 at its own deadline.
    proxy = await start_proxy(
        sa_config(
            sa_key[0],
            {"upstream": private_service.url, "prefix": "/long", "timeout": 120},
            {"upstream": private_service.url, "prefix": "/short", "timeout": 0.5},
        )
    )
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(request("GET", "/long/x"))
        assert (await conn.response()).status == 200
        await conn.send(request("GET", "/short/slow?seconds=60"))
        # The 120 s check of the first request would answer long after this wait gives up.
        answer = await asyncio.wait_for(conn.response(), 20)
        assert answer.status == 504
        assert b"within 0.5 s" in answer.body
    finally:
        await conn.close()
