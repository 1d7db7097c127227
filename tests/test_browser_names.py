"""A whole project in a real browser: two services at ``a.localhost`` and ``b.localhost``.

The project is listed through the fake Cloud Run Admin API; headless Chromium
(as in tests/test_browser.py) opens each service at its own origin, where
absolute-path scripts and fetch() reach that service with its own token, and a
page of one service cannot call the other through the proxy (another origin).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from proxy.app import STATE, build_identities, make_app
from proxy.config import parse_config
from proxy.resolve import resolve_config
from proxy.server import ProxyServer
from tests.fakes import PrivateService

from .test_browser import _chromium, browser  # noqa: F401
from .test_names_support import PROJECT, REGION, Apis, _cloud_apis  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class ProjectStack:
    a: PrivateService
    b: PrivateService
    proxy: ProxyServer

    def origin(self, name: str) -> str:
        return f"http://{name}.localhost:{self.proxy.addresses[0][1]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def project(_cloud_apis: Apis, fake_google: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProjectStack]:
    _chromium()  # skip (or fail under CI) before starting anything
    email = "browser-names@fake-project.iam.gserviceaccount.com"
    key = fake_google.write_key_file(tmp_path_factory.mktemp("names") / "key.json", email)
    _cloud_apis.run.reset()
    with PrivateService(certs_url=fake_google.certs_url) as a, PrivateService(certs_url=fake_google.certs_url) as b:
        _cloud_apis.run.add_service("a", REGION, uri=a.url)
        _cloud_apis.run.add_service("b", REGION, uri=b.url)
        _cloud_apis.run.grant(email, "run.services.list")
        config = parse_config(
            {
                "credentials": {"source": "service_account", "key_file": str(key)},
                "serve_project": {"project": PROJECT, "region": REGION},
                "services_refresh": 0,
            },
            env={},
        )
        identities = build_identities(config)
        env = {"CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": _cloud_apis.run.url}
        config, jobs = await resolve_config(config, identities, env=env)
        app = make_app(config, identities=identities, background=jobs)
        # The production server, on a free loopback port.
        served = dataclasses.replace(config, listen=dataclasses.replace(config.listen, host="127.0.0.1", port=0))
        server = ProxyServer(app, served)
        await server.start()
        try:
            assert await app[STATE].tokens.wait_ready(15)
            yield ProjectStack(a, b, server)
        finally:
            await server.stop()
            _cloud_apis.run.reset()


async def test_two_services_each_at_its_own_origin(browser, project):
    context = await browser.new_context()
    page = await context.new_page()
    try:
        for name, service in (("a", project.a), ("b", project.b)):
            service.clear()
            response = await page.goto(f"{project.origin(name)}/page")
            assert response is not None and response.status == 200
            # /page loads /static/app.js by absolute path: it reaches the same service.
            await page.wait_for_function("document.title === 'app.js loaded'", timeout=10_000)
            assert [r.raw_path for r in service.requests][:2] == ["/page", "/static/app.js"]
            result = await page.evaluate(
                "async () => { const r = await fetch('/echo?from=page'); return {status: r.status, body: await r.json()}; }"
            )
            assert result["status"] == 200 and result["body"]["path"] == "/echo?from=page"
            # Each service got a token for its own URL, as Cloud Run requires.
            assert all(r.claims is not None and r.claims["aud"] == service.url for r in service.requests)

        # From b's page, a's origin is another origin: the proxy refuses to lend a's identity.
        project.a.clear()
        outcome = await page.evaluate(
            "async (url) => { try { const r = await fetch(url); return 'status ' + r.status; } catch (e) { return e.name; } }",
            f"{project.origin('a')}/echo",
        )
        assert outcome == "TypeError"
        assert project.a.requests == []
    finally:
        await context.close()
