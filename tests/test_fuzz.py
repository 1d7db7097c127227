"""Fuzz a running proxy with mutated HTTP/1.1 requests (hypothesis), bounded in time.

Requests are built from parts known to matter (smuggling headers, hostile
targets, token headers, line endings, chunked bodies), then mutated at the byte
level, split into pieces, and sent raw. Whatever comes back, afterwards:

- the proxy still answers a normal request (no crash, no wedged state);
- every request that reached the upstream carried the configured Host, and a
  second ("evil") listener on loopback, which targets and Host headers point
  at, never got a connection: no token went to another host;
- no token reached a log line, no handler failed with an unexpected exception.

Marked ``soak``: ``python -m pytest -m soak tests/test_fuzz.py``; the time
budget is ``FUZZ_SECONDS`` (45 s by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import make_app
from proxy.config import parse_config
from proxy.server import ProxyServer


BUDGET = float(os.environ.get("FUZZ_SECONDS", "45"))
# The budget plus setup and the last round, within a timeout longer than the suite's default.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(BUDGET) + 180)]

STATUS_LINE = re.compile(rb"HTTP/\d\.\d \d{3} ")
#: Examples per hypothesis run; runs repeat until the budget is spent.
ROUND = 200

# "EVIL" is replaced by the evil listener's host:port when sending.
METHODS = ["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "CONNECT", "TRACE", "PRI", "get", "G ET", "GET\x00", ""]
TARGETS = [
    "/", "/x", "/xsa/y", "/app/z", "*", "//EVIL/x", "///EVIL/x", "/http://EVIL/", "http://EVIL/x", "https://EVIL/",
    "EVIL", "/%2e%2e/x", "/a/../b", "/a/%2E./b", "/%2F%2FEVIL/x", "/.proxy/status", "/.proxy/../x", "/x?a=b#c",
    "/x?next=http://EVIL/", "/\x00", "/%00", "/" + "a" * 9000, "", "/ws", "/upload", "/bytes/1000", "/status/401",
]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "HTTP/1.", ""]
NAMES = [
    "Host", "Content-Length", "Transfer-Encoding", "Connection", "Authorization", "X-Serverless-Authorization",
    "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Expect", "X-Forwarded-For", "X-Forwarded-Host",
    "X_Forwarded_Host", "Forwarded", "Origin", "Sec-Fetch-Site", "Cookie", "Proxy-Authorization", "TE", "Trailer",
    "Keep-Alive", "Content-Encoding", "X-A", "Host ", " Host", "Content_Length", "Transfer_Encoding", "X-Original-URL",
]
VALUES = [
    "localhost", "EVIL", "app.localhost", "chunked", "chunked, identity", "identity", "gzip, chunked", "0", "5", "-1",
    "1, 1", "+3", "close", "keep-alive", "Authorization", "upgrade, Authorization, X-Serverless-Authorization",
    "websocket", "13", "dGhlIHNhbXBsZSBub25jZQ==", "100-continue", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln", "",
    "a\x00b", "a\rb", "a\nb", "x" * 9000, "null", "http://EVIL", "http://localhost", "cross-site", "trailers",
]
#: Headers a well-behaved client sends (so that many requests get forwarded).
BENIGN = [
    ("Accept", "*/*"), ("User-Agent", "fuzz/1.0"), ("Authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln"),
    ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "EVIL"), ("Forwarded", "host=EVIL"), ("X-App", "value"),
    ("Connection", "Authorization, X-Serverless-Authorization"), ("Origin", "http://localhost"), ("Cookie", "a=b"),
]
BAD_EOLS = ["\n", "\r", "\r\r\n", "\n\r"]


def mostly(usual: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` nine times in ten: most requests should get far enough to be forwarded."""
    # (hypothesis favours the first element of sampled_from: let that be the usual case.)
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda pick: usual if pick else rare)


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[bytes, list[int], bool]:
    """(request bytes, split points, half-close after sending)."""
    eol = draw(mostly(st.just("\r\n"), st.sampled_from(BAD_EOLS)))
    method = draw(mostly(st.sampled_from(METHODS[:7]), st.sampled_from(METHODS) | st.text(min_size=1, max_size=8)))
    target = draw(mostly(st.sampled_from(TARGETS), st.text(max_size=40).map(lambda t: "/" + t)))
    version = draw(mostly(st.just("HTTP/1.1"), st.sampled_from(VERSIONS)))
    headers = [("Host", draw(st.sampled_from(["localhost", "localhost:8080", "127.0.0.1", "app.localhost", "EVIL"])))]
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            headers.append(draw(st.sampled_from(BENIGN)))
            continue
        name = draw(mostly(st.sampled_from(NAMES), st.text(min_size=1, max_size=12)))
        value = draw(mostly(st.sampled_from(VALUES), st.text(max_size=30)))
        headers.append((name, value))
    body_kind = draw(st.sampled_from(["none", "length", "chunked", "none", "length", "junk"]))
    if body_kind == "chunked":
        chunks = draw(st.lists(st.binary(max_size=40), max_size=4))
        body = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks) + draw(
            mostly(st.just(b"0\r\n\r\n"), st.sampled_from([b"0\r\n", b"", b"0\r\nX: y\r\n\r\n"]))
        )
        headers.append(("Transfer-Encoding", "chunked"))
    elif body_kind == "length":
        body = draw(st.binary(max_size=200))
        headers.append(("Content-Length", str(len(body) + draw(mostly(st.just(0), st.integers(-3, 3))))))
    else:
        body = draw(st.binary(max_size=100)) if body_kind == "junk" else b""
    if draw(mostly(st.just(True), st.just(False))):
        headers.append(("Connection", "close"))
    sep = draw(mostly(st.just(": "), st.sampled_from([":", " : ", ":\t", ": \r\n "])))
    lines = "".join(f"{k}{sep}{v}{draw(mostly(st.just(eol), st.sampled_from(BAD_EOLS)))}" for k, v in headers)
    head = f"{method} {target} {version}{eol}{lines}{eol}"
    data = bytearray(head.encode("utf-8", "surrogatepass") + body)
    # Byte-level mutations (none in half the cases): insert, delete, replace, duplicate.
    for _ in range(draw(st.integers(0, 3)) if draw(st.booleans()) else 0):
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\r\n", b"\n", b"\x00", b" ", b":", b"\r\n\r\n"]))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "duplicate":
            piece = data[at : at + draw(st.integers(1, 60))]
            data[at:at] = piece
    splits = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3, unique=True))) if len(data) > 1 else []
    return bytes(data), splits, draw(st.integers(0, 7)) == 0


class EvilListener:
    """A loopback listener the proxy must never connect to."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


class ThreadedProxy:
    """The real app with the production server, on its own loop in a thread."""

    def __init__(self, config: dict) -> None:
        self.config = parse_config(config)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread_id: int | None = None

    def start(self) -> ThreadedProxy:
        self._thread.start()
        self.thread_id = self._thread.ident
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        import dataclasses

        self.app = make_app(self.config)
        served = dataclasses.replace(self.config, listen=dataclasses.replace(self.config.listen, host="127.0.0.1", port=0))
        self.server = ProxyServer(self.app, served)
        await self.server.start()
        self.port = self.server.addresses[0][1]
        assert await self.app.state.tokens.wait_ready(15)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def send(port: int, data: bytes, splits: list[int], half_close: bool, timeout: float = 3.0) -> bytes:
    """Send ``data`` in pieces, then read until the server closes (or ``timeout``)."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            last = 0
            for cut in [*splits, len(data)]:
                s.sendall(data[last:cut])
                last = cut
            if half_close:
                s.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass  # reset, timeout: the server's call
    return bytes(got)


def normal_request(port: int, path: str = "/fuzz-check") -> bytes:
    return send(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode(), [], False, timeout=10)


def test_fuzzed_requests(google, sa_key, private_service, caplog):
    caplog.set_level(logging.DEBUG)
    evil = EvilListener()
    start = len(google.issued)
    proxy = ThreadedProxy(
        {
            "credentials": {"source": "service_account", "key_file": str(sa_key[0])},
            # Short timeouts: a request left unfinished costs the fuzzer little time.
            "limits": {"header_timeout": 0.5, "keepalive_timeout": 0.3, "max_connections": 64},
            "routes": [
                {"prefix": "/", "upstream": private_service.url, "max_body_bytes": 100_000},
                {"prefix": "/xsa", "upstream": private_service.url, "header": "x-serverless-authorization"},
                {"host": "app.localhost", "prefix": "/", "upstream": private_service.url},
            ],
        }
    ).start()
    evil_hostport = f"127.0.0.1:{evil.port}".encode()
    began = time.monotonic()
    counts = {"sent": 0, "answered": 0}
    statuses: dict[bytes, int] = {}
    try:
        assert normal_request(proxy.port).startswith(b"HTTP/1.1 200")

        @settings(
            max_examples=ROUND,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
        @given(raw_requests())
        def fuzz(case: tuple[bytes, list[int], bool]) -> None:
            data, splits, half_close = case
            data = data.replace(b"EVIL", evil_hostport)
            reply = send(proxy.port, data, splits, half_close)
            counts["sent"] += 1
            if reply:
                counts["answered"] += 1
                assert STATUS_LINE.match(reply), reply[:200]
                status = reply[9:12]
                statuses[status] = statuses.get(status, 0) + 1
                if not reply.startswith(b"HTTP/1."):
                    # aiohttp answers in the request's version; the proxy forwards HTTP/1.x only.
                    assert status == b"505" or b" /.proxy/" in data.split(b"\n", 1)[0], (reply[:200], data[:200])
            if counts["sent"] % 200 == 0:
                assert normal_request(proxy.port).startswith(b"HTTP/1.1 200"), "the proxy stopped answering"

        while time.monotonic() - began < BUDGET:
            fuzz()
        # Still serving, and nothing went astray.
        assert normal_request(proxy.port, "/after-fuzz").startswith(b"HTTP/1.1 200")
    finally:
        proxy.stop()
        evil.close()
    print(
        f"\nfuzz: {counts['sent']} requests in {time.monotonic() - began:.0f} s, {counts['answered']} answered; "
        f"statuses {dict(sorted((k.decode(), v) for k, v in statuses.items()))}; "
        f"{len(private_service.requests)} reached the upstream"
    )
    assert counts["sent"] >= 100, counts
    assert evil.connections == 0
    records = private_service.requests
    assert records and records[-1].raw_path == "/after-fuzz"
    for rec in records:
        assert rec.header_values("Host") == [private_service.host], rec.headers
        if rec.claims is not None:
            assert rec.claims["aud"] == private_service.url
    issued = google.issued[start:]
    text = caplog.text
    for token in issued:
        assert token not in text and token.rsplit(".", 1)[1] not in text
    # The proxy's own errors only: the fake upstream, on its own thread, may well log the
    # requests the proxy aborted.
    unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR and r.thread == proxy.thread_id]
    assert not unexpected, [r.getMessage() for r in unexpected[:5]]


# --------------------------------------------------------------------------- HTTP/2 frames

H2_BUDGET = float(os.environ.get("FUZZ_H2_SECONDS", str(BUDGET / 2)))
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_PATHS = ["/", "/h2/x", "/h2/bytes/10", "/.proxy/status.json", "//EVIL/x", "http://EVIL/", "*", "/%2e%2e/x", ""]
H2_AUTHORITIES = ["localhost", "127.0.0.1", "EVIL", "app.localhost", "", "localhost:1", "a" * 300]


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (len(payload) << 8 | kind).to_bytes(4, "big") + bytes([flags & 0xFF]) + (stream & 0xFFFFFFFF).to_bytes(4, "big") + payload


@st.composite
def h2_headers_block(draw: st.DrawFn) -> bytes:
    """A HEADERS payload HPACK-encoded by h2's own encoder, from hostile parts."""
    import hpack

    fields = [
        (":method", draw(st.sampled_from(["GET", "POST", "CONNECT", "PRI", "get", ""]))),
        (":scheme", draw(st.sampled_from(["http", "https", "ftp", ""]))),
        (":path", draw(st.sampled_from(H2_PATHS))),
        (":authority", draw(st.sampled_from(H2_AUTHORITIES))),
    ]
    extra = draw(st.lists(st.tuples(st.sampled_from([n.lower() for n in NAMES] + ["te", "content-type", ":status", "Upper"]), st.sampled_from(VALUES + ["trailers", "application/grpc", "EVIL"])), max_size=6))
    fields = draw(st.permutations(fields[: draw(st.integers(0, 4))] + extra)) if draw(st.booleans()) else fields + extra
    return hpack.Encoder().encode(fields)


@st.composite
def h2_frames(draw: st.DrawFn) -> bytes:
    """A preface, SETTINGS, then a few frames: well-formed ones mixed with broken ones."""
    out = bytearray(_PREFACE if draw(st.integers(0, 20)) else draw(st.binary(max_size=24)))
    out += _frame(0x4, 0, 0, b"")  # our SETTINGS
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from([0x0, 0x1, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7, 0x8, 0x9, 0xA, 0xFE]))
        stream = draw(st.sampled_from([0, 1, 1, 3, 2, 0x7FFFFFFF, 0x80000001]))
        flags = draw(st.sampled_from([0, 0x1, 0x4, 0x5, 0x8, 0x20, 0xFF]))
        if kind == 0x1:
            payload = draw(h2_headers_block())
        elif kind == 0x4:
            payload = b"".join(draw(st.integers(0, 9)).to_bytes(2, "big") + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") for _ in range(draw(st.integers(0, 3))))
        elif kind == 0x8:
            payload = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        else:
            payload = draw(st.binary(max_size=64)) if draw(st.integers(0, 9)) else b"\0" * draw(st.sampled_from([16384, 16385, 70000]))
        out += _frame(kind, flags, stream, payload)
    return bytes(out)


def _h2_get(port: int, path: str) -> int | None:
    """A normal HTTP/2 request with h2's client; its status, or None."""
    import h2.connection
    import h2.events

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", "localhost")], end_stream=True)
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                return None
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
            s.sendall(conn.data_to_send())
    return None


def test_fuzzed_http2_frames(google, sa_key, private_service, fake_google, caplog):
    from tests.fakes.h2_service import H2PrivateService

    caplog.set_level(logging.DEBUG)
    evil = EvilListener()
    with H2PrivateService(fake_google.certs_url) as h2_service:
        proxy = ThreadedProxy(
            {
                "credentials": {"source": "service_account", "key_file": str(sa_key[0])},
                "limits": {"header_timeout": 0.5, "keepalive_timeout": 0.3, "max_connections": 64},
                "routes": [
                    {"prefix": "/", "upstream": private_service.url},
                    {"prefix": "/h2", "upstream": h2_service.url},
                ],
            }
        ).start()
        evil_hostport = f"127.0.0.1:{evil.port}".encode()
        began = time.monotonic()
        counts = {"sent": 0, "answered": 0}
        try:
            assert _h2_get(proxy.port, "/h2/start") == 200

            @settings(max_examples=ROUND, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
            @given(h2_frames(), st.lists(st.integers(1, 300), max_size=3))
            def fuzz(data: bytes, splits: list[int]) -> None:
                data = data.replace(b"EVIL", evil_hostport)
                reply = send(proxy.port, data, sorted(c for c in splits if c < len(data)), False, timeout=1.0)
                counts["sent"] += 1
                counts["answered"] += bool(reply)
                if counts["sent"] % 100 == 0:
                    assert _h2_get(proxy.port, "/h2/check") == 200, "the proxy stopped answering HTTP/2"
                    assert normal_request(proxy.port).startswith(b"HTTP/1.1 200"), "the proxy stopped answering HTTP/1.1"

            while time.monotonic() - began < H2_BUDGET:
                fuzz()
            assert _h2_get(proxy.port, "/h2/after-fuzz") == 200
        finally:
            proxy.stop()
            evil.close()
        print(f"\nh2 fuzz: {counts['sent']} connections in {time.monotonic() - began:.0f} s, {counts['answered']} answered; {len(h2_service.requests)} reached the h2 upstream")
        assert counts["sent"] >= 50, counts
        assert evil.connections == 0
        assert h2_service.requests[-1].path == "/after-fuzz"
        for rec in h2_service.requests:
            assert rec.claims is not None and rec.claims["aud"] == h2_service.url
        unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR and r.thread == proxy.thread_id]
        assert not unexpected, [r.getMessage() for r in unexpected[:5]]
