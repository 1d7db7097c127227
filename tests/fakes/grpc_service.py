"""GrpcService: a fake private gRPC service on Cloud Run that really checks ID tokens.

A real grpcio server (h2c on loopback, as Cloud Run's end-to-end HTTP/2 hands
requests to a container) whose interceptor checks each call's token the way
Cloud Run's front end does, with the same rules as :class:`PrivateService`:
``x-serverless-authorization`` if present, else ``authorization``; no token is
PERMISSION_DENIED (Cloud Run's 403), a bad, expired, untrusted or wrong-audience
token is UNAUTHENTICATED (its 401). Signatures are verified with
``google.auth.jwt.decode`` against the fake Google's certs, fetched once.

Methods carry raw bytes (no protobuf code generation; grpcio passes bytes through
when no serializer is given), under the service ``test.Echo``:

- ``Unary``: echoes the request; initial metadata ``x-echo-initial``, trailing
  metadata ``caller`` (the token's email) and ``x-echo-trailing-bin``;
  a request ``status:CODE:MESSAGE`` ends the call with that status and message.
- ``ServerStream``: a request ``N:SIZE`` answers N messages of SIZE bytes.
- ``ClientStream``: answers ``COUNT:TOTAL_BYTES`` of what it received.
- ``Bidi``: echoes every message as it arrives.
- ``Wait``: blocks until cancelled or 60 s pass; records the cancellation.
- ``Sleep``: a request ``MS`` answers ``slept`` after that many milliseconds.

Every call's method, invocation metadata and outcome is recorded.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import google.auth.exceptions
import google.auth.jwt
import grpc

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
SERVICE = "test.Echo"


@dataclass
class GrpcCall:
    method: str
    metadata: list[tuple[str, str | bytes]]
    checked_header: str | None = None
    claims: dict[str, Any] | None = None
    refused: grpc.StatusCode | None = None
    #: Seconds left before the call's deadline when the method began (None: no deadline).
    time_remaining: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def header(self, name: str) -> str | bytes | None:
        for k, v in self.metadata:
            if k == name:
                return v
        return None


class _Verifier(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, service: GrpcService) -> None:
        self.service = service

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        call = GrpcCall(details.method, list(details.invocation_metadata or ()))
        self.service._record(call)
        try:
            call.checked_header, call.claims = self.service._verify(call.metadata)
        except _Refusal as r:
            call.refused = code = r.code
            message = r.message

            def refuse(request: Any, context: grpc.ServicerContext, call: GrpcCall) -> None:
                context.abort(code, message)

            refused = continuation(details)
            if refused is None:
                return None
            _, make = _KINDS[(refused.request_streaming, refused.response_streaming)]
            return make(lambda request, context: refuse(request, context, call))
        handler = continuation(details)
        if handler is None:
            return None
        return _with_call(handler, call)


_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _with_call(handler: grpc.RpcMethodHandler, call: GrpcCall) -> grpc.RpcMethodHandler:
    """The same handler, its behaviour given the checked call (the interceptor runs on another thread)."""
    attr, make = _KINDS[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, attr)
    return make(lambda request, context: behaviour(request, context, call))


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrpcService:
    def __init__(
        self,
        certs_url: str,
        audiences: Iterable[str] | None = None,
        max_message: int = 64 << 20,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._certs_url = certs_url
        self._audiences = list(audiences) if audiences is not None else None
        self._lock = threading.Lock()
        self.calls: list[GrpcCall] = []
        self._certs: dict[str, str] = {}
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64),
            interceptors=[_Verifier(self)],
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                *options,
            ],
            maximum_concurrent_rpcs=None,
        )
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, self._handlers())])
        self._port = self._server.add_insecure_port("127.0.0.1:0")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        self.refresh_certs()
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def refresh_certs(self) -> None:
        with urllib.request.urlopen(self._certs_url, timeout=10) as response:
            self._certs = json.load(response)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def audiences(self) -> list[str]:
        return self._audiences if self._audiences is not None else [self.url]

    @audiences.setter
    def audiences(self, value: Iterable[str]) -> None:
        self._audiences = list(value)

    def calls_to(self, method: str) -> list[GrpcCall]:
        with self._lock:
            return [c for c in self.calls if c.method == f"/{SERVICE}/{method}"]

    # ------------------------------------------------------------------ checks
    def _record(self, call: GrpcCall) -> None:
        with self._lock:
            self.calls.append(call)

    def _verify(self, metadata: list[tuple[str, str | bytes]]) -> tuple[str, dict[str, Any]]:
        values = dict(metadata)
        name = "x-serverless-authorization" if "x-serverless-authorization" in values else "authorization"
        value = values.get(name)
        if value is None:
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, "403 Forbidden: no identity token")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme != "Bearer" or token.count(".") != 2:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, f"401 Unauthorized: {name} is not 'Bearer <jwt>'")
        try:
            claims = google.auth.jwt.decode(token, certs=self._certs)
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, f"401 Unauthorized: {str(exc).splitlines()[0][:80]}") from None
        if claims.get("aud") not in self.audiences:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, f"401 Unauthorized: wrong audience {claims.get('aud')!r}")
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, "401 Unauthorized: not issued by Google")
        return name, claims

    # ------------------------------------------------------------------ methods
    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Wait": grpc.unary_unary_rpc_method_handler(self._wait),
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
        }

    @staticmethod
    def _caller(context: grpc.ServicerContext, call: GrpcCall) -> None:
        claims = call.claims or {}
        context.set_trailing_metadata((("caller", str(claims.get("email", ""))), ("x-echo-trailing-bin", b"\xff\x00")))

    def _unary(self, request: bytes, context: grpc.ServicerContext, call: GrpcCall) -> bytes:
        context.send_initial_metadata((("x-echo-initial", "initial"),))
        self._caller(context, call)
        if request.startswith(b"status:"):
            _, code, message = request.decode().split(":", 2)
            context.abort(grpc.StatusCode[code], message)
        return request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext, call: GrpcCall) -> Iterator[bytes]:
        self._caller(context, call)
        count, size = (int(x) for x in request.decode().split(":"))
        for i in range(count):
            yield (b"%d:" % i).ljust(size, b"x")

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext, call: GrpcCall) -> bytes:
        self._caller(context, call)
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return b"%d:%d" % (count, total)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext, call: GrpcCall) -> Iterator[bytes]:
        self._caller(context, call)
        yield from requests

    def _wait(self, request: bytes, context: grpc.ServicerContext, call: GrpcCall) -> bytes:
        done = threading.Event()
        context.add_callback(lambda: (call.cancelled.set() if not context.is_active() else None, done.set()))
        done.wait(60)
        return b"done"

    def _sleep(self, request: bytes, context: grpc.ServicerContext, call: GrpcCall) -> bytes:
        call.time_remaining = context.time_remaining()
        threading.Event().wait(int(request or b"0") / 1000)
        return b"slept"
