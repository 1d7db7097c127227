"""`idtoken-proxy demo` as a newcomer runs it: a subprocess on a free port, a fresh HOME, no
Google variables. Direct to the sample service is 403; through the proxy it is 200 with the
caller's email, with a token the stand-in minted through the service-account key flow; the
websocket echo and the event stream work through the proxy; Ctrl-C exits 0 and leaves no files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_EMAIL = "demo-caller@idtoken-proxy-demo.iam.gserviceaccount.com"
_START_TIMEOUT = 60.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_env(root: Path) -> dict[str, str]:
    """A newcomer's environment: a fresh HOME and TMPDIR, nothing Google-related, no proxies."""
    home, tmp = root / "home", root / "tmp"
    home.mkdir()
    tmp.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return env


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    port: int
    tmp: Path
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    issuer_url: str = ""
    service_url: str = ""

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, object]:
        with _NO_PROXY.open(f"{self.issuer_url}/demo/stats", timeout=10) as r:
            doc: dict[str, object] = json.load(r)
        return doc

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def _pump(stream: object, lines: list[str]) -> None:
    # Line by line, so the waiting test sees each line as it arrives.
    for line in stream:  # type: ignore[attr-defined]
        lines.append(line)  # noqa: PERF402


def start_demo(root: Path) -> Demo:
    port = free_port()
    env = demo_env(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
        cwd=str(ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    demo = Demo(proc, port, Path(env["TMPDIR"]))
    for stream, lines in ((proc.stdout, demo.stdout), (proc.stderr, demo.stderr)):
        threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()
    deadline = time.monotonic() + _START_TIMEOUT
    # The banner names the stand-ins' ports; then wait for the proxy to listen.
    while time.monotonic() < deadline and proc.poll() is None:
        text = "".join(demo.stdout)
        issuer = re.search(r"token endpoint \(stand-in\)\s+(http://127\.0\.0\.1:\d+)/token", text)
        service = re.search(r"private sample service\s+(http://127\.0\.0\.1:\d+)", text)
        if issuer and service and "listening on" in "".join(demo.stderr):
            demo.issuer_url, demo.service_url = issuer.group(1), service.group(1)
            return demo
        time.sleep(0.05)
    demo.stop()
    raise AssertionError(f"the demo did not start:\n{''.join(demo.stdout)}\n{''.join(demo.stderr)}")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _NO_PROXY.open(request, timeout=20) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = start_demo(tmp_path_factory.mktemp("demo"))
    try:
        yield d
    finally:
        d.stop()


def test_banner_says_nothing_reaches_google_and_prints_what_to_try(demo: Demo) -> None:
    text = "".join(demo.stdout)
    assert "nothing reaches Google" in text
    assert f"curl -i {demo.service_url}/" in text
    assert f"curl http://localhost:{demo.port}/" in text
    assert f"http://localhost:{demo.port}/.proxy/" in text
    # The config it runs, ready to copy: the ordinary service_account source and this upstream.
    assert "source: service_account" in text
    assert f"- upstream: {demo.service_url}" in text


def test_direct_is_403_and_through_the_proxy_is_200_with_the_callers_email(demo: Demo) -> None:
    status, _, body = get(f"{demo.service_url}/")
    assert status == 403, body
    assert "no identity token" in body
    status, _, body = get(f"{demo.proxy_url}/")
    assert status == 200, body
    assert f"Hello, {DEMO_EMAIL}!" in body
    assert '"iss": "https://accounts.google.com"' in body
    assert f'"aud": "{demo.service_url}"' in body
    # Claims only, never the token (a JWT starts with the base64 of '{"').
    assert "eyJ" not in body


def test_the_status_page_shows_the_route_and_its_token_without_the_token(demo: Demo) -> None:
    assert get(f"{demo.proxy_url}/")[0] == 200
    status, _, body = get(f"{demo.proxy_url}/.proxy/status.json")
    assert status == 200, body
    assert demo.service_url in body and DEMO_EMAIL in body
    assert "eyJ" not in body


def test_a_bad_token_direct_is_401_with_www_authenticate(demo: Demo) -> None:
    status, headers, body = get(f"{demo.service_url}/", {"Authorization": "Bearer a.b.c"})
    assert status == 401, body
    assert headers.get("WWW-Authenticate", "").startswith("Bearer ")
    assert body.count("\n") == 1


def test_the_token_was_minted_through_the_key_flow(demo: Demo) -> None:
    assert get(f"{demo.proxy_url}/")[0] == 200
    stats = demo.stats()
    # google-auth signed an assertion with the key file's key, the stand-in verified it and
    # minted the ID token for the service's audience.
    assert stats["refused"] == 0
    by_audience = stats["by_audience"]
    assert isinstance(by_audience, dict) and by_audience.get(demo.service_url, 0) >= 1
    # The token cache: many requests, not many tokens.
    for _ in range(5):
        assert get(f"{demo.proxy_url}/")[0] == 200
    assert demo.stats()["id_tokens_minted"] == stats["id_tokens_minted"]


def test_the_browser_page_shows_the_claims_and_says_it_is_a_demo(demo: Demo) -> None:
    status, headers, body = get(f"{demo.proxy_url}/", {"Accept": "text/html"})
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "nothing reaches Google" in body
    assert DEMO_EMAIL in body
    assert "eyJ" not in body


async def test_websocket_echo_through_the_proxy(demo: Demo) -> None:
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.ws_connect(f"{demo.proxy_url}/ws", timeout=aiohttp.ClientWSTimeout(ws_receive=20)) as ws:
            for text in ("hello", "x" * 70_000):
                await ws.send_str(text)
                message = await ws.receive(timeout=20)
                assert message.type == aiohttp.WSMsgType.TEXT
                assert message.data == text
            await ws.send_bytes(b"\x00\x01binary")
            message = await ws.receive(timeout=20)
            assert message.type == aiohttp.WSMsgType.BINARY and message.data == b"\x00\x01binary"
            await ws.close(code=1000)
        assert ws.close_code == 1000
    # Direct, the upgrade is refused like any other request without a token.
    async with aiohttp.ClientSession(trust_env=False) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{demo.service_url}/ws")
    assert refused.value.status == 403


async def test_event_stream_through_the_proxy(demo: Demo) -> None:
    events: list[str] = []
    url = f"{demo.proxy_url}/events?count=3&interval=0.2"
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        async for line in r.content:
            if line.startswith(b"data: "):
                events.append(line.decode().strip())
    assert [e.split(" at ")[0] for e in events] == [f"data: event {i} of 3" for i in (1, 2, 3)]


def test_no_token_in_the_demos_output(demo: Demo) -> None:
    assert get(f"{demo.proxy_url}/")[0] == 200
    assert "eyJ" not in "".join(demo.stdout) + "".join(demo.stderr)


def test_ctrl_c_exits_0_and_leaves_no_files(tmp_path: Path) -> None:
    demo = start_demo(tmp_path)
    try:
        assert get(f"{demo.proxy_url}/")[0] == 200
        # The key and config live in TMPDIR while it runs...
        assert [p.name for p in demo.tmp.iterdir()] != []
    finally:
        status = demo.stop()
    assert status == 0, "".join(demo.stderr)
    # ...and nothing is left behind: not in TMPDIR, not in the fresh HOME.
    assert list(demo.tmp.iterdir()) == []
    assert list((tmp_path / "home").iterdir()) == []
    assert "Traceback" not in "".join(demo.stderr)


def test_a_busy_port_is_a_one_line_startup_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            cwd=str(ROOT),
            env=demo_env(tmp_path),
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "--port" in result.stderr
    assert result.stdout == ""


@pytest.mark.browser
async def test_the_page_in_a_browser_shows_the_websocket_echo_and_the_event_stream(demo: Demo) -> None:
    from tests.test_browser import CHROMIUM_ARGS, _chromium

    executable = _chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            response = await page.goto(f"http://localhost:{demo.port}/")
            assert response is not None and response.status == 200
            assert DEMO_EMAIL in await page.inner_text("h1")
            assert "nothing reaches Google" in await page.inner_text(".demo")
            # The page's own script: a websocket echo and an event stream, through the proxy.
            await page.wait_for_function("document.getElementById('ws').textContent.startsWith('echoed: ')", timeout=30_000)
            assert await page.inner_text("#ws") == "echoed: hello through the proxy"
            await page.wait_for_function("document.getElementById('sse').textContent.startsWith('event 3 of 3')", timeout=30_000)
        finally:
            await browser.close()
