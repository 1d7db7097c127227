"""Private MCP servers: the MCP Python SDK's own client and server, with the proxy between.

1. Streamable HTTP through the proxy: the SDK's streamable-HTTP client talks to the SDK's
   server (behind a Cloud-Run-like token check) through `idtoken-proxy` run as a subprocess:
   initialize, tools/list, tool calls, a tool's streamed notifications, one Mcp-Session-Id
   throughout, across a token refresh.
2. The stdio bridge, `idtoken-proxy mcp URL`, driven as a subprocess by the SDK's stdio client.
"""

from __future__ import annotations

import json
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
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

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


# -- the stdio bridge ---------------------------------------------------------------------


@pytest.fixture
def bridge_env(clean_env: Any, key_file: Path) -> dict[str, str]:
    """The bridge's environment: credentials found the default way (auto: the key file)."""
    return {**_env(clean_env), "GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}


@pytest.fixture
def errlog(tmp_path: Path) -> Iterator[Any]:
    """A real file for the bridge's stderr (the SDK's stdio client hands it to the subprocess)."""
    with open(tmp_path / "bridge.err", "w+") as f:
        yield f


def bridge(url: str, env: dict[str, str], *extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "proxy", "mcp", url, *extra], env=env, cwd=str(ROOT))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_bridge_initialize_list_and_call_end_to_end(
    mode: str, google: FakeGoogle, mcp_server: PrivateMCPServer, bridge_env: dict[str, str], errlog: Any
) -> None:
    from mcp.client.stdio import stdio_client

    logs: list[str] = []

    async def on_log(params: Any) -> None:
        logs.append(str(params.data))

    async with Client(stdio_client(bridge(mcp_server.mcp_url, bridge_env), errlog=errlog), mode=mode, logging_callback=on_log) as client:
        assert client.server_info is not None and client.server_info.name == "private-mcp-test"
        # Both eras through the bridge: the 2025 handshake, and the 2026 per-request envelope
        # whose HTTP headers (MCP-Protocol-Version, Mcp-Method, Mcp-Name) the bridge adds.
        assert (client.protocol_version in MODERN_PROTOCOL_VERSIONS) == (mode == "auto")
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == {"echo", "whoami", "countdown"}
        assert _text(await client.call_tool("echo", {"text": "through stdio"})) == "through stdio"
        assert _text(await client.call_tool("whoami", {})) == SA_EMAIL
        assert _text(await client.call_tool("countdown", {"n": 2})) == "counted 2"
    errlog.seek(0)
    stderr = errlog.read()
    if mode == "legacy":
        assert logs == ["tick 1 of 2", "tick 2 of 2"]
    # Every request carried a token the fake Google minted for the service's audience.
    assert mcp_server.seen and {s.email for s in mcp_server.seen} == {SA_EMAIL}
    assert google.calls_by_audience[("token", mcp_server.url)] >= 1
    assert mcp_server.refused == []
    assert f"bridging stdio to {mcp_server.mcp_url}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("status", "words"), [(403, "403 Forbidden"), (401, "401 Unauthorized")])
async def test_bridge_a_refused_token_is_a_json_rpc_error_with_a_one_line_reason(
    status: int, words: str, mcp_server: PrivateMCPServer, bridge_env: dict[str, str], errlog: Any
) -> None:
    from mcp import MCPError
    from mcp.client.stdio import stdio_client

    async with Client(stdio_client(bridge(mcp_server.mcp_url, bridge_env), errlog=errlog), mode="legacy") as client:
        mcp_server.refuse_all = status
        with pytest.raises(MCPError) as refused:
            await client.list_tools()
        message = refused.value.error.message
        assert words in message and mcp_server.url in message
        assert "\n" not in message
        # The bridge keeps serving: once the server accepts again, so does the session.
        mcp_server.refuse_all = None
        assert _text(await client.call_tool("echo", {"text": "again"})) == "again"


async def test_bridge_an_unreachable_server_is_a_json_rpc_error(google: FakeGoogle, bridge_env: dict[str, str], errlog: Any) -> None:
    import socket

    from mcp import MCPError
    from mcp.client.stdio import stdio_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(BaseException) as failed:
        async with Client(stdio_client(bridge(f"{dead}/mcp", bridge_env), errlog=errlog), mode="legacy"):
            pass
    # The failed initialize comes out of the client's task groups.
    error = failed.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert isinstance(error, MCPError), repr(failed.value)
    message = error.error.message
    assert f"cannot reach {dead}" in message and "\n" not in message


def test_bridge_stdout_carries_only_mcp_messages(mcp_server: PrivateMCPServer, bridge_env: dict[str, str]) -> None:
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "raw"}}},
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "mcp", mcp_server.mcp_url, "--log-level", "debug"],
        cwd=str(ROOT), env=bridge_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    answers: dict[int, dict[str, Any]] = {}
    out: list[str] = []
    try:
        for message in lines:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            if "id" in message:
                # Answers come in order of the requests here: one at a time.
                while message["id"] not in answers:
                    line = proc.stdout.readline()
                    assert line, "the bridge closed stdout"
                    out.append(line)
                    doc = json.loads(line)
                    if "id" in doc and "method" not in doc:
                        answers[doc["id"]] = doc
        # communicate() closes stdin: the client is done, the bridge exits.
        rest, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out.extend(rest.splitlines(keepends=True))
    assert proc.returncode == 0, stderr
    # Every line on stdout is one JSON-RPC message, even with debug logging on.
    for line in out:
        assert json.loads(line)["jsonrpc"] == "2.0", line
    assert answers[1]["result"]["serverInfo"]["name"] == "private-mcp-test"
    assert {t["name"] for t in answers[2]["result"]["tools"]} == {"echo", "whoami", "countdown"}
    assert answers[3]["result"]["content"][0]["text"] == "raw"
    assert "bridging stdio to" in stderr
    assert "eyJ" not in stderr


def test_bridge_without_the_extra_says_how_to_install_it(clean_env: Any) -> None:
    # What a missing package looks like to Python: its import fails.
    code = "import sys; sys.modules['mcp'] = None; from proxy.__main__ import main; sys.exit(main(['mcp', 'https://x.run.app/mcp']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=_env(clean_env), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 3
    assert result.stderr == "idtoken-proxy mcp: needs the MCP SDK: pip install 'idtoken-proxy[mcp]'\n"
    assert result.stdout == ""


def test_bridge_a_bad_url_names_it_and_exits_2(clean_env: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "mcp", "http://mcp.example.com/mcp"],
        cwd=str(ROOT), env=_env(clean_env), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("idtoken-proxy mcp: URL: plain http:// to a remote host")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
