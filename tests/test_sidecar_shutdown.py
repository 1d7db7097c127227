"""Graceful shutdown of the real CLI: SIGTERM drains in-flight requests and exits 0.

Each test runs ``python -m proxy`` in a subprocess against a local upstream; the
upstream's slow endpoint is held open by the test, so the order of events is
forced by the test, never by timing.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web

from proxy.app import STATE, make_app
from proxy.config import parse_config
from proxy.auth.static import StaticIdentity
from proxy.server import EXIT_FORCED, ProxyServer

from .test_sidecar_support import ProxyProcess, Upstream, clean_env, eventually, get_status, mint_jwt, write_config


async def _start(tmp_path: Path, upstream: Upstream, token: str, **top: object) -> ProxyProcess:
    config = write_config(tmp_path / "config.yaml", upstream.url, **top)
    env = clean_env(tmp_path, SIDECAR_TEST_TOKEN=token)
    proxy = await ProxyProcess(["--config", str(config)], env).start()
    await proxy.wait_listening()
    return proxy


async def _readyz(session: aiohttp.ClientSession, proxy: ProxyProcess) -> int:
    status, _ = await get_status(session, proxy.admin_url + "/.proxy/readyz")
    return status


async def test_sigterm_lets_the_slow_request_finish_and_exits_0(tmp_path: Path) -> None:
    token = mint_jwt()
    async with Upstream() as upstream, aiohttp.ClientSession() as session:
        proxy = await _start(tmp_path, upstream, token, shutdown_timeout=60)
        try:
            await eventually(lambda: _is(session, proxy.admin_url + "/.proxy/readyz", 200), "readiness 200")
            slow = asyncio.ensure_future(session.get(proxy.url + "/slow"))
            await asyncio.wait_for(upstream.slow_arrived.wait(), 30)

            proxy.signal(signal.SIGTERM)
            # Phase 1: readiness fails while the request is still in flight.
            await eventually(lambda: _is(session, proxy.admin_url + "/.proxy/readyz", 503), "readiness 503 on SIGTERM")
            status, body = await get_status(session, proxy.admin_url + "/.proxy/readyz")
            assert (status, body) == (503, "not ready: shutting down\n")
            # Phase 2: the main listener no longer accepts connections.
            await eventually(lambda: _refused(proxy.url + "/hello"), "the main listener to stop accepting")
            assert not slow.done()
            assert proxy.proc is not None and proxy.proc.returncode is None

            # Phase 3: the in-flight request completes, whole.
            upstream.release()
            resp = await asyncio.wait_for(slow, 30)
            body = await resp.text()
            assert resp.status == 200
            assert body == "slow but complete " + "x" * 1000
            assert await proxy.wait_exit() == 0
        finally:
            await proxy.stop()
    assert upstream.authorizations[0] == f"Bearer {token}"
    assert "SIGTERM: shutting down" in proxy.stderr
    assert "waiting up to 60 s for 1 in-flight request" in proxy.stderr
    assert proxy.stderr.rstrip().endswith("stopped")


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with Upstream() as upstream, aiohttp.ClientSession() as session:
        # A drain deadline far beyond the wait below: only the second signal can end it early.
        proxy = await _start(tmp_path, upstream, mint_jwt(), shutdown_timeout=3600)
        try:
            slow = asyncio.ensure_future(session.get(proxy.url + "/slow"))
            await asyncio.wait_for(upstream.slow_arrived.wait(), 30)
            proxy.signal(signal.SIGTERM)
            await eventually(lambda: _is(session, proxy.admin_url + "/.proxy/readyz", 503), "shutdown to start")
            proxy.signal(signal.SIGINT)
            assert await proxy.wait_exit() == EXIT_FORCED
            with pytest.raises(aiohttp.ClientError):
                resp = await asyncio.wait_for(slow, 30)
                await resp.read()
        finally:
            await proxy.stop()
    assert "second SIGINT: exiting now" in proxy.stderr


async def test_drain_deadline_cancels_the_rest_and_still_exits_0(tmp_path: Path) -> None:
    async with Upstream() as upstream, aiohttp.ClientSession() as session:
        proxy = await _start(tmp_path, upstream, mint_jwt(), shutdown_timeout=0.2)
        try:
            slow = asyncio.ensure_future(session.get(proxy.url + "/slow"))
            await asyncio.wait_for(upstream.slow_arrived.wait(), 30)
            proxy.signal(signal.SIGTERM)
            # The upstream never answers: the deadline passes, the request is cancelled.
            assert await proxy.wait_exit() == 0
            with pytest.raises(aiohttp.ClientError):
                resp = await asyncio.wait_for(slow, 30)
                await resp.read()
        finally:
            await proxy.stop()


async def test_shutdown_closes_websockets_with_1001(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The websocket contract of ProxyState: an open websocket through the proxy is in
    # state.websockets, and shutdown closes each with 1001 (going away).
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", mint_jwt())
    opened = asyncio.Event()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        opened.set()
        async for _ in ws:
            pass
        return ws

    upstream_app = web.Application()
    upstream_app.router.add_get("/ws-test", ws_handler)
    runner = web.AppRunner(upstream_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]
    config = parse_config(
        {
            "credentials": {"source": "static", "token_env": "SIDECAR_TEST_TOKEN"},
            "listen": {"port": 0},
            "admin": {"port": 0},
            "routes": [{"name": "up", "upstream": f"http://127.0.0.1:{upstream_port}"}],
        }
    )
    ident = StaticIdentity(token_env="SIDECAR_TEST_TOKEN")
    app = make_app(config, identities={config.routes[0].credentials: ident})
    state = app[STATE]
    server = ProxyServer(app, config)
    await server.start()
    try:
        port = server.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws-test") as ws:
                await asyncio.wait_for(opened.wait(), 30)
                assert len(state.websockets) == 1
                stopping = asyncio.ensure_future(server.stop())
                msg = await asyncio.wait_for(ws.receive(), 30)
                assert msg.type == WSMsgType.CLOSE
                assert msg.data == WSCloseCode.GOING_AWAY
                assert msg.extra == "proxy shutting down"
                await asyncio.wait_for(stopping, 30)
    finally:
        await server.stop()
        await runner.cleanup()
    assert state.readiness is not None and state.readiness.shutting_down


async def _is(session: aiohttp.ClientSession, url: str, status: int) -> bool:
    try:
        got, _ = await get_status(session, url)
    except aiohttp.ClientConnectionError:
        return False
    return got == status


async def _refused(url: str) -> bool:
    # A fresh session: a pooled keep-alive connection would not show a closed listener.
    async with aiohttp.ClientSession() as fresh:
        try:
            async with fresh.get(url) as resp:
                await resp.read()
        except aiohttp.ClientConnectorError:
            return True
    return False
