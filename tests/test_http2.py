"""HTTP/2 that is not gRPC, on the same port as HTTP/1.1: curl, raw h2 frames, and both at once.

The upstream is an h2c service (hypercorn) that checks each request's ID token
as Cloud Run does. The conformance cases speak raw frames (hyperframe) to the
real proxy and check the GOAWAY error code each violation must get (RFC 9113).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest

from tests.fakes.h2_service import H2PrivateService
from tests.fakes.private_service import pattern_bytes, pattern_sha256

MiB = 1 << 20
BIG = 50 * MiB


@pytest.fixture
def h2_service(fake_google: Any) -> Iterator[H2PrivateService]:
    with H2PrivateService(fake_google.certs_url) as service:
        yield service


@pytest.fixture
async def proxy(start_proxy: Any, sa_key: tuple[Path, str], h2_service: H2PrivateService) -> Any:
    return await start_proxy(
        {"credentials": {"source": "service_account", "key_file": str(sa_key[0])}, "routes": [{"upstream": h2_service.url}]}
    )


def _curl() -> str:
    path = shutil.which("curl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("curl is not installed (tests/run.sh installs it)")
        pytest.skip("curl is not installed")
    return path


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await asyncio.to_thread(subprocess.run, [_curl(), "-sS", *args], capture_output=True, timeout=120, check=False)


# --------------------------------------------------------------------------- curl


async def test_curl_get_50_mib_over_http2_intact(proxy: Any, h2_service: H2PrivateService, tmp_path: Path) -> None:
    out = tmp_path / "down"
    done = await curl("--http2-prior-knowledge", "-o", str(out), "-w", "%{http_version} %{http_code}", f"{proxy.url}/bytes/{BIG}")
    assert done.stdout == b"2 200", done.stderr
    assert out.stat().st_size == BIG
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(BIG)
    # End to end over HTTP/2, with a token for the service's own audience.
    (seen,) = h2_service.requests
    assert seen.http_version == "2" and seen.claims is not None and seen.claims["aud"] == h2_service.url


async def test_curl_post_50_mib_over_http2_intact(proxy: Any, h2_service: H2PrivateService, tmp_path: Path) -> None:
    data = tmp_path / "up"
    with data.open("wb") as f:
        for start in range(0, BIG, MiB):
            f.write(pattern_bytes(MiB, start))
    done = await curl("--http2-prior-knowledge", "--data-binary", f"@{data}", "-H", "Content-Type: application/octet-stream", f"{proxy.url}/upload")
    assert json.loads(done.stdout) == {"len": BIG, "sha256": pattern_sha256(BIG)}, done.stderr
    assert h2_service.requests[0].http_version == "2"


async def test_http1_and_http2_clients_on_the_same_port_at_once(proxy: Any, h2_service: H2PrivateService) -> None:
    async def h1(i: int) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/h1/{i}") as r:
            return str((await r.json())["http_version"])

    async def h2(i: int) -> str:
        done = await curl("--http2-prior-knowledge", f"{proxy.url}/h2/{i}")
        return str(json.loads(done.stdout)["http_version"])

    versions = await asyncio.gather(*(h1(i) for i in range(10)), *(h2(i) for i in range(10)))
    # The upstream leg follows the client's: HTTP/1.1 stays HTTP/1.1, HTTP/2 goes as HTTP/2.
    assert versions == ["1.1"] * 10 + ["2"] * 10


async def test_upgrade_h2c_is_served_as_http1(proxy: Any) -> None:
    done = await curl("--http2", "-w", "\n%{http_version}", f"{proxy.url}/upgrade")
    body, _, version = done.stdout.rpartition(b"\n")
    assert version == b"1.1", done.stderr
    assert json.loads(body)["http_version"] == "1.1"


async def test_a_stream_the_proxy_refuses_gets_status_and_reason(proxy: Any) -> None:
    done = await curl("--http2-prior-knowledge", "-w", "\n%{http_code}", "-H", "Host: evil.example.com", f"{proxy.url}/x")
    body, _, code = done.stdout.rpartition(b"\n")
    assert code == b"403"
    assert b"evil.example.com" in body and body.count(b"\n") <= 1


# --------------------------------------------------------------------------- raw frames


def _client(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _read_events(sock: socket.socket, conn: h2.connection.H2Connection, until: type, limit: float = 10) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        try:
            events += conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
        with contextlib.suppress(OSError):
            sock.sendall(conn.data_to_send())
        if any(isinstance(e, until) for e in events):
            break
    return events


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", (len(payload) << 8) | kind) + bytes([flags]) + struct.pack(">I", stream) + payload


def _answer(port: int, after_settings: bytes, until: type = h2.events.ConnectionTerminated) -> list[Any]:
    sock, conn = _client(port)
    with sock:
        _read_events(sock, conn, h2.events.RemoteSettingsChanged)
        sock.sendall(after_settings)
        return _read_events(sock, conn, until)


def _goaway_code(port: int, after_settings: bytes) -> int | None:
    ended = [e for e in _answer(port, after_settings) if isinstance(e, h2.events.ConnectionTerminated)]
    return int(ended[0].error_code) if ended else None





_GET = [(":method", "GET"), (":scheme", "http"), (":path", "/x"), (":authority", "127.0.0.1")]


def _headers_frame(stream: int, headers: list[tuple[str, str]], end: bool = True) -> bytes:
    # An encoder that sends what it is given, forbidden fields included.
    enc = h2.connection.H2Connection(h2.config.H2Configuration(validate_outbound_headers=False, normalize_outbound_headers=False))
    enc.initiate_connection()
    enc.data_to_send()
    enc.send_headers(stream, headers, end_stream=end)
    return enc.data_to_send()


async def test_preface_settings_and_their_ack(proxy: Any) -> None:
    def run() -> list[Any]:
        sock, conn = _client(proxy.port)
        with sock:
            return _read_events(sock, conn, h2.events.SettingsAcknowledged)

    events = await asyncio.to_thread(run)
    settings = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)).changed_settings
    # Our own limits, advertised: streams, header list, no push.
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 1000
    assert settings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 65536
    assert settings[h2.settings.SettingCodes.ENABLE_PUSH].new_value == 0
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)


async def test_flow_control_violation_is_a_flow_control_error(proxy: Any) -> None:
    # 40 DATA frames of 16 KiB on one stream: far past its 256 KiB window.
    frames = _headers_frame(1, [(":method", "POST"), *_GET[1:]], end=False) + _frame(0x0, 0, 1, b"\0" * 16384) * 40
    assert await asyncio.to_thread(_goaway_code, proxy.port, frames) == h2.errors.ErrorCodes.FLOW_CONTROL_ERROR


async def test_hpack_garbage_is_a_compression_error(proxy: Any) -> None:
    # An indexed header field with an index far past both tables.
    frames = _frame(0x1, 0x4 | 0x1, 1, b"\xff\xff\xff\xff\x0f")
    assert await asyncio.to_thread(_goaway_code, proxy.port, frames) == h2.errors.ErrorCodes.COMPRESSION_ERROR


async def test_oversized_frame_is_a_frame_size_error(proxy: Any) -> None:
    frames = _frame(0x0, 0, 1, b"\0" * 20000)  # above the 16 KiB SETTINGS_MAX_FRAME_SIZE
    assert await asyncio.to_thread(_goaway_code, proxy.port, frames) == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


async def test_data_on_an_idle_stream_is_a_protocol_error(proxy: Any) -> None:
    frames = _frame(0x0, 0x1, 7, b"hello")  # stream 7 was never opened
    assert await asyncio.to_thread(_goaway_code, proxy.port, frames) == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_connection_specific_header_is_refused(proxy: Any, h2_service: H2PrivateService) -> None:
    # A malformed request; h2 (and so the proxy) ends the whole connection for it, with PROTOCOL_ERROR.
    frames = _headers_frame(1, [*_GET, ("connection", "keep-alive")])
    assert await asyncio.to_thread(_goaway_code, proxy.port, frames) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert h2_service.requests == []


async def test_te_other_than_trailers_is_refused_and_te_trailers_passes(proxy: Any, h2_service: H2PrivateService) -> None:
    assert await asyncio.to_thread(_goaway_code, proxy.port, _headers_frame(1, [*_GET, ("te", "gzip")])) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    done = await curl("--http2-prior-knowledge", "-H", "TE: trailers", f"{proxy.url}/te")
    assert json.loads(done.stdout)["path"] == "/te"


async def test_websocket_over_http2_is_refused_clearly(proxy: Any) -> None:
    """RFC 8441 is not supported: we never advertise SETTINGS_ENABLE_CONNECT_PROTOCOL, and CONNECT is refused."""

    def run() -> tuple[int | None, bytes]:
        sock, conn = _client(proxy.port)
        with sock:
            _read_events(sock, conn, h2.events.RemoteSettingsChanged)
            conn.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1")], end_stream=True)
            sock.sendall(conn.data_to_send())
            events = _read_events(sock, conn, h2.events.StreamEnded)
        status = next((int(dict(e.headers)[b":status"]) for e in events if isinstance(e, h2.events.ResponseReceived)), None)
        body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        return status, body

    status, body = await asyncio.to_thread(run)
    assert status == 405 and b"CONNECT is not supported" in body
