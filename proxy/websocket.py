"""Websocket upgrades: which headers each hop's handshake carries.

The upgrade request gets the same treatment as any request (guard, route,
token, header rules) and is checked before the upstream is contacted. Its
handshake headers (key, version, offered subprotocols and extensions) go to
the upstream as the client sent them, and the upstream's answer (accept key,
chosen subprotocol and extensions) comes back as it sent it: the two ends
negotiate end to end, so permessage-deflate just passes, and the bytes after
the 101 are relayed as they are (engine/tunnel.py).

The other headers of the upstream's 101 reach the client except hop-by-hop
ones, framing, Date and Server (the client's hop writes its own) and CORS; its
cookies are rewritten as on any response (headers.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from .engine.tunnel import BAD_GATEWAY, GOING_AWAY
from .policy.headers import Headers, downstream_response_headers, rewrite_set_cookies

#: Handshake headers, passed end to end.
HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)
_HANDSHAKE_LOWER = frozenset(name.lower() for name in HANDSHAKE)
#: Headers of the upstream's 101 that switching_headers leaves out, besides hop-by-hop ones.
_NOT_RELAYED_101 = frozenset(name.lower() for name in (*HANDSHAKE, "Content-Length", "Transfer-Encoding", "Date", "Server"))
#: Close codes a peer may send on the wire.
OK = 1000


def handshake_headers(headers: Iterable[tuple[str, str]] | CIMultiDict[str]) -> list[tuple[str, str]]:
    """The websocket handshake headers among ``headers``, in order."""
    items = headers.items() if isinstance(headers, CIMultiDict) else headers
    return [(name, value) for name, value in items if name.lower() in _HANDSHAKE_LOWER]


def _tokens(values: Iterable[str]) -> set[str]:
    """The names in comma-separated header values (an extension's parameters left out)."""
    return {item.split(";", 1)[0].strip().lower() for value in values for item in value.split(",") if item.strip()}


def agreed_handshake(request: CIMultiDict[str], answer: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's handshake answer, less any extension or subprotocol the client did not offer."""
    offered_extensions = _tokens(request.getall("Sec-WebSocket-Extensions", ()))
    offered_protocols = _tokens(request.getall("Sec-WebSocket-Protocol", ()))
    out = []
    for name, value in answer:
        lower = name.lower()
        if lower == "sec-websocket-extensions" and not _tokens([value]) <= offered_extensions:
            continue
        if lower == "sec-websocket-protocol" and value.strip().lower() not in offered_protocols:
            continue
        out.append((name, value))
    return out


def sendable_code(code: int | None) -> int:
    """A close code that may go on the wire for one received (1005/1006 may not)."""
    if code is None or code in (0, OK, 1005):
        return OK
    if code in (1006, 1015):
        return BAD_GATEWAY
    return code


def switching_headers(
    upstream_101: Headers, *, upstream_host: str, prefix: str = "/", base_path: str = "", request_path: str = "/"
) -> CIMultiDict[str]:
    """The headers of the upstream's 101 that go into the client's 101.

    End-to-end headers pass (Set-Cookie rewritten as on any response:
    :func:`~proxy.headers.rewrite_set_cookies`); hop-by-hop ones do not, nor the
    handshake's own, framing, Date and Server, which the client's hop writes itself,
    nor CORS headers (the proxy's guard decides CORS; browsers ignore it on a 101).
    """
    out = downstream_response_headers(upstream_101)
    for name in _NOT_RELAYED_101:
        out.popall(name, None)
    for name in [n for n in out if n.lower().startswith("access-control-")]:
        out.popall(name, None)
    if "Set-Cookie" in out:
        rewrite_set_cookies(out, upstream_host=upstream_host, prefix=prefix, base_path=base_path, request_path=request_path)
    return out


__all__ = ["BAD_GATEWAY", "GOING_AWAY", "HANDSHAKE", "agreed_handshake", "handshake_headers", "sendable_code", "switching_headers"]
