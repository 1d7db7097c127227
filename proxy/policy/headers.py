"""Pure functions over header multidicts: what goes upstream, what comes back.

Rule for requests: strip first, inject last, so nothing a client sends can
override or accompany the token the proxy attaches.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

#: RFC 9110 7.6.1 connection-specific fields (lower case), plus Proxy-Connection.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)

#: Response headers the upstream may not set: only the proxy grants CORS (guard.py
#: removes them). Access-Control-Allow-Private-Network is among them: it is never sent.
UPSTREAM_CORS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Private-Network",
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
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


#: Header name, as a client spelled it -> whether it is dropped on the way upstream,
#: for requests whose Connection header names nothing (the name alone decides then).
#: Bounded: names past the limit are simply decided each time.
_DROPPED: dict[str, bool] = {}
_DROPPED_MAX = 512


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

    ``host`` is the upstream's Host value. ``token_header`` is ``authorization``,
    ``x-serverless-authorization`` or ``proxy-authorization``; in the latter two
    modes the client's own Authorization passes through untouched, since Cloud
    Run checks only the X-Serverless-Authorization header when both are present
    and IAP reads its token from Proxy-Authorization when the app uses
    Authorization for itself. The client's own Proxy-Authorization is dropped
    in every mode (the token replaces it). ``keep`` names
    headers to pass even though they would otherwise be stripped.
    """
    keep_lower = {k.lower() for k in keep}
    if token_header in ("x-serverless-authorization", "proxy-authorization"):
        keep_lower.add("authorization")
    named = connection_tokens(incoming)
    kept: list[tuple[str, str]] = []
    for name, value in incoming.items():
        if keep_lower and name.lower() in keep_lower and name.lower() not in named and "_" not in name:
            kept.append((name, value))
            continue
        if named:
            dropped = _dropped_from_request(name, named)
        else:
            known = _DROPPED.get(name)
            if known is None:
                known = _dropped_from_request(name, named)
                if len(_DROPPED) < _DROPPED_MAX:
                    _DROPPED[name] = known
            dropped = known
        if not dropped:
            kept.append((name, value))
    out: CIMultiDict[str] = CIMultiDict(kept)
    # Inject last: nothing above can have left a second copy of these.
    out["Host"] = host
    if client_ip:
        out["X-Forwarded-For"] = client_ip
    out["X-Forwarded-Proto"] = forwarded_proto
    if forwarded_host:
        out["X-Forwarded-Host"] = forwarded_host
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


def _after_own_origin(value: str, proxy_host: str) -> str | None:
    """What follows ``http(s)://PROXY_HOST`` in ``value`` (path, query), or None if not ours."""
    lower = value.lower()
    host = proxy_host.lower()
    for scheme in ("http://", "https://"):
        if lower.startswith(scheme) and lower.startswith(host, len(scheme)):
            rest = value[len(scheme) + len(host) :]
            # "http://localhost:80801/" or "http://localhost.evil/" is not "http://localhost:8080".
            if not rest or rest[0] in "/?#":
                return rest
    return None


def rewrite_origin(value: str, *, proxy_host: str, upstream_origin: str) -> str:
    """An ``Origin`` naming the proxy (as the client reached it) becomes the upstream's origin.

    Frameworks' CSRF checks (Django compares Origin with its Host) would refuse
    every same-origin form otherwise. Other origins pass unchanged.
    """
    rest = _after_own_origin(value, proxy_host)
    return upstream_origin if rest == "" else value


def rewrite_referer(value: str, *, proxy_host: str, upstream_origin: str, prefix: str, base_path: str) -> str:
    """A ``Referer`` on the proxy becomes the same page's URL on the upstream.

    Under the route's ``prefix`` the path maps as requests do (prefix off, the
    upstream's ``base_path`` on); a page outside it keeps its path. Referers on
    other origins pass unchanged.
    """
    rest = _after_own_origin(value, proxy_host)
    if rest is None:
        return value
    rest = rest.partition("#")[0]
    path, sep, query = rest.partition("?")
    if prefix == "/":
        path = base_path + path or "/"
    elif path == prefix or path.startswith(prefix + "/"):
        path = base_path + path[len(prefix) :] or "/"
    else:
        path = path or "/"
    return f"{upstream_origin}{path}{sep}{query}"


def rewrite_same_origin(headers: CIMultiDict[str], *, proxy_host: str, upstream_origin: str, prefix: str, base_path: str) -> None:
    """Apply :func:`rewrite_origin` and :func:`rewrite_referer` to upstream-bound headers in place."""
    origin = headers.get("Origin")
    if origin is not None:
        headers["Origin"] = rewrite_origin(origin, proxy_host=proxy_host, upstream_origin=upstream_origin)
    referer = headers.get("Referer")
    if referer is not None:
        headers["Referer"] = rewrite_referer(
            referer, proxy_host=proxy_host, upstream_origin=upstream_origin, prefix=prefix, base_path=base_path
        )


def rewrite_cookie_domain(value: str, *, upstream_host: str) -> str:
    """Drop a ``Set-Cookie`` ``Domain`` attribute that names the upstream host.

    The browser talks to the proxy (``localhost``, ``app.localhost``), which
    would reject a cookie for ``hello-abc.a.run.app``; without ``Domain`` the
    cookie belongs to whatever host the browser used. A Domain naming a parent
    domain of the upstream counts too; any other Domain is left as it is.
    """
    if "domain" not in value.lower():
        return value
    parts = value.split(";")
    kept = [parts[0]]
    host = upstream_host.lower().strip("[]")
    changed = False
    for attribute in parts[1:]:
        name, _, domain = attribute.partition("=")
        if name.strip().lower() == "domain":
            domain = domain.strip().lstrip(".").lower()
            if domain and (host == domain or host.endswith("." + domain)):
                changed = True
                continue
        kept.append(attribute)
    return ";".join(kept) if changed else value


def _default_cookie_path(request_path: str) -> str:
    """RFC 6265 5.1.4: the Path a browser gives a cookie set without a (valid) one."""
    if not request_path.startswith("/") or request_path.count("/") == 1:
        return "/"
    return request_path[: request_path.rindex("/")]


def _mapped_cookie_path(path: str, *, prefix: str, base_path: str) -> str:
    """An upstream cookie path as the same pages' path on the proxy (route ``prefix``)."""
    if path == base_path or path.startswith(base_path + "/"):
        rest = path[len(base_path) :]
        if rest not in ("", "/"):
            return rest if prefix == "/" else prefix + rest
    # The whole route: the upstream's base itself or "/" under it (Path=/a, not /a/,
    # which would not match the page /a); an ancestor of the base too. A path elsewhere
    # on the upstream host names no page reachable through this route, and kept as it
    # is it would name another route's pages on the shared origin: it stays with the route.
    return prefix


def rewrite_cookie_path(value: str, *, prefix: str, base_path: str, request_path: str) -> str:
    """Map a ``Set-Cookie`` ``Path`` from the upstream's paths to the route's on the proxy.

    Several services share the proxy's origin under their route prefixes, and a
    browser sends a cookie to every path under its Path: the upstream's ``Path=/``
    under ``prefix: /a`` becomes ``Path=/a`` (``Path=/x`` becomes ``/a/x``, with the
    upstream's ``base_path`` taken off first), like nginx's ``proxy_cookie_path``, so
    the cookie of the service at /a is not sent to the one at /b. ``request_path`` is
    the raw path the client asked the proxy for. Other attributes are kept as they are.
    """
    if prefix == "/" and not base_path:
        return value  # the upstream's paths are the proxy's: nothing to map
    parts = value.split(";")
    changed = False
    seen = False
    # Without a Path (or with one not starting with "/") the browser takes the
    # directory of the path it requested (RFC 6265 5.1.4, 5.2.4). That is already the
    # upstream's own default mapped under the prefix (/a/x/y -> /a/x against /x), with
    # one exception: a request for the prefix itself (/a) defaults to its parent ("/"),
    # which would reach every route. Only then is Path set: to the prefix.
    default = _default_cookie_path(request_path)
    default_ok = prefix == "/" or default == prefix or default.startswith(prefix + "/")
    for i in range(1, len(parts)):
        name, _eq, path = parts[i].partition("=")
        if name.strip().lower() != "path":
            continue
        seen = True
        path = path.strip()
        if path.startswith("/"):
            new = _mapped_cookie_path(path, prefix=prefix, base_path=base_path)
        elif default_ok:
            continue
        else:
            new = prefix
        if new != path:
            lead = name[: len(name) - len(name.lstrip())]
            parts[i] = f"{lead}{name.strip()}={new}"
            changed = True
    if not seen and not default_ok:
        parts.append(f" Path={prefix}")
        changed = True
    return ";".join(parts) if changed else value


def rewrite_set_cookies(
    headers: CIMultiDict[str], *, upstream_host: str, prefix: str = "/", base_path: str = "", request_path: str = "/"
) -> None:
    """Apply :func:`rewrite_cookie_domain` and :func:`rewrite_cookie_path` to every ``Set-Cookie``, in place."""
    cookies = headers.popall("Set-Cookie", [])
    for cookie in cookies:
        cookie = rewrite_cookie_domain(cookie, upstream_host=upstream_host)
        cookie = rewrite_cookie_path(cookie, prefix=prefix, base_path=base_path, request_path=request_path)
        headers.add("Set-Cookie", cookie)
