#!/usr/bin/env python3
"""The ceiling: the least a Python reverse proxy on the proxy's own stack can do per request.

    BENCH_ID_TOKEN=... python bench/ceiling.py PORT http://127.0.0.1:UPSTREAM_PORT

asyncio protocols on uvloop with httptools on both sides, one upstream keep-alive
connection per client connection, the same ``Authorization`` header injected
(``Bearer $BENCH_ID_TOKEN``, as the Go peer's) and the upstream's ``Host``, and
nothing else: no guard, no routes, no limits, no logs, no metrics, no pipelining,
no request bodies. It is not a proxy anyone should run; it tells what the layers
of idtoken-proxy cost, measured beside it (``bench/run.py --compare``, as
``ceiling={python} bench/ceiling.py {port} {upstream}``).
"""

from __future__ import annotations

import asyncio
import os
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        head = b"HTTP/1.1 %d OK\r\n" % status + b"".join(self.headers) + b"\r\n"
        self.client.transport.write(head + b"".join(self.body))  # type: ignore[union-attr]
        self.headers, self.body = [], []

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int, fixed: bytes) -> None:
        self.upstream_port = upstream_port
        #: The Host and Authorization lines every upstream request carries.
        self.fixed = fixed
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.url = b""
        self.headers: list[bytes] = []
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"host", b"authorization"):
            self.headers += (name, b": ", value, b"\r\n")

    def on_message_complete(self) -> None:
        head = b"".join(
            [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n", self.fixed, *self.headers, b"\r\n"]
        )
        self.url, self.headers = b"", []
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(head)
        else:
            self.connecting = asyncio.ensure_future(self._connect(head))

    async def _connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, self.upstream = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.upstream_port)
        self.upstream.transport.write(head)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def main(port: int, upstream: str) -> None:
    authority = upstream.partition("://")[2].rstrip("/")
    fixed = f"Host: {authority}\r\nAuthorization: Bearer {os.environ['BENCH_ID_TOKEN']}\r\n".encode()
    upstream_port = int(authority.rpartition(":")[2])
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(upstream_port, fixed), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
