"""The status page: ``/.proxy/`` for people, ``/.proxy/status.json`` for scripts.

Both show the same thing: every route with its audience, the identity it runs
as, seconds until its token expires, how many requests it answered and its
recent errors. Never a token: token state comes from ``TokenCache.status``,
which does not carry one. The browser guard applies here as everywhere.

Counts and errors are collected as each response's head goes out (one
dictionary lookup and an increment per response); an error is a request the proxy
refused or failed (with its one-line reason) or an upstream answer of 401,
403 or 5xx.
"""

from __future__ import annotations

import datetime
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..auth.tokens import TokenCache
from ..config import RESERVED_PREFIX, Config
from ..errors import redact
from ..policy.router import CompiledRoute

PAGE_PATH = RESERVED_PREFIX + "/"
JSON_PATH = RESERVED_PREFIX + "/status.json"
#: Errors kept per route.
RECENT_ERRORS = 10
#: Upstream statuses worth showing although the proxy itself did not fail.
_UPSTREAM_ERRORS = frozenset({401, 403})

_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # The page is ours and static: no script, no framing, nothing fetched.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ErrorRecord:
    time: float
    method: str
    path: str
    status: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": _iso(self.time),
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass
class _Counts:
    requests: int = 0
    errors: deque[ErrorRecord] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))


class RequestStats:
    """Request counts and recent errors per route name ("-": requests no route took)."""

    def __init__(self, route_names: Iterable[str]) -> None:
        self._by_route = {name: _Counts() for name in route_names}
        self.unrouted = _Counts()
        #: HTTP/2 streams served (each is also counted as a request of its route).
        self.http2_streams = 0

    def counts(self, name: str) -> _Counts:
        return self._by_route.get(name, self.unrouted)

    def count(self, method: str, raw_path: str, route: str, status: int, status_reason: str, error: str | None) -> None:
        """Count a response as its head goes out; ``error`` is the proxy's reason if it refused or failed."""
        reason = error
        # The proxy's own pages are not traffic, unless something was refused there.
        if reason is None and raw_path.startswith(PAGE_PATH):
            return
        counts = self._by_route.get(route)
        if counts is None:
            # A route added at run time (a whole project's new service) gets its own counts.
            counts = self.unrouted if route == "-" else self._by_route.setdefault(route, _Counts())
        counts.requests += 1
        if reason is None:
            if status < 500 and status not in _UPSTREAM_ERRORS:
                return
            reason = f"upstream answered {status} {status_reason}"
        # The query may hold secrets: never kept. The path is scrubbed of anything token-shaped.
        path = redact(raw_path.partition("?")[0][:200])
        counts.errors.append(ErrorRecord(time.time(), method, path, status, redact(reason)))


class StatusPage:
    """Builds the status document from the config, the routes, the token cache and the stats."""

    def __init__(
        self,
        config: Config,
        routes: Sequence[CompiledRoute],
        tokens: TokenCache,
        stats: RequestStats,
        reload_info: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self.config = config
        #: The config generation and the last reload's outcome (reload.py).
        self.reload_info = reload_info
        # Kept, not copied: the router's list, which a whole project's refresh updates.
        self.routes = routes
        self.tokens = tokens
        self.stats = stats

    def document(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data. Never a token."""
        routes = []
        for r in self.routes:
            st = self.tokens.status(r.token_key)
            counts = self.stats.counts(r.name)
            routes.append(
                {
                    "name": r.name,
                    "host": r.route.host,
                    "prefix": r.route.prefix,
                    "upstream": r.route.upstream,
                    "audience": r.route.audience,
                    "header": r.route.header,
                    "by_name": r.route.by_name,
                    "region": r.route.region,
                    "custom_audiences": list(r.route.custom_audiences),
                    "identity": st["identity"],
                    "source": st["source"],
                    "email": st["email"],
                    "token_valid": st["valid"],
                    "token_expires_in": st["expires_in"],
                    "token_audience": st["token_audience"],
                    "token_error": st["last_error"],
                    "refreshes": st["refreshes"],
                    "requests": counts.requests,
                    "recent_errors": [e.as_dict() for e in reversed(counts.errors)],
                }
            )
        c = self.config
        return {
            "version": __version__,
            "time": _iso(time.time()),
            "listen": f"{c.listen.host}:{c.listen.port}",
            "browser": {
                "allowed_hosts": list(c.allowed_hosts),
                "allowed_origins": list(c.allowed_origins),
                "cross_site_navigation": c.cross_site_navigation,
            },
            "routes": routes,
            "unrouted": {
                "requests": self.stats.unrouted.requests,
                "recent_errors": [e.as_dict() for e in reversed(self.stats.unrouted.errors)],
            },
            "http2_streams": self.stats.http2_streams,
            **(self.reload_info() if self.reload_info is not None else {}),
        }

    def json_page(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """``GET /.proxy/status.json``."""
        body = json.dumps(self.document(), indent=2) + "\n"
        return 200, [("Content-Type", "application/json; charset=utf-8"), ("Cache-Control", "no-store")], body.encode()

    def html_page(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """``GET /.proxy/``: the same document as an HTML page."""
        headers = [("Content-Type", "text/html; charset=utf-8"), *_PAGE_HEADERS.items()]
        return 200, headers, render_html(self.document()).encode()

    def pages(self) -> dict[str, Callable[[], tuple[int, list[tuple[str, str]], bytes]]]:
        """The page, the JSON, and ``/.proxy`` redirected to the page."""

        def to_page() -> tuple[int, list[tuple[str, str]], bytes]:
            body = b"308: Permanent Redirect"
            return 308, [("Location", PAGE_PATH), ("Content-Type", "text/plain; charset=utf-8")], body

        return {PAGE_PATH: self.html_page, JSON_PATH: self.json_page, RESERVED_PREFIX: to_page}


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _expiry(seconds: float | None, valid: bool) -> str:
    if seconds is None:
        return "no token yet"
    if not valid:
        return "expired" if seconds <= 0 else f"{seconds:.0f} s (too close to expiry to send)"
    minutes, secs = divmod(int(seconds), 60)
    return f"{seconds:.0f} s ({minutes} min {secs:02d} s)"


def _errors_html(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "<span class=muted>none</span>"
    items = "".join(
        f"<li><code>{_e(e['time'])}</code> {_e(e['method'])} <code>{_e(e['path'])}</code> "
        f"<b>{e['status']}</b> {_e(e['reason'])}</li>"
        for e in errors
    )
    return f"<ul>{items}</ul>"


#: What html.escape(quote=True) replaces: the html module would bring html.entities (~0.5 MiB
#: resident) into every proxy for five replacements on a page few ever open.
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"})


def _e(value: object) -> str:
    """``html.escape`` of the value as text ("" for None)."""
    return ("" if value is None else str(value)).translate(_ESCAPES)


def render_html(doc: dict[str, Any]) -> str:
    """The status document as a small static HTML page (everything escaped)."""
    rows = []
    for r in doc["routes"]:
        match = f"{r['host'] or '*'}{r['prefix']}"
        token = _expiry(r["token_expires_in"], r["token_valid"])
        if r["token_error"]:
            token += f"<br><span class=err>last refresh failed: {_e(r['token_error'])}</span>"
        rows.append(
            "<tr>"
            f"<td><b>{_e(r['name'])}</b></td>"
            f"<td><code>{_e(match)}</code></td>"
            f"<td><code>{_e(r['upstream'])}</code>"
            + (f"<br><span class=muted>{_e(r['by_name'])}{' (' + _e(r['region']) + ')' if r.get('region') else ''}</span>" if r.get("by_name") else "")
            + (f"<br><span class=muted>customAudiences: {', '.join(_e(a) for a in r['custom_audiences'])}</span>" if r.get("custom_audiences") else "")
            + "</td>"
            f"<td><code>{_e(r['audience'])}</code><br><span class=muted>{_e(r['header'])} header</span></td>"
            f"<td>{_e(r['email'] or r['identity'])}<br><span class=muted>{_e(r['source'])}</span></td>"
            f"<td>{token}</td>"
            f"<td class=num>{r['requests']}</td>"
            f"<td>{_errors_html(r['recent_errors'])}</td>"
            "</tr>"
        )
    browser = doc["browser"]
    unrouted = doc["unrouted"]
    return (
        "<!doctype html>\n<html><head><meta charset=utf-8><title>idtoken-proxy status</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;text-align:left}"
        ".muted{color:#777}.err{color:#b00}.num{text-align:right}ul{margin:0;padding-left:1.2em}</style>"
        "</head><body>\n"
        f"<h1>idtoken-proxy {_e(doc['version'])}</h1>\n"
        f"<p>Listening on <code>{_e(doc['listen'])}</code> &middot; status at {_e(doc['time'])} "
        f"&middot; <a href=\"status.json\">status.json</a></p>\n"
        + (
            f"<p>Configuration generation {_e(str(doc['generation']))}; last reload: {_e(str(doc.get('last_reload') or 'none'))}</p>\n"
            if "generation" in doc
            else ""
        )
        +
        "<table><tr><th>route</th><th>match</th><th>upstream</th><th>audience</th><th>identity</th>"
        "<th>token expires in</th><th>requests</th><th>recent errors</th></tr>\n"
        + "\n".join(rows)
        + "\n</table>\n"
        f"<h2>Requests no route took</h2><p>{unrouted['requests']} "
        "(refused by the browser guard, no matching route, CORS preflights)</p>"
        f"{_errors_html(unrouted['recent_errors'])}\n"
        "<h2>Browser guard</h2><p>Allowed hosts: localhost, 127.0.0.1, [::1], *.localhost, route hosts"
        + "".join(f", <code>{_e(h)}</code>" for h in browser["allowed_hosts"])
        + "<br>Allowed origins: "
        + (", ".join(f"<code>{_e(o)}</code>" for o in browser["allowed_origins"]) or "the proxy's own only")
        + f"<br>Cross-site navigation: {_e(browser['cross_site_navigation'])}</p>\n"
        "</body></html>\n"
    )
