"""The HTTP/2 server side: h2c with prior knowledge on the main listener.

The HTTP/1.1 protocol hands a connection over here when its first bytes are the
HTTP/2 client preface (:data:`~proxy.engine.h2common.PREFACE`), feeding the
bytes it already read. Each request stream becomes a :class:`ServerStream`
handed to ``handler`` in a task of its own, structured as hypercorn's
``protocol/h2.py``: events in, per-stream buffers that wait for window, data
acknowledged only once it has gone on.

Limits of our own go out in the first SETTINGS (``h2common``): concurrent
streams, header list size, frame size; h2 enforces them and answers a peer
that breaks them (or flow control, or stream states, or HPACK) with GOAWAY and
the matching error code.

Shutdown (:meth:`H2ServerConnection.shutdown`) sends GOAWAY with the last stream
id seen, refuses streams opened after it, lets the others finish, and closes
the connection when none is left or when the caller gives up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import h2.errors
import h2.events

from .h2common import Endpoint, Headers, Stream, goaway_frame

log = logging.getLogger(__name__)


class ServerStream(Stream):
    def __init__(self, endpoint: H2ServerConnection, stream_id: int, headers: Headers) -> None:
        super().__init__(endpoint, stream_id)
        self.headers = headers
        self.task: asyncio.Task[None] | None = None

    def pseudo(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
            if not k.startswith(b":"):
                break
        return None

    def send_trailers(self, headers: Headers) -> None:
        self.send_headers(headers, end_stream=True)


Handler = Callable[[ServerStream], Awaitable[None]]


class H2ServerConnection(Endpoint):
    client_side = False

    def __init__(
        self,
        handler: Handler,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        peer: tuple[str, int] | None = None,
        on_close: Callable[[H2ServerConnection], None] | None = None,
    ) -> None:
        super().__init__(loop)
        self.handler = handler
        self.peer = peer
        self.on_close = on_close
        self.highest_stream_id = 0
        self.draining = False
        self._idle: asyncio.Future[None] | None = None
        #: Streams opened on this connection (the status page counts them).
        self.stream_count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for stream in list(self.streams.values()):
            if isinstance(stream, ServerStream) and stream.task is not None:
                stream.task.cancel()
        self._wake_idle()
        if self.on_close is not None:
            self.on_close(self)

    # ---------------------------------------------------------------- events
    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
            return
        super().handle_event(event)

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.draining:
            # Opened after our GOAWAY: never processed, so the client may retry it elsewhere.
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.highest_stream_id = max(self.highest_stream_id, sid)
        stream = ServerStream(self, sid, event.headers)
        self.streams[sid] = stream
        self.stream_count += 1
        if event.stream_ended is not None:
            stream._push(("end", None))
        stream.task = self.loop.create_task(self._run(stream))

    async def _run(self, stream: ServerStream) -> None:
        try:
            await self.handler(stream)
        except asyncio.CancelledError:
            stream.cancel(h2.errors.ErrorCodes.CANCEL)
        except Exception:
            log.exception("HTTP/2 stream %d: the handler failed", stream.id)
            stream.cancel(h2.errors.ErrorCodes.INTERNAL_ERROR)
        else:
            if not stream.ended_outbound and stream.reset is None:
                stream.cancel(h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif not stream.ended_inbound and stream.reset is None:
                # We answered before the request body ended: tell the client to stop sending.
                stream.cancel(h2.errors.ErrorCodes.NO_ERROR)
        finally:
            self.forget(stream)

    def forget(self, stream: Stream) -> None:
        super().forget(stream)
        if self.draining and not self.streams:
            self._wake_idle()
            self.close()

    def _wake_idle(self) -> None:
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Send GOAWAY (NO_ERROR): the streams open now may finish, no new one is taken."""
        if self.draining or self.transport is None or self.transport.is_closing():
            return
        self.draining = True
        self._write_out()
        self.transport.write(goaway_frame(self.highest_stream_id))
        if not self.streams:
            self.close()

    async def wait_idle(self) -> None:
        if not self.streams or self.closed_exc is not None:
            return
        self._idle = self.loop.create_future()
        await self._idle

    def abort_streams(self) -> None:
        for stream in list(self.streams.values()):
            if isinstance(stream, ServerStream) and stream.task is not None:
                stream.task.cancel()
