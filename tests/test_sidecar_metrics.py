"""Prometheus metrics: parsed with prometheus-client's own parser, moving as requests flow."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import STATE, make_app
from proxy.config import Config, parse_config
from proxy.auth.static import StaticIdentity
from proxy.ops.metrics import ProxyMetrics
from proxy.server import ProxyServer

from .test_sidecar_support import Upstream, eventually, mint_jwt


def _config(upstream: str) -> Config:
    return parse_config(
        {
            "credentials": {"source": "static", "token_env": "SIDECAR_TEST_TOKEN"},
            "listen": {"port": 0},
            "admin": {"port": 0},
            "routes": [
                {"name": "api", "prefix": "/api", "upstream": upstream},
                {"name": "other", "prefix": "/other", "upstream": upstream},
            ],
        },
        {},
    )


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample, keyed by (sample name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def running(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", mint_jwt(lifetime=1800))
    async with Upstream() as upstream:
        config = _config(upstream.url)
        ident = StaticIdentity(token_env="SIDECAR_TEST_TOKEN")
        app = make_app(config, identities={config.credentials: ident})
        server = ProxyServer(app, config)
        await server.start()
        try:
            yield server, upstream
        finally:
            await server.stop()


async def test_metrics_parse_and_move_with_requests(running) -> None:  # type: ignore[no-untyped-def]
    server, upstream = running
    main = f"http://127.0.0.1:{server.addresses[0][1]}"
    admin = f"http://127.0.0.1:{server.admin_addresses[0][1]}"
    async with aiohttp.ClientSession() as s:

        async def scrape(base: str = admin) -> Samples:
            async with s.get(base + "/.proxy/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return parse(await resp.text())

        before = await scrape()
        assert value(before, "idtoken_proxy_requests_total", route="api", method="GET", status_class="2xx", protocol="HTTP/1.1") == 0
        assert value(before, "idtoken_proxy_requests_in_flight") == 0
        assert value(before, "idtoken_proxy_build_info", version="0.1.0") == 1

        async with s.get(main + "/api/hello") as r:
            assert (r.status, await r.text()) == (200, "hello")
        async with s.get(main + "/api/hello") as r:
            await r.read()
        body = b"z" * 1000
        async with s.post(main + "/api/echo", data=body) as r:
            assert await r.read() == body
            echo_size = r.content_length
        async with s.get(main + "/other/status/503") as r:
            assert r.status == 503
        async with s.get(main + "/nowhere") as r:
            assert r.status == 404
        async with s.request("PROPFIND", main + "/api/hello") as r:
            assert r.status == 405  # the upstream's answer: counted under OTHER
        async with s.request("BREW", main + "/api/hello") as r:
            assert r.status == 400  # aiohttp's parser refuses it before any route

        async def counted() -> bool:
            a = await scrape()
            return value(a, "idtoken_proxy_requests_total", route="-", method="OTHER", status_class="4xx", protocol="HTTP/1.1") == 1

        await eventually(counted, "the last request to be counted")
        after = await scrape()
        assert value(after, "idtoken_proxy_requests_total", route="api", method="GET", status_class="2xx", protocol="HTTP/1.1") == 2
        assert value(after, "idtoken_proxy_requests_total", route="api", method="POST", status_class="2xx", protocol="HTTP/1.1") == 1
        assert value(after, "idtoken_proxy_requests_total", route="api", method="OTHER", status_class="4xx", protocol="HTTP/1.1") == 1
        assert value(after, "idtoken_proxy_requests_total", route="other", method="GET", status_class="5xx", protocol="HTTP/1.1") == 1
        assert value(after, "idtoken_proxy_requests_total", route="-", method="GET", status_class="4xx", protocol="HTTP/1.1") == 1
        assert value(after, "idtoken_proxy_requests_total", route="-", method="OTHER", status_class="4xx", protocol="HTTP/1.1") == 1
        # Only requests that reached the upstream have an upstream latency.
        assert value(after, "idtoken_proxy_upstream_latency_seconds_count", route="api") == 4
        assert value(after, "idtoken_proxy_upstream_latency_seconds_count", route="other") == 1
        assert value(after, "idtoken_proxy_upstream_latency_seconds_count", route="-") == 0
        assert value(after, "idtoken_proxy_upstream_latency_seconds_bucket", route="api", le="+Inf") == 4
        assert value(after, "idtoken_proxy_upstream_latency_seconds_sum", route="api") > 0
        assert value(after, "idtoken_proxy_request_body_bytes_total", route="api") == 1000
        # Response bytes are what went on the wire: at least the bodies, plus heads.
        sent = value(after, "idtoken_proxy_response_bytes_total", route="api")
        assert sent > 2 * len("hello") + echo_size
        # Scrapes and health checks are not proxied requests.
        assert not any(labels and dict(labels).get("route") == ".proxy" for _, labels in after)
        # No per-path label anywhere.
        assert all("path" not in dict(labels) for _, labels in after)

        # The main listener serves the same registry.
        main_view = await scrape(main)
        assert value(main_view, "idtoken_proxy_requests_total", route="api", method="GET", status_class="2xx", protocol="HTTP/1.1") == 2

        # In flight: one slow request held open by the test.
        slow = asyncio.ensure_future(s.get(main + "/api/slow"))
        await asyncio.wait_for(upstream.slow_arrived.wait(), 30)
        assert value(await scrape(), "idtoken_proxy_requests_in_flight") == 1
        upstream.release()
        resp = await slow
        await resp.read()
        resp.release()
        assert value(await scrape(), "idtoken_proxy_requests_in_flight") == 0


async def test_token_metrics_by_route(running) -> None:  # type: ignore[no-untyped-def]
    server, _ = running
    state = server.app[STATE]
    assert await state.tokens.wait_ready(30)
    admin = f"http://127.0.0.1:{server.admin_addresses[0][1]}"
    async with aiohttp.ClientSession() as s:
        async with s.get(admin + "/.proxy/metrics") as resp:
            samples = parse(await resp.text())
    for route in ("api", "other"):
        assert value(samples, "idtoken_proxy_token_refreshes_total", route=route, outcome="ok") == 1
        assert value(samples, "idtoken_proxy_token_refreshes_total", route=route, outcome="error") == 0
        expiry = value(samples, "idtoken_proxy_token_expiry_seconds", route=route)
        assert 0 < expiry <= 1800
        assert value(samples, "idtoken_proxy_token_valid", route=route) == 1


def test_token_metrics_before_the_first_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", mint_jwt())
    config = _config("http://127.0.0.1:9")
    app = make_app(config, identities={config.credentials: StaticIdentity(token_env="SIDECAR_TEST_TOKEN")})
    metrics = app[STATE].metrics
    assert metrics is not None
    samples = parse(metrics.render().decode())
    assert value(samples, "idtoken_proxy_token_valid", route="api") == 0
    assert ("idtoken_proxy_token_expiry_seconds", frozenset({("route", "api")})) not in samples


def test_each_app_has_its_own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", mint_jwt())
    config = _config("http://127.0.0.1:9")
    apps = [
        make_app(config, identities={config.credentials: StaticIdentity(token_env="SIDECAR_TEST_TOKEN")}) for _ in range(3)
    ]
    registries = {id(a[STATE].metrics.registry) for a in apps}  # type: ignore[union-attr]
    assert len(registries) == 3
    first: ProxyMetrics = apps[0][STATE].metrics  # type: ignore[assignment]
    first.observe("api", "GET", 200, 0, 10, 0.01)
    assert value(parse(first.render().decode()), "idtoken_proxy_requests_total", route="api", method="GET", status_class="2xx", protocol="HTTP/1.1") == 1
    second: ProxyMetrics = apps[1][STATE].metrics  # type: ignore[assignment]
    assert value(parse(second.render().decode()), "idtoken_proxy_requests_total", route="api", method="GET", status_class="2xx", protocol="HTTP/1.1") == 0
