"""Upstreams on raw asyncio streams, for engine tests where the upstream's wire matters.

- :class:`SlowReader`: reads request bodies slowly (a small read, then a pause), counts
  and hashes what it got, then answers ``200`` with ``{"len": N, "sha256": HEX}``.
- :class:`EarlyAnswer`: reads a request head and a little of its body, then answers
  ``413`` with ``Connection: close`` without waiting for the rest, and closes the way a
  careful server does (half-close, then discard what still comes for a while), so the
  answer is not lost to a reset. A request without a body gets ``200 after``.

Both record what they saw and accept any token (the private service checks tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json


class _RawServer:
    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port = 0
        self.heads: list[bytes] = []

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Not wait_closed(): a handler still discarding a body must not hold up teardown.

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def _is_chunked(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return False


class SlowReader(_RawServer):
    """Reads ``read_size`` bytes, sleeps ``pause`` seconds, again, until the body is in."""

    def __init__(self, read_size: int = 16384, pause: float = 0.001) -> None:
        super().__init__()
        self.read_size = read_size
        self.pause = pause
        self.received: list[tuple[int, str]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            digest, size = hashlib.sha256(), 0
            length = _content_length(head)
            if length is None and _is_chunked(head):
                async for chunk in _chunks(reader):
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.sleep(self.pause)
            else:
                left = length or 0
                while left:
                    chunk = await reader.read(min(self.read_size, left))
                    if not chunk:
                        return
                    digest.update(chunk)
                    size += len(chunk)
                    left -= len(chunk)
                    await asyncio.sleep(self.pause)
            self.received.append((size, digest.hexdigest()))
            body = json.dumps({"len": size, "sha256": digest.hexdigest()}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


async def _chunks(reader: asyncio.StreamReader):  # type: ignore[no-untyped-def]
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return
        left = size
        while left:
            chunk = await reader.read(min(left, 16384))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(chunk)
            yield chunk
        await reader.readexactly(2)


class EarlyAnswer(_RawServer):
    """Answers ``413`` after ``read_first`` body bytes, then half-closes and discards."""

    BODY = b"upstream: too large\n"

    def __init__(self, read_first: int = 65536, linger: float = 5.0) -> None:
        super().__init__()
        self.read_first = read_first
        self.linger = linger
        #: Body bytes read before answering (as received, chunk framing included).
        self.read_before_answer = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if _content_length(head) is None and not _is_chunked(head):
            # No body: a plain answer (the request after the refused upload, say).
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\nafter\n")
            await writer.drain()
            return
        got = 0
        while got < self.read_first:
            chunk = await reader.read(self.read_first - got)
            if not chunk:
                break
            got += len(chunk)
        self.read_before_answer = got
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(self.BODY), self.BODY)
        )
        await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        # Lingering close: read and drop what the client still sends, for a while.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.linger):
                while await reader.read(65536):
                    pass
