"""The front door: proxied requests skip the Application, with the same outcome.

``app.ProxyFrontDoor`` hands a plain proxied request straight to the forwarder
and calls the guard's and the status page's response hooks itself; anything
else (here: a request with ``Expect: 100-continue``) goes through the
Application's router, middlewares and signals. Each test runs both ways, checks
which way was taken, and expects the same answer.
"""

from __future__ import annotations

import aiohttp
import pytest

from proxy.limits import FRONT_DOOR
from tests.test_guard import ALLOWED, sa_config

#: (extra request headers, whether the Application handles the request)
WAYS = {
    "front door": ({}, False),
    "application": ({"Expect": "100-continue"}, True),
}


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def started(start_proxy, sa_key, private_service, monkeypatch):
    proxy = await start_proxy(
        sa_config(sa_key[0], {"name": "svc", "prefix": "/svc", "upstream": private_service.url}, allowed_origins=[ALLOWED])
    )
    door = proxy.app[FRONT_DOOR]
    calls = []
    application_handle = door.app._handle

    async def counting(request):
        calls.append(request.raw_path)
        return await application_handle(request)

    # Only to observe which way a request took: the door calls the Application's handler.
    monkeypatch.setattr(door.app, "_handle", counting)
    return proxy, calls


@pytest.mark.parametrize("way", list(WAYS))
async def test_cors_headers_token_and_counts_are_the_same_either_way(way, start_proxy, client, sa_key, private_service, monkeypatch):
    extra, via_application = WAYS[way]
    proxy, calls = await started(start_proxy, sa_key, private_service, monkeypatch)

    # The upstream answers /cors with "Access-Control-Allow-Origin: *": replaced by the proxy's own.
    async with client.get(f"{proxy.url}/svc/cors", headers=extra) as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers
        assert r.headers["Vary"] == "Origin"
    assert private_service.last.claims is not None  # the token was checked upstream
    assert private_service.last.header("Expect") is None  # never forwarded
    async with client.get(f"{proxy.url}/svc/cors", headers={"Origin": ALLOWED, **extra}) as r:
        assert r.status == 200
        assert r.headers.getall("Access-Control-Allow-Origin") == [ALLOWED]
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
    # An upstream 500 is counted and listed as a recent error of its route.
    async with client.get(f"{proxy.url}/svc/status/500", headers=extra) as r:
        assert r.status == 500
    # No route: the proxy's own 404, readable by the allowed origin.
    async with client.get(f"{proxy.url}/elsewhere", headers={"Origin": ALLOWED, **extra}) as r:
        assert r.status == 404
        assert r.headers["Access-Control-Allow-Origin"] == ALLOWED

    proxied = [p for p in calls if not p.startswith("/.proxy")]
    assert proxied == (["/svc/cors", "/svc/cors", "/svc/status/500", "/elsewhere"] if via_application else [])

    async with client.get(f"{proxy.url}/.proxy/status.json") as r:
        doc = await r.json()
    svc = next(route for route in doc["routes"] if route["name"] == "svc")
    assert svc["requests"] == 3
    assert [(e["path"], e["status"]) for e in svc["recent_errors"]] == [("/svc/status/500", 500)]
    assert calls[-1] == "/.proxy/status.json"  # the proxy's own pages: always the Application


@pytest.mark.parametrize("way", list(WAYS))
async def test_refusals_are_the_same_either_way(way, start_proxy, client, sa_key, private_service, monkeypatch):
    extra, _ = WAYS[way]
    proxy, calls = await started(start_proxy, sa_key, private_service, monkeypatch)
    async with client.get(f"{proxy.url}/svc/a", headers={"Origin": "http://evil.example", **extra}) as r:
        assert r.status == 403
        assert "cross-site request refused" in await r.text()
        assert "Access-Control-Allow-Origin" not in r.headers
    async with client.get(f"{proxy.url}/svc/a", headers={"Host": "evil.example", **extra}) as r:
        assert r.status == 403
    assert private_service.requests == []
    # Refusals are answered by the guard middleware: the Application's way.
    assert calls == ["/svc/a", "/svc/a"]
