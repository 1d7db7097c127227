"""Route matching on the raw request target, and the upstream request target it maps to.

Matching uses the raw path (not a percent-decoded one, and no dot segments are
resolved), so what is matched is exactly what is forwarded. Requests go to the
route's configured scheme, host and port only: the upstream target is sent as
a path and never parsed as a URL, so nothing in the request can change the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote

from ..auth.tokens import TokenKey
from ..config import RESERVED_PREFIX, Route
from ..errors import BadRequest, NoRoute


class Target(NamedTuple):
    """A request target split once: raw path and raw query (without '?').

    A named tuple rather than a frozen dataclass: one is made per request.
    """

    path: str
    query: str


@dataclass(frozen=True)
class CompiledRoute:
    """A route with everything the hot path needs computed once at startup."""

    route: Route
    token_key: TokenKey
    scheme: str
    host: str
    port: int
    base_path: str
    #: Host header value for the upstream (port omitted when default).
    host_header: str
    #: ``scheme://host[:port]`` of the upstream, for Origin rewriting and checks.
    origin: str

    @property
    def name(self) -> str:
        return self.route.name

    def upstream_target(self, rest: str, query: str) -> str:
        """The origin-form request target upstream for the raw path remainder ``rest`` and raw ``query``.

        Sent to the route's own scheme, host and port (engine/upstream.py's Origin),
        never parsed as a URL: nothing in it can change where it goes.
        """
        path = self.base_path + rest or "/"
        return f"{path}?{query}" if query else path


def compile_route(route: Route, token_key: TokenKey) -> CompiledRoute:
    scheme, host, port, base = route.upstream_parts
    default = 443 if scheme == "https" else 80
    host_lit = f"[{host}]" if ":" in host else host
    host_header = host_lit if port == default else f"{host_lit}:{port}"
    return CompiledRoute(
        route=route,
        token_key=token_key,
        scheme=scheme,
        host=host,
        port=port,
        base_path=base,
        host_header=host_header,
        origin=f"{scheme}://{host_header}",
    )


def split_target(raw: str) -> Target:
    """Validate an origin-form request target and split off the query.

    Absolute-form (``http://evil/``), authority-form and ``*`` are refused, as are
    ``.``/``..`` segments (raw or percent-encoded), so that matching and the
    upstream can never disagree about which path is meant.
    """
    if not raw.startswith("/"):
        if raw == "*":
            raise BadRequest("asterisk-form request target (OPTIONS *) is not proxied")
        raise BadRequest("request target must be a path (absolute-form targets are not proxied)")
    path, _sep, query = raw.partition("?")
    path = path.partition("#")[0]
    if "." not in path and "%" not in path:
        return Target(path, query)
    for segment in path.split("/"):
        if "." in segment or "%" in segment:
            decoded = unquote(segment)
            if decoded in (".", "..") or ("/" in decoded and any(p in (".", "..") for p in decoded.split("/"))):
                raise BadRequest("path contains a . or .. segment")
    return Target(path, query)


class Router:
    """Longest-prefix match, whole segments, host routes before host-less ones."""

    def __init__(self, routes: list[CompiledRoute]) -> None:
        #: The current table. ``replace`` changes this very list in place, so whoever
        #: holds it (the status page) sees the table as it is now.
        self.routes = routes
        self._index(routes, {})

    def _index(self, routes: list[CompiledRoute], gone: dict[str, str]) -> None:
        by_host: dict[str | None, list[CompiledRoute]] = {}
        for r in routes:
            by_host.setdefault(r.route.host, []).append(r)
        # Longest prefix first, so the first match wins. replace() runs on the event
        # loop, between the steps of requests: each match sees one whole table.
        self._by_host = {h: sorted(rs, key=lambda r: len(r.route.prefix), reverse=True) for h, rs in by_host.items()}
        self.hosts = frozenset(h for h in self._by_host if h)
        self._gone = gone

    def replace(self, routes: list[CompiledRoute], gone: dict[str, str] | None = None) -> None:
        """Make ``routes`` the table (a whole project's services, re-listed at run time).

        ``gone`` maps host names no longer served to the reason a request for them
        gets (404).
        """
        self._index(routes, dict(gone or {}))
        self.routes[:] = routes

    def match(self, host: str | None, target: Target) -> tuple[CompiledRoute, str]:
        """The route for a request and the raw path remainder to forward."""
        path = target.path
        if path == RESERVED_PREFIX or path.startswith(RESERVED_PREFIX + "/"):
            raise NoRoute(f"{RESERVED_PREFIX}/ is reserved for the proxy's own pages")
        candidates = self._by_host.get(host) if host else None
        if candidates is None:
            if host and host in self._gone:
                raise NoRoute(self._gone[host])
            candidates = self._by_host.get(None)
            if candidates is None and self.hosts:
                # Only host routes (a whole project): say where the services are.
                shown = ", ".join(sorted(self.hosts)[:20]) + (", ..." if len(self.hosts) > 20 else "")
                raise NoRoute(f"no service is served at {host or 'this host'}; the services are at {shown}")
            candidates = candidates or []
        for r in candidates:
            prefix = r.route.prefix
            if prefix == "/":
                return r, path
            if path == prefix:
                return r, ""
            if path.startswith(prefix) and path[len(prefix)] == "/":
                return r, path[len(prefix):]
        prefixes = ", ".join(r.route.prefix for r in candidates) or "none"
        raise NoRoute(f"no route for {path}; configured prefixes: {prefixes}")
