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
        #: The client's address.
        self.remote = endpoint.peer[0] if endpoint.peer else None

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
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(loop)
        self.handler = handler
        #: Seconds a connection with no stream stays open (limits.keepalive_timeout).
        self.idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
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
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self.idle_timeout is not None and self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        # Taken before the base class lets go of them: their handlers are cancelled.
        streams = list(self.streams.values())
        super().connection_lost(exc)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for stream in streams:
            if isinstance(stream, ServerStream) and stream.task is not None and not stream.task.done():
                stream.task.cancel()
        self._wake_idle()
        if self.on_close is not None:
            self.on_close(self)

    # ---------------------------------------------------------------- events
    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
            return
        if isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            super().handle_event(event)
            if isinstance(stream, ServerStream) and stream.task is not None and not stream.task.done():
                # The client cancelled: so is its handler, and with it the upstream stream.
                stream.task.cancel()
            return
        super().handle_event(event)

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.draining:
            # Opened after our GOAWAY: never processed, so the client may retry it elsewhere.
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.highest_stream_id = max(self.highest_stream_id, sid)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
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
        if not self.streams:
            if self.draining:
                self._wake_idle()
                self.close()
            else:
                self._arm_idle()

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


class H2Connections:
    """A listener's HTTP/2 side: connections the HTTP/1.1 protocol handed over (http1.H2Handoff)."""

    def __init__(self, handler: Handler, idle_timeout: float | None = None) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.connections: set[H2ServerConnection] = set()
        #: Streams opened since start (the status page counts them).
        self.streams_opened = 0

    @property
    def count(self) -> int:
        return len(self.connections)

    def take(self, transport: asyncio.Transport, data: bytes) -> None:
        conn = H2ServerConnection(self.handler, on_close=self.connections.discard, idle_timeout=self.idle_timeout)
        self.connections.add(conn)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.data_received(data)

    def shutdown(self) -> None:
        for conn in list(self.connections):
            conn.shutdown()

    def stream_tasks(self) -> set[asyncio.Future[None]]:
        return {
            s.task
            for conn in self.connections
            for s in conn.streams.values()
            if isinstance(s, ServerStream) and s.task is not None and not s.task.done()
        }

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
