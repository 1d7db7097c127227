"""gRPC through the proxy: grpcio's client -> idtoken-proxy (h2c) -> a gRPC service that checks tokens.

The service (tests/fakes/grpc_service.py) verifies each call's ID token as
Cloud Run does, against the fake Google's keys; the proxy mints that token with
a service-account key through the fake token endpoint, as in production.
grpcio runs its blocking calls in a thread while the proxy serves on the test's
event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from tests.fakes.grpc_service import GrpcService

MiB = 1 << 20
METHOD = "/test.Echo/"


@pytest.fixture
def grpc_service(fake_google: Any) -> Iterator[GrpcService]:
    with GrpcService(fake_google.certs_url) as service:
        yield service


def grpc_config(key: Path, upstream: str, **route: Any) -> dict[str, Any]:
    return {
        "credentials": {"source": "service_account", "key_file": str(key)},
        "routes": [{"upstream": upstream, **route}],
    }


@pytest.fixture
async def proxy(start_proxy: Any, sa_key: tuple[Path, str], grpc_service: GrpcService) -> Any:
    return await start_proxy(grpc_config(sa_key[0], grpc_service.url))


def channel(port: int, **options: Any) -> grpc.Channel:
    opts = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
    opts += list(options.items())
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def rpc_error(fn: Any) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded")


# --------------------------------------------------------------------------- calls that work


async def test_unary_call_carries_the_routes_token(proxy: Any, grpc_service: GrpcService, sa_key: tuple[Path, str]) -> None:
    def call() -> tuple[bytes, Any]:
        with channel(proxy.port) as ch:
            return ch.unary_unary(METHOD + "Unary").with_call(b"hello", timeout=10)

    reply, c = await in_thread(call)
    assert reply == b"hello"
    # The service saw a token for its own audience, minted for the key's service account.
    assert ("caller", sa_key[1]) in tuple(c.trailing_metadata())
    recorded = grpc_service.calls_to("Unary")[0]
    assert recorded.refused is None and recorded.claims is not None and recorded.claims["aud"] == grpc_service.url


async def test_streaming_both_ways_1000_messages(proxy: Any) -> None:
    def call() -> tuple[list[bytes], bytes, list[bytes]]:
        with channel(proxy.port) as ch:
            down = list(ch.unary_stream(METHOD + "ServerStream")(b"1000:64", timeout=60))
            up = ch.stream_unary(METHOD + "ClientStream")((b"m%d" % i for i in range(1000)), timeout=60)
            bidi = list(ch.stream_stream(METHOD + "Bidi")((b"b%d" % i for i in range(1000)), timeout=60))
            return down, up, bidi

    down, up, bidi = await in_thread(call)
    assert [m.split(b":")[0] for m in down] == [b"%d" % i for i in range(1000)]
    assert up == b"1000:%d" % sum(len(b"m%d" % i) for i in range(1000))
    assert bidi == [b"b%d" % i for i in range(1000)]


async def test_an_8_mib_message_each_way(proxy: Any) -> None:
    payload = bytes(range(251)) * (8 * MiB // 251)

    def call() -> bytes:
        with channel(proxy.port) as ch:
            return ch.unary_unary(METHOD + "Unary")(payload, timeout=60)

    assert await in_thread(call) == payload


async def test_200_concurrent_rpcs_on_one_channel(proxy: Any, grpc_service: GrpcService) -> None:
    def call() -> list[bytes]:
        with channel(proxy.port) as ch:
            method = ch.unary_unary(METHOD + "Sleep")
            futures = [method.future(b"50", timeout=60) for _ in range(200)]
            return [f.result() for f in futures]

    assert await in_thread(call) == [b"slept"] * 200
    assert len(grpc_service.calls_to("Sleep")) == 200


async def test_metadata_both_ways_with_binary_and_trailing(proxy: Any, grpc_service: GrpcService) -> None:
    sent = (("x-custom", "value ascii"), ("x-blob-bin", b"\x00\x01\xfe\xff"))

    def call() -> Any:
        with channel(proxy.port) as ch:
            return ch.unary_unary(METHOD + "Unary").with_call(b"m", metadata=sent, timeout=10)[1]

    c = await in_thread(call)
    recorded = grpc_service.calls_to("Unary")[0]
    assert recorded.header("x-custom") == "value ascii"
    assert recorded.header("x-blob-bin") == b"\x00\x01\xfe\xff"
    assert dict(c.initial_metadata()).get("x-echo-initial") == "initial"
    assert dict(c.trailing_metadata()).get("x-echo-trailing-bin") == b"\xff\x00"


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
async def test_every_status_and_message_pass_unchanged(proxy: Any, code: grpc.StatusCode) -> None:
    message = f"upstream says {code.name}: ünïcødé ✓ 100%"

    def call() -> tuple[grpc.StatusCode, str]:
        with channel(proxy.port) as ch:
            return rpc_error(lambda: ch.unary_unary(METHOD + "Unary")(f"status:{code.name}:{message}".encode(), timeout=10))

    assert await in_thread(call) == (code, message)


async def test_client_cancel_reaches_the_service(proxy: Any, grpc_service: GrpcService) -> None:
    def call() -> bool:
        with channel(proxy.port) as ch:
            future = ch.unary_unary(METHOD + "Wait").future(b"", timeout=60)
            deadline = time.monotonic() + 20
            while not grpc_service.calls_to("Wait") and time.monotonic() < deadline:
                time.sleep(0.02)
            future.cancel()
            return grpc_service.calls_to("Wait")[0].cancelled.wait(10)

    assert await in_thread(call)


async def test_client_deadline_is_deadline_exceeded_and_passes_upstream(proxy: Any, grpc_service: GrpcService) -> None:
    def call() -> tuple[grpc.StatusCode, str]:
        with channel(proxy.port) as ch:
            return rpc_error(lambda: ch.unary_unary(METHOD + "Sleep")(b"5000", timeout=0.5))

    code, _ = await in_thread(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # grpc-timeout reached the service: its deadline is the client's, not the route's 300 s.
    remaining = grpc_service.calls_to("Sleep")[0].time_remaining
    assert remaining is not None and 0 < remaining <= 0.5


@pytest.mark.soak  # bounded load: everyday runs skip it, .ci/run runs it
async def test_a_bidi_stream_keeps_flowing_across_token_refreshes(
    start_proxy: Any, sa_key: tuple[Path, str], grpc_service: GrpcService, google: Any
) -> None:
    google.token_lifetime = 20
    proxy = await start_proxy(grpc_config(sa_key[0], grpc_service.url))
    first = next(iter(proxy.state.tokens.keys()))
    minted_before = proxy.state.tokens.status(first)["refreshes"]["ok"]
    stop = threading.Event()

    def messages() -> Iterator[bytes]:
        i = 0
        while not stop.is_set():
            yield b"tick %d" % i
            i += 1
            time.sleep(0.05)

    def call() -> int:
        with channel(proxy.port) as ch:
            got = 0
            for _ in ch.stream_stream(METHOD + "Bidi")(messages(), timeout=120):
                got += 1
            return got

    task = asyncio.ensure_future(in_thread(call))
    # Two refreshes of a 20-second token happen while the stream is open.
    deadline = time.monotonic() + 90
    while proxy.state.tokens.status(first)["refreshes"]["ok"] < minted_before + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert proxy.state.tokens.status(first)["refreshes"]["ok"] >= minted_before + 2
    # New calls carry the new token, the open stream still flows.
    before = len(grpc_service.calls_to("Unary"))

    def unary() -> bytes:
        with channel(proxy.port) as ch:
            return ch.unary_unary(METHOD + "Unary")(b"after", timeout=10)

    assert await in_thread(unary) == b"after"
    assert len(grpc_service.calls_to("Unary")) == before + 1
    stop.set()
    got = await asyncio.wait_for(task, 30)
    assert got > 100


# --------------------------------------------------------------------------- the proxy's own refusals


def _refused(port: int, method: str = "Unary", authority: str | None = None) -> tuple[grpc.StatusCode, str]:
    options = {"grpc.default_authority": authority} if authority else {}
    with channel(port, **options) as ch:
        return rpc_error(lambda: ch.unary_unary(METHOD + method)(b"x", timeout=15))


async def test_no_route_is_unimplemented(start_proxy: Any, sa_key: tuple[Path, str], grpc_service: GrpcService) -> None:
    proxy = await start_proxy(grpc_config(sa_key[0], grpc_service.url, prefix="/other.Service"))
    code, message = await in_thread(_refused, proxy.port)
    assert code == grpc.StatusCode.UNIMPLEMENTED, message
    assert "no route" in message


async def test_guard_refusal_is_permission_denied(proxy: Any) -> None:
    # A Host the guard does not allow (DNS rebinding shape): refused before any token is used.
    code, message = await in_thread(_refused, proxy.port, "Unary", "evil.example.com")
    assert code == grpc.StatusCode.PERMISSION_DENIED, message
    assert "evil.example.com" in message


async def test_unreachable_upstream_is_unavailable(start_proxy: Any, sa_key: tuple[Path, str], unused_tcp_port: int) -> None:
    proxy = await start_proxy(grpc_config(sa_key[0], f"http://127.0.0.1:{unused_tcp_port}"))
    code, message = await in_thread(_refused, proxy.port)
    assert code == grpc.StatusCode.UNAVAILABLE, message
    assert f"127.0.0.1:{unused_tcp_port} unreachable" in message


async def test_upstream_that_will_not_speak_http2_is_unavailable_not_downgraded(
    start_proxy: Any, sa_key: tuple[Path, str], private_service: Any
) -> None:
    proxy = await start_proxy(grpc_config(sa_key[0], private_service.url))
    code, message = await in_thread(_refused, proxy.port)
    assert code == grpc.StatusCode.UNAVAILABLE, message
    assert "does not speak HTTP/2" in message
    assert private_service.requests == []


async def test_no_token_is_unavailable(start_proxy: Any, sa_key: tuple[Path, str], grpc_service: GrpcService, google: Any) -> None:
    google.fail("token", 503)
    proxy = await start_proxy(grpc_config(sa_key[0], grpc_service.url), ready=False)
    code, message = await in_thread(_refused, proxy.port)
    assert code == grpc.StatusCode.UNAVAILABLE, message
    assert "token" in message.lower()
    assert grpc_service.calls == []


async def test_proxy_timeout_is_deadline_exceeded(start_proxy: Any, sa_key: tuple[Path, str], grpc_service: GrpcService) -> None:
    proxy = await start_proxy(grpc_config(sa_key[0], grpc_service.url, timeout=1))

    def call() -> tuple[grpc.StatusCode, str]:
        with channel(proxy.port) as ch:
            return rpc_error(lambda: ch.unary_unary(METHOD + "Sleep")(b"5000", timeout=30))

    code, message = await in_thread(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message
    assert "no response" in message


async def test_the_services_own_401_passes_through(proxy: Any, grpc_service: GrpcService) -> None:
    # The service refuses every token: its UNAUTHENTICATED reaches the client as it sent it.
    grpc_service.audiences = ["https://someone-else.example"]

    def call() -> tuple[grpc.StatusCode, str]:
        with channel(proxy.port) as ch:
            return rpc_error(lambda: ch.unary_unary(METHOD + "Unary")(b"x", timeout=10))

    code, message = await in_thread(call)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert message.startswith("401 Unauthorized: wrong audience")


# --------------------------------------------------------------------------- operations


async def test_access_line_metrics_and_status_count_http2_streams(proxy: Any, caplog: Any) -> None:
    def calls() -> None:
        with channel(proxy.port) as ch:
            ch.unary_unary(METHOD + "Unary")(b"ok", timeout=10)
            rpc_error(lambda: ch.unary_unary(METHOD + "Unary")(b"status:NOT_FOUND:nope", timeout=10))

    await in_thread(calls)
    lines = [r.getMessage() for r in caplog.records if r.name == "idtoken_proxy.access"]
    # One line per stream: method, path, protocol, HTTP status and grpc-status.
    assert any('"POST /test.Echo/Unary" HTTP/2 200 grpc-status 0 ' in line for line in lines), lines
    assert any('"POST /test.Echo/Unary" HTTP/2 200 grpc-status 5 ' in line for line in lines), lines
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/.proxy/metrics") as r:
            text = await r.text()
        assert 'idtoken_proxy_requests_total{method="POST",protocol="HTTP/2",route=' in text
        async with s.get(f"{proxy.url}/.proxy/status.json") as r:
            assert (await r.json())["http2_streams"] == 2
