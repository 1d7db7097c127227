"""Outbound proxies come from the environment once, per route; ~/.netrc is never used.

The client session runs with trust_env=False (the per-request environment and
~/.netrc lookups cost ~120 us per request): these tests hold the behaviour that
trust_env used to give (HTTP(S)_PROXY, NO_PROXY) and the one it must not
(.netrc Basic credentials added to upstream requests).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.envproxy import env_proxies, proxy_for


@pytest.mark.parametrize(
    ("environ", "scheme", "host", "expected"),
    [
        ({}, "https", "x.run.app", None),
        ({"HTTPS_PROXY": "http://p:3128"}, "https", "x.run.app", "http://p:3128"),
        ({"HTTPS_PROXY": "http://p:3128"}, "http", "x.run.app", None),
        ({"HTTP_PROXY": "http://p:3128"}, "http", "127.0.0.1", "http://p:3128"),
        ({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"}, "https", "x.run.app", "http://lower:2"),
        ({"ALL_PROXY": "http://all:1"}, "https", "x.run.app", "http://all:1"),
        ({"HTTPS_PROXY": "p:3128"}, "https", "x.run.app", "http://p:3128"),
        ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "run.app"}, "https", "x.run.app", None),
        ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": ".run.app"}, "https", "x.run.app", None),
        ({"HTTPS_PROXY": "http://p:3128", "no_proxy": "*"}, "https", "x.run.app", None),
        ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "other.example"}, "https", "x.run.app", "http://p:3128"),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "127.0.0.1"}, "http", "127.0.0.1", None),
    ],
)
def test_proxy_for_a_route(environ, scheme, host, expected):
    via = proxy_for(scheme, host, 443 if scheme == "https" else 80, environ)
    assert (via.describe() if via else None) == expected


def test_proxy_credentials_are_split_from_the_url():
    via = proxy_for("https", "x.run.app", 443, {"HTTPS_PROXY": "http://user:s3cret@p:3128"})
    assert via is not None
    assert via.describe() == "http://p:3128" and "s3cret" not in via.describe()
    assert via.headers == {"Proxy-Authorization": aiohttp.encode_basic_auth("user", "s3cret")}


def test_env_proxies_reads_proxy_variables_only():
    assert env_proxies({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "a,b", "PATH": "/bin", "EMPTY_PROXY": ""}) == {
        "https": "http://p:1",
        "no": "a,b",
    }


class FakeForwardProxy:
    """A plain-HTTP forward proxy on loopback that records request lines and answers itself."""

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.request_lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nvia-proxy")
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def forward_proxy() -> AsyncIterator[FakeForwardProxy]:
    fp = FakeForwardProxy()
    await fp.start()
    yield fp
    await fp.stop()


def _config(key, upstream, header="authorization"):
    return {
        "credentials": {"source": "service_account", "key_file": str(key)},
        "routes": [{"prefix": "/", "upstream": upstream, "header": header}],
    }


async def test_http_proxy_from_the_environment_is_used(start_proxy, sa_key, private_service, forward_proxy, clean_env, monkeypatch, google):
    proxy_url = f"http://127.0.0.1:{forward_proxy.server.sockets[0].getsockname()[1]}"
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    # google-auth (requests) honours the variables too: its token endpoint (127.0.0.1)
    # stays direct, while the route names its upstream "localhost".
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    key, _ = sa_key
    upstream = f"http://localhost:{private_service.port}"
    config = _config(key, upstream)
    config["routes"][0]["audience"] = private_service.url
    proxy = await start_proxy(config)
    # Chosen once, at startup.
    assert [v.describe() if v else None for v in proxy.state.forwarder.proxies.values()] == [proxy_url]
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/hello?q=1") as r:
        assert (r.status, await r.text()) == (200, "via-proxy")
    # Absolute-form through the proxy, to the configured upstream.
    assert forward_proxy.request_lines == [f"GET {upstream}/hello?q=1 HTTP/1.1"]
    assert private_service.requests == []


async def test_no_proxy_sends_the_route_direct(start_proxy, sa_key, private_service, forward_proxy, clean_env, monkeypatch, google):
    proxy_url = f"http://127.0.0.1:{forward_proxy.server.sockets[0].getsockname()[1]}"
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    key, _ = sa_key
    proxy = await start_proxy(_config(key, private_service.url))
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/hello") as r:
        assert r.status == 200, await r.text()
    assert forward_proxy.request_lines == []
    assert private_service.last.raw_path == "/hello"


@pytest.mark.parametrize("header", ["authorization", "x-serverless-authorization"])
async def test_netrc_credentials_are_never_sent_upstream(start_proxy, sa_key, private_service, clean_env, header):
    # A .netrc entry for the upstream host, where aiohttp's trust_env would find it.
    netrc = clean_env.home / ".netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-secret\ndefault login any password any-secret\n")
    netrc.chmod(0o600)
    key, _ = sa_key
    proxy = await start_proxy(_config(key, private_service.url, header))
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.url}/hello") as r:
        assert r.status == 200, await r.text()
    seen = private_service.last
    values = [v for _, v in seen.headers]
    assert not any("Basic" in v or "secret" in v for v in values), seen.headers
    if header == "x-serverless-authorization":
        assert seen.header_values("Authorization") == []
