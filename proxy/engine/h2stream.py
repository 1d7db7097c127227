"""A stream as the request path sees any request: a head, a body, a response writer.

The counterparts of engine/http1.py's RequestHead, Body and Response for an
HTTP/2 stream (engine/h2server.py's ServerStream), so a stream takes the same
request path. Nothing here imports h2: the request path (exchange.py) tells an
HTTP/2 request from an HTTP/1 one by these classes, and an idle proxy that has
seen no HTTP/2 connection does not load h2, hpack and hyperframe (h2lazy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from .http1 import RequestHead

if TYPE_CHECKING:
    from .h2common import Headers
    from .h2server import ServerStream

#: RFC 9113 8.2.2: connection-specific fields have no place in HTTP/2.
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})


class H2RequestHead(RequestHead):
    """A request head made from a stream's HEADERS: ``:authority`` is the Host."""

    __slots__ = ("grpc", "stream")

    def __init__(self, stream: ServerStream, remote: str | None) -> None:
        method = target = authority = ""
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in stream.headers:
            name = k.decode("latin-1")
            value = v.decode("utf-8", "surrogateescape")
            if name.startswith(":"):
                if name == ":method":
                    method = value
                elif name == ":path":
                    target = value
                elif name == ":authority":
                    authority = value
                continue
            headers.add(name, value)
        if authority and "host" not in headers:
            # The guard and the router read Host; in HTTP/2 it is :authority (RFC 9113 8.3.1).
            headers["Host"] = authority
        super().__init__(method, target, (2, 0), headers, remote, keep_alive=True, upgrade=False)
        self.stream = stream
        self.grpc = headers.get("content-type", "").lower().startswith("application/grpc")


class H2Body:
    """The request body of a stream: read() acknowledges what it hands over."""

    __slots__ = ("_stream", "complete", "length", "trailers")

    def __init__(self, stream: ServerStream, length: int | None) -> None:
        self._stream = stream
        self.complete = stream.next_is_end()
        self.length = length
        self.trailers: Headers | None = None

    @property
    def total(self) -> int:
        """Body bytes received so far (whoever read them)."""
        return self._stream.received

    @property
    def exists(self) -> bool:
        return not self.complete or self.total > 0

    async def read(self) -> bytes:
        while not self.complete:
            kind, value = await self._stream.read()
            if kind == "data":
                self._stream.ack(len(value))
                return bytes(value)
            if kind == "trailers":
                self.trailers = value
            else:
                self.complete = True
        return b""


class H2Response:
    """Writes the proxy's own answers on a stream (pages, refusals); relayed responses go by h2relay.

    ``refuse``, given for gRPC calls, turns a refusal (status >= 400) into the
    single HEADERS block a gRPC client reads its status from.
    """

    __slots__ = ("_body", "finished", "grpc_status", "keep_alive", "reason", "refuse", "sent", "started", "status", "stream")

    def __init__(self, stream: ServerStream, refuse: Callable[[int, str], Headers] | None = None) -> None:
        self.stream = stream
        self.refuse = refuse
        self.keep_alive = True
        self.status = 0
        self.reason = ""
        self.sent = 0
        self.started = False
        self.finished = False
        self._body = b""
        #: The grpc-status of a refusal sent as a gRPC answer.
        self.grpc_status: str | None = None

    @property
    def client_gone(self) -> bool:
        return self.stream.reset is not None or self.stream.endpoint.closed_exc is not None

    def close_after(self) -> None:
        """Nothing to do: the stream ends with its response; the connection goes on."""

    def send(self, status: int, headers: Iterable[tuple[str, str]], body: bytes = b"", reason: str = "") -> None:
        """A complete answer: the head now, the body by ``finish()``."""
        self.status, self.reason, self.started = status, reason, True
        if self.refuse is not None and status >= 400:
            lines = body.decode("utf-8", "replace").strip().splitlines()
            fields = self.refuse(status, lines[0] if lines else reason)
            self.grpc_status = next((v.decode("latin-1") for k, v in fields if k == b"grpc-status"), None)
            self.stream.send_headers(fields, end_stream=True)
            self.finished = True
            return
        out = [(n, v) for n, v in headers if n.lower() != "content-length"]
        out.append(("content-length", str(len(body))))
        self.stream.send_headers(response_headers(status, out), end_stream=not body)
        self._body = body
        self.sent = len(body)
        self.finished = not body

    async def finish(self) -> None:
        """Send what ``send`` left for the window, and end the stream."""
        if self._body:
            body, self._body = self._body, b""
            await self.stream.send_data(body, end_stream=True)
            self.finished = True

    def abort(self) -> None:
        import h2.errors  # loaded already: a stream exists

        self.finished = True
        self.stream.cancel(h2.errors.ErrorCodes.INTERNAL_ERROR)


def response_headers(status: int, headers: Iterable[tuple[str, str]]) -> Headers:
    """A response head as HTTP/2 fields: lower-case names, connection-specific ones left out."""
    out: Headers = [(b":status", b"%d" % status)]
    for name, value in headers:
        lower = name.lower()
        if lower in CONNECTION_SPECIFIC:
            continue
        out.append((lower.encode("latin-1"), value.encode("utf-8", "surrogateescape")))
    return out
