"""Raw HTTP/1.1 over loopback sockets, for tests where the wire matters.

An HTTP client library would normalise what these tests send on purpose
(paths, header folding, framing), and would hide whether the server closed the
connection. ``RawConnection`` sends bytes as they are, parses one response at a
time, and can tell whether the server closed the connection afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Reply:
    """One response as read off the wire."""

    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    #: True when the body was cut short (the server closed the connection mid-body).
    truncated: bool = False

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class ConnectionClosed(Exception):
    """The server closed the connection before sending a response head."""


@dataclass
class RawConnection:
    """One client connection to 127.0.0.1:port."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: list[bytes] = field(default_factory=list)

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 10, head_request: bool = False) -> Reply:
        """Read one response; ConnectionClosed if the server closed first."""
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            raise ConnectionClosed(f"closed before a response head (got {e.partial[:200]!r})") from None
        except ConnectionResetError:
            raise ConnectionClosed("connection reset before a response head") from None
        status_line, _, block = head[:-4].partition(b"\r\n")
        version, _, rest = status_line.decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in block.split(b"\r\n"):
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
        reply = Reply(int(code), reason, version, headers, b"")
        if head_request or reply.status in (204, 304) or 100 <= reply.status < 200:
            return reply
        length = reply.header("Content-Length")
        chunked = "chunked" in (reply.header("Transfer-Encoding") or "").lower()
        try:
            if chunked:
                reply.body = await asyncio.wait_for(self._read_chunked(), timeout)
            elif length is not None:
                reply.body = await asyncio.wait_for(self.reader.readexactly(int(length)), timeout)
            else:
                reply.body = await asyncio.wait_for(self.reader.read(), timeout)
        except asyncio.IncompleteReadError as e:
            reply.body, reply.truncated = e.partial, True
        except ConnectionResetError:
            reply.truncated = True
        return reply

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # Trailers (none expected), then the final CRLF.
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(body)
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def closed_by_server(self, timeout: float = 10) -> bool:
        """Wait (up to ``timeout``) for the server to close; True if it did.

        Anything the server sends meanwhile is discarded. Only use this where the
        close is expected: a connection that stays open costs the full timeout.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def exchange(port: int, data: bytes, *, timeout: float = 10, wait_close: bool = True) -> tuple[Reply, bool | None]:
    """Send ``data`` on a new connection, read one response, and wait for the close.

    Returns (reply, closed): ``closed`` is whether the server closed the
    connection after the response (waited for up to ``timeout``), or None with
    ``wait_close=False``, for responses that may keep the connection open.
    """
    conn = await RawConnection.open(port)
    try:
        await conn.send(data)
        reply = await conn.response(timeout)
        closed = await conn.closed_by_server(timeout) if wait_close else None
        return reply, closed
    finally:
        await conn.close()


def request(method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"", host: str = "localhost") -> bytes:
    """A well-formed HTTP/1.1 request (Host first, Content-Length when there is a body)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Listener:
    """A loopback TCP listener that records every connection and what it received.

    Stands in for a host the proxy must never talk to ("evil"), or for an
    upstream that misbehaves (``on_connect`` gets reader and writer).
    """

    def __init__(self, on_connect=None) -> None:  # type: ignore[no-untyped-def]
        self.connections = 0
        self.received = bytearray()
        self.closed = asyncio.Event()
        self.connected = asyncio.Event()
        self._on_connect = on_connect
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Listener:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.closed.clear()
        self.connected.set()
        try:
            if self._on_connect is not None:
                await self._on_connect(reader, writer, self)
            else:
                while chunk := await reader.read(65536):
                    self.received += chunk
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
