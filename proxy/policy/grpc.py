"""gRPC's view of the proxy's own refusals: the status a gRPC client understands.

When the proxy itself fails a request whose ``content-type`` starts with
``application/grpc``, it answers as gRPC servers do (PROTOCOL-HTTP2.md): a
trailers-only response, HTTP 200, with ``grpc-status`` and a percent-encoded
``grpc-message`` carrying the one-line reason. The status follows the gRPC
project's HTTP-to-gRPC mapping (``doc/http-grpc-status-mapping.md``), as Envoy
does for its own replies; the proxy's own upstream timeout is
DEADLINE_EXCEEDED. An upstream's own answer is never rewritten.
"""

from __future__ import annotations

OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

#: doc/http-grpc-status-mapping.md; anything else is UNKNOWN.
_FROM_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def is_grpc(content_type: str | bytes | None) -> bool:
    if content_type is None:
        return False
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.lower().startswith("application/grpc")


def status_for(http_status: int, *, deadline: bool = False) -> int:
    """The grpc-status for a refusal the proxy would give with ``http_status``."""
    if deadline:
        return DEADLINE_EXCEEDED
    return _FROM_HTTP.get(http_status, UNKNOWN)


def encode_message(text: str) -> bytes:
    """Percent-encode a grpc-message: bytes outside printable ASCII, and '%' (PROTOCOL-HTTP2.md)."""
    out = bytearray()
    for b in text.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def trailers_only(http_status: int, reason: str, *, deadline: bool = False, content_type: bytes = b"application/grpc") -> list[tuple[bytes, bytes]]:
    """The single HEADERS block (with END_STREAM) of a gRPC error answer."""
    return [
        (b":status", b"200"),
        (b"content-type", content_type),
        (b"grpc-status", b"%d" % status_for(http_status, deadline=deadline)),
        (b"grpc-message", encode_message(reason)),
    ]


def refusal(http_status: int, reason: str) -> list[tuple[bytes, bytes]]:
    """The proxy's own refusal of a gRPC call; its one 504 is its own upstream timeout."""
    return trailers_only(http_status, reason, deadline=http_status == 504)
