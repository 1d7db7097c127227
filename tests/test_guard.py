"""The browser guard: every decision as a table, then the same rules on a real proxy.

The tables call ``Guard.decide`` (pure: method and headers in, verdict out); the
integration tests show the guard answering before any token is fetched or any
upstream contacted, for proxied requests, websocket upgrades and /.proxy/ pages,
and the CORS headers on real responses.
"""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.config import Config, parse_config
from proxy.policy.guard import Guard
from tests.test_forward import raw_exchange

ALLOWED = "http://localhost:3000"


def guard(**top) -> Guard:
    config = {
        "routes": [
            {"upstream": "http://127.0.0.1:9", "prefix": "/svc"},
            {"upstream": "http://127.0.0.1:9", "host": "App.Localhost"},
            {"upstream": "http://127.0.0.1:9", "host": "hello.test"},
        ],
        "allowed_hosts": ["dev.example.test", "*.corp.test"],
        "allowed_origins": [ALLOWED],
        **top,
    }
    return Guard(parse_config(config, env={}))


def decide(g: Guard, method: str, headers: dict[str, str]):
    return g.decide(method, CIMultiDict(headers))


# --------------------------------------------------------------------------- Host allowlist


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8080",
        "LOCALHOST:8080",
        "localhost.",  # a fully qualified localhost
        "127.0.0.1",
        "127.0.0.1:8080",
        "[::1]",
        "[::1]:8080",
        "app.localhost:8080",  # a route's host (and a *.localhost name)
        "foo.localhost",
        "a.b.localhost:1",
        "hello.test:8080",  # a route's host, implicitly allowed
        "dev.example.test",  # allowed_hosts
        "x.corp.test:443",  # allowed_hosts wildcard
    ],
)
def test_host_allowed(host):
    v = decide(guard(), "GET", {"Host": host})
    assert v.allowed, (host, v)


@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost.evil.com", 403),
        ("localhost.evil.com:8080", 403),
        ("evil@localhost", 403),
        ("evil@localhost:8080", 403),
        ("evil@app.localhost", 403),
        ("evil.com", 403),
        ("127.0.0.1.nip.io", 403),
        ("127.0.0.2", 403),
        ("[::2]:8080", 403),
        ("0.0.0.0:8080", 403),
        ("corp.test", 403),  # "*.corp.test" does not match corp.test itself
        ("example.test", 403),
        ("localhost..", 403),
        (".localhost", 403),
        ("", 400),
        ("localhost:abc", 400),
        ("localhost:99999", 400),
        ("localhost:", 400),
        (":8080", 400),
        ("[::1", 400),
        ("[::1]x", 400),
        ("[]:80", 400),
        ("local host", 400),
        ("localhost/evil", 400),
        ("localhost\\evil", 400),
        ("evil.com:8080@localhost", 400),
    ],
)
def test_host_refused(host, status):
    v = decide(guard(), "GET", {"Host": host})
    assert not v.allowed and v.status == status, (host, v)
    assert "\n" not in v.reason


def test_missing_host_is_refused():
    v = decide(guard(), "GET", {})
    assert (v.allowed, v.status) == (False, 403)
    assert "no Host" in v.reason


def test_listen_address_is_allowed_but_a_wildcard_is_not():
    assert decide(guard(listen={"host": "127.0.0.5"}), "GET", {"Host": "127.0.0.5:8080"}).allowed
    g = guard(listen={"host": "0.0.0.0", "allow_non_loopback": True})
    assert not decide(g, "GET", {"Host": "0.0.0.0:8080"}).allowed


def test_host_sets_are_computed_once():
    g = guard()
    assert isinstance(g.hosts, frozenset) and isinstance(g.origins, frozenset)
    assert {"localhost", "127.0.0.1", "[::1]", "app.localhost", "hello.test", "dev.example.test"} <= g.hosts
    assert g.host_suffixes == (".localhost", ".corp.test")


def test_one_guard_answers_alike_when_asked_again():
    # Allowed Host values are remembered; refusals never are, and the memory is bounded.
    g = guard()
    hosts = ["localhost:8080", "evil.example", "app.localhost", "EVIL.example:1", "localhost:8080", "evil.example", "bad host"]
    first = [decide(g, "GET", {"Host": h}) for h in hosts]
    again = [decide(g, "GET", {"Host": h}) for h in hosts]
    assert [v.allowed for v in first] == [v.allowed for v in again] == [True, False, True, False, True, False, False]
    assert [v.status for v in first] == [v.status for v in again]
    for port in range(1, 200):
        assert decide(g, "GET", {"Host": f"localhost:{port}"}).allowed
    assert not decide(g, "GET", {"Host": "evil.example"}).allowed
    assert len(g._allowed_host_values) <= 64


# --------------------------------------------------------------------------- Origin / Sec-Fetch-*

H = "localhost:8080"
NAV = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}

PASS_CASES = [
    ("curl, SDKs, servers: no browser headers", "POST", {}),
    ("own origin", "POST", {"Origin": "http://localhost:8080", "Sec-Fetch-Site": "same-origin"}),
    ("own origin, any case", "POST", {"Origin": "HTTP://LocalHost:8080"}),
    ("own origin behind a TLS terminator", "POST", {"Origin": "https://localhost:8080"}),
    ("same-origin", "GET", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}),
    ("user typed the URL", "GET", {"Sec-Fetch-Site": "none", **NAV}),
    ("cross-site link: top-level GET navigation", "GET", {"Sec-Fetch-Site": "cross-site", **NAV}),
    ("cross-site top-level HEAD navigation", "HEAD", {"Sec-Fetch-Site": "cross-site", **NAV}),
    ("same-site top-level GET navigation", "GET", {"Sec-Fetch-Site": "same-site", **NAV}),
    ("navigation with a foreign Origin (GET)", "GET", {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", **NAV}),
    ("allowed origin, same-site", "PUT", {"Origin": ALLOWED, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}),
    ("allowed origin wins over cross-site", "DELETE", {"Origin": ALLOWED, "Sec-Fetch-Site": "cross-site"}),
    ("allowed origin, websocket", "GET", {"Origin": ALLOWED}),
]


@pytest.mark.parametrize("name, method, headers", PASS_CASES, ids=[c[0] for c in PASS_CASES])
def test_origin_policy_passes(name, method, headers):
    v = decide(guard(), method, {"Host": H, **headers})
    assert v.allowed, v


REFUSE_CASES = [
    ("cross-site fetch", "GET", {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}),
    ("cross-site fetch, no Origin", "GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}),
    ("same-site: another port on localhost", "GET", {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}),
    ("same-site without Origin", "GET", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}),
    ("cross-site script", "GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}),
    ("cross-site image", "GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}),
    ("cross-site XHR POST", "POST", {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}),
    ("cross-site form POST navigation", "POST", {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", **NAV}),
    ("cross-site iframe", "GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}),
    ("cross-site navigate without document", "GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
    ("cross-site websocket (Origin only)", "GET", {"Origin": "http://evil.example", "Upgrade": "websocket"}),
    ("Origin null", "POST", {"Origin": "null"}),
    ("Origin null, same-origin claimed", "GET", {"Origin": "null", "Sec-Fetch-Site": "same-origin"}),
    ("foreign Origin, same-origin claimed", "GET", {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}),
    ("foreign Origin, no Sec-Fetch", "GET", {"Origin": "http://evil.example"}),
    ("origin that only starts like ours", "GET", {"Origin": "http://localhost:8080.evil.example"}),
    ("other scheme", "GET", {"Origin": "file://localhost:8080"}),
    ("allowed origin's other port", "GET", {"Origin": "http://localhost:30000"}),
    ("preflight from a foreign origin", "OPTIONS", {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT", "Sec-Fetch-Mode": "cors"}),
]


@pytest.mark.parametrize("name, method, headers", REFUSE_CASES, ids=[c[0] for c in REFUSE_CASES])
def test_origin_policy_refuses(name, method, headers):
    v = decide(guard(), method, {"Host": H, **headers})
    assert (v.allowed, v.status) == (False, 403), v
    assert v.reason.startswith("cross-site") and "\n" not in v.reason


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_cross_site_navigation_refuse_closes_the_navigation_exception(method):
    headers = {"Host": H, "Sec-Fetch-Site": "cross-site", **NAV}
    assert decide(guard(), method, headers).allowed
    v = decide(guard(cross_site_navigation="refuse"), method, headers)
    assert (v.allowed, v.status) == (False, 403)
    assert "cross_site_navigation: refuse" in v.reason
    # The user's own navigations (typed URL, same origin) still pass.
    assert decide(guard(cross_site_navigation="refuse"), method, {"Host": H, "Sec-Fetch-Site": "none", **NAV}).allowed


def test_allowed_origin_is_marked_for_cors_and_preflight_recognised():
    g = guard()
    v = decide(g, "PUT", {"Host": H, "Origin": "HTTP://LOCALHOST:3000"})
    assert v.allowed and v.cors_origin == ALLOWED and not v.preflight
    v = decide(g, "OPTIONS", {"Host": H, "Origin": ALLOWED, "Access-Control-Request-Method": "PUT"})
    assert v.allowed and v.preflight
    # An OPTIONS that is not a preflight goes to the upstream like any request.
    v = decide(g, "OPTIONS", {"Host": H, "Origin": ALLOWED})
    assert v.allowed and not v.preflight
    # Same-origin requests are not CORS.
    assert decide(g, "POST", {"Host": H, "Origin": "http://localhost:8080"}).cors_origin is None


def test_allowed_origin_with_a_default_port_matches_what_browsers_send():
    # Browsers serialise Origin without the scheme's default port.
    g = guard(allowed_origins=["http://example.test:80", "https://secure.test:443/", "http://other.test:8080"])
    assert g.origins == {"http://example.test", "https://secure.test", "http://other.test:8080"}
    for origin in ("http://example.test", "https://secure.test", "http://other.test:8080"):
        v = decide(g, "POST", {"Host": H, "Origin": origin, "Sec-Fetch-Site": "cross-site"})
        assert v.allowed and v.cors_origin == origin, (origin, v)
    for origin in ("https://example.test", "http://secure.test", "http://other.test", "http://example.test:8080"):
        assert not decide(g, "POST", {"Host": H, "Origin": origin, "Sec-Fetch-Site": "cross-site"}).allowed, origin
    # A Config built in code (not through the loader) is normalised by the guard too.
    config = Config(routes=parse_config({"routes": [{"upstream": "http://127.0.0.1:9"}]}, env={}).routes, allowed_origins=("HTTPS://Secure.test:443",))
    assert decide(Guard(config), "GET", {"Host": H, "Origin": "https://secure.test"}).cors_origin == "https://secure.test"


def test_host_is_checked_before_origin():
    v = decide(guard(), "GET", {"Host": "evil.example", "Origin": "http://evil.example"})
    assert (v.allowed, v.status) == (False, 403) and "Host" in v.reason


# --------------------------------------------------------------------------- on a real proxy


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_refusals_come_before_any_token_or_upstream(start_proxy, client, sa_key, private_service, google):
    # No token can be had: a request the guard passes would wait for one and get 503.
    google.fail("token", status=500)
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}), ready=False)
    cases = [
        ({"Host": "evil.example"}, 403, "Host 'evil.example' is not allowed"),
        ({"Host": "localhost.evil.com:1"}, 403, "is not allowed"),
        ({"Host": "localhost:x"}, 400, "malformed Host"),
        ({"Origin": "http://evil.example"}, 403, "cross-site request refused"),
        ({"Origin": "null"}, 403, "cross-site request refused (Origin 'null')"),
        ({"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"}, 403, "Sec-Fetch-Site same-site"),
    ]
    for headers, status, reason in cases:
        async with client.post(f"{proxy.url}/x", headers=headers, data=b"body") as r:
            body = await r.text()
            assert r.status == status, (headers, body)
            assert body.startswith(f"idtoken-proxy: {status} ") and reason in body, body
            assert body.count("\n") == 1
            assert "Access-Control-Allow-Origin" not in r.headers
    assert private_service.requests == []


async def test_missing_host_and_http10_without_host(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    # HTTP/1.0 may leave Host out: the guard refuses it.
    status, body = await raw_exchange(proxy.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert b" 403 " in status, (status, body)
    assert b"no Host header" in body
    # HTTP/1.1 must send one: aiohttp refuses the request before the guard sees it.
    status, body = await raw_exchange(proxy.port, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert b" 400 " in status, (status, body)
    status, body = await raw_exchange(proxy.port, b"GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n")
    assert b" 400 " in status  # aiohttp refuses a second Host itself
    assert private_service.requests == []


async def test_connect_with_a_local_host_still_reaches_the_forwarders_refusal(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    status, body = await raw_exchange(proxy.port, b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b" 405 " in status and b"reverse proxy" in body
    assert private_service.requests == []


async def test_guard_covers_proxy_pages_and_websocket_upgrades(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    for path in ("/.proxy/", "/.proxy/status.json", "/.proxy/healthz", "/.proxy/readyz", "/.proxy/metrics"):
        async with client.get(f"{proxy.url}{path}", headers={"Host": "rebound.evil.example"}) as r:
            assert r.status == 403, path
        async with client.get(f"{proxy.url}{path}", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403, path
        async with client.get(f"{proxy.url}{path}") as r:
            assert r.status in (200, 503), path  # readyz may still be 503; it is not refused
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{proxy.url}/ws", origin="http://evil.example")
    assert e.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(f"{proxy.url}/ws", headers={"Host": "evil.example"})
    assert e.value.status == 403
    assert private_service.requests == []
    # The proxy's own origin may open one.
    async with client.ws_connect(f"{proxy.url}/ws", origin=proxy.url) as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"


async def test_cross_site_navigation_passes_unless_refused(start_proxy, client, sa_key, private_service):
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Sec-Fetch-User": "?1"}
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    async with client.get(f"{proxy.url}/page", headers=nav) as r:
        assert r.status == 200
    strict = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, cross_site_navigation="refuse"))
    async with client.get(f"{strict.url}/page", headers=nav) as r:
        assert r.status == 403
        assert "cross_site_navigation: refuse" in await r.text()
    assert [r.raw_path for r in private_service.requests] == ["/page"]


# --------------------------------------------------------------------------- CORS


async def test_preflight_is_answered_by_the_proxy(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, allowed_origins=[ALLOWED]))
    headers = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type, x-app-thing",
        "Access-Control-Request-Private-Network": "true",
        "Sec-Fetch-Site": "same-site",
        "Sec-Fetch-Mode": "cors",
    }
    async with client.options(f"{proxy.url}/upload", headers=headers) as r:
        assert r.status == 204
        h = r.headers
        assert h.getall("Access-Control-Allow-Origin") == [ALLOWED]
        assert h["Access-Control-Allow-Credentials"] == "true"
        assert h["Access-Control-Allow-Methods"] == "PUT"
        assert h["Access-Control-Allow-Headers"] == "content-type, x-app-thing"
        assert h["Access-Control-Max-Age"] == "600"
        assert "Origin" in h["Vary"]
        # Never: the proxy does not open private networks to anyone.
        assert "Access-Control-Allow-Private-Network" not in h
    # The upstream never saw the preflight.
    assert private_service.requests == []
    # The actual request then goes through, answered with CORS headers.
    async with client.put(f"{proxy.url}/upload", data=b"12345", headers={"Origin": ALLOWED, "Sec-Fetch-Site": "same-site"}) as r:
        assert r.status == 200
        assert (await r.json())["len"] == 5
        assert r.headers.getall("Access-Control-Allow-Origin") == [ALLOWED]
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert private_service.last.claims is not None
    # The cross-origin Origin is the truth and reaches the upstream unchanged.
    assert private_service.last.header("Origin") == ALLOWED


async def test_upstream_cors_headers_are_replaced(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, allowed_origins=[ALLOWED]))
    # The upstream answers /cors with "Access-Control-Allow-Origin: *".
    async with client.get(f"{proxy.url}/cors") as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers
        assert r.headers["Vary"] == "Origin"
    async with client.get(f"{proxy.url}/cors", headers={"Origin": ALLOWED}) as r:
        assert r.headers.getall("Access-Control-Allow-Origin") == [ALLOWED]
    async with client.get(f"{proxy.url}/cors", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    # Proxy errors for an allowed origin are readable by it too (e.g. no route).
    no_route = await start_proxy(sa_config(sa_key[0], {"prefix": "/a", "upstream": private_service.url}, allowed_origins=[ALLOWED]))
    async with client.get(f"{no_route.url}/b", headers={"Origin": ALLOWED}) as r:
        assert r.status == 404
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_allowed_origin_listed_with_its_default_port_gets_cors(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"upstream": private_service.url}, allowed_origins=["http://example.test:80", "https://example.test:443/"])
    )
    for origin in ("http://example.test", "https://example.test"):
        # What a browser on that page sends: Origin without the default port.
        headers = {"Origin": origin, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
        async with client.post(f"{proxy.url}/upload", data=b"abc", headers=headers) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["len"] == 3
            assert r.headers.getall("Access-Control-Allow-Origin") == [origin]
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert private_service.last.header("Origin") == origin
    async with client.post(f"{proxy.url}/upload", data=b"abc", headers={"Origin": "http://example.test:8080"}) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_without_allowed_origins_no_cors_header_is_ever_sent(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    for headers in ({}, {"Origin": proxy.url}):
        async with client.get(f"{proxy.url}/cors", headers=headers) as r:
            assert r.status == 200
            assert not [k for k in r.headers if k.lower().startswith("access-control-")], r.headers
            assert "Vary" not in r.headers


# --------------------------------------------------------------------------- what the upstream sees, what comes back


async def test_same_origin_origin_and_referer_are_rewritten_to_the_upstream(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"prefix": "/svc", "upstream": private_service.url}))
    own = f"http://localhost:{proxy.port}"
    headers = {"Host": f"localhost:{proxy.port}", "Origin": own, "Referer": f"{own}/svc/form?step=2"}
    async with client.post(f"{proxy.url}/svc/submit", headers=headers, data=b"a=1") as r:
        assert r.status == 200
    rec = private_service.last
    assert rec.header_values("Origin") == [private_service.url]
    assert rec.header_values("Referer") == [f"{private_service.url}/form?step=2"]


async def test_host_route_location_and_cookie_stay_on_the_proxy(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"host": "app.localhost", "upstream": private_service.url}, {"prefix": "/other", "upstream": "http://127.0.0.1:9"})
    )
    host = f"app.localhost:{proxy.port}"
    async with client.get(f"{proxy.url}/redirect", params={"to": f"{private_service.url}/next?x=1"}, headers={"Host": host}, allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == f"http://{host}/next?x=1"
    assert private_service.last.raw_path.startswith("/redirect")
    async with client.get(f"{proxy.url}/set-cookie", headers={"Host": host}) as r:
        assert r.status == 200
        cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("session=fake-session")
    assert "domain" not in cookie.lower(), cookie
    assert "Path=/" in cookie and "HttpOnly" in cookie
    # Without the host route's Host, the prefix routes apply.
    async with client.get(f"{proxy.url}/set-cookie") as r:
        assert r.status == 404


async def test_cookie_paths_stay_under_their_route_prefix(start_proxy, sa_key, private_service):
    svc = private_service.url
    proxy = await start_proxy(
        sa_config(
            sa_key[0],
            {"prefix": "/a", "upstream": svc},
            {"prefix": "/b", "upstream": svc},
            # A base path: the upstream's /set-cookie is the proxy's /c.
            {"prefix": "/c", "upstream": f"{svc}/set-cookie", "audience": svc},
        )
    )
    # A jar that path-matches as browsers do (unsafe: the proxy is reached by IP address).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(f"{proxy.url}/a/set-cookie", params=[("path", "/"), ("path", "/x"), ("path", "")]) as r:
            assert r.status == 200
            assert r.headers.getall("Set-Cookie") == [
                "session=fake-session; HttpOnly; Path=/a",
                "session1=fake-session; HttpOnly; Path=/a/x",
                # No Path: the browser's default (/a, from /a/set-cookie) is already the route's.
                "session2=fake-session; HttpOnly",
            ]
        async with browser.get(f"{proxy.url}/c", params=[("path", ""), ("path", "/"), ("path", "/set-cookie/y")]) as r:
            assert r.status == 200
            assert private_service.last.raw_path.startswith("/set-cookie?")
            assert r.headers.getall("Set-Cookie") == [
                # No Path on a request for the prefix itself: the browser would default to "/".
                "session=fake-session; HttpOnly; Path=/c",
                "session1=fake-session; HttpOnly; Path=/c",
                "session2=fake-session; HttpOnly; Path=/c/y",
            ]
        # The service at /b gets none of the cookies set through /a or /c.
        async with browser.get(f"{proxy.url}/b/page") as r:
            assert r.status == 200
        assert private_service.last.raw_path == "/page"
        assert private_service.last.header_values("Cookie") == []
        # The one at /a gets its own (and session1 only under /a/x).
        async with browser.get(f"{proxy.url}/a/x/page") as r:
            assert r.status == 200
        assert sorted(private_service.last.header("Cookie").split("; ")) == [
            "session1=fake-session",
            "session2=fake-session",
            "session=fake-session",
        ]
        async with browser.get(f"{proxy.url}/a/page") as r:
            assert r.status == 200
        assert sorted(private_service.last.header("Cookie").split("; ")) == ["session2=fake-session", "session=fake-session"]
