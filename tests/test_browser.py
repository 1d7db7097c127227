"""A real browser through the proxy: headless Chromium (Debian's) driven by Playwright.

Shows that a private app served through a host route works as if it were
public (absolute-path scripts, fetch(), a WebSocket, server-sent events), that a
page on another local origin cannot use the proxy's identity (refused by the
proxy itself, not just blocked by CORS in the browser), and that an origin in
``allowed_origins`` gets through CORS with the preflight answered by the proxy.

Chromium runs headless with a fresh profile, background networking off, no
proxy server, and a host resolver that knows only ``localhost`` and
``*.localhost`` (which Chromium itself maps to loopback: checked below, since
the proxy listens on 127.0.0.1 only), so nothing but loopback can be reached.
One browser, one proxy and one set of servers serve the whole module.

Where Chromium or Playwright is missing these tests are skipped with the
reason; with CI=true they fail instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from proxy.app import STATE, make_app
from proxy.config import parse_config
from proxy.server import ProxyServer
from tests.fakes import BackgroundServer, PrivateService

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    # Every name but localhost, *.localhost and 127.0.0.1 fails to resolve: nothing off loopback.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE *.localhost, EXCLUDE 127.0.0.1",
]


def _chromium() -> str:
    """The Chromium to drive, or skip (fail under CI=true) saying why there is none."""
    # CHROMIUM_PATH points at another build (or, set to a missing file, shows the skip).
    path = os.environ.get("CHROMIUM_PATH") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium"))
    problem = None
    if path is None or not os.access(path, os.X_OK):
        problem = f"Chromium is not installed{f' at {path}' if path else ''} (bash tests/run.sh installs Debian's chromium with apt-get)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            problem = "Playwright for Python is not installed (pip install -e '.[test]')"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run in CI: {problem}")
        pytest.skip(problem)
    assert path is not None
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    executable = _chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        # A fresh temporary profile per launch (Playwright's default).
        b = await p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield b
        await b.close()


BLANK = "<!doctype html><html><head><title>other origin</title></head><body>another local site</body></html>"


@dataclass
class Stack:
    service: PrivateService
    proxy: ProxyServer
    other: BackgroundServer

    @property
    def port(self) -> int:
        return int(self.proxy.addresses[0][1])

    @property
    def app_origin(self) -> str:
        """The private app as the browser sees it: a whole origin, by host route."""
        return f"http://app.localhost:{self.port}"

    @property
    def foreign_origin(self) -> str:
        """A page on another local origin, not allowed: 127.0.0.1 on another port."""
        return f"http://127.0.0.1:{self.other.port}"

    @property
    def allowed_origin(self) -> str:
        """A page on another local origin listed in allowed_origins."""
        return f"http://localhost:{self.other.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(fake_google: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    _chromium()  # skip before starting anything
    key = fake_google.write_key_file(tmp_path_factory.mktemp("browser") / "key.json", "browser-sa@test-project.iam.gserviceaccount.com")
    other_app = web.Application()

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text=BLANK, content_type="text/html")

    other_app.router.add_get("/", blank)
    with PrivateService(certs_url=fake_google.certs_url) as service, BackgroundServer(other_app) as other:
        config = parse_config(
            {
                "credentials": {"source": "service_account", "key_file": str(key)},
                "routes": [
                    {"name": "app", "host": "app.localhost", "upstream": service.url},
                    {"name": "api", "upstream": service.url},
                ],
                "allowed_origins": [f"http://localhost:{other.port}"],
            },
            env={},
        )
        app = make_app(config)
        # The production server, on a free loopback port.
        served = dataclasses.replace(config, listen=dataclasses.replace(config.listen, host="127.0.0.1", port=0))
        server = ProxyServer(app, served)
        await server.start()
        try:
            assert await app[STATE].tokens.wait_ready(15)
            yield Stack(service, server, other)
        finally:
            await server.stop()


def guard_refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "proxy.policy.guard" and r.levelno == logging.INFO]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "idtoken_proxy.access"]


async def test_private_app_works_in_a_browser_through_a_host_route(browser, stack):
    context = await browser.new_context()
    page = await context.new_page()
    stack.service.clear()
    try:
        response = await page.goto(f"{stack.app_origin}/page")
        assert response is not None and response.status == 200
        # /page loads /static/app.js by absolute path; app.js sets the title.
        await page.wait_for_function("document.title === 'app.js loaded'", timeout=10_000)
        seen = [r.raw_path for r in stack.service.requests]
        assert seen[:2] == ["/page", "/static/app.js"], seen
        # Chromium resolved app.localhost to loopback itself: the proxy listens on 127.0.0.1 only.
        assert all(r.claims is not None for r in stack.service.requests)

        # fetch(): same origin, so the proxy passes it and the upstream sees itself as the origin.
        result = await page.evaluate(
            """async () => {
                const r = await fetch('/api/items?x=1', {method: 'POST', body: 'hello', headers: {'Content-Type': 'text/plain'}});
                return {status: r.status, body: await r.json()};
            }"""
        )
        assert result["status"] == 200
        assert result["body"]["method"] == "POST" and result["body"]["path"] == "/api/items?x=1"
        rec = stack.service.last
        assert rec.claims is not None and rec.claims["aud"] == stack.service.url
        assert rec.header_values("Origin") == [stack.service.url]
        assert rec.header_values("Referer") == [f"{stack.service.url}/page"]

        # A WebSocket: echo, the subprotocol the upstream chose, and its close code.
        ws = await page.evaluate(
            """() => new Promise((resolve, reject) => {
                const ws = new WebSocket(`ws://${location.host}/ws`, ['chat.v1']);
                const out = {messages: []};
                ws.onopen = () => { out.protocol = ws.protocol; ws.send('ping 1'); };
                ws.onmessage = (e) => {
                    out.messages.push(e.data);
                    if (out.messages.length === 1) ws.send('close:4001');
                };
                ws.onclose = (e) => { out.code = e.code; out.reason = e.reason; resolve(out); };
                ws.onerror = () => { out.error = true; };
                setTimeout(() => reject(new Error('websocket timed out')), 10000);
            })"""
        )
        assert ws == {"protocol": "chat.v1", "messages": ["ping 1"], "code": 4001, "reason": "closed by server"}
        assert stack.service.last.raw_path == "/ws" and stack.service.last.claims is not None

        # Server-sent events, as they come.
        events = await page.evaluate(
            """() => new Promise((resolve, reject) => {
                const es = new EventSource('/sse?n=3&interval=0.05');
                const data = [];
                es.onmessage = (e) => { data.push([e.lastEventId, e.data]); if (data.length === 3) { es.close(); resolve(data); } };
                setTimeout(() => { es.close(); reject(new Error('SSE timed out: ' + JSON.stringify(data))); }, 10000);
            })"""
        )
        assert events == [["0", "event 0"], ["1", "event 1"], ["2", "event 2"]]
    finally:
        await context.close()


async def test_a_page_on_another_origin_is_refused_by_the_proxy(browser, stack, caplog):
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(f"{stack.foreign_origin}/")
        caplog.clear()
        stack.service.clear()
        proxy_same_site = f"http://127.0.0.1:{stack.port}"  # same host, other port: same-site
        results = await page.evaluate(
            """async ([sameSite, crossSite]) => {
                const out = {};
                for (const [name, url] of [['same-site', sameSite + '/echo'], ['cross-site', crossSite + '/echo']]) {
                    try { const r = await fetch(url); out[name] = 'status ' + r.status; }
                    catch (e) { out[name] = e.name; }
                }
                // A no-cors script needs no CORS at all: only the proxy can refuse it.
                out.script = await new Promise((resolve) => {
                    const s = document.createElement('script');
                    s.src = crossSite + '/static/app.js';
                    s.onload = () => resolve('loaded'); s.onerror = () => resolve('error');
                    document.head.appendChild(s);
                });
                out.title = document.title;
                out.websocket = await new Promise((resolve) => {
                    const ws = new WebSocket(crossSite.replace('http', 'ws') + '/ws');
                    ws.onopen = () => resolve('open');
                    ws.onclose = (e) => resolve('closed ' + e.code);
                });
                return out;
            }""",
            [proxy_same_site, stack.app_origin],
        )
        assert results == {
            "same-site": "TypeError",
            "cross-site": "TypeError",
            "script": "error",
            "title": "other origin",
            "websocket": "closed 1006",
        }
        # The proxy saw each request and refused it itself; the private service saw none.
        refusals = guard_refusals(caplog)
        origin = repr(stack.foreign_origin)
        assert f"refused GET /echo: cross-site request refused (Origin {origin})" in refusals
        assert "refused GET /static/app.js: cross-site request refused (Sec-Fetch-Site cross-site)" in refusals
        assert f"refused GET /ws: cross-site request refused (Origin {origin})" in refusals
        assert len([r for r in refusals if r.startswith("refused GET /echo")]) == 2, refusals
        assert stack.service.requests == []
        # ... with a 403 each (in the access log; the page only sees a network error).
        lines = access_lines(caplog)
        assert len([line for line in lines if re.fullmatch(r'- "GET /echo" 403 .*', line)]) == 2, lines
        assert any(re.fullmatch(r'- "GET /static/app.js" 403 .*', line) for line in lines), lines

        # A link from that site is a top-level navigation: it passes, like a SameSite=Lax cookie.
        await page.set_content(f'<a id="go" href="{stack.app_origin}/page">open the app</a>')
        async with page.expect_navigation():
            await page.click("#go")
        await page.wait_for_function("document.title === 'app.js loaded'", timeout=10_000)
        assert [r.raw_path for r in stack.service.requests][:2] == ["/page", "/static/app.js"]
    finally:
        await context.close()


async def test_an_allowed_origin_gets_through_cors(browser, stack, caplog):
    context = await browser.new_context()
    page = await context.new_page()
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r))
    try:
        await page.goto(f"{stack.allowed_origin}/")
        caplog.clear()
        stack.service.clear()
        proxy = f"http://localhost:{stack.port}"
        # JSON, a custom header and credentials: a non-simple request, so the browser preflights it.
        result = await page.evaluate(
            """async (proxy) => {
                const r = await fetch(proxy + '/upload', {
                    method: 'PUT', credentials: 'include',
                    headers: {'Content-Type': 'application/json', 'X-Requested-By': 'test'},
                    body: JSON.stringify({hello: 'world'}),
                });
                return {status: r.status, body: await r.json()};
            }""",
            proxy,
        )
        assert result["status"] == 200
        assert result["body"]["len"] == len('{"hello":"world"}')
        put = [r for r in responses if r.url == f"{proxy}/upload" and r.request.method == "PUT"]
        assert len(put) == 1
        cors = await put[0].all_headers()
        assert cors["access-control-allow-origin"] == stack.allowed_origin
        assert cors["access-control-allow-credentials"] == "true"
        # The preflight was answered by the proxy (the upstream saw only the PUT).
        assert [(r.method, r.raw_path) for r in stack.service.requests] == [("PUT", "/upload")]
        assert stack.service.last.claims is not None
        assert f"answered the CORS preflight for PUT /upload from {stack.allowed_origin}" in [
            r.getMessage() for r in caplog.records if r.name == "proxy.policy.guard"
        ]
        lines = access_lines(caplog)
        assert any(re.fullmatch(r'- "OPTIONS /upload" 204 .*', line) for line in lines), lines
        assert any(re.fullmatch(r'api "PUT /upload" 200 .*', line) for line in lines), lines
        assert guard_refusals(caplog) == []
    finally:
        await context.close()
