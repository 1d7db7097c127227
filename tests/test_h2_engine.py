"""The HTTP/2 engine parts on their own: the server codec, the upstream pool and the relay.

A minimal relay (no routes or guard: it adds a token minted by the fake Google)
between real grpcio clients and the token-verifying gRPC fake, so flow control,
trailers, resets and GOAWAY are exercised with the official implementation on
both sides.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import h2.connection
import h2.events
import pytest

from proxy.engine.h2relay import relay
from proxy.engine.h2server import H2ServerConnection, ServerStream
from proxy.engine.h2upstream import H2Pool, H2UpstreamError, Origin
from tests.fakes.grpc_service import GrpcService

MiB = 1 << 20


@pytest.fixture
def grpc_service(fake_google: Any) -> Iterator[GrpcService]:
    with GrpcService(fake_google.certs_url) as service:
        yield service


@dataclass
class Relay:
    port: int
    pool: H2Pool
    connections: list[H2ServerConnection]
    errors: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def h2_relay(grpc_service: GrpcService, fake_google: Any) -> AsyncIterator[Relay]:
    loop = asyncio.get_running_loop()
    pool = H2Pool()  # quiets hpack's DEBUG records, as the app factory does
    origin = Origin("http", "127.0.0.1", grpc_service.port)
    token = fake_google.mint(grpc_service.url, email="relay@example.com")
    errors: list[str] = []
    connections: list[H2ServerConnection] = []

    async def handler(stream: ServerStream) -> None:
        headers = [(k, v) for k, v in stream.headers if k != b":authority" and k != b"authorization"]
        headers.insert(3, (b":authority", origin.authority.encode()))
        headers.append((b"authorization", f"Bearer {token}".encode()))
        try:
            upstream = await pool.open_stream(origin, headers, end_stream=stream.next_is_end())
        except H2UpstreamError as e:
            errors.append(str(e))
            stream.send_headers([(b":status", b"502")], end_stream=True)
            return
        if stream.next_is_end():
            await stream.read()
        await relay(stream, upstream, lambda head: head)

    def factory() -> H2ServerConnection:
        conn = H2ServerConnection(handler, loop)
        connections.append(conn)
        return conn

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield Relay(port, pool, connections, errors)
    server.close()
    for c in connections:
        c.close()
    pool.close()
    await server.wait_closed()


def _md() -> tuple[tuple[str, str], ...]:
    return (("x-custom", "v"),)


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def _channel(relay: Relay) -> grpc.Channel:
    return grpc.insecure_channel(
        relay.target,
        options=[("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)],
    )


async def test_unary_through_the_relay_carries_the_token(h2_relay: Relay, grpc_service: GrpcService) -> None:
    def call() -> tuple[bytes, Any]:
        with _channel(h2_relay) as ch:
            return ch.unary_unary("/test.Echo/Unary").with_call(b"hello", metadata=_md(), timeout=10)

    reply, c = await _in_thread(call)
    assert reply == b"hello"
    assert ("caller", "relay@example.com") in tuple(c.trailing_metadata())
    recorded = grpc_service.calls_to("Unary")[0]
    assert recorded.refused is None and recorded.header("x-custom") == "v"


async def test_streams_both_ways_1000_messages(h2_relay: Relay) -> None:
    def call() -> tuple[list[bytes], bytes, list[bytes]]:
        with _channel(h2_relay) as ch:
            down = list(ch.unary_stream("/test.Echo/ServerStream")(b"1000:100", timeout=30))
            up = ch.stream_unary("/test.Echo/ClientStream")((b"m%d" % i for i in range(1000)), timeout=30)
            bidi = list(ch.stream_stream("/test.Echo/Bidi")((b"b%d" % i for i in range(1000)), timeout=30))
            return down, up, bidi

    down, up, bidi = await _in_thread(call)
    assert [m.split(b":")[0] for m in down] == [b"%d" % i for i in range(1000)]
    assert up == b"1000:%d" % sum(len(b"m%d" % i) for i in range(1000))
    assert bidi == [b"b%d" % i for i in range(1000)]


async def test_large_messages_pass_intact(h2_relay: Relay) -> None:
    payload = bytes(range(251)) * (8 * MiB // 251)

    def call() -> bytes:
        with _channel(h2_relay) as ch:
            return ch.unary_unary("/test.Echo/Unary")(payload, timeout=60)

    assert await _in_thread(call) == payload


async def test_concurrent_rpcs_on_one_channel(h2_relay: Relay) -> None:
    def call() -> list[bytes]:
        with _channel(h2_relay) as ch:
            method = ch.unary_unary("/test.Echo/Unary")
            futures = [method.future(b"%d" % i, timeout=60) for i in range(200)]
            return [f.result() for f in futures]

    assert await _in_thread(call) == [b"%d" % i for i in range(200)]


async def test_status_and_message_pass_unchanged(h2_relay: Relay) -> None:
    def call() -> tuple[grpc.StatusCode, str]:
        with _channel(h2_relay) as ch:
            try:
                ch.unary_unary("/test.Echo/Unary")("status:RESOURCE_EXHAUSTED:quota é 100%".encode(), timeout=10)
            except grpc.RpcError as e:
                return e.code(), e.details()
        raise AssertionError("no error")

    assert await _in_thread(call) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota é 100%")


async def test_client_cancel_reaches_the_server(h2_relay: Relay, grpc_service: GrpcService) -> None:
    def call() -> bool:
        with _channel(h2_relay) as ch:
            future = ch.unary_unary("/test.Echo/Wait").future(b"", timeout=30)
            deadline = time.monotonic() + 10
            while not grpc_service.calls_to("Wait") and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)
            future.cancel()
            return grpc_service.calls_to("Wait")[0].cancelled.wait(5)

    assert await _in_thread(call)


async def test_upstream_that_is_not_http2_is_refused(fake_google: Any) -> None:
    pool = H2Pool()
    with pytest.raises(H2UpstreamError, match="does not speak HTTP/2: it did not answer the HTTP/2 preface"):
        await pool.open_stream(Origin("http", "127.0.0.1", fake_google.port), [(b":method", b"GET")], True)
    pool.close()


async def test_unreachable_upstream_is_named(unused_tcp_port: int) -> None:
    pool = H2Pool()
    with pytest.raises(H2UpstreamError, match=rf"upstream http://127.0.0.1:{unused_tcp_port} unreachable"):
        await pool.open_stream(Origin("http", "127.0.0.1", unused_tcp_port), [(b":method", b"GET")], True)
    pool.close()


async def test_a_full_connection_opens_another(fake_google: Any) -> None:
    """The upstream's MAX_CONCURRENT_STREAMS is respected: a sixth stream does not wait, it opens a connection."""
    with GrpcService(fake_google.certs_url, options=[("grpc.max_concurrent_streams", 2)]) as limited:
        pool = H2Pool()
        origin = Origin("http", "127.0.0.1", limited.port)
        token = fake_google.mint(limited.url)
        head = [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/test.Echo/Sleep"),
            (b":authority", origin.authority.encode()), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), (b"authorization", f"Bearer {token}".encode()),
        ]
        message = b"500"
        streams = [await pool.open_stream(origin, head, end_stream=False) for _ in range(5)]
        for s in streams:
            await s.send_data(b"\0" + struct.pack(">I", len(message)) + message, end_stream=True)
        heads = await asyncio.wait_for(asyncio.gather(*(s.response for s in streams)), 30)
        assert all(dict(h)[b":status"] == b"200" for h in heads)
        assert len(pool.connections(origin)) == 3
        pool.close()


def _raw_h2_client(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _events_until(sock: socket.socket, conn: h2.connection.H2Connection, kind: type, limit: float = 10) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        try:
            events += conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
        sock.sendall(conn.data_to_send())
        if any(isinstance(e, kind) for e in events):
            break
    return events


async def test_bad_preface_closes(h2_relay: Relay) -> None:
    def run() -> bytes:
        sock = socket.create_connection(("127.0.0.1", h2_relay.port), timeout=10)
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\0" * 9)
        out = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return out
            out += data

    await _in_thread(run)  # closed, not hung (recv returns b"" within the timeout)


async def test_server_goaway_lets_streams_finish(h2_relay: Relay, grpc_service: GrpcService) -> None:
    done = threading.Event()

    def call() -> bytes:
        with _channel(h2_relay) as ch:
            future = ch.unary_unary("/test.Echo/Wait").future(b"", timeout=30)
            deadline = time.monotonic() + 10
            while not grpc_service.calls_to("Wait") and time.monotonic() < deadline:
                time.sleep(0.02)
            done.set()
            try:
                return future.result(timeout=1)
            except grpc.FutureTimeoutError:
                return b"still running"

    task = asyncio.ensure_future(_in_thread(call))
    while not done.is_set():
        await asyncio.sleep(0.02)
    for c in h2_relay.connections:
        c.shutdown()
    assert await task == b"still running"
    assert all(c.draining for c in h2_relay.connections)


@pytest.mark.parametrize(
    ("http_status", "deadline", "code"),
    [
        (503, False, grpc.StatusCode.UNAVAILABLE),
        (502, False, grpc.StatusCode.UNAVAILABLE),
        (403, False, grpc.StatusCode.PERMISSION_DENIED),
        (404, False, grpc.StatusCode.UNIMPLEMENTED),
        (400, False, grpc.StatusCode.INTERNAL),
        (504, True, grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, False, grpc.StatusCode.UNKNOWN),
    ],
)
async def test_trailers_only_errors_as_grpcio_reads_them(http_status: int, deadline: bool, code: grpc.StatusCode) -> None:
    """A refusal written by policy.grpc reaches grpcio as that status, with its message decoded."""
    from proxy.policy.grpc import trailers_only

    reason = f"refused: é 100% ({http_status})"

    async def handler(stream: ServerStream) -> None:
        stream.send_headers(trailers_only(http_status, reason, deadline=deadline), end_stream=True)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: H2ServerConnection(handler, loop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def call() -> tuple[grpc.StatusCode, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
            except grpc.RpcError as e:
                return e.code(), e.details()
        raise AssertionError("no error")

    try:
        assert await _in_thread(call) == (code, reason)
    finally:
        server.close()


def test_grpc_message_percent_encoding() -> None:
    from proxy.policy.grpc import encode_message

    assert encode_message("plain text: ok") == b"plain text: ok"
    assert encode_message("é 100%\n") == b"%C3%A9 100%25%0A"
