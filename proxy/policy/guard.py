"""The browser guard: who may make a browser send requests through this proxy.

Anyone who can make a browser send a request to the proxy acts with the
proxy's Google identity, so the guard runs first on every request (proxied
ones, websocket upgrades, the proxy's own ``/.proxy/`` pages), before any token
is fetched or any upstream is contacted:

1. Host allowlist on the raw ``Host`` header (stops DNS rebinding): localhost,
   127.0.0.1, [::1], ``*.localhost``, the config's ``allowed_hosts`` and route
   ``host:`` names; case-insensitive, port ignored. Else 403 (400 if malformed).
2. Cross-site requests are treated as the web treats ``SameSite=Lax`` cookies:
   an ``Origin`` that is the proxy's own or listed in ``allowed_origins``
   passes; otherwise ``Sec-Fetch-Site: cross-site``/``same-site`` or any other
   ``Origin`` (``null`` included) is refused with 403, except a top-level GET or
   HEAD navigation (unless ``cross_site_navigation: refuse``). Requests without
   these headers (curl, SDKs, servers) pass.
3. CORS for ``allowed_origins``: preflights are answered here; on every
   response the upstream's ``Access-Control-Allow-*`` headers are dropped and,
   for an allowed origin, the proxy's own are set. The proxy never sends
   ``Access-Control-Allow-Private-Network``.

All sets are computed once; a request costs a few dictionary lookups.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict

from ..config import Config, normalize_origin
from ..errors import BadRequest, Forbidden, ProxyError
from .headers import UPSTREAM_CORS

log = logging.getLogger(__name__)

#: Host names every proxy accepts: loopback by name and by address.
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})

_CROSS = frozenset({"cross-site", "same-site"})
_NAVIGATION_METHODS = frozenset({"GET", "HEAD"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DNS_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+")
_BAD_HOST_CHARS = re.compile(r"[\x00-\x20\x7f/\\?#]")
#: Seconds a browser may cache a preflight answer.
PREFLIGHT_MAX_AGE = "600"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the guard decided about one request."""

    allowed: bool
    #: 400 or 403 when refused.
    status: int = 200
    #: One line for the refusal body and the log.
    reason: str = ""
    hint: str | None = None
    #: The allowed origin to answer CORS for, if the request comes from one.
    cors_origin: str | None = None
    #: A CORS preflight from an allowed origin: the guard answers it itself.
    preflight: bool = False


PASS = Verdict(True)
#: Allowed Host values remembered (Guard.check_host).
_HOST_CACHE_SIZE = 64


def _refuse(status: int, reason: str, hint: str | None = None) -> Verdict:
    return Verdict(False, status, reason, hint)


def _show(value: str) -> str:
    """A client-sent value, quoted and bounded, for a reason line."""
    return repr(value[:100] + ("..." if len(value) > 100 else ""))


class Guard:
    """Host allowlist, Origin / Sec-Fetch-* policy and CORS, built once from the config."""

    def __init__(self, config: Config) -> None:
        exact = set(LOCAL_HOSTS)
        suffixes = [".localhost"]
        for name in config.allowed_hosts:
            name = name.lower().rstrip(".")
            if name.startswith("*."):
                suffixes.append(name[1:])
            else:
                exact.add(name)
        # A route's host is where the user means to browse: it is allowed implicitly.
        for route in config.routes:
            if route.host:
                exact.add(route.host.lower().rstrip("."))
        # So is the address the proxy was told to listen on (unless it is a wildcard).
        listen = config.listen.host.lower().strip("[]")
        if listen not in ("", "0.0.0.0", "::"):
            exact.add(f"[{listen}]" if ":" in listen else listen)
        self.hosts = frozenset(exact)
        self.host_suffixes = tuple(suffixes)
        # Compared with the lower-cased Origin a browser sends (no default port): a
        # Config built in code gets the loader's normalisation here too (idempotent).
        self.origins = frozenset(normalize_origin(o) for o in config.allowed_origins)
        self.refuse_navigation = config.cross_site_navigation == "refuse"
        self._allowed_hint = (
            "browse to localhost, 127.0.0.1, [::1] or a *.localhost name, or add this name to allowed_hosts"
        )
        #: Host values seen and allowed: a client sends the same one on every request.
        self._allowed_host_values: set[str] = set()

    # -- decisions (pure: method and headers in, verdict out) ----------------------

    def host_allowed(self, name: str) -> bool:
        """Whether a lower-cased host name (no port) may be used to reach the proxy."""
        if name in self.hosts:
            return True
        # A wildcard matches plain DNS names only: "evil@app.localhost" is no name of ours.
        return name.endswith(self.host_suffixes) and _DNS_NAME.fullmatch(name) is not None

    def check_host(self, value: str | None) -> Verdict:
        """The Host allowlist (DNS rebinding: a foreign name that resolves to us)."""
        if value in self._allowed_host_values:
            return PASS
        verdict = self._check_host(value)
        if verdict is PASS and value is not None and len(self._allowed_host_values) < _HOST_CACHE_SIZE:
            # Bounded: a client cycling through allowed spellings cannot grow it without end.
            self._allowed_host_values.add(value)
        return verdict

    def _check_host(self, value: str | None) -> Verdict:
        if value is None:
            return _refuse(403, "request has no Host header", "send Host: localhost")
        if not value or _BAD_HOST_CHARS.search(value):
            return _refuse(400, f"malformed Host header {_show(value)}")
        lower = value.lower()
        if lower.startswith("["):
            end = lower.find("]")
            if end < 0:
                return _refuse(400, f"malformed Host header {_show(value)}")
            name, rest = lower[: end + 1], lower[end + 1 :]
            if rest and not rest.startswith(":"):
                return _refuse(400, f"malformed Host header {_show(value)}")
            port = rest[1:] if rest else None
        else:
            name, sep, port_text = lower.rpartition(":")
            if not sep:
                name, port = lower, None
            else:
                port = port_text
        if port is not None and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            return _refuse(400, f"malformed Host header {_show(value)} (bad port)")
        if not name or name == "[]":
            return _refuse(400, f"malformed Host header {_show(value)} (no host name)")
        # "localhost." is localhost (a fully qualified name); only one dot goes.
        name = name.removesuffix(".")
        if not self.host_allowed(name):
            return _refuse(403, f"Host {_show(value)} is not allowed", self._allowed_hint)
        return PASS

    def check_origin(self, method: str, host: str, headers: Mapping[str, str]) -> Verdict:
        """The cross-site policy for a request whose Host passed (``host`` as sent)."""
        origin = headers.get("Origin")
        site = headers.get("Sec-Fetch-Site")
        if origin is None and site is None:
            # Not a browser (curl, SDKs, servers), or a browser's own same-origin GET.
            return PASS
        if origin is not None:
            lowered = origin.lower()
            if _is_own_origin(lowered, host.lower()):
                return PASS
            if lowered in self.origins:
                # An allowed origin wins over Sec-Fetch-Site (another port is "same-site").
                preflight = method == "OPTIONS" and "Access-Control-Request-Method" in headers
                return Verdict(True, cors_origin=lowered, preflight=preflight)
            cross = f"Origin {_show(origin)}"
        elif site in _CROSS:
            cross = f"Sec-Fetch-Site {site}"
        else:
            # same-origin, or none (typed URL, bookmark): the user's own doing.
            return PASS
        # Links and OAuth redirects from other sites land here as top-level navigations.
        if (
            method in _NAVIGATION_METHODS
            and headers.get("Sec-Fetch-Mode") == "navigate"
            and headers.get("Sec-Fetch-Dest") == "document"
        ):
            if not self.refuse_navigation:
                return PASS
            return _refuse(
                403,
                f"cross-site navigation refused ({cross}; cross_site_navigation: refuse)",
                "open the page from the proxy itself, or set cross_site_navigation: allow",
            )
        return _refuse(
            403,
            f"cross-site request refused ({cross})",
            "a page on another origin may not use this proxy's identity; list that origin in allowed_origins to allow it",
        )

    def decide(self, method: str, headers: Mapping[str, str]) -> Verdict:
        """Every check, in order: Host, then Origin / Sec-Fetch-*."""
        host = headers.get("Host")
        verdict = self.check_host(host)
        if not verdict.allowed:
            return verdict
        assert host is not None
        return self.check_origin(method, host, headers)

    # -- the response side ---------------------------------------------------------

    def adds_nothing(self, cors_origin: str | None) -> bool:
        """Whether finish_headers leaves a response as it is, given that the response
        has none of the upstream CORS headers it removes."""
        return not self.origins and cors_origin is None

    def finish_headers(self, headers: CIMultiDict[str], status: int, cors_origin: str | None, preflight: bool = False) -> None:
        """Replace whatever CORS headers a response carries with the proxy's own."""
        if status == 101:
            return
        if not preflight:
            for name in UPSTREAM_CORS:
                if name in headers:
                    del headers[name]
        if cors_origin is not None:
            headers["Access-Control-Allow-Origin"] = cors_origin
            headers["Access-Control-Allow-Credentials"] = "true"
        if self.origins:
            # The answer depends on Origin: caches must not hand one origin's to another.
            _add_vary(headers, "Origin")


def _is_own_origin(origin: str, host: str) -> bool:
    """``http://HOST`` (or https, behind a TLS terminator) for the Host the request was sent to."""
    if origin.startswith("http://"):
        return origin[7:] == host
    if origin.startswith("https://"):
        return origin[8:] == host
    return False


def _add_vary(headers: CIMultiDict[str], name: str) -> None:
    existing = headers.get("Vary")
    if existing is None:
        headers["Vary"] = name
    elif name.lower() not in (v.strip().lower() for v in existing.split(",")) and existing.strip() != "*":
        headers["Vary"] = f"{existing}, {name}"


def log_refusal(method: str, target: str, verdict: Verdict) -> None:
    """The guard's INFO line for a request it refused (the path without its query, bounded)."""
    log.info("refused %s %s: %s", method, target.partition("?")[0][:200], verdict.reason)


def log_preflight(headers: Mapping[str, str], target: str, origin: str | None) -> None:
    log.debug(
        "answered the CORS preflight for %s %s from %s",
        headers.get("Access-Control-Request-Method", "")[:20],
        target.partition("?")[0][:200],
        origin,
    )


def refusal(verdict: Verdict) -> ProxyError:
    """The error a refused verdict is answered with."""
    if verdict.status == 400:
        return BadRequest(verdict.reason, verdict.hint)
    return Forbidden(verdict.reason, verdict.hint)


def preflight_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers of the proxy's own 204 answer to a CORS preflight from an allowed origin.

    The requested method and headers are granted (the origin is trusted); the
    upstream never sees the preflight, since it would not carry a token an
    upstream could check and an upstream ``*`` must not decide.
    """
    out: CIMultiDict[str] = CIMultiDict(
        {
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
    )
    method = headers.get("Access-Control-Request-Method", "").strip()
    if _TOKEN.fullmatch(method):
        out["Access-Control-Allow-Methods"] = method
    requested = [h.strip() for h in headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
    allowed = [h for h in requested if _TOKEN.fullmatch(h)]
    if allowed:
        out["Access-Control-Allow-Headers"] = ", ".join(allowed)
    # Allow-Origin and Allow-Credentials are added by finish_headers, like on every answer.
    return out
