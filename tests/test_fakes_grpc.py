"""The fake gRPC service checks tokens as Cloud Run does, and its methods behave as documented."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.fakes.grpc_service import GrpcService


@pytest.fixture
def grpc_service(fake_google: Any) -> Iterator[GrpcService]:
    with GrpcService(fake_google.certs_url) as service:
        yield service


def _channel(service: GrpcService) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{service.port}")


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_no_token_is_permission_denied(grpc_service: GrpcService) -> None:
    with _channel(grpc_service) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_service.calls_to("Unary")[0].refused == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("kind", ["wrong_audience", "expired", "untrusted", "not_bearer"])
def test_bad_token_is_unauthenticated(grpc_service: GrpcService, fake_google: Any, kind: str) -> None:
    token = {
        "wrong_audience": lambda: fake_google.mint("https://other.example"),
        "expired": lambda: fake_google.expired_token(grpc_service.url),
        "untrusted": lambda: fake_google.mint_untrusted(grpc_service.url),
        "not_bearer": lambda: "x.y.z",
    }[kind]()
    metadata = (("authorization", token),) if kind == "not_bearer" else _bearer(token)
    with _channel(grpc_service) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_stream("/test.Echo/ServerStream")(b"2:10", metadata=metadata, timeout=10).next()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()


def test_methods_with_a_good_token(grpc_service: GrpcService, fake_google: Any) -> None:
    md = _bearer(fake_google.mint(grpc_service.url, email="caller@example.com"))
    with _channel(grpc_service) as ch:
        reply, call = ch.unary_unary("/test.Echo/Unary").with_call(b"ping", metadata=md, timeout=10)
        assert reply == b"ping"
        assert ("caller", "caller@example.com") in tuple(call.trailing_metadata())
        assert [len(m) for m in ch.unary_stream("/test.Echo/ServerStream")(b"3:100", metadata=md, timeout=10)] == [100] * 3
        assert ch.stream_unary("/test.Echo/ClientStream")(iter([b"a", b"bb", b"ccc"]), metadata=md, timeout=10) == b"3:6"
        assert list(ch.stream_stream("/test.Echo/Bidi")(iter([b"1", b"2"]), metadata=md, timeout=10)) == [b"1", b"2"]
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/test.Echo/Unary")("status:NOT_FOUND:ünïcode".encode(), metadata=md, timeout=10)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND, "ünïcode")
    assert grpc_service.calls_to("Unary")[0].checked_header == "authorization"


def test_cancel_is_recorded(grpc_service: GrpcService, fake_google: Any) -> None:
    md = _bearer(fake_google.mint(grpc_service.url))
    with _channel(grpc_service) as ch:
        future = ch.unary_unary("/test.Echo/Wait").future(b"", metadata=md, timeout=30)
        deadline = time.monotonic() + 10
        while not grpc_service.calls_to("Wait") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        future.cancel()
    assert grpc_service.calls_to("Wait")[0].cancelled.wait(10)
