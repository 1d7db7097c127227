"""Logs: one access line per request, Cloud Logging fields in JSON, never a token."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.ops.logs import setup_logging

from .test_sidecar_support import ProxyProcess, Upstream, clean_env, eventually, get_status, mint_jwt, write_config


async def _full_run(tmp_path: Path, fmt: str, token: str, client_token: str, **log: object) -> tuple[ProxyProcess, Upstream]:
    """Start at debug level, send a handful of requests, SIGTERM, return the finished process."""
    async with Upstream() as upstream:
        config = write_config(tmp_path / "config.yaml", upstream.url, log={"level": "debug", "format": fmt, **log})
        proxy = await ProxyProcess(["--config", str(config)], clean_env(tmp_path, SIDECAR_TEST_TOKEN=token)).start()
        try:
            await proxy.wait_listening()
            async with aiohttp.ClientSession() as s:

                async def ready() -> bool:
                    return (await get_status(s, proxy.admin_url + "/.proxy/readyz"))[0] == 200

                await eventually(ready, "readiness")
                headers = {"Authorization": f"Bearer {client_token}", "User-Agent": "sidecar-test/1.0"}
                async with s.get(proxy.url + f"/hello?access_token={client_token}&x=1", headers=headers) as r:
                    assert r.status == 200
                async with s.post(proxy.url + "/echo", data=b"q" * 321, headers=headers) as r:
                    assert r.status == 200
                async with s.get(proxy.url + "/status/502") as r:
                    assert r.status == 502
                async with s.get(proxy.url + f"/{client_token}/path") as r:
                    assert r.status == 404
                async with s.get(proxy.url + "/hello") as r:
                    assert r.status == 200
            proxy.signal(signal.SIGTERM)
            assert await proxy.wait_exit() == 0
        finally:
            await proxy.stop()
    # The proxy really sent the token upstream (and the client's was replaced), so its
    # absence from the log below means something.
    assert upstream.authorizations[0] == f"Bearer {token}"
    return proxy, upstream


def _secrets(token: str) -> Iterator[str]:
    yield token
    yield from token.split(".")


async def test_json_logs_at_debug_carry_cloud_logging_fields_and_no_token(tmp_path: Path) -> None:
    token, client_token = mint_jwt(), mint_jwt(email="client@example.com")
    proxy, _ = await _full_run(tmp_path, "json", token, client_token)
    for secret in [*_secrets(token), *_secrets(client_token)]:
        assert secret not in proxy.stderr
    entries = [json.loads(line) for line in proxy.lines]  # every line is one JSON object
    for e in entries:
        assert e["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert isinstance(e["message"], str)
    access = [e for e in entries if "httpRequest" in e]
    assert len(access) == 5  # one per request; probes on the admin listener are not logged
    first = access[0]
    http = first["httpRequest"]
    assert http["requestMethod"] == "GET"
    assert http["requestUrl"] == "/hello"  # the query is left out by default
    assert http["status"] == 200
    assert int(http["responseSize"]) > len("hello")
    assert re.fullmatch(r"\d+\.\d{6}s", http["latency"])
    assert http["remoteIp"] == "127.0.0.1"
    assert http["userAgent"] == "sidecar-test/1.0"
    assert first["route"] == "up"
    assert re.fullmatch(r"\d+\.\d{6}s", first["upstreamLatency"])
    assert access[1]["httpRequest"]["requestSize"] == "321"
    assert access[2]["httpRequest"]["status"] == 502
    assert access[3]["httpRequest"]["requestUrl"] == "/[redacted-jwt]/path"
    assert access[3]["route"] == "up"
    # Startup and refresh events once, not per request.
    messages = [e["message"] for e in entries]
    assert sum(m.startswith("token for ") for m in messages) == 1
    assert sum(m.startswith("listening on ") for m in messages) == 1
    assert sum(m.startswith("route up:") for m in messages) == 1


async def test_text_logs_one_line_per_request_and_no_token(tmp_path: Path) -> None:
    token, client_token = mint_jwt(), mint_jwt(email="client@example.com")
    proxy, _ = await _full_run(tmp_path, "text", token, client_token)
    for secret in [*_secrets(token), *_secrets(client_token)]:
        assert secret not in proxy.stderr
    access = [line for line in proxy.lines if " idtoken_proxy.access: " in line]
    assert len(access) == 5
    assert re.search(r'INFO idtoken_proxy\.access: up "GET /hello" 200 \d+B [\d.]+ms upstream [\d.]+ms$', access[0])


async def test_include_query_logs_the_query_but_still_no_token(tmp_path: Path) -> None:
    token, client_token = mint_jwt(), mint_jwt(email="client@example.com")
    proxy, _ = await _full_run(tmp_path, "json", token, client_token, include_query=True)
    for secret in [*_secrets(token), *_secrets(client_token)]:
        assert secret not in proxy.stderr
    access = [json.loads(line) for line in proxy.lines if '"httpRequest"' in line]
    assert access[0]["httpRequest"]["requestUrl"] == "/hello?access_token=[redacted-jwt]&x=1"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tracebacks_and_messages_are_redacted(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    token = mint_jwt()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("debug", fmt)
        log = logging.getLogger("proxy.test")
        log.debug("header was Authorization: Bearer %s", "opaque-secret-value")
        try:
            raise RuntimeError(f"upstream said {token}")
        except RuntimeError:
            log.exception("failed with %s", token)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    for secret in [*_secrets(token), "opaque-secret-value"]:
        assert secret not in err
    assert "RuntimeError: upstream said [redacted-jwt]" in err
    assert "Bearer [redacted]" in err
    if fmt == "json":
        lines = [json.loads(line) for line in err.splitlines()]
        assert [e["severity"] for e in lines] == ["DEBUG", "ERROR"]
        assert "Traceback" in lines[1]["message"]


def test_json_formatter_without_handler_setup() -> None:
    from proxy.ops.logs import JsonFormatter

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["severity"] == "WARNING" and entry["message"] == "hello world"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.handle(record)
    assert json.loads(stream.getvalue())["message"] == "hello world"
