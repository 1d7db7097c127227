"""Pure functions: header rules, Location rewriting, target splitting, route matching."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL
from multidict import CIMultiDict

from proxy.config import Route
from proxy.errors import BadRequest, NoRoute
from proxy.policy.headers import (
    downstream_response_headers,
    rewrite_cookie_path,
    rewrite_location,
    rewrite_referer,
    rewrite_set_cookies,
    upstream_request_headers,
)
from proxy.policy.router import Router, compile_route, split_target
from proxy.auth.tokens import TokenKey
from proxy.engine.upstream import UpstreamConnection


def up(headers, mode="authorization"):
    return upstream_request_headers(
        CIMultiDict(headers),
        host="svc.run.app",
        token_header=mode,
        token="TOKEN",
        client_ip="127.0.0.1",
        forwarded_host="localhost:8080",
    )


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authorization",
        "Forwarded",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "X_Forwarded_For",
        "X-Serverless-Authorization",
        "X_Serverless_Authorization",
        "Authorization",
        "Host",
        "Expect",
    ],
)
def test_client_header_is_not_forwarded_as_sent(name):
    out = up([(name, "client-value"), ("Accept", "text/html")])
    assert "client-value" not in out.values(), out
    assert out["Accept"] == "text/html"


def test_injected_headers_are_single_and_last_word():
    out = up([("Authorization", "Bearer evil"), ("Host", "evil.example"), ("X-Forwarded-For", "1.2.3.4")])
    assert out.getall("Authorization") == ["Bearer TOKEN"]
    assert out.getall("Host") == ["svc.run.app"]
    assert out.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert out["X-Forwarded-Proto"] == "http"
    assert out["X-Forwarded-Host"] == "localhost:8080"


def test_headers_named_in_connection_are_dropped():
    out = up([("Connection", "close, X-Secret"), ("X-Secret", "s"), ("X-Keep", "k")])
    assert "X-Secret" not in out and "Connection" not in out
    assert out["X-Keep"] == "k"


def test_connection_naming_authorization_still_gets_the_token():
    out = up([("Connection", "Authorization, X-Serverless-Authorization"), ("Authorization", "Bearer evil")])
    assert out.getall("Authorization") == ["Bearer TOKEN"]


def test_serverless_mode_keeps_the_clients_authorization():
    out = up([("Authorization", "Basic app-credential"), ("X-Serverless-Authorization", "Bearer evil")], mode="x-serverless-authorization")
    assert out.getall("Authorization") == ["Basic app-credential"]
    assert out.getall("x-serverless-authorization") == ["Bearer TOKEN"]


def test_serverless_mode_drops_authorization_named_in_connection():
    out = up([("Connection", "authorization"), ("Authorization", "Basic x")], mode="x-serverless-authorization")
    assert "Authorization" not in out


def test_response_hop_by_hop_is_stripped():
    out = downstream_response_headers(
        CIMultiDict(
            [
                ("Connection", "X-Internal"),
                ("X-Internal", "1"),
                ("Transfer-Encoding", "chunked"),
                ("Keep-Alive", "timeout=5"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Content-Length", "10"),
            ]
        )
    )
    assert list(out.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Length", "10")]


@pytest.mark.parametrize(
    "location, upstream, prefix, expected",
    [
        ("https://svc.run.app/login?x=1", "https://svc.run.app", "/hello", "http://localhost:8080/hello/login?x=1"),
        ("https://svc.run.app:443/a#f", "https://svc.run.app", "/", "http://localhost:8080/a#f"),
        ("https://SVC.run.app/a", "https://svc.run.app", "/", "http://localhost:8080/a"),
        ("https://svc.run.app/fn/next", "https://r-p.net/fn", "/", "https://svc.run.app/fn/next"),
        ("https://r-p.net/fn/next", "https://r-p.net/fn", "/f", "http://localhost:8080/f/next"),
        ("https://r-p.net/fn", "https://r-p.net/fn", "/f", "http://localhost:8080/f"),
        ("https://r-p.net/other", "https://r-p.net/fn", "/f", "https://r-p.net/other"),
        ("http://svc.run.app/a", "https://svc.run.app", "/", "http://svc.run.app/a"),
        ("https://svc.run.app:8443/a", "https://svc.run.app", "/", "https://svc.run.app:8443/a"),
        ("https://accounts.google.com/o/oauth2", "https://svc.run.app", "/", "https://accounts.google.com/o/oauth2"),
        ("/login", "https://svc.run.app", "/hello", "/hello/login"),
        ("/fn/x", "https://r-p.net/fn", "/f", "/f/x"),
        ("next", "https://svc.run.app", "/hello", "next"),
        ("//evil.example/x", "https://svc.run.app", "/", "//evil.example/x"),
    ],
)
def test_rewrite_location(location, upstream, prefix, expected):
    assert rewrite_location(location, upstream=upstream, prefix=prefix, proxy_origin="http://localhost:8080") == expected


@pytest.mark.parametrize(
    "raw, path, query",
    [
        ("/a/b?x=1&y=%20", "/a/b", "x=1&y=%20"),
        ("/a?", "/a", ""),
        ("//evil.example/x", "//evil.example/x", ""),
        ("/http://evil/x", "/http://evil/x", ""),
        ("/a%2Fb", "/a%2Fb", ""),
        ("/.well-known/x", "/.well-known/x", ""),
        ("/a/..b/c.", "/a/..b/c.", ""),
    ],
)
def test_split_target_accepts(raw, path, query):
    t = split_target(raw)
    assert (t.path, t.query) == (path, query)


@pytest.mark.parametrize(
    "raw",
    [
        "http://evil/x",
        "*",
        "evil.example:443",
        "/a/../b",
        "/a/./b",
        "/a/%2e%2e/b",
        "/a/%2E/b",
        "/..",
        "/a/.%2e",
        "/a/%2e%2e%2fb",
        "/a/x%2f.%2fb",  # an encoded slash hides a . segment
        "/a/x%2F..",
    ],
)
def test_split_target_refuses(raw):
    with pytest.raises(BadRequest):
        split_target(raw)


def _router(*specs):
    routes = []
    for i, (prefix, upstream, host) in enumerate(specs):
        r = Route(name=f"r{i}", prefix=prefix, upstream=upstream, audience=upstream, host=host)
        routes.append(compile_route(r, TokenKey("id", upstream)))
    return Router(routes)


@pytest.mark.parametrize(
    "path, route, rest",
    [
        ("/hello", "r0", ""),
        ("/hello/", "r0", "/"),
        ("/hello/x/y", "r0", "/x/y"),
        ("/helloworld", "r2", "/helloworld"),
        ("/hello/api/v1", "r1", "/v1"),
        ("/hello/apiv1", "r0", "/apiv1"),
        ("/", "r2", "/"),
    ],
)
def test_longest_whole_segment_prefix_wins(path, route, rest):
    router = _router(("/hello", "https://a.run.app", None), ("/hello/api", "https://b.run.app", None), ("/", "https://c.run.app", None))
    r, got_rest = router.match("localhost", split_target(path))
    assert (r.name, got_rest) == (route, rest)


def test_no_match_names_the_prefixes():
    router = _router(("/a", "https://a.run.app", None), ("/b", "https://b.run.app", None))
    with pytest.raises(NoRoute, match="configured prefixes: /a, /b"):
        router.match("localhost", split_target("/c"))


def test_reserved_prefix_is_never_routed():
    router = _router(("/", "https://a.run.app", None))
    with pytest.raises(NoRoute):
        router.match("localhost", split_target("/.proxy/x"))


def test_host_routes_before_hostless():
    router = _router(("/", "https://a.run.app", "app.localhost"), ("/", "https://b.run.app", None))
    assert router.match("app.localhost", split_target("/x"))[0].name == "r0"
    assert router.match("localhost", split_target("/x"))[0].name == "r1"


@pytest.mark.parametrize(
    "upstream, rest, query, expected",
    [
        ("https://a.run.app", "/x", "q=1", "https://a.run.app/x?q=1"),
        ("https://a.run.app", "", "", "https://a.run.app/"),
        ("https://r-p.net/fn", "", "", "https://r-p.net/fn"),
        ("https://r-p.net/fn", "/", "", "https://r-p.net/fn/"),
        ("https://a.run.app", "//evil.example/x", "", "https://a.run.app//evil.example/x"),
        ("https://a.run.app", "/http://evil/x", "a=%2F", "https://a.run.app/http://evil/x?a=%2F"),
        ("https://a.run.app", "/a%2Fb%20c", "x=%zz&y", "https://a.run.app/a%2Fb%20c?x=%zz&y"),
        ("http://127.0.0.1:9000/base", "/x", "", "http://127.0.0.1:9000/base/x"),
    ],
)
def test_upstream_target_keeps_the_configured_host_and_raw_bytes(upstream, rest, query, expected):
    # yarl (the tests' own, through aiohttp) is the oracle: the target the proxy sends, put
    # after the route's scheme, host and port, is the URL expected, and parses back to that host.
    route = _router(("/", upstream, None)).routes[0]
    target = route.upstream_target(rest, query)
    url = URL(f"{route.scheme}://{route.host_header}{target}", encoded=True)
    assert str(url) == expected
    assert url.host == route.host and url.port == route.port
    assert url.raw_path_qs == target


@pytest.mark.parametrize(
    "raw",
    [
        [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")],
        [(b"Connection", b"keep-alive, X-Drop"), (b"X-Drop", b"1"), (b"x-drop", b"2"), (b"X-Keep", b"3")],
        [(b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"), (b"Trailer", b"X")],
        [(b"connection", b"close"), (b"CONNECTION", b" Set-Cookie ,,"), (b"Set-Cookie", b"a=1"), (b"Vary", b"Origin")],
        [(b"X-Bytes", "caf\u00e9".encode()), (b"X-Raw", b"\xff\xfe"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
    ],
)
async def test_lean_response_headers_match_the_session_paths_rule(raw):
    # The lean path filters while decoding; the session path decodes, then filters.
    conn = UpstreamConnection(asyncio.get_running_loop())
    for name, value in raw:
        conn.on_header(name, value)  # as the parser hands them over
    # As aiohttp's client decodes a response head (utf-8, surrogateescape), then the rule.
    decoded = CIMultiDict((n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in raw)
    expected = downstream_response_headers(decoded)
    assert list(conn.client_headers().items()) == list(expected.items())


# --------------------------------------------------------------------------- the upstream's Host and origin


@pytest.mark.parametrize(
    "upstream, host_header, port",
    [
        # Cloud Run routes on its own name: the Host an https://...:443 upstream receives has no port.
        ("https://hello-abc-uc.a.run.app", "hello-abc-uc.a.run.app", 443),
        ("https://hello-abc-uc.a.run.app:443", "hello-abc-uc.a.run.app", 443),
        ("https://svc.example:8443", "svc.example:8443", 8443),
        ("https://svc.example:80", "svc.example:80", 80),  # 80 is http's default, not https's
        ("http://127.0.0.1", "127.0.0.1", 80),
        ("http://127.0.0.1:80", "127.0.0.1", 80),
        ("http://127.0.0.1:443", "127.0.0.1:443", 443),
        ("http://127.0.0.1:9000/base", "127.0.0.1:9000", 9000),
        # IPv6: the address in brackets, with or without the port.
        ("http://[::1]:9000", "[::1]:9000", 9000),
        ("http://[::1]", "[::1]", 80),
        ("https://[2001:db8::1]", "[2001:db8::1]", 443),
        ("https://[2001:db8::1]:8443/fn", "[2001:db8::1]:8443", 8443),
    ],
)
def test_upstream_host_header_names_the_port_only_when_it_is_not_the_schemes_default(upstream, host_header, port):
    (route,) = _router(("/", upstream, None)).routes
    scheme = upstream.partition(":")[0]
    assert (route.scheme, route.port) == (scheme, port)
    assert route.host_header == host_header
    assert route.origin == f"{scheme}://{host_header}"
    # What the upstream receives: that Host, whatever the client sent.
    out = upstream_request_headers(
        CIMultiDict([("Host", "localhost:8080")]),
        host=route.host_header,
        token_header="authorization",
        token="TOKEN",
        client_ip=None,
        forwarded_host=None,
    )
    assert out.getall("Host") == [host_header]
    assert route.upstream_target("/x", "q=1") == f"{route.base_path}/x?q=1"


def test_router_hosts_and_a_host_without_routes_of_its_own():
    router = _router(("/", "https://a.run.app", "app.localhost"), ("/api", "https://b.run.app", None))
    assert router.hosts == frozenset({"app.localhost"})
    # Another name (or none) gets the host-less routes.
    assert router.match("other.localhost", split_target("/api/x"))[0].name == "r1"
    assert router.match(None, split_target("/api"))[1] == ""
    only_hosts = _router(("/", "https://a.run.app", "app.localhost"))
    # Only host routes (a whole project's shape): the refusal says where the services are.
    with pytest.raises(NoRoute, match="^no service is served at localhost; the services are at app.localhost$"):
        only_hosts.match("localhost", split_target("/x"))


@pytest.mark.parametrize(
    "raw, path, query",
    [
        ("/a/b#frag", "/a/b", ""),
        ("/", "/", ""),
        ("/a/b.c/d%20e", "/a/b.c/d%20e", ""),
        ("/%2e%2efoo", "/%2e%2efoo", ""),
    ],
)
def test_split_target_drops_a_fragment_and_keeps_dotted_names(raw, path, query):
    t = split_target(raw)
    assert (t.path, t.query) == (path, query)


# --------------------------------------------------------------------------- Location, Referer and cookie Path at the edges


@pytest.mark.parametrize(
    "location, upstream, prefix, expected",
    [
        # http's default port, spelled or not, on either side.
        ("http://up.example:80/x", "http://up.example", "/p", "http://localhost:8080/p/x"),
        ("http://up.example/x", "http://up.example:80", "/p", "http://localhost:8080/p/x"),
        ("https://up.example/x", "https://up.example:443", "/p", "http://localhost:8080/p/x"),
        # Another port is another server; 443 is not http's default, 80 not https's.
        ("http://up.example:8080/x", "http://up.example", "/", "http://up.example:8080/x"),
        ("http://up.example:443/x", "http://up.example", "/", "http://up.example:443/x"),
        ("https://up.example:80/x", "https://up.example", "/", "https://up.example:80/x"),
        ("http://127.0.0.1:9000/x", "http://127.0.0.1:9000", "/p", "http://localhost:8080/p/x"),
        ("http://127.0.0.1:9001/x", "http://127.0.0.1:9000", "/p", "http://127.0.0.1:9001/x"),
        ("http://[::1]:9000/x", "http://[::1]:9000", "/p", "http://localhost:8080/p/x"),
        ("https://up.example:bad/x", "https://up.example", "/", "https://up.example:bad/x"),
        # The base path ends at a "/": /fnx is not under /fn.
        ("https://r-p.net/fnx/next", "https://r-p.net/fn", "/f", "https://r-p.net/fnx/next"),
        ("https://r-p.net/fn/", "https://r-p.net/fn", "/f", "http://localhost:8080/f/"),
        ("https://r-p.net/fn/next", "https://r-p.net/fn", "/", "http://localhost:8080/next"),
        ("https://r-p.net/fn", "https://r-p.net/fn", "/", "http://localhost:8080/"),
        ("/fn", "https://r-p.net/fn", "/f", "/f"),
        ("/fn/", "https://r-p.net/fn", "/f", "/f/"),
        ("/fnx", "https://r-p.net/fn", "/f", "/fnx"),
        ("/fn?x=1", "https://r-p.net/fn", "/f", "/f?x=1"),
        ("/fn/x?a=1#top", "https://r-p.net/fn", "/f", "/f/x?a=1#top"),
        # The upstream's root, under a prefix: the prefix's root.
        ("https://svc.run.app", "https://svc.run.app", "/hello", "http://localhost:8080/hello/"),
        ("/", "https://svc.run.app", "/hello", "/hello/"),
        ("/", "https://svc.run.app", "/", "/"),
        ("https://svc.run.app/", "https://svc.run.app", "/", "http://localhost:8080/"),
        ("?page=2", "https://svc.run.app", "/hello", "?page=2"),
        ("", "https://svc.run.app", "/hello", ""),
    ],
)
def test_rewrite_location_at_the_edges(location, upstream, prefix, expected):
    assert rewrite_location(location, upstream=upstream, prefix=prefix, proxy_origin="http://localhost:8080") == expected


UP = "https://hello-abc-uc.a.run.app"


@pytest.mark.parametrize(
    "referer, prefix, expected",
    [
        # The proxy's origin with no path: the upstream's root, query kept.
        ("http://localhost:8080?q=1", "/svc", f"{UP}/?q=1"),
        ("http://localhost:8080", "/svc", f"{UP}/"),
        ("http://localhost:8080/svc?q=1", "/svc", f"{UP}/?q=1"),
        ("http://localhost:8080/svc/", "/svc", f"{UP}/"),
    ],
)
def test_rewrite_referer_without_a_path(referer, prefix, expected):
    assert rewrite_referer(referer, proxy_host="localhost:8080", upstream_origin=UP, prefix=prefix, base_path="") == expected


@pytest.mark.parametrize(
    "cookie, prefix, base, request_path, expected",
    [
        # The browser uses the last Path: one it ignores (not starting with "/") does not
        # stop the next from being mapped.
        ("sid=1; Path=x; Path=/", "/a", "", "/a/login", "sid=1; Path=x; Path=/a"),
        ("sid=1; HttpOnly; Path=/x", "/a", "", "/a/login", "sid=1; HttpOnly; Path=/a/x"),
        # Prefix "/" over a base path: the browser's default directory is already right.
        ("sid=1", "/", "/fn", "/a/b", "sid=1"),
        ("sid=1; Path=x", "/", "/fn", "/a/b", "sid=1; Path=x"),
        ("sid=1; Path=/fn/a", "/", "/fn", "/a/b", "sid=1; Path=/a"),
        ("sid=1", "/a", "", "/a/b/c", "sid=1"),
    ],
)
def test_rewrite_cookie_path_at_slash_boundaries(cookie, prefix, base, request_path, expected):
    assert rewrite_cookie_path(cookie, prefix=prefix, base_path=base, request_path=request_path) == expected


def test_a_kept_header_does_not_end_the_others():
    out = up([("Authorization", "Basic app"), ("Accept", "text/html"), ("X-App", "1")], mode="x-serverless-authorization")
    assert out.getall("Authorization") == ["Basic app"]
    assert (out["Accept"], out["X-App"]) == ("text/html", "1")


def test_keep_never_passes_a_name_spelled_with_underscores():
    # X_Forwarded_For folds into X-Forwarded-For: no `keep` entry lets a client forge it.
    out = upstream_request_headers(
        CIMultiDict([("X_Forwarded_For", "6.6.6.6"), ("X-Keep", "k")]),
        host="svc.run.app",
        token_header="authorization",
        token="TOKEN",
        client_ip="127.0.0.1",
        forwarded_host=None,
        keep=["x_forwarded_for", "x-keep"],
    )
    assert "6.6.6.6" not in out.values()
    assert out.getall("X-Forwarded-For") == ["127.0.0.1"] and out["X-Keep"] == "k"


def test_rewrite_set_cookies_by_default_maps_nothing_and_needs_no_cookie():
    headers = CIMultiDict([("Set-Cookie", "a=1; Path=/x"), ("Set-Cookie", "b=2")])
    rewrite_set_cookies(headers, upstream_host="svc.run.app")
    assert headers.getall("Set-Cookie") == ["a=1; Path=/x", "b=2"]
    none: CIMultiDict[str] = CIMultiDict([("Content-Type", "text/plain")])
    rewrite_set_cookies(none, upstream_host="svc.run.app", prefix="/a")
    assert list(none.items()) == [("Content-Type", "text/plain")]


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("*", "asterisk-form request target (OPTIONS *) is not proxied"),
        ("http://evil/x", "request target must be a path (absolute-form targets are not proxied)"),
        ("evil.example:443", "request target must be a path (absolute-form targets are not proxied)"),
        ("/a/%2e%2e/b", "path contains a . or .. segment"),
    ],
)
def test_split_target_says_why_it_refuses(raw, reason):
    with pytest.raises(BadRequest) as e:
        split_target(raw)
    assert e.value.reason == reason


def test_the_reserved_prefix_refusal_says_why():
    router = _router(("/", "https://a.run.app", None))
    for path in ("/.proxy", "/.proxy/x"):
        with pytest.raises(NoRoute) as e:
            router.match("localhost", split_target(path))
        assert e.value.reason == "/.proxy/ is reserved for the proxy's own pages"
    # Only that segment: /.proxyx is an ordinary path.
    assert router.match("localhost", split_target("/.proxyx"))[1] == "/.proxyx"
