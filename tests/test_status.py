"""The status page: /.proxy/ (HTML) and /.proxy/status.json: routes, audiences,
identity, token expiry, request counts and recent errors; never a token."""

from __future__ import annotations

import aiohttp
import pytest

from proxy.ops.status import render_html
from tests.test_forward import free_port


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


@pytest.fixture
async def client():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_status_json_and_page(start_proxy, client, sa_key, private_service):
    key, email = sa_key
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await start_proxy(
        sa_config(
            key,
            {"name": "svc", "prefix": "/svc", "upstream": private_service.url},
            {"name": "app", "host": "app.localhost", "upstream": private_service.url, "header": "x-serverless-authorization"},
            {"name": "dead", "prefix": "/dead", "upstream": dead},
            allowed_origins=["http://localhost:3000"],
        )
    )
    for path in ("/svc/a", "/svc/b", "/svc/status/500", "/svc/status/404", "/dead/x", "/nothing"):
        async with client.get(f"{proxy.url}{path}") as r:
            await r.read()
    async with client.get(f"{proxy.url}/x", headers={"Host": f"app.localhost:{proxy.port}"}) as r:
        assert r.status == 200
    async with client.get(f"{proxy.url}/svc/a", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403

    async with client.get(f"{proxy.url}/.proxy/status.json") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers["Cache-Control"] == "no-store"
        text = await r.text()
        doc = await r.json()
    routes = {route["name"]: route for route in doc["routes"]}
    assert list(routes) == ["svc", "app", "dead"]
    svc, app, dead_route = routes["svc"], routes["app"], routes["dead"]
    assert (svc["prefix"], svc["host"], svc["upstream"], svc["audience"]) == ("/svc", None, private_service.url, private_service.url)
    assert (app["host"], app["header"]) == ("app.localhost", "x-serverless-authorization")
    assert svc["email"] == email and svc["source"] == "service_account"
    assert svc["token_valid"] is True and 3000 < svc["token_expires_in"] <= 3600
    assert svc["token_audience"] == private_service.url
    # Requests per route: the 404 is the app's answer, not an error; 500 is.
    assert svc["requests"] == 4 and app["requests"] == 1 and dead_route["requests"] == 1
    assert [(e["method"], e["path"], e["status"]) for e in svc["recent_errors"]] == [("GET", "/svc/status/500", 500)]
    assert svc["recent_errors"][0]["reason"].startswith("upstream answered 500")
    assert dead_route["recent_errors"][0]["status"] == 502
    assert "cannot connect" in dead_route["recent_errors"][0]["reason"]
    # What no route took: the 404 and the guard's refusal, newest first.
    unrouted = doc["unrouted"]
    assert unrouted["requests"] == 2
    assert [e["status"] for e in unrouted["recent_errors"]] == [403, 404]
    assert "cross-site request refused" in unrouted["recent_errors"][0]["reason"]
    assert doc["browser"] == {"allowed_hosts": [], "allowed_origins": ["http://localhost:3000"], "cross_site_navigation": "allow"}

    async with client.get(f"{proxy.url}/.proxy/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/html")
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        page = await r.text()
    for needle in ("svc", "app.localhost/", private_service.url, email, "upstream answered 500", "cannot connect", "http://localhost:3000"):
        assert needle in page, needle

    # Never a token, anywhere.
    for route in proxy.state.router.routes:
        minted = proxy.state.tokens.peek(route.token_key)
        assert minted is not None
        assert minted.token not in text and minted.token not in page
        assert minted.token.split(".")[1] not in text + page
    assert "eyJ" not in text + page


async def test_status_page_is_not_counted_and_cannot_be_shadowed(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"host": "app.localhost", "upstream": private_service.url}, {"upstream": private_service.url}))
    for host in (f"app.localhost:{proxy.port}", f"localhost:{proxy.port}"):
        async with client.get(f"{proxy.url}/.proxy/status.json", headers={"Host": host}) as r:
            assert r.status == 200
            doc = await r.json()
    assert private_service.requests == []
    assert all(route["requests"] == 0 for route in doc["routes"]) and doc["unrouted"]["requests"] == 0
    async with client.get(f"{proxy.url}/.proxy", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/.proxy/"
    async with client.get(f"{proxy.url}/.proxy/nothing-here") as r:
        assert r.status == 404
        assert "reserved" in await r.text()
    assert private_service.requests == []


async def test_a_route_without_a_token_shows_why(start_proxy, client, sa_key, private_service, google):
    google.fail("token", status=400)
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}), ready=False)
    assert not await proxy.state.tokens.wait_ready(2)
    async with client.get(f"{proxy.url}/.proxy/status.json") as r:
        doc = await r.json()
    route = doc["routes"][0]
    assert route["token_valid"] is False and route["token_expires_in"] is None
    assert route["token_error"]
    async with client.get(f"{proxy.url}/.proxy/") as r:
        page = await r.text()
    assert "no token yet" in page and "last refresh failed" in page


def test_html_escapes_everything():
    doc = {
        "version": "0.1.0",
        "time": "t",
        "listen": "127.0.0.1:8080",
        "browser": {"allowed_hosts": ["<h>"], "allowed_origins": [], "cross_site_navigation": "allow"},
        "routes": [
            {
                "name": "<script>alert(1)</script>",
                "host": None,
                "prefix": "/",
                "upstream": "https://x",
                "audience": "https://x",
                "header": "authorization",
                "identity": "i",
                "source": "static",
                "email": None,
                "token_valid": True,
                "token_expires_in": 100.0,
                "token_audience": "https://x",
                "token_error": None,
                "refreshes": {},
                "requests": 1,
                "recent_errors": [{"time": "t", "method": "GET", "path": "/<img src=x>", "status": 502, "reason": "<b>"}],
            }
        ],
        "unrouted": {"requests": 0, "recent_errors": []},
    }
    page = render_html(doc)
    assert "<script>" not in page and "<img" not in page and "<b><" not in page and "<h>" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x&gt;" in page
