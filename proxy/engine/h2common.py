"""What both HTTP/2 sides share: one h2 connection on an asyncio protocol, and its streams.

An :class:`Endpoint` owns an ``h2.connection.H2Connection`` and its transport,
feeds it the bytes that arrive, turns its events into per-stream state and
writes what it has to send. A :class:`Stream` is one request/response: its
inbound items (data, trailers, end) wait in a small queue, and
:meth:`Stream.send_data` waits for flow-control window. Inbound data is
acknowledged (the peer's window reopened) only when the consumer says it has
passed it on (:meth:`Stream.ack`), so a slow reader on one side slows the
sender on the other instead of filling memory (h2 docs, "Flow Control").

GOAWAY is read here, not by h2. h2 4.x moves its connection state machine to
CLOSED on the first GOAWAY sent or received, and then refuses every frame of
the streams still in flight; a graceful GOAWAY (NO_ERROR) means "finish those,
open no more". So the frame reader lifts GOAWAY frames out of the byte stream
before h2 sees them, and :func:`goaway_frame` writes ours, leaving h2's
connection open for the streams that are allowed to finish.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions

from .http1 import PREFACE

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

_GOAWAY = 0x7
#: Our own limits, advertised in SETTINGS.
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 64 * 1024
MAX_FRAME_SIZE = 16384
#: Receive window per stream; the connection window is grown to a multiple of it.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
#: Write buffer marks of the transport (pause sending data above HIGH).
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
#: Seconds a connection closed for a protocol error keeps reading (see Endpoint._linger).
LINGER_SECONDS = 2.0


def goaway_frame(last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> bytes:
    """A GOAWAY frame's bytes (RFC 9113 6.8), written around h2 (see the module docstring)."""
    payload = struct.pack(">II", last_stream_id & 0x7FFFFFFF, error_code) + debug
    return struct.pack(">IBI", (len(payload) << 8) | _GOAWAY, 0, 0) + payload


class FrameReader:
    """Splits received bytes into what goes to h2 and the GOAWAY frames it must not see."""

    def __init__(self, skip: int = 0) -> None:
        #: Bytes to pass through unread first (the client preface on the server side).
        self._skip = skip
        self._buf = bytearray()
        self._raw = False

    def feed(self, data: bytes, max_frame: int) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        """(bytes for h2, [(last_stream_id, error_code, debug data)] of GOAWAY frames)."""
        if self._raw:
            return data, []
        self._buf += data
        out = bytearray()
        goaways: list[tuple[int, int, bytes]] = []
        if self._skip:
            n = min(self._skip, len(self._buf))
            out += self._buf[:n]
            del self._buf[:n]
            self._skip -= n
            if self._skip:
                return bytes(out), goaways
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[0:3], "big")
            kind = self._buf[3]
            if length > max_frame:
                # Too large for us: h2 refuses it with FRAME_SIZE_ERROR; stop splitting.
                out += self._buf
                self._buf.clear()
                self._raw = True
                break
            if len(self._buf) < 9 + length:
                break
            frame = bytes(self._buf[: 9 + length])
            del self._buf[: 9 + length]
            if kind == _GOAWAY and length >= 8:
                last, code = struct.unpack(">II", frame[9:17])
                goaways.append((last & 0x7FFFFFFF, code, frame[17:]))
            else:
                out += frame
        return bytes(out), goaways


class StreamReset(Exception):
    """The peer reset the stream, or the connection went away under it."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code


class Stream:
    """One HTTP/2 stream as seen by the code relaying it."""

    def __init__(self, endpoint: Endpoint, stream_id: int) -> None:
        self.endpoint = endpoint
        self.id = stream_id
        #: ("data", bytes) | ("trailers", Headers) | ("end", None), in arrival order.
        self._inbound: collections.deque[tuple[str, Any]] = collections.deque()
        self._readable: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None
        self.reset: StreamReset | None = None
        self.ended_inbound = False
        self.ended_outbound = False
        self.closed = False
        #: Bytes received and not yet acknowledged (given back to the peer's window).
        self.unacked = 0
        #: Body bytes received in all.
        self.received = 0
        #: Called once when the peer resets the stream or the connection fails.
        self.on_reset: Callable[[StreamReset], None] | None = None

    # ---------------------------------------------------------------- inbound
    def _push(self, item: tuple[str, Any]) -> None:
        self._inbound.append(item)
        self._wake_reader()
        if item[0] == "end":
            self.ended_inbound = True
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self.ended_inbound and self.ended_outbound and not self.closed:
            self.closed = True
            self.endpoint.forget(self)

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    def _fail(self, exc: StreamReset) -> None:
        if self.reset is None and not self.closed:
            self.reset = exc
            self._wake_reader()
            self._wake_window()
            if self.on_reset is not None:
                self.on_reset(exc)
        self.closed = True

    async def read(self) -> tuple[str, Any]:
        """The next inbound item; raises StreamReset if the stream was reset first."""
        while not self._inbound:
            if self.reset is not None:
                raise self.reset
            if self.closed:
                # Cancelled from our side: nothing more will arrive.
                raise StreamReset(h2.errors.ErrorCodes.CANCEL, "stream cancelled")
            self._readable = self.endpoint.loop.create_future()
            await self._readable
        return self._inbound.popleft()

    def next_is_end(self) -> bool:
        """Whether the next inbound item, already here, is the end of the stream."""
        return bool(self._inbound) and self._inbound[0][0] == "end"

    def ack(self, n: int) -> None:
        """``n`` received bytes have gone on: reopen that much of the peer's window."""
        if n <= 0:
            return
        self.unacked -= n
        self.endpoint.acknowledge(self, n)

    # ---------------------------------------------------------------- outbound
    def _wake_window(self) -> None:
        if self._window is not None and not self._window.done():
            self._window.set_result(None)

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        if self.reset is not None:
            raise self.reset
        self.endpoint.conn.send_headers(self.id, headers, end_stream=end_stream)
        self.endpoint.flush()
        if end_stream:
            self._ended_outbound()

    def _ended_outbound(self) -> None:
        self.ended_outbound = True
        self._maybe_done()

    async def send_data(self, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Send ``data``, waiting for window and for the transport to drain as needed."""
        ep = self.endpoint
        view = memoryview(data)
        while True:
            if self.reset is not None:
                raise self.reset
            if ep.closed_exc is not None:
                raise ep.closed_exc
            if self.closed and not self.ended_outbound:
                # Cancelled from our side (cancel): nothing more may be sent.
                raise StreamReset(h2.errors.ErrorCodes.CANCEL, "stream cancelled")
            if ep.write_paused:
                await ep.drained()
                continue
            if not view:
                if end_stream:
                    ep.conn.end_stream(self.id)
                    ep.flush()
                    self._ended_outbound()
                return
            window = min(ep.conn.local_flow_control_window(self.id), ep.conn.max_outbound_frame_size)
            if window <= 0:
                self._window = ep.loop.create_future()
                await self._window
                continue
            chunk, view = view[:window], view[window:]
            ep.conn.send_data(self.id, chunk.tobytes(), end_stream=end_stream and not view)
            ep.flush()
            if end_stream and not view:
                self._ended_outbound()
                return

    def end(self) -> None:
        if self.reset is None and not self.ended_outbound:
            self.endpoint.conn.end_stream(self.id)
            self.endpoint.flush()
            self._ended_outbound()

    def cancel(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset the stream from our side (the other side of the relay went away)."""
        if self.closed or self.reset is not None:
            return
        self.closed = True
        # Whoever waits to read or to send on it must not wait forever.
        self._wake_reader()
        self._wake_window()
        try:
            self.endpoint.conn.reset_stream(self.id, error_code)
            self.endpoint.flush()
        except h2.exceptions.StreamClosedError:
            pass
        self.endpoint.forget(self)


class Endpoint(asyncio.Protocol):
    """One HTTP/2 connection: bytes in, events to streams, bytes out."""

    client_side = False

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_event_loop()
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.reader = FrameReader(skip=0 if self.client_side else len(PREFACE))
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        #: Set by the peer's GOAWAY: (last stream id it will process, error code).
        self.goaway: tuple[int, int] | None = None
        #: Set when the connection is gone; every later operation raises it.
        self.closed_exc: StreamReset | None = None
        self._lingering = False
        self._flush_scheduled = False

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)  # type: ignore[attr-defined]
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        frames, goaways = self.reader.feed(data, self.conn.max_inbound_frame_size)
        try:
            events = self.conn.receive_data(frames) if frames else []
        except h2.exceptions.ProtocolError as e:
            # h2 has queued a GOAWAY with the right error code: send it, then close.
            log.debug("HTTP/2 protocol error from the peer: %s", e)
            if isinstance(e.__cause__, hpack.exceptions.HPACKError) and self.transport is not None:
                # RFC 9113 4.3: an undecodable header block is a COMPRESSION_ERROR (h2 says PROTOCOL_ERROR).
                self.conn.clear_outbound_data_buffer()
                self.transport.write(goaway_frame(self.conn.highest_inbound_stream_id, h2.errors.ErrorCodes.COMPRESSION_ERROR))
            else:
                self._write_out()
            self._lost(StreamReset(h2.errors.ErrorCodes.PROTOCOL_ERROR, f"HTTP/2 protocol error: {e}"))
            self._linger()
            return
        for event in events:
            self.handle_event(event)
        for last, code, _debug in goaways:
            self.on_goaway(last, code)
        self.flush()

    def _linger(self) -> None:
        """Close after our GOAWAY, reading and dropping what the peer still sends for a moment.

        Closing a socket with unread input makes the kernel send RST, which can
        destroy the GOAWAY before the peer reads it (nginx's lingering close).
        """
        self._lingering = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(StreamReset(h2.errors.ErrorCodes.CANCEL, "connection closed"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drained(self) -> None:
        if self.write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    # ---------------------------------------------------------------- helpers
    def flush(self) -> None:
        """Write what h2 has queued, once per loop iteration: many streams' frames in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def acknowledge(self, stream: Stream, n: int) -> None:
        try:
            self.conn.acknowledge_received_data(n, stream.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The stream is gone: its bytes still count against the connection window.
            self.conn.increment_flow_control_window(n)
        self.flush()

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)

    def _lost(self, exc: StreamReset) -> None:
        if self.closed_exc is None:
            self.closed_exc = exc
        for stream in list(self.streams.values()):
            stream._fail(exc)
        self.streams.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---------------------------------------------------------------- events
    def handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                # A stream we already gave up on: its bytes still count against the connection window.
                if event.flow_controlled_length:
                    self.conn.increment_flow_control_window(event.flow_controlled_length)
                return
            stream.unacked += event.flow_controlled_length
            # Padding counts against the window but is not relayed: give it back now.
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                stream.unacked -= padding
                self.conn.acknowledge_received_data(padding, event.stream_id)
            if event.data:
                stream.received += len(event.data)
                stream._push(("data", event.data))
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._push(("trailers", event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._push(("end", None))
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream._fail(StreamReset(int(event.error_code), f"stream reset by the peer ({_code_name(event.error_code)})"))
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._wake_window()
            else:
                for stream in self.streams.values():
                    stream._wake_window()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream._wake_window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # Only from h2's own handling (we lift GOAWAY frames out before it sees them).
            self._lost(StreamReset(int(event.error_code or 0), "connection terminated"))

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        """The peer sent GOAWAY: streams above ``last_stream_id`` were never processed."""
        self.goaway = (last_stream_id, error_code)
        for sid, stream in list(self.streams.items()):
            if sid > last_stream_id or error_code != 0:
                self.streams.pop(sid, None)
                stream._fail(StreamReset(error_code or h2.errors.ErrorCodes.REFUSED_STREAM, "refused by the peer's GOAWAY"))


def _code_name(code: Any) -> str:
    try:
        return h2.errors.ErrorCodes(int(code)).name
    except ValueError:
        return str(int(code))
