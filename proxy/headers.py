"""Pure functions over header multidicts: what goes upstream, what comes back.

Rule for requests: strip first, inject last, so nothing a client sends can
override or accompany the token the proxy attaches.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

#: RFC 9110 7.6.1 connection-specific fields (lower case), plus Proxy-Connection.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)

#: Client-sent headers that could carry or forge credentials or provenance.
#: Compared after folding "_" to "-", so X_Forwarded_For is caught too.
_CLIENT_SENSITIVE = frozenset(
    {"authorization", "x-serverless-authorization", "proxy-authorization", "forwarded", "expect", "host"}
)

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def connection_tokens(headers: Headers) -> set[str]:
    """Lower-cased header names listed in every Connection header."""
    names: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


def _dropped_from_request(name: str, named_in_connection: set[str]) -> bool:
    lower = name.lower()
    if lower in HOP_BY_HOP or lower in named_in_connection:
        return True
    folded = lower.replace("_", "-")
    return folded in _CLIENT_SENSITIVE or folded in HOP_BY_HOP or folded.startswith("x-forwarded-")


def upstream_request_headers(
    incoming: Headers,
    *,
    host: str,
    token_header: str,
    token: str,
    client_ip: str | None,
    forwarded_host: str | None,
    forwarded_proto: str = "http",
    keep: Iterable[str] = (),
) -> CIMultiDict[str]:
    """Headers to send upstream for a client request.

    ``host`` is the upstream's Host value. ``token_header`` is ``authorization`` or
    ``x-serverless-authorization``; in the latter mode the client's own
    Authorization passes through untouched, since Cloud Run checks only the
    X-Serverless-Authorization header when both are present. ``keep`` names
    headers to pass even though they would otherwise be stripped.
    """
    keep_lower = {k.lower() for k in keep}
    if token_header == "x-serverless-authorization":
        keep_lower.add("authorization")
    named = connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() in keep_lower and name.lower() not in named and "_" not in name:
            out.add(name, value)
        elif not _dropped_from_request(name, named):
            out.add(name, value)
    # Inject last: nothing above can have left a second copy of these.
    out[hdrs.HOST] = host
    if client_ip:
        out[hdrs.X_FORWARDED_FOR] = client_ip
    out[hdrs.X_FORWARDED_PROTO] = forwarded_proto
    if forwarded_host:
        out[hdrs.X_FORWARDED_HOST] = forwarded_host
    out[token_header] = f"Bearer {token}"
    return out


def downstream_response_headers(incoming: Headers) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones (and those Connection names)."""
    named = connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        out.add(name, value)
    return out


def rewrite_location(value: str, *, upstream: str, prefix: str, proxy_origin: str) -> str:
    """Point a Location that names the upstream back at the proxy.

    ``upstream`` is the route's normalised upstream URL (scheme://host[:port][/base]),
    ``prefix`` the route prefix, ``proxy_origin`` e.g. ``http://localhost:8080``.
    Locations elsewhere (another host, or outside the upstream's base path) pass unchanged.
    """
    try:
        loc = urlsplit(value)
        up = urlsplit(upstream)
        loc_port = loc.port
    except ValueError:
        return value
    base = up.path.rstrip("/")
    if loc.scheme or loc.netloc:
        if loc.scheme.lower() != up.scheme or (loc.hostname or "") != up.hostname:
            return value
        default = 443 if up.scheme == "https" else 80
        if (loc_port or default) != (up.port or default):
            return value
        origin = proxy_origin
    elif value.startswith("/"):
        origin = ""  # path-absolute: stays relative, only the path moves
    else:
        return value  # relative to the current path: already right through the proxy
    path = loc.path or "/"
    if base:
        if path != base and not path.startswith(base + "/"):
            return value
        path = path[len(base):] or "/"
    new_prefix = "" if prefix == "/" else prefix
    if new_prefix and path == "/" and not (loc.path or "").endswith("/") and base:
        path = ""
    result = f"{origin}{new_prefix}{path}"
    if loc.query:
        result += f"?{loc.query}"
    if loc.fragment:
        result += f"#{loc.fragment}"
    return result or "/"
