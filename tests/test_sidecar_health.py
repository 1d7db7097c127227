"""Health and readiness on the main and the admin listener.

A gated identity (injected through the app factory) holds the first token back
until the test opens the gate, so readiness is seen 503 before tokens, 200
after, and 503 again from the first moment of shutdown.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from proxy.app import STATE, make_admin_app, make_app
from proxy.config import Config, parse_config
from proxy.auth.identity import Identity, Minted, minted
from proxy.server import ProxyServer, StartupError

from .test_sidecar_support import eventually, get_status, mint_jwt


class GatedIdentity(Identity):
    """Mints a token only once ``gate`` is set; fails with ``error`` while it is set."""

    source = "static"
    chooses_audience = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.error: str | None = None
        self.email = "gated@example.com"

    async def fetch(self, audience: str) -> Minted:
        if self.error:
            raise RuntimeError(self.error)
        await self.gate.wait()
        return minted(mint_jwt(audience))

    def _fetch_sync(self, audience: str) -> Minted:  # never used: fetch is async here
        raise NotImplementedError


def _config(**top: object) -> Config:
    raw: dict[str, object] = {
        "listen": {"port": 0},
        "admin": {"port": 0},
        "routes": [
            {"name": "one", "prefix": "/one", "upstream": "http://127.0.0.1:9"},
            {"name": "two", "prefix": "/two", "upstream": "http://127.0.0.1:10"},
        ],
    }
    raw.update(top)
    return parse_config(raw, {})


async def _server(config: Config, ident: Identity) -> ProxyServer:
    app = make_app(config, identities={r.credentials: ident for r in config.routes})
    server = ProxyServer(app, config)
    await server.start()
    return server


async def test_readiness_flips_before_tokens_after_tokens_and_on_shutdown() -> None:
    ident = GatedIdentity()
    server = await _server(_config(), ident)
    try:
        main = f"http://127.0.0.1:{server.addresses[0][1]}"
        admin = f"http://127.0.0.1:{server.admin_addresses[0][1]}"
        async with aiohttp.ClientSession() as s:
            for base in (main, admin):
                assert await get_status(s, base + "/.proxy/healthz") == (200, "ok\n")
                status, body = await get_status(s, base + "/.proxy/readyz")
                assert status == 503
                assert "route one: no valid token yet" in body and "route two: no valid token yet" in body

            ident.gate.set()

            async def ready() -> bool:
                return (await get_status(s, admin + "/.proxy/readyz"))[0] == 200

            await eventually(ready, "readiness once tokens are in")
            assert await get_status(s, main + "/.proxy/readyz") == (200, "ready\n")
            async with s.head(admin + "/.proxy/readyz") as resp:
                assert resp.status == 200

            server.begin_shutdown()
            for base in (main, admin):
                assert await get_status(s, base + "/.proxy/readyz") == (503, "not ready: shutting down\n")
                # Liveness stays green while draining: a restart now would only cut requests.
                assert await get_status(s, base + "/.proxy/healthz") == (200, "ok\n")
    finally:
        await server.stop()


async def test_readiness_names_the_token_error() -> None:
    ident = GatedIdentity()
    ident.error = "metadata server said no"
    server = await _server(_config(), ident)
    try:
        admin = f"http://127.0.0.1:{server.admin_addresses[0][1]}"
        async with aiohttp.ClientSession() as s:

            async def reports_error() -> bool:
                status, body = await get_status(s, admin + "/.proxy/readyz")
                return status == 503 and "metadata server said no" in body

            await eventually(reports_error, "the refresh error in the readiness answer")
    finally:
        await server.stop()


async def test_admin_listener_serves_only_health_and_metrics() -> None:
    ident = GatedIdentity()
    ident.gate.set()
    config = _config()
    app = make_app(config, identities={r.credentials: ident for r in config.routes})
    admin = make_admin_app(app[STATE])
    paths = sorted(admin.pages)
    assert paths == ["/.proxy/healthz", "/.proxy/metrics", "/.proxy/readyz"]
    server = ProxyServer(app, config, admin)
    await server.start()
    try:
        admin_url = f"http://127.0.0.1:{server.admin_addresses[0][1]}"
        async with aiohttp.ClientSession() as s:
            # A route prefix on the admin port is not proxied, whatever Host says.
            async with s.get(admin_url + "/one/x", headers={"Host": "10.0.0.7"}) as resp:
                assert resp.status == 404
            # Probes send the pod IP as Host: the admin listener answers it.
            async with s.get(admin_url + "/.proxy/healthz", headers={"Host": "10.0.0.7:9090"}) as resp:
                assert resp.status == 200
    finally:
        await server.stop()


async def test_admin_port_in_use_is_a_startup_error() -> None:
    ident = GatedIdentity()
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        config = _config(admin={"port": port})
        app = make_app(config, identities={r.credentials: ident for r in config.routes})
        server = ProxyServer(app, config)
        with pytest.raises(StartupError, match=rf"cannot listen on 127.0.0.1:{port} \(admin\)"):
            await server.start()
        await server.stop()  # a no-op after a failed start
    finally:
        blocker.close()
        await blocker.wait_closed()


def test_no_admin_listener_unless_configured() -> None:
    config = parse_config({"routes": [{"upstream": "http://127.0.0.1:9"}]}, {})
    assert config.admin.port is None
    app = make_app(config, identities={config.routes[0].credentials: GatedIdentity()})
    assert ProxyServer(app, config).admin_app is None


def test_admin_flags_and_environment(tmp_path: Path) -> None:
    from proxy.__main__ import _env_default, build_config, serve_parser

    env = {"IDTOKEN_PROXY_ADMIN_PORT": "9191", "IDTOKEN_PROXY_ADMIN_HOST": "0.0.0.0"}
    parser = serve_parser()
    _env_default(parser, env)
    config = build_config(parser.parse_args(["--upstream", "http://127.0.0.1:9"]), env)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", 9191)
    parser = serve_parser()
    _env_default(parser, env)
    config = build_config(parser.parse_args(["--upstream", "http://127.0.0.1:9", "--admin-port", "9292"]), env)
    assert config.admin.port == 9292  # the flag wins over the environment
