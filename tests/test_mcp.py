"""Private MCP servers: the MCP Python SDK's own client and server, with the proxy between.

1. Streamable HTTP through the proxy: the SDK's streamable-HTTP client talks to the SDK's
   server (behind a Cloud-Run-like token check) through `idtoken-proxy` run as a subprocess:
   initialize, tools/list, tool calls, a tool's streamed notifications, one Mcp-Session-Id
   throughout, across a token refresh.
2. The stdio bridge, `idtoken-proxy mcp URL`, driven as a subprocess by the SDK's stdio client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The test extra installs the SDK: without it these tests fail to import, never skip.
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.fakes import FakeGoogle
from tests.fakes.mcp_server import PrivateMCPServer

ROOT = Path(__file__).resolve().parent.parent
SA_EMAIL = "mcp-invoker@fake-project.iam.gserviceaccount.com"
_WAIT = 60.0


@pytest.fixture
def mcp_server(google: FakeGoogle) -> Iterator[PrivateMCPServer]:
    with PrivateMCPServer(google.certs_url) as server:
        yield server


@pytest.fixture
def key_file(google: FakeGoogle, tmp_path: Path) -> Path:
    return google.write_key_file(tmp_path / "key.json", SA_EMAIL)


def _env(clean: Any) -> dict[str, str]:
    env = clean.env()
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ProxyProcess:
    """`idtoken-proxy --config FILE` as a subprocess; stderr collected line by line."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", str(config)],
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + _WAIT
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", "".join(self.lines))
            if found:
                self.url = found.group(1)
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the proxy did not start:\n" + "".join(self.lines))

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def proxy_for(clean_env: Any, tmp_path: Path, key_file: Path) -> Iterator[Any]:
    started: list[ProxyProcess] = []

    def start(upstream: str) -> ProxyProcess:
        config = tmp_path / "proxy.yaml"
        config.write_text(
            "listen: {host: 127.0.0.1, port: 0}\n"
            f"credentials: {{source: service_account, key_file: {json.dumps(str(key_file))}}}\n"
            f"routes:\n  - upstream: {upstream}\n"
        )
        proxy = ProxyProcess(config, _env(clean_env))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def _text(result: Any) -> str:
    assert not result.is_error, result
    return "".join(block.text for block in result.content if getattr(block, "type", None) == "text")


async def test_streamable_http_through_the_proxy_across_a_token_refresh(
    google: FakeGoogle, mcp_server: PrivateMCPServer, proxy_for: Any
) -> None:
    # Short tokens: the proxy refreshes in the background every few seconds.
    google.token_lifetime = 20
    proxy = proxy_for(mcp_server.url)
    logs: list[str] = []
    progress: list[float] = []

    async def on_log(params: Any) -> None:
        logs.append(str(params.data))

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(done)

    transport = streamable_http_client(f"{proxy.url}/mcp")
    async with Client(transport, mode="legacy", logging_callback=on_log) as client:
        assert client.server_info is not None and client.server_info.name == "private-mcp-test"
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == {"echo", "whoami", "countdown"}
        assert _text(await client.call_tool("echo", {"text": "hi"})) == "hi"
        assert _text(await client.call_tool("whoami", {})) == SA_EMAIL
        # A server-sent notification stream: the tool's log and progress messages
        # arrive over the response's event stream, before its result.
        result = await client.call_tool("countdown", {"n": 3}, progress_callback=on_progress)
        assert _text(result) == "counted 3"
        assert logs == ["tick 1 of 3", "tick 2 of 3", "tick 3 of 3"]
        assert progress == [1, 2, 3]

        # Wait (bounded) for the proxy's background refresh, then go on in the same session.
        first = mcp_server.tokens()[-1]
        deadline = time.monotonic() + _WAIT
        while time.monotonic() < deadline and google.calls_by_audience[("token", mcp_server.url)] < 2:
            await _sleep(0.2)
        assert google.calls_by_audience[("token", mcp_server.url)] >= 2, "the proxy never refreshed its token"
        assert _text(await client.call_tool("echo", {"text": "after the refresh"})) == "after the refresh"
        assert mcp_server.tokens()[-1] != first

    seen = mcp_server.seen
    # One session: every request after initialize carried the Mcp-Session-Id the server gave.
    assert seen[0].session_id is None
    session_ids = {s.session_id for s in seen[1:]}
    assert len(session_ids) == 1 and None not in session_ids
    assert len({s.token for s in seen}) >= 2
    assert {s.email for s in seen} == {SA_EMAIL}
    assert mcp_server.refused == []


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)
