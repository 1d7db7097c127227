"""The main listener accepts a burst of connections in batches, and serves them all.

``proxy/engine/listen.py`` owns the listening socket (uvloop would accept one
connection per loop turn). These tests run the real ProxyServer on the loop the
suite uses and a private service that verifies every token.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.engine.listen import Listener
from proxy.app import make_app
from proxy.config import parse_config
from proxy.server import ProxyServer, StartupError

BURST = 300


def _config(key_file: str, upstream: str, port: int = 0, host: str = "127.0.0.1"):
    return parse_config(
        {
            "listen": {"host": host, "port": port},
            "credentials": {"source": "service_account", "key_file": key_file},
            "routes": [{"upstream": upstream}],
        },
        {},
    )


async def _started(config) -> ProxyServer:
    server = ProxyServer(make_app(config), config)
    await server.start()
    return server


async def test_a_burst_of_connections_is_accepted_in_batches_and_all_are_served(sa_key, private_service):
    server = await _started(_config(str(sa_key[0]), private_service.url))
    try:
        port = server.addresses[0][1]
        site = server.listener
        assert isinstance(site, Listener)
        # The kernel completes every handshake into the accept queue before the proxy looks.
        streams = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(BURST)))
        hardened = server.main
        for _ in range(500):
            if hardened.open_connections == BURST:
                break
            await asyncio.sleep(0.01)
        assert hardened.open_connections == BURST
        # More than one connection per readiness event: batches, not one per loop turn.
        assert site.largest_batch > 1

        async def exchange(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(f"GET /n/{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data

        answers = await asyncio.gather(*(exchange(i, r, w) for i, (r, w) in enumerate(streams)))
        assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * BURST
        assert sorted(r.raw_path for r in private_service.requests) == sorted(f"/n/{i}" for i in range(BURST))
        assert all(r.claims is not None for r in private_service.requests)
    finally:
        server.begin_shutdown()
        await server.stop()


async def test_stopping_closes_the_listening_socket(sa_key, private_service):
    server = await _started(_config(str(sa_key[0]), private_service.url))
    port = server.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
    writer.close()
    server.begin_shutdown()
    await server.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_port_in_use_is_a_startup_error(sa_key, private_service):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        server = ProxyServer(make_app(_config(str(sa_key[0]), private_service.url, port=port)), _config(str(sa_key[0]), private_service.url, port=port))
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}: .*address already in use"):
            await server.start()
        assert server.listener is None
    finally:
        taken.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
async def test_ipv6_loopback(sa_key, private_service):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = await _started(_config(str(sa_key[0]), private_service.url, host="::1"))
    try:
        port = server.addresses[0][1]
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write(b"GET /v6 HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
    finally:
        server.begin_shutdown()
        await server.stop()
