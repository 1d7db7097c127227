"""A client that goes away before its response is complete still gets its access line.

A handler cancelled because the client's connection was lost must not vanish
from the log and the metrics. As nginx logs them: 499 with no bytes if the client left before the response's
head went out; the real status with the bytes sent so far if it left mid-body;
exactly one line either way, ending in "(client gone)". A response that was
completely written keeps its normal line.

Raw sockets against the real proxy and the fake private service. No assertion
about how long anything took: each wait is bounded and waits for an outcome.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import make_app
from proxy.config import parse_config
from proxy.engine.http1 import ServerState
from proxy.engine.listen import Listener
from proxy.ops.logs import JsonFormatter, TextFormatter
from tests.rawhttp import RawConnection, exchange, request

ROUTE = "svc"
#: route "METHOD path" status bytes duration [upstream latency] [note], as AccessLogger writes it.
LINE = re.compile(r'^(?P<route>\S+) "(?P<method>\S+) (?P<path>\S+)" (?P<status>\d{3}) (?P<bytes>\d+)B (?P<ms>[\d.]+)ms(?P<upstream> upstream [\d.]+ms)?(?P<note> \(client gone\))?$')
BIG = 50_000_000


def config(key_path: Any, upstream: str) -> dict[str, Any]:
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": [{"name": ROUTE, "upstream": upstream}]}


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "idtoken_proxy.access"]


def parsed(record: logging.LogRecord) -> dict[str, str]:
    m = LINE.match(record.getMessage())
    assert m is not None, record.getMessage()
    return m.groupdict()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


async def leave(conn: RawConnection, reset: bool) -> None:
    """Close the client's side: a FIN (a tab closed, curl exiting) or a RST (SO_LINGER 0)."""
    if reset:
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await conn.close()


async def settled(caplog: pytest.LogCaptureFixture, server: ServerState, inflight: Callable[[], int]) -> list[logging.LogRecord]:
    """The access records once the proxied request has its line and its connection is gone.

    After that nothing is left that could write a second line for it.
    """
    await eventually(lambda: any(r.getMessage().startswith(ROUTE + " ") for r in access_records(caplog)), "an access line")
    await eventually(lambda: server.open_connections == 0 and inflight() == 0, "the client's connection closed and no request in flight")
    await asyncio.sleep(0.1)  # a line written after the close would show up by now; only ever adds a check
    return [r for r in access_records(caplog) if r.getMessage().startswith(ROUTE + " ")]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def metrics(port: int) -> Samples:
    reply, _ = await exchange(port, request("GET", "/.proxy/metrics", host=f"127.0.0.1:{port}"), wait_close=False)
    assert reply.status == 200, reply.text
    out: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_by_class(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["status_class"]: v
        for (name, labels), v in samples.items()
        if name == "idtoken_proxy_requests_total" and dict(labels).get("route") == ROUTE
    }


def json_line(record: logging.LogRecord) -> dict[str, Any]:
    """The record as --log-format json writes it."""
    return json.loads(JsonFormatter().format(record))


def server_of(proxy: Any) -> ServerState:
    server = proxy.server.main
    assert isinstance(server, ServerState)
    return server


# --------------------------------------------------------------------------- before the response head


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("body", [b"", b"x"], ids=["lean", "session"])
async def test_a_client_leaving_before_the_head_is_logged_499(start_proxy, sa_key, private_service, caplog, body, reset):
    # A request body takes the ClientSession path; without one, the lean client's.
    proxy = await start_proxy(config(sa_key[0], private_service.url))
    conn = await RawConnection.open(proxy.port)
    await conn.send(request("GET", "/slow?seconds=60&token=secret", body=body))
    await eventually(lambda: any(r.raw_path.startswith("/slow") for r in private_service.requests), "the request upstream")
    await leave(conn, reset)

    records = await settled(caplog, server_of(proxy), lambda: proxy.state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["route"], line["method"], line["path"], line["status"], line["bytes"]) == (ROUTE, "GET", "/slow", "499", "0")
    assert line["upstream"] is None  # no response head came from the upstream
    assert line["note"] == " (client gone)"
    assert float(line["ms"]) > 0

    entry = json_line(records[0])
    http = entry["httpRequest"]
    assert http["status"] == 499 and http["responseSize"] == "0" and http["requestMethod"] == "GET"
    assert http["requestUrl"] == "/slow" and http["latency"].endswith("s")
    assert http.get("requestSize") == (str(len(body)) if body else None)
    assert entry["route"] == ROUTE and "upstreamLatency" not in entry
    assert entry["message"].endswith("(client gone)") and entry["severity"] == "INFO"
    assert TextFormatter().format(records[0]).endswith('INFO idtoken_proxy.access: ' + records[0].getMessage())

    samples = await metrics(proxy.port)
    assert requests_by_class(samples) == {"4xx": 1.0}
    assert value(samples, "idtoken_proxy_requests_total", route=ROUTE, method="GET", status_class="4xx", protocol="HTTP/1.1") == 1.0
    assert value(samples, "idtoken_proxy_response_bytes_total", route=ROUTE) == 0.0
    assert value(samples, "idtoken_proxy_request_body_bytes_total", route=ROUTE) == len(body)
    assert value(samples, "idtoken_proxy_upstream_latency_seconds_count", route=ROUTE) == 0.0


async def test_a_client_leaving_mid_upload_is_logged_499_with_the_body_bytes_received(start_proxy, sa_key, private_service, caplog):
    proxy = await start_proxy(config(sa_key[0], private_service.url))
    conn = await RawConnection.open(proxy.port)
    await conn.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await eventually(lambda: any(r.raw_path == "/upload" for r in private_service.requests), "the upload upstream")
    await leave(conn, reset=False)

    records = await settled(caplog, server_of(proxy), lambda: proxy.state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["method"], line["path"], line["status"], line["bytes"], line["note"]) == ("POST", "/upload", "499", "0", " (client gone)")
    http = json_line(records[0])["httpRequest"]
    assert http["status"] == 499 and http["requestSize"] == "5"
    samples = await metrics(proxy.port)
    assert value(samples, "idtoken_proxy_requests_total", route=ROUTE, method="POST", status_class="4xx", protocol="HTTP/1.1") == 1.0
    assert value(samples, "idtoken_proxy_request_body_bytes_total", route=ROUTE) == 5.0


# --------------------------------------------------------------------------- after the response head


@pytest.mark.parametrize(
    "target, body",
    [
        (f"/bytes/{BIG}", b""),  # lean client, chunked: written chunk by chunk
        (f"/bytes/{BIG}?cl=1", b""),  # lean client, Content-Length: piped from the upstream's socket
        (f"/bytes/{BIG}", b"x"),  # ClientSession (_relay)
    ],
    ids=["lean-chunked", "lean-piped", "session"],
)
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_client_leaving_mid_body_keeps_the_status_and_the_bytes_sent(start_proxy, sa_key, private_service, caplog, target, body, reset):
    proxy = await start_proxy(config(sa_key[0], private_service.url))
    conn = await RawConnection.open(proxy.port)
    await conn.send(request("GET", target, body=body))
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 200")
    got = len(head) + len(await asyncio.wait_for(conn.reader.readexactly(65536), 15))
    await leave(conn, reset)

    records = await settled(caplog, server_of(proxy), lambda: proxy.state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["route"], line["method"], line["path"], line["status"], line["note"]) == (ROUTE, "GET", f"/bytes/{BIG}", "200", " (client gone)")
    sent = int(line["bytes"])
    # At least what the client read, far from all of it (the body alone is BIG bytes).
    assert got <= sent < BIG
    assert line["upstream"] is not None  # the upstream's head did come

    http = json_line(records[0])["httpRequest"]
    assert http["status"] == 200 and http["responseSize"] == str(sent)

    samples = await metrics(proxy.port)
    assert requests_by_class(samples) == {"2xx": 1.0}
    assert value(samples, "idtoken_proxy_response_bytes_total", route=ROUTE) == sent
    assert value(samples, "idtoken_proxy_upstream_latency_seconds_count", route=ROUTE) == 1.0


async def test_a_client_leaving_after_the_head_of_a_slow_body(start_proxy, sa_key, private_service, caplog):
    """The upstream sent its head and nothing more: the client got exactly the head."""
    proxy = await start_proxy(config(sa_key[0], private_service.url))
    conn = await RawConnection.open(proxy.port)
    await conn.send(request("GET", "/slow-body?seconds=60"))
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 200")
    await leave(conn, reset=False)

    records = await settled(caplog, server_of(proxy), lambda: proxy.state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["path"], line["status"], line["bytes"], line["note"]) == ("/slow-body", "200", str(len(head)), " (client gone)")
    samples = await metrics(proxy.port)
    assert requests_by_class(samples) == {"2xx": 1.0}


async def test_a_websocket_whose_client_vanishes_keeps_its_101(start_proxy, sa_key, private_service, caplog):
    proxy = await start_proxy(config(sa_key[0], private_service.url))
    conn = await RawConnection.open(proxy.port)
    key = base64.b64encode(os.urandom(16)).decode()
    await conn.send(
        request(
            "GET",
            "/ws",
            [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")],
            host=f"127.0.0.1:{proxy.port}",
        )
    )
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 101")
    # Gone without a close frame: the relay is cancelled with the connection.
    await leave(conn, reset=True)

    records = await settled(caplog, server_of(proxy), lambda: proxy.state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["path"], line["status"], line["note"]) == ("/ws", "101", " (client gone)")
    assert int(line["bytes"]) == len(head)


# --------------------------------------------------------------------------- complete responses


@pytest.mark.parametrize("target", ["/bytes/300000", "/bytes/300000?cl=1", "/bytes/100", "/slow-body?seconds=0.2"])
async def test_a_complete_response_keeps_its_normal_line_when_the_client_then_leaves(start_proxy, sa_key, private_service, caplog, target):
    proxy = await start_proxy(config(sa_key[0], private_service.url))
    conn = await RawConnection.open(proxy.port)
    await conn.send(request("GET", target))
    reply = await conn.response(timeout=15)
    assert reply.status == 200 and not reply.truncated
    await leave(conn, reset=True)

    records = await settled(caplog, server_of(proxy), lambda: proxy.state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["status"], line["note"]) == ("200", None)
    samples = await metrics(proxy.port)
    assert requests_by_class(samples) == {"2xx": 1.0}


# --------------------------------------------------------------------------- writes that find the connection closed


@pytest.fixture
async def uncancelled_proxy(sa_key, private_service) -> AsyncIterator[tuple[int, ServerState, Any]]:
    """The proxy served by a listener that does not cancel handlers on a lost connection.

    A lost connection then cancels nothing: the handler learns of it when a
    write finds the connection closed (ConnectionResetError), the other way the
    proxy notices a client gone.
    """
    cfg = parse_config(config(sa_key[0], private_service.url))
    app = make_app(cfg)
    await app.startup()
    server = ServerState(app.exchange, cfg.limits, asyncio.get_running_loop(), cancel_on_disconnect=False)
    listener = Listener.open(server, "127.0.0.1", 0, backlog=128)
    try:
        port = listener.addresses[0][1]
        state = app.state
        assert await state.tokens.wait_ready(15)
        yield port, server, state
    finally:
        listener.close()
        server.stop_accepting()
        await server.drain(1.0)
        await app.cleanup()


async def test_a_head_written_to_a_closed_connection_is_logged_499(uncancelled_proxy, private_service, caplog):
    port, server, state = uncancelled_proxy
    conn = await RawConnection.open(port)
    await conn.send(request("GET", "/slow?seconds=1"))
    await eventually(lambda: any(r.raw_path.startswith("/slow") for r in private_service.requests), "the request upstream")
    await leave(conn, reset=True)
    # The handler still waits for the upstream; its head then meets the closed connection.
    records = await settled(caplog, server, lambda: state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["path"], line["status"], line["bytes"], line["note"]) == ("/slow", "499", "0", " (client gone)")
    samples = await metrics(port)
    assert requests_by_class(samples) == {"4xx": 1.0}


@pytest.mark.parametrize("target, body", [(f"/bytes/{BIG}", b""), (f"/bytes/{BIG}?cl=1", b""), (f"/bytes/{BIG}", b"x")], ids=["lean-chunked", "lean-piped", "session"])
async def test_a_body_written_to_a_closed_connection_keeps_the_status(uncancelled_proxy, private_service, caplog, target, body):
    port, server, state = uncancelled_proxy
    conn = await RawConnection.open(port)
    await conn.send(request("GET", target, body=body))
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 15)
    got = len(head) + len(await asyncio.wait_for(conn.reader.readexactly(65536), 15))
    await leave(conn, reset=True)
    records = await settled(caplog, server, lambda: state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["status"], line["note"]) == ("200", " (client gone)")
    assert got <= int(line["bytes"]) < BIG
    # Not mistaken for an upstream that broke off.
    assert not any("upstream broke off" in r.getMessage() for r in caplog.records)
    samples = await metrics(port)
    assert requests_by_class(samples) == {"2xx": 1.0}



async def test_an_upload_cut_off_without_cancellation_is_logged_499_and_no_error(uncancelled_proxy, private_service, caplog):
    # The handler learns of the lost client from its body: not an upstream failure, not a server error.
    port, server, state = uncancelled_proxy
    conn = await RawConnection.open(port)
    await conn.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await eventually(lambda: any(r.raw_path == "/upload" for r in private_service.requests), "the upload upstream")
    await leave(conn, reset=True)
    records = await settled(caplog, server, lambda: state.forwarder.inflight)
    assert len(records) == 1, [r.getMessage() for r in records]
    line = parsed(records[0])
    assert (line["method"], line["path"], line["status"], line["note"]) == ("POST", "/upload", "499", " (client gone)")
    # (The fake upstream's aiohttp server logs its own aborted upload at ERROR: not the proxy's.)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("proxy")], caplog.text
