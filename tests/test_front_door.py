"""One request path: plain proxied requests and the rest get the same treatment.

Requests that take the path's shortcuts (a complete response relayed as its
bytes) and requests that do not (here: ``Expect: 100-continue``, which the
engine answers itself, never forwarded) get the same guard, CORS headers,
token and counts. Each test runs both ways and expects the same answer.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.test_guard import ALLOWED, sa_config

#: extra request headers
WAYS = {
    "plain": {},
    "expect": {"Expect": "100-continue"},
}


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def started(start_proxy, sa_key, private_service):
    return await start_proxy(
        sa_config(sa_key[0], {"name": "svc", "prefix": "/svc", "upstream": private_service.url}, allowed_origins=[ALLOWED])
    )


@pytest.mark.parametrize("way", list(WAYS))
async def test_cors_headers_token_and_counts_are_the_same_either_way(way, start_proxy, client, sa_key, private_service):
    extra = WAYS[way]
    proxy = await started(start_proxy, sa_key, private_service)

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

    async with client.get(f"{proxy.url}/.proxy/status.json") as r:
        doc = await r.json()
    svc = next(route for route in doc["routes"] if route["name"] == "svc")
    assert svc["requests"] == 3
    assert [(e["path"], e["status"]) for e in svc["recent_errors"]] == [("/svc/status/500", 500)]


@pytest.mark.parametrize("way", list(WAYS))
async def test_refusals_are_the_same_either_way(way, start_proxy, client, sa_key, private_service):
    extra = WAYS[way]
    proxy = await started(start_proxy, sa_key, private_service)
    async with client.get(f"{proxy.url}/svc/a", headers={"Origin": "http://evil.example", **extra}) as r:
        assert r.status == 403
        assert "cross-site request refused" in await r.text()
        assert "Access-Control-Allow-Origin" not in r.headers
    async with client.get(f"{proxy.url}/svc/a", headers={"Host": "evil.example", **extra}) as r:
        assert r.status == 403
    assert private_service.requests == []
