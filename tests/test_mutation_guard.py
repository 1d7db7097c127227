"""The guard's finer rules, each on a real proxy or through ``Guard.decide``.

- a websocket handshake (101) from an allowed origin carries no CORS headers;
- ``Vary: Origin`` is added once, whatever the upstream's Vary already says;
- the listen address, IPv6 included, is an allowed Host (a wildcard is not);
- the preflight answer grants exactly the method and headers asked for.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import parse_config
from proxy.policy.guard import Guard
from tests.fakes import BackgroundServer

ALLOWED = "http://localhost:3000"


def sa_config(key_path, *routes, **top):  # type: ignore[no-untyped-def]
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


@pytest.fixture
async def client():  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as session:
        yield session


async def raw_head(port: int, request: bytes) -> tuple[int, CIMultiDict[str]]:
    """Send one request; the response's status and headers (the head only)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    return int(status_line.split()[1]), headers


# --------------------------------------------------------------------------- 101: no CORS


async def test_a_websocket_handshake_from_an_allowed_origin_carries_no_cors_headers(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, allowed_origins=[ALLOWED]))
    key = base64.b64encode(os.urandom(16)).decode()
    # The upstream's 101 offers a CORS header of its own too.
    status, headers = await raw_head(
        proxy.port,
        (
            "GET /ws?header=Access-Control-Allow-Origin:* HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{proxy.port}\r\nOrigin: {ALLOWED}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    assert status == 101, headers
    assert [n for n in headers if n.lower().startswith("access-control-")] == [], headers
    # The same origin's plain request is answered with CORS (the rule is the 101's alone).
    async with client.get(f"{proxy.url}/x", headers={"Origin": ALLOWED}) as r:
        assert r.status == 200
        assert r.headers.getall("Access-Control-Allow-Origin") == [ALLOWED]


# --------------------------------------------------------------------------- Vary: Origin, once


class VaryUpstream:
    """An upstream that answers with the Vary header(s) asked for (?vary=..., repeatable)."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._answer)
        self.server = BackgroundServer(app)

    async def _answer(self, request: web.Request) -> web.Response:
        response = web.Response(text="ok\n")
        for value in request.query.getall("vary", []):
            response.headers.add("Vary", value)
        return response


@pytest.fixture
def vary_upstream() -> Iterator[VaryUpstream]:
    upstream = VaryUpstream()
    upstream.server.start()
    yield upstream
    upstream.server.stop()


@pytest.mark.parametrize(
    "upstream_vary, expected",
    [
        ([], "Origin"),
        (["Origin"], "Origin"),
        (["origin"], "origin"),
        (["Accept-Encoding"], "Accept-Encoding, Origin"),
        (["Accept-Encoding, origin"], "Accept-Encoding, origin"),
        (["Accept-Encoding ,  ORIGIN , Cookie"], "Accept-Encoding ,  ORIGIN , Cookie"),
        (["Originator"], "Originator, Origin"),  # a name that merely starts like it
        (["*"], "*"),  # varies on everything already
    ],
)
@pytest.mark.parametrize("origin", [None, ALLOWED])
async def test_vary_origin_is_added_once(start_proxy, client, sa_key, vary_upstream, upstream_vary, expected, origin):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": vary_upstream.server.url}, allowed_origins=[ALLOWED]))
    query = "&".join(f"vary={v}" for v in upstream_vary)
    headers = {"Origin": origin} if origin else {}
    async with client.get(f"{proxy.url}/x?{query}", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers.getall("Vary") == [expected]
        assert ("Access-Control-Allow-Origin" in r.headers) == (origin is not None)


# --------------------------------------------------------------------------- the listen address as a Host


def guard(**top) -> Guard:  # type: ignore[no-untyped-def]
    config = {"routes": [{"upstream": "http://127.0.0.1:9"}], **top}
    return Guard(parse_config(config, env={}))


def host_allowed(g: Guard, host: str) -> bool:
    return g.decide("GET", CIMultiDict({"Host": host})).allowed


@pytest.mark.parametrize("listen", ["fd00::5", "FD00::5", "[fd00::5]"])
def test_an_ipv6_listen_address_is_an_allowed_host_in_brackets(listen):
    g = guard(listen={"host": listen, "allow_non_loopback": True})
    assert host_allowed(g, "[fd00::5]:8080")
    assert host_allowed(g, "[FD00::5]")
    assert not host_allowed(g, "[fd00::6]:8080")
    assert not host_allowed(g, "fd00::5")  # unbracketed: not that address


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_listen_address_is_no_allowed_host(listen):
    g = guard(listen={"host": listen, "allow_non_loopback": True})
    host = f"[{listen.strip('[]')}]" if ":" in listen else listen
    assert not host_allowed(g, f"{host}:8080")
    assert host_allowed(g, "localhost:8080")


def test_a_loopback_listen_address_other_than_127_0_0_1_is_allowed():
    g = guard(listen={"host": "127.0.0.2"})
    assert host_allowed(g, "127.0.0.2:8080")
    assert not host_allowed(g, "127.0.0.3:8080")


@pytest.mark.parametrize("length, shown", [(100, "{host}"), (101, "{host100}...")])
def test_a_refused_host_is_quoted_in_the_reason_up_to_100_characters(length, shown):
    host = ("h" * 200)[: length - 5] + ".test"
    v = guard().decide("GET", CIMultiDict({"Host": host}))
    assert (v.allowed, v.status) == (False, 403)
    assert v.reason == f"Host {shown.format(host=host, host100=host[:100])!r} is not allowed"


def test_refusals_give_the_user_a_hint():
    g = guard()
    host = g.decide("GET", CIMultiDict({"Host": "evil.example"}))
    assert host.hint == "browse to localhost, 127.0.0.1, [::1] or a *.localhost name, or add this name to allowed_hosts"
    assert g.decide("GET", CIMultiDict()).hint == "send Host: localhost"
    cross = g.decide("POST", CIMultiDict({"Host": "localhost", "Origin": "http://evil.example"}))
    assert (cross.allowed, cross.status) == (False, 403)
    assert cross.hint is not None and "list that origin in allowed_origins" in cross.hint


async def test_a_refusal_is_plain_text_the_browser_must_not_sniff(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    async with client.get(f"{proxy.url}/x", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        body = await r.text()
    assert "cross-site request refused" in body and "allowed_origins" in body
    assert private_service.requests == []


# --------------------------------------------------------------------------- the preflight answer


@pytest.mark.parametrize(
    "method, requested, allow_methods, allow_headers",
    [
        ("PUT", "Content-Type, X-App", "PUT", "Content-Type, X-App"),
        (" DELETE ", " x-one ,, x-two ", "DELETE", "x-one, x-two"),
        # Not tokens: a value that could split the header is granted to nobody.
        ("PUT\tX", "ok, bad header, x:y", None, "ok"),
        ("PATCH", "", "PATCH", None),
    ],
)
async def test_a_preflight_grants_what_was_asked_and_nothing_malformed(
    start_proxy, client, sa_key, private_service, method, requested, allow_methods, allow_headers
):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}, allowed_origins=[ALLOWED]))
    headers = {"Origin": ALLOWED, "Access-Control-Request-Method": method}
    if requested:
        headers["Access-Control-Request-Headers"] = requested
    async with client.options(f"{proxy.url}/upload", headers=headers) as r:
        assert r.status == 204
        assert r.headers.get("Access-Control-Allow-Methods") == allow_methods
        assert r.headers.get("Access-Control-Allow-Headers") == allow_headers
        assert r.headers["Access-Control-Max-Age"] == "600"
        assert r.headers.getall("Vary") == ["Origin, Access-Control-Request-Method, Access-Control-Request-Headers"]
        assert r.headers.getall("Access-Control-Allow-Origin") == [ALLOWED]
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert private_service.requests == []
