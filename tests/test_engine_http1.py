"""The HTTP/1.1 engine from outside: raw sockets and real clients against a running proxy.

Pipelined requests answered in order, ``Expect: 100-continue``, backpressure with a slow
reader on either side (the proxy's RSS stays flat), a chunked upload to an upstream that
answers early, and outbound proxies (``HTTPS_PROXY`` CONNECT, plain ``HTTP_PROXY``).
Only the running proxy is used (the ``start_proxy`` fixture or ``python -m proxy``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.outbound_proxy import OutboundProxy
from tests.fakes.private_service import PrivateService, pattern_bytes
from tests.fakes.raw_upstreams import EarlyAnswer, SlowReader
from tests.fakes.tls import HOST, TestCA, TLSPrivateService
from tests.rawhttp import ConnectionClosed, RawConnection, request
from tests.test_sidecar_support import ProxyProcess, clean_env, mint_jwt

MIB = 1 << 20


def sa_config(key: Path, upstream: str, **route: Any) -> dict[str, Any]:
    return {
        "credentials": {"source": "service_account", "key_file": str(key)},
        "routes": [{"prefix": "/", "upstream": upstream, **route}],
    }


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --------------------------------------------------------------------------- pipelining


async def test_pipelined_requests_are_answered_in_order(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], private_service.url))
    # The first one is slow upstream: answering as they complete would put it last.
    targets = ["/slow?seconds=0.5&id=0", *[f"/echo?id={i}" for i in range(1, 6)], "/slow?seconds=0.2&id=6", "/echo?id=7"]
    conn = await RawConnection.open(proxy.port)
    try:
        # All of them in one write, before any answer.
        await conn.send(b"".join(request("GET", t, host=f"127.0.0.1:{proxy.port}") for t in targets))
        replies = [await conn.response(timeout=20) for _ in targets]
    finally:
        await conn.close()
    assert [r.status for r in replies] == [200] * len(targets), [(r.status, r.text) for r in replies]
    bodies = [r.text for r in replies]
    assert bodies[0] == "slow\n" and bodies[6] == "slow\n", bodies
    echoed = [json.loads(bodies[i])["path"] for i in (1, 2, 3, 4, 5, 7)]
    assert echoed == [targets[i] for i in (1, 2, 3, 4, 5, 7)]
    # Each one reached the upstream with its token, in the order sent.
    assert [r.raw_path for r in private_service.requests] == targets
    assert all(r.claims is not None for r in private_service.requests)


# --------------------------------------------------------------------------- Expect: 100-continue


async def test_expect_100_continue_gets_100_before_the_body(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], private_service.url))
    body = pattern_bytes(200_000)
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(
            request("POST", "/upload", [("Content-Length", str(len(body))), ("Expect", "100-continue")], host=f"127.0.0.1:{proxy.port}")
        )
        # Nothing of the body has been sent: the interim answer must come first.
        interim = await conn.response(timeout=10)
        assert (interim.status, interim.body) == (100, b""), interim
        await conn.send(body)
        final = await conn.response(timeout=20)
    finally:
        await conn.close()
    assert final.status == 200, final.text
    assert json.loads(final.text) == {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert private_service.last.body_len == len(body)


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        # No route for the path.
        ("/other/upload", [], 404),
        # The guard: a Host that is not the proxy's own.
        ("/svc/upload", [("Host", "evil.example")], 403),
    ],
)
async def test_expect_100_continue_refused_request_gets_its_status_without_100(start_proxy, sa_key, private_service, target, headers, status):
    proxy = await start_proxy(sa_config(sa_key[0], private_service.url, prefix="/svc"))
    host = next((v for k, v in headers if k == "Host"), f"127.0.0.1:{proxy.port}")
    conn = await RawConnection.open(proxy.port)
    try:
        await conn.send(request("POST", target, [("Content-Length", "100000"), ("Expect", "100-continue")], host=host))
        reply = await conn.response(timeout=10)
    finally:
        await conn.close()
    # The final status first: no 100 invites a body that would only be thrown away.
    assert reply.status == status, (reply.status, reply.text)
    assert reply.text.startswith("idtoken-proxy: "), reply.text
    assert private_service.requests == []


# --------------------------------------------------------------------------- backpressure (subprocess, RSS)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler:
    """The highest VmRSS of ``pid`` seen while running (every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, vm_rss_kib(self.pid))
            await asyncio.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak_kib = vm_rss_kib(self.pid)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak_kib = max(self.peak_kib, vm_rss_kib(self.pid))


#: Generous: the proxy may keep a few buffers per side, never the transfer.
RSS_GROWTH_BOUND_KIB = 64 * 1024
TRANSFER = 200 * MIB


async def start_cli(tmp_path: Path, config: dict[str, Any], **env: str) -> ProxyProcess:
    config = {**config, "listen": {"port": 0}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proxy = ProxyProcess(["--config", str(path)], clean_env(tmp_path, **env))
    await proxy.start()
    try:
        await proxy.wait_listening(admin=False)
    except BaseException:
        await proxy.stop()
        raise
    return proxy


def static_config(upstream: str) -> dict[str, Any]:
    return {"credentials": {"source": "static", "token_env": "ENGINE_TEST_TOKEN"}, "routes": [{"prefix": "/", "upstream": upstream}]}


async def warm_up(proxy: ProxyProcess, path: str, method: str = "GET", body: bytes = b"") -> None:
    """A small request first: the baseline RSS includes what serving one request loads."""
    async with aiohttp.ClientSession() as session, session.request(method, f"{proxy.url}{path}", data=body or None) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def slow_download(port: int, target: str, expected: int, *, read_size: int = 32768, pause: float = 0.001) -> int:
    """GET ``target`` on a raw socket, reading ``read_size`` bytes per ``pause``; returns the body length."""
    conn = await RawConnection.open(port)
    try:
        await conn.send(request("GET", target, [("Connection", "close")], host=f"127.0.0.1:{port}"))
        head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200"), head
        got = 0
        async with asyncio.timeout(240):
            while got < expected:
                chunk = await conn.reader.read(read_size)
                if not chunk:
                    break
                got += len(chunk)
                await asyncio.sleep(pause)
        return got
    finally:
        await conn.close()


@pytest.mark.timeout(300)
@pytest.mark.soak  # bounded load: everyday runs skip it, .ci/run runs it
async def test_slow_client_download_keeps_the_proxy_rss_flat(tmp_path, sa_key, fake_google):
    with PrivateService(certs_url=fake_google.certs_url) as service:
        proxy = await start_cli(tmp_path, sa_config(sa_key[0], service.url))
        try:
            await warm_up(proxy, "/bytes/100000?cl=1")
            base = vm_rss_kib(proxy.proc.pid)
            with RssSampler(proxy.proc.pid) as rss:
                # The upstream could send it all in a second; the client takes far longer.
                got = await slow_download(proxy.port, f"/bytes/{TRANSFER}?cl=1", TRANSFER)
            assert got == TRANSFER
        finally:
            await proxy.stop()
    growth = rss.peak_kib - base
    assert growth < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew {growth // 1024} MiB (from {base // 1024} MiB) during a slow 200 MiB download"


@pytest.mark.timeout(300)
@pytest.mark.soak  # bounded load: everyday runs skip it, .ci/run runs it
async def test_slow_upstream_upload_keeps_the_proxy_rss_flat(tmp_path):
    async with SlowReader(read_size=16384, pause=0.001) as upstream:
        proxy = await start_cli(tmp_path, static_config(upstream.url), ENGINE_TEST_TOKEN=mint_jwt(upstream.url))
        try:
            await warm_up(proxy, "/warm", "POST", b"x" * 1000)
            base = vm_rss_kib(proxy.proc.pid)
            digest = hashlib.sha256()

            async def body() -> AsyncIterator[bytes]:
                for start in range(0, TRANSFER, MIB):
                    chunk = pattern_bytes(MIB, start)
                    digest.update(chunk)
                    yield chunk

            with RssSampler(proxy.proc.pid) as rss:
                timeout = aiohttp.ClientTimeout(total=240)
                async with aiohttp.ClientSession(timeout=timeout) as session, session.post(f"{proxy.url}/upload", data=body()) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
            assert answer == {"len": TRANSFER, "sha256": digest.hexdigest()}
        finally:
            await proxy.stop()
    growth = rss.peak_kib - base
    assert growth < RSS_GROWTH_BOUND_KIB, f"proxy RSS grew {growth // 1024} MiB (from {base // 1024} MiB) during a 200 MiB upload to a slow reader"


# --------------------------------------------------------------------------- an upstream that answers early


async def test_chunked_upload_to_an_upstream_that_answers_early(start_proxy, monkeypatch):
    async with EarlyAnswer(read_first=65536) as upstream:
        monkeypatch.setenv("ENGINE_TEST_TOKEN", mint_jwt(upstream.url))
        proxy = await start_proxy(static_config(upstream.url))
        conn = await RawConnection.open(proxy.port)
        chunk = b"%x\r\n%s\r\n" % (65536, b"u" * 65536)

        async def send_body() -> str:
            # 16 MiB chunked, then the last chunk and a second request on the same connection,
            # all sent whatever comes back (as curl does); the proxy may close at any point.
            try:
                for _ in range(256):
                    await conn.send(chunk)
                await conn.send(b"0\r\n\r\n" + request("GET", "/after", host=f"127.0.0.1:{proxy.port}"))
                return "sent"
            except (ConnectionError, OSError):
                return "reset"

        try:
            await conn.send(request("POST", "/upload", [("Transfer-Encoding", "chunked")], host=f"127.0.0.1:{proxy.port}"))
            sender = asyncio.ensure_future(send_body())
            # The upstream's early answer reaches the client while the body is still coming.
            reply = await conn.response(timeout=20)
            assert reply.status == 413, (reply.status, reply.text)
            assert reply.body == EarlyAnswer.BODY
            sent = await asyncio.wait_for(sender, 30)
            # Then the connection is either closed, or it was drained and serves the next request.
            try:
                after = await conn.response(timeout=20)
            except ConnectionClosed:
                after = None
            if after is None:
                assert await conn.closed_by_server(timeout=20)
            else:
                # Drained: the body's end was found and the next request went on as usual.
                assert sent == "sent" and (after.status, after.body) == (200, b"after\n"), (sent, after.status, after.text)
        finally:
            # Abort, not close: a proxy that stopped reading would hold a graceful close forever.
            conn.writer.transport.abort()
    assert len(upstream.heads) >= 1 and upstream.heads[0].startswith(b"POST /upload HTTP/1.1")


# --------------------------------------------------------------------------- outbound proxies


async def test_https_proxy_connect_reaches_the_https_service_with_the_token(tmp_path, sa_key, fake_google):
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    ca = TestCA(ca_dir)
    with TLSPrivateService(ca, certs_url=fake_google.certs_url) as service:
        async with OutboundProxy() as outbound:
            # The token endpoint (127.0.0.1) stays direct; the route's host is "localhost".
            proxy = await start_cli(
                tmp_path, sa_config(sa_key[0], service.url), SSL_CERT_FILE=str(ca.ca_file), HTTPS_PROXY=outbound.url, NO_PROXY="127.0.0.1"
            )
            try:
                async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/hello?via=connect") as r:
                    assert r.status == 200, await r.text()
                    assert json.loads(await r.text())["path"] == "/hello?via=connect"
            finally:
                await proxy.stop()
        lines = [r.line for r in outbound.requests]
        assert lines == [f"CONNECT {HOST}:{service.port} HTTP/1.1"], lines
        # TLS went end to end through the tunnel, with the route's host as SNI.
        assert service.handshakes == [HOST]
        seen = service.last
        assert seen.claims is not None and seen.claims["aud"] == service.url


async def test_http_proxy_forwards_an_http_upstream_with_the_token(start_proxy, client, sa_key, private_service, clean_env, monkeypatch):
    async with OutboundProxy() as outbound:
        monkeypatch.setenv("HTTP_PROXY", outbound.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        upstream = f"http://localhost:{private_service.port}"
        proxy = await start_proxy(sa_config(sa_key[0], upstream, audience=private_service.url))
        async with client.get(f"{proxy.url}/hello?via=http-proxy") as r:
            assert r.status == 200, await r.text()
            assert json.loads(await r.text())["path"] == "/hello?via=http-proxy"
    assert [r.line for r in outbound.requests] == [f"GET {upstream}/hello?via=http-proxy HTTP/1.1"]
    seen = private_service.last
    assert seen.raw_path == "/hello?via=http-proxy"
    assert seen.claims is not None and seen.claims["aud"] == private_service.url
