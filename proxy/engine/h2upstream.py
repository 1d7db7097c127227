"""The HTTP/2 upstream: a pool of h2 client connections, streams opened on them.

Cloud Run serves HTTP/2 over TLS, negotiated with ALPN ``h2``; an ``http://``
loopback upstream (a local container, the tests) gets h2c with prior knowledge.
A connection is used only after the upstream's SETTINGS arrived, so an upstream
that does not speak HTTP/2 is told apart from one that fails later, and is
never silently downgraded: gRPC cannot work over HTTP/1.1.

One connection carries streams up to the upstream's ``MAX_CONCURRENT_STREAMS``;
when it is full, or the upstream sent GOAWAY, the next stream goes to another
connection (opened if needed). A connection that has no streams left after a
GOAWAY is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import h2.events

from ..ops.logs import quiet_token_loggers
from .h2common import Endpoint, Headers, Stream, StreamReset

log = logging.getLogger(__name__)


class H2UpstreamError(Exception):
    """The upstream could not be reached over HTTP/2; the message says why, in one line."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class UpstreamStream(Stream):
    def __init__(self, endpoint: Endpoint, stream_id: int) -> None:
        super().__init__(endpoint, stream_id)
        self.response: asyncio.Future[Headers] = endpoint.loop.create_future()

    def _fail(self, exc: StreamReset) -> None:
        if not self.response.done():
            self.response.set_exception(exc)
            # Retrieved or not, the reset is reported through read(); no "never retrieved" noise.
            self.response.exception()
        super()._fail(exc)


class UpstreamConnection(Endpoint):
    client_side = True

    def __init__(self, origin: Origin, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop)
        self.origin = origin
        self.settled: asyncio.Future[None] = self.loop.create_future()
        self.on_idle: list[UpstreamConnection] | None = None

    # ---------------------------------------------------------------- pool view
    def capacity(self) -> int:
        limit = self.conn.remote_settings.max_concurrent_streams
        return max(0, limit - len(self.streams))

    def usable(self) -> bool:
        return (
            self.closed_exc is None
            and self.goaway is None
            and self.settled.done()
            and not self.settled.cancelled()
            and self.settled.exception() is None
            and self.capacity() > 0
        )

    def open(self, headers: Headers, end_stream: bool) -> UpstreamStream:
        sid = self.conn.get_next_available_stream_id()
        stream = UpstreamStream(self, sid)
        self.streams[sid] = stream
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self.flush()
        stream.ended_outbound = end_stream
        return stream

    def forget(self, stream: Stream) -> None:
        super().forget(stream)
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.goaway is not None and not self.streams:
            self.close()

    # ---------------------------------------------------------------- events
    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged) and not self.settled.done():
            self.settled.set_result(None)
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if isinstance(stream, UpstreamStream) and not stream.response.done():
                stream.response.set_result(event.headers)
            return
        super().handle_event(event)

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        super().on_goaway(last_stream_id, error_code)
        log.debug("upstream %s sent GOAWAY (last stream %d, code %d)", self.origin.authority, last_stream_id, error_code)
        self._close_if_drained()

    def _lost(self, exc: StreamReset) -> None:
        if not self.settled.done():
            self.settled.set_exception(exc)
            self.settled.exception()
        super()._lost(exc)


class H2Pool:
    """HTTP/2 connections per upstream origin."""

    def __init__(self, connect_timeout: float = 10.0) -> None:
        # hpack logs each header it encodes at DEBUG, the token among them.
        quiet_token_loggers()
        self.connect_timeout = connect_timeout
        self._conns: dict[Origin, list[UpstreamConnection]] = {}
        self._connecting: dict[Origin, asyncio.Task[UpstreamConnection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # The default context reads SSL_CERT_FILE / SSL_CERT_DIR as OpenSSL does.
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["h2"])
            self._ssl = ctx
        return self._ssl

    async def open_stream(self, origin: Origin, headers: Headers, end_stream: bool) -> UpstreamStream:
        """A new stream to ``origin`` with ``headers`` sent; raises H2UpstreamError."""
        while True:
            conn = self._usable(origin)
            if conn is None:
                conn = await self._connection(origin)
            if conn.usable():
                return conn.open(headers, end_stream)

    def _usable(self, origin: Origin) -> UpstreamConnection | None:
        conns = self._conns.get(origin)
        if not conns:
            return None
        conns[:] = [c for c in conns if c.closed_exc is None]
        for c in conns:
            if c.usable():
                return c
        return None

    async def _connection(self, origin: Origin) -> UpstreamConnection:
        task = self._connecting.get(origin)
        if task is None:
            task = asyncio.ensure_future(self._connect(origin))
            self._connecting[origin] = task
            task.add_done_callback(lambda t: self._connecting.pop(origin, None))
        return await asyncio.shield(task)

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        where = f"{origin.scheme}://{origin.authority}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: UpstreamConnection(origin, loop),
                    origin.host,
                    origin.port,
                    ssl=self._ssl_context() if tls else None,
                    server_hostname=origin.host if tls else None,
                )
                if tls:
                    chosen = transport.get_extra_info("ssl_object").selected_alpn_protocol()
                    if chosen != "h2":
                        transport.close()
                        raise H2UpstreamError(
                            f"upstream {where} does not speak HTTP/2 (ALPN offered h2, it chose {chosen or 'none'})"
                        )
                try:
                    await conn.settled
                except StreamReset:
                    raise H2UpstreamError(
                        f"upstream {where} does not speak HTTP/2: it did not answer the HTTP/2 preface"
                        + ("" if tls else " (h2c with prior knowledge)")
                    ) from None
        except TimeoutError:
            raise H2UpstreamError(f"upstream {where} did not answer within {self.connect_timeout:g} s") from None
        except ssl.SSLCertVerificationError as e:
            raise H2UpstreamError(f"upstream {where}: TLS certificate not accepted: {e.verify_message}") from None
        except ssl.SSLError as e:
            raise H2UpstreamError(f"upstream {where}: TLS failed: {e.reason or e}") from None
        except OSError as e:
            raise H2UpstreamError(f"upstream {where} unreachable: {e.strerror or e}") from None
        self._conns.setdefault(origin, []).append(conn)
        return conn

    def connections(self, origin: Origin) -> list[UpstreamConnection]:
        return [c for c in self._conns.get(origin, []) if c.closed_exc is None]

    def close(self) -> None:
        for conns in self._conns.values():
            for c in conns:
                c.close()
        self._conns.clear()
