"""Pure header rewrites for browsers: Origin, Referer, Set-Cookie Domain and Path (tables)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.policy.headers import (
    rewrite_cookie_domain,
    rewrite_cookie_path,
    rewrite_origin,
    rewrite_referer,
    rewrite_same_origin,
    rewrite_set_cookies,
)

UP = "https://hello-abc-uc.a.run.app"


@pytest.mark.parametrize(
    "origin, proxy_host, expected",
    [
        ("http://localhost:8080", "localhost:8080", UP),
        ("http://LOCALHOST:8080", "localhost:8080", UP),
        ("https://localhost:8080", "localhost:8080", UP),
        ("http://app.localhost:8080", "app.localhost:8080", UP),
        ("http://localhost", "localhost", UP),
        # Not the proxy as the client reached it: unchanged.
        ("http://localhost:3000", "localhost:8080", "http://localhost:3000"),
        ("http://localhost:80801", "localhost:8080", "http://localhost:80801"),
        ("http://localhost:8080.evil.example", "localhost:8080", "http://localhost:8080.evil.example"),
        ("http://127.0.0.1:8080", "localhost:8080", "http://127.0.0.1:8080"),
        ("null", "localhost:8080", "null"),
        ("http://localhost:8080/x", "localhost:8080", "http://localhost:8080/x"),  # not an origin
    ],
)
def test_rewrite_origin(origin, proxy_host, expected):
    assert rewrite_origin(origin, proxy_host=proxy_host, upstream_origin=UP) == expected


@pytest.mark.parametrize(
    "referer, prefix, base, expected",
    [
        ("http://localhost:8080/page?q=1", "/", "", f"{UP}/page?q=1"),
        ("http://localhost:8080/", "/", "", f"{UP}/"),
        ("http://localhost:8080", "/", "", f"{UP}/"),
        ("http://localhost:8080/svc/page", "/svc", "", f"{UP}/page"),
        ("http://localhost:8080/svc", "/svc", "", f"{UP}/"),
        ("http://localhost:8080/svc/a?b=1", "/svc", "/fn", f"{UP}/fn/a?b=1"),
        ("http://localhost:8080/svc", "/svc", "/fn", f"{UP}/fn"),
        ("http://localhost:8080/page", "/", "/fn", f"{UP}/fn/page"),
        # A page outside the route (another route's): the origin changes, the path stays.
        ("http://localhost:8080/other/page", "/svc", "", f"{UP}/other/page"),
        ("http://localhost:8080/svcx/page", "/svc", "", f"{UP}/svcx/page"),
        ("http://localhost:8080/page#frag", "/", "", f"{UP}/page"),
        # Other origins: unchanged.
        ("http://localhost:3000/page", "/", "", "http://localhost:3000/page"),
        ("http://localhost:8080evil/page", "/", "", "http://localhost:8080evil/page"),
        ("https://www.google.com/", "/", "", "https://www.google.com/"),
        ("not a url", "/", "", "not a url"),
    ],
)
def test_rewrite_referer(referer, prefix, base, expected):
    assert rewrite_referer(referer, proxy_host="localhost:8080", upstream_origin=UP, prefix=prefix, base_path=base) == expected


def test_rewrite_same_origin_touches_only_origin_and_referer():
    headers = CIMultiDict(
        [("Origin", "http://localhost:8080"), ("Referer", "http://localhost:8080/svc/x"), ("X-Other", "http://localhost:8080")]
    )
    rewrite_same_origin(headers, proxy_host="localhost:8080", upstream_origin=UP, prefix="/svc", base_path="")
    assert list(headers.items()) == [("Origin", UP), ("Referer", f"{UP}/x"), ("X-Other", "http://localhost:8080")]
    empty: CIMultiDict[str] = CIMultiDict()
    rewrite_same_origin(empty, proxy_host="localhost:8080", upstream_origin=UP, prefix="/", base_path="")
    assert not empty


HOST = "hello-abc-uc.a.run.app"


@pytest.mark.parametrize(
    "cookie, expected",
    [
        (f"sid=1; Domain={HOST}; Path=/; HttpOnly", "sid=1; Path=/; HttpOnly"),
        (f"sid=1; domain=.{HOST}; Secure", "sid=1; Secure"),
        (f"sid=1; Path=/; DOMAIN={HOST.upper()}", "sid=1; Path=/"),
        ("sid=1; Domain=a.run.app; Path=/", "sid=1; Path=/"),  # a parent domain of the upstream
        ("sid=1; Domain=run.app", "sid=1"),
        (f"sid=1;Domain={HOST};Path=/", "sid=1;Path=/"),
        # Not the upstream's: left alone.
        ("sid=1; Domain=example.com; Path=/", "sid=1; Domain=example.com; Path=/"),
        ("sid=1; Domain=un.app", "sid=1; Domain=un.app"),
        (f"sid=1; Domain=x.{HOST}", f"sid=1; Domain=x.{HOST}"),
        ("sid=1; Path=/; HttpOnly", "sid=1; Path=/; HttpOnly"),
        ("sid=1; Domain=", "sid=1; Domain="),
        ("domain=1; Path=/", "domain=1; Path=/"),  # a cookie named "domain" is not the attribute
        (f"sid=\"a;b\"; Domain={HOST}", "sid=\"a;b\""),
    ],
)
def test_rewrite_cookie_domain(cookie, expected):
    assert rewrite_cookie_domain(cookie, upstream_host=HOST) == expected


def test_rewrite_cookie_domain_for_an_ip_upstream():
    assert rewrite_cookie_domain("a=1; Domain=127.0.0.1; Path=/", upstream_host="127.0.0.1") == "a=1; Path=/"


def test_rewrite_set_cookies_keeps_every_cookie():
    headers = CIMultiDict(
        [("Set-Cookie", f"a=1; Domain={HOST}"), ("Content-Type", "text/plain"), ("Set-Cookie", "b=2; Domain=example.com"), ("set-cookie", "c=3")]
    )
    rewrite_set_cookies(headers, upstream_host=HOST)
    assert headers.getall("Set-Cookie") == ["a=1", "b=2; Domain=example.com", "c=3"]
    assert headers["Content-Type"] == "text/plain"


@pytest.mark.parametrize(
    "cookie, prefix, base, request_path, expected",
    [
        # Under a prefix: the upstream's paths move under it.
        ("sid=1; Path=/", "/a", "", "/a/login", "sid=1; Path=/a"),
        ("sid=1; Path=/x", "/a", "", "/a/login", "sid=1; Path=/a/x"),
        ("sid=1; Path=/x/", "/a", "", "/a/x/y", "sid=1; Path=/a/x/"),
        ("sid=1; Path=/", "/a/b", "", "/a/b/", "sid=1; Path=/a/b"),
        # Attribute names are case-insensitive; spacing and every other attribute stay.
        ("sid=1; path=/; HttpOnly", "/a", "", "/a/", "sid=1; path=/a; HttpOnly"),
        ("sid=1; PATH=/x; Secure; SameSite=Lax", "/a", "", "/a/", "sid=1; PATH=/a/x; Secure; SameSite=Lax"),
        ("sid=1;Path=/;Max-Age=60", "/a", "", "/a/", "sid=1;Path=/a;Max-Age=60"),
        ("sid=1; Path = /x ; HttpOnly", "/a", "", "/a/", "sid=1; Path=/a/x; HttpOnly"),
        ("sid=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/", "/a", "", "/a/", "sid=1; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/a"),
        # The browser uses the last Path: each is mapped.
        ("sid=1; Path=/x; Path=/", "/a", "", "/a/", "sid=1; Path=/a/x; Path=/a"),
        # A cookie named "path" is not the attribute.
        ("path=/; Path=/", "/a", "", "/a/", "path=/; Path=/a"),
        # The upstream's base path comes off first.
        ("sid=1; Path=/fn", "/a", "/fn", "/a/", "sid=1; Path=/a"),
        ("sid=1; Path=/fn/", "/a", "/fn", "/a/", "sid=1; Path=/a"),
        ("sid=1; Path=/fn/x", "/a", "/fn", "/a/", "sid=1; Path=/a/x"),
        ("sid=1; Path=/fn/x", "/", "/fn", "/", "sid=1; Path=/x"),
        ("sid=1; Path=/fn", "/", "/fn", "/", "sid=1; Path=/"),
        # Above the base (covers the whole route) or beside it (no page of this route,
        # but another route's on the shared origin): kept to the route.
        ("sid=1; Path=/", "/a", "/fn", "/a/", "sid=1; Path=/a"),
        ("sid=1; Path=/fnx", "/a", "/fn", "/a/", "sid=1; Path=/a"),
        ("sid=1; Path=/other/x", "/a", "/fn", "/a/", "sid=1; Path=/a"),
        # No Path: the browser defaults to the requested directory, already under the
        # prefix, except for a request of the prefix itself (its parent is "/").
        ("sid=1; HttpOnly", "/a", "", "/a/login", "sid=1; HttpOnly"),
        ("sid=1", "/a", "", "/a/x/y", "sid=1"),
        ("sid=1", "/a", "", "/a/", "sid=1"),
        ("sid=1; HttpOnly", "/a", "", "/a", "sid=1; HttpOnly; Path=/a"),
        ("sid=1", "/a/b", "", "/a/b", "sid=1; Path=/a/b"),
        ("sid=1", "/a/b", "/fn", "/a/b", "sid=1; Path=/a/b"),
        # A Path not starting with "/" counts as none (RFC 6265 5.2.4).
        ("sid=1; Path=x", "/a", "", "/a/login", "sid=1; Path=x"),
        ("sid=1; Path=", "/a", "", "/a", "sid=1; Path=/a"),
        ("sid=1; Path", "/a", "", "/a", "sid=1; Path=/a"),
        # Prefix "/" without a base path: the proxy's paths are the upstream's.
        ("sid=1; Path=/", "/", "", "/", "sid=1; Path=/"),
        ("sid=1; Path=/x", "/", "", "/x/y", "sid=1; Path=/x"),
        ("sid=1", "/", "", "/", "sid=1"),
        ("sid=1; Path=", "/", "", "/x", "sid=1; Path="),
    ],
)
def test_rewrite_cookie_path(cookie, prefix, base, request_path, expected):
    assert rewrite_cookie_path(cookie, prefix=prefix, base_path=base, request_path=request_path) == expected


def test_rewrite_cookie_path_returns_the_same_string_when_nothing_changes():
    cookie = "sid=1; Path=/a/x; HttpOnly"
    assert rewrite_cookie_path(cookie, prefix="/", base_path="", request_path="/") is cookie
    unchanged = "sid=1; HttpOnly"
    assert rewrite_cookie_path(unchanged, prefix="/a", base_path="", request_path="/a/x") is unchanged


def test_rewrite_set_cookies_maps_every_path_and_domain():
    headers = CIMultiDict(
        [
            ("Set-Cookie", f"a=1; Domain={HOST}; Path=/"),
            ("Content-Type", "text/plain"),
            ("set-cookie", "b=2; path=/x; Secure"),
            ("Set-Cookie", "c=3; Domain=example.com"),
        ]
    )
    rewrite_set_cookies(headers, upstream_host=HOST, prefix="/a", base_path="", request_path="/a")
    assert headers.getall("Set-Cookie") == ["a=1; Path=/a", "b=2; path=/a/x; Secure", "c=3; Domain=example.com; Path=/a"]
    assert headers["Content-Type"] == "text/plain"
