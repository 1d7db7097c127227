#!/usr/bin/env python3
"""CPU per request of the proxy's own code, with no sockets: the request path in a loop.

    python bench/inproc.py [--requests N] [--connections C] [--profile] [--engine-only]

The real engine (engine/http1.py's protocol, the exchange, the upstream pool's
connections) runs on uvloop, but its transports are fakes: a client transport
that sends the next request when a response is complete, and an upstream
transport that answers each request head with an nginx-like 100-byte response.
What it prints is the proxy's Python work per request, without the kernel's
(the four socket calls a request costs on loopback): a figure that moves little
when the machine is busy, for comparing two versions of the code. The real
figures are bench/run.py's. ``--engine-only`` replaces the request path with a
service that answers each request at once (the HTTP/1.1 engine's own share).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The script's own folder holds bench/h2.py, which would shadow the h2 package.
sys.path[0] = str(ROOT)

from proxy.app import make_app  # noqa: E402
from proxy.config import parse_config  # noqa: E402
from proxy.engine.http1 import ServerState  # noqa: E402
from proxy.engine.upstream import UpstreamConnection  # noqa: E402
from proxy.ops.logs import setup_logging  # noqa: E402
from proxy.server import tune_gc  # noqa: E402

REQUEST = (
    b"GET /100b HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 03:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
    b"Last-Modified: Wed, 02 Dec 2026 02:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "692e5a00-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100
)


class FakeTransport:
    """Enough of a uvloop transport for the engine."""

    def __init__(self, on_write: Any) -> None:
        self.on_write = on_write
        self.closing = False

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, parts: Any) -> None:
        self.on_write(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


async def run(requests: int, connections: int, profile: bool, engine_only: bool = False) -> float:
    loop = asyncio.get_running_loop()
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 8080},
            "credentials": {"source": "static", "token_env": "BENCH_ID_TOKEN"},
            "routes": [{"upstream": "http://127.0.0.1:9"}],
        },
    )
    app = make_app(config)
    await app.startup()
    exchange = app.exchange
    await exchange.tokens.wait_ready(5)
    service: Any = exchange
    if engine_only:
        # The HTTP/1.1 engine alone: a service that answers at once, with no upstream.
        class Answer:
            async def handle(self, head: Any, body: Any, response: Any) -> None:
                response.send_raw(200, "OK", RESPONSE[: RESPONSE.index(b"\r\n\r\n") + 4], b"x" * 100)

        service = Answer()
    state = ServerState(service, config.limits, loop)
    route = exchange.router.routes[0]
    origin = exchange.origin_for(route)
    done = asyncio.Event()
    left = [requests]
    failed: list[bytes] = []

    def client(i: int) -> None:
        proto = state()

        def on_write(data: bytes) -> None:
            # One write is one complete response on the plain path; count responses, then ask again.
            answers = data.count(b"HTTP/1.1 ")
            if data.count(b"HTTP/1.1 200 OK\r\n") != answers or not data.endswith(b"x" * 100):
                failed.append(data[:200])
            left[0] -= answers
            if left[0] <= 0:
                done.set()
            else:
                loop.call_soon(proto.data_received, REQUEST)

        proto.connection_made(FakeTransport(on_write))  # type: ignore[arg-type]
        loop.call_soon(proto.data_received, REQUEST)

    pool = exchange.pool
    for _ in range(connections):
        conn = UpstreamConnection(loop, pool._read_buffer)

        def on_up(data: bytes, conn: UpstreamConnection = conn) -> None:
            loop.call_soon(conn.data_received, RESPONSE)

        conn.connection_made(FakeTransport(on_up))  # type: ignore[arg-type]
        conn.idle_since = loop.time()
        pool._idle.setdefault(origin, []).append(conn)
    tune_gc()
    prof = cProfile.Profile() if profile else None
    t0 = time.process_time()
    if prof:
        prof.enable()
    for i in range(connections):
        client(i)
    await done.wait()
    if prof:
        prof.disable()
    spent = time.process_time() - t0
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    if failed:
        raise SystemExit(f"inproc: {len(failed)} responses were not the upstream's 200, e.g. {failed[0]!r}")
    return spent


def dummy_token() -> str:
    """An unsigned JWT with exp a year ahead: enough for the static identity source."""
    import base64
    import json

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"aud": "http://127.0.0.1:9", "exp": int(time.time()) + 365 * 86400, "email": "bench@example.invalid"}
    return f"{part({'alg': 'RS256', 'kid': 'bench'})}.{part(claims)}.{'c2ln' * 86}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--engine-only", action="store_true", help="answer at once, without the request path and the upstream")
    args = ap.parse_args()
    os.environ["BENCH_ID_TOKEN"] = dummy_token()
    # The access log goes where it goes when serving, but to /dev/null.
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)
    try:
        setup_logging("info", "text")
        import uvloop

        spent = uvloop.run(run(args.requests, args.connections, args.profile, args.engine_only))
    finally:
        os.dup2(saved, 2)
        logging.shutdown()
    print(f"{args.requests} requests, {args.connections} connections: {spent * 1e6 / args.requests:.1f} us CPU per request")


if __name__ == "__main__":
    main()
