"""Upgraded connections (websockets) as a byte tunnel, after the upstream's 101.

Once the upstream has switched protocols, the bytes pass both ways as they
are: extensions (permessage-deflate) and subprotocols are negotiated end to
end, and close frames with their codes and reasons pass like any other frame.
Each direction has backpressure: reading from one side pauses while the other
side's write buffer is high.

Frame boundaries are tracked only far enough to inject a close frame where one
may go: 1001 (going away) to both sides at shutdown, 1014 (bad gateway) to the
client when the upstream's connection ends without a close frame, 1001 to the
upstream when the client's ends without one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable

from .http1 import HTTP1Protocol
from .upstream import UpstreamConnection

log = logging.getLogger(__name__)

#: 1001 (going away) and 1014 (bad gateway, IANA registry).
GOING_AWAY = 1001
BAD_GATEWAY = 1014
#: Seconds the other side gets to answer a close frame before its connection is closed.
WIND_DOWN = 5.0


class FrameTracker:
    """Follows websocket frame boundaries in one direction; notes a close frame going by."""

    __slots__ = ("_head", "_remaining", "close_seen")

    def __init__(self) -> None:
        self._head = bytearray()
        self._remaining = 0
        self.close_seen = False

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                continue
            head = self._head
            head.append(data[i])
            i += 1
            if len(head) < 2:
                continue
            size = head[1] & 0x7F
            ext = 2 if size == 126 else 8 if size == 127 else 0
            if len(head) < 2 + ext + (4 if head[1] & 0x80 else 0):
                continue
            if ext:
                size = int.from_bytes(head[2 : 2 + ext], "big")
            if head[0] & 0x0F == 0x8:
                self.close_seen = True
            self._head = bytearray()
            self._remaining = size


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    """A close frame (a client's frames are masked, RFC 6455 5.3)."""
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = os.urandom(4)
    return bytes([0x88, 0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Tunnel:
    """Relays one upgraded connection between the client and the upstream."""

    def __init__(
        self,
        client: HTTP1Protocol,
        client_transport: asyncio.Transport,
        client_pending: bytes,
        upstream: UpstreamConnection,
        name: str,
        on_done: Callable[[Tunnel], None] | None = None,
    ) -> None:
        self.client = client
        self.client_transport = client_transport
        self.upstream = upstream
        self.name = name
        self._on_done = on_done
        self.up = FrameTracker()  # client -> upstream (masked frames)
        self.down = FrameTracker()  # upstream -> client
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        #: A close frame for the client waiting for a frame boundary (shutdown), and its code.
        self._pending_close: bytes | None = None
        self._client_closed = False
        #: The client's connection ended without its close frame (it vanished).
        self.client_vanished = False
        self._upstream_closed = False
        self._timer: asyncio.TimerHandle | None = None
        #: Bytes relayed upstream and to the client after the 101.
        self.bytes_up = 0
        self.bytes_down = 0
        # Both ends now deliver to the tunnel; what each sent already goes first.
        pending_up = upstream.leftover
        upstream.leftover = b""
        upstream.tunnel = self
        client.attach_tunnel(self)
        if upstream.closed or upstream.transport is None:
            self.upstream_lost()
        else:
            upstream.transport.resume_reading()
            if pending_up:
                self.upstream_data(pending_up)
        if client_pending:
            self.client_data(client_pending)

    # -- client -> upstream --------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self.up.feed(data)
        transport = self.upstream.transport
        if transport is not None and not self._upstream_closed:
            self.bytes_up += len(data)
            transport.write(data)

    def client_lost(self) -> None:
        if not self._client_closed and not self.up.close_seen:
            self.client_vanished = True
        self._client_closed = True
        transport = self.upstream.transport
        if transport is not None and not self._upstream_closed:
            if not self.up.close_seen and self.up.at_boundary:
                # The client vanished without a close frame: the upstream hears "going away".
                transport.write(close_frame(GOING_AWAY, b"", masked=True))
            self._close_upstream_later()
        self._check_done()

    def client_pause_writing(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def client_resume_writing(self) -> None:
        if self.upstream.transport is not None and not self._upstream_closed:
            self.upstream.transport.resume_reading()

    # -- upstream -> client ------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self.down.feed(data)
        if self._client_closed or self.client_transport.is_closing():
            return
        self.bytes_down += len(data)
        self.client_transport.write(data)
        if self._pending_close is not None and self.down.at_boundary:
            self.client_transport.write(self._pending_close)
            self._pending_close = None

    def upstream_lost(self) -> None:
        self._upstream_closed = True
        if not self._client_closed and not self.client_transport.is_closing():
            if not self.down.close_seen:
                log.info("%s: upstream websocket ended without a close frame; closing the client's with %d", self.name, BAD_GATEWAY)
                if self.down.at_boundary:
                    self.client_transport.write(close_frame(BAD_GATEWAY, b"upstream connection lost", masked=False))
            # Written bytes go out first; the client's own close frame (if any) has nowhere to go.
            self.client_transport.close()
        self._client_closed = True
        self._check_done()

    def upstream_pause_writing(self) -> None:
        if not self.client_transport.is_closing():
            self.client_transport.pause_reading()

    def upstream_resume_writing(self) -> None:
        if not self.client_transport.is_closing():
            self.client_transport.resume_reading()

    # -- the end --------------------------------------------------------------------------

    def going_away(self, reason: bytes = b"proxy shutting down") -> None:
        """Shutdown: both sides get a 1001 close frame (at a frame boundary), then the connections close."""
        if not self._client_closed and not self.client_transport.is_closing() and not self.down.close_seen:
            frame = close_frame(GOING_AWAY, reason, masked=False)
            if self.down.at_boundary:
                self.client_transport.write(frame)
            else:
                self._pending_close = frame
        transport = self.upstream.transport
        if transport is not None and not self._upstream_closed and not self.up.close_seen and self.up.at_boundary:
            transport.write(close_frame(GOING_AWAY, reason, masked=True))
        self._close_upstream_later()

    def _close_upstream_later(self) -> None:
        # The upstream, as the server, closes the TCP connection after the close handshake;
        # one that does not is closed for it.
        if self._timer is None:
            self._timer = self.loop.call_later(WIND_DOWN, self.abort)

    def abort(self) -> None:
        self._timer = None
        self.upstream.close()
        if not self.client_transport.is_closing():
            self.client_transport.close()
        self._upstream_closed = self._client_closed = True
        self._check_done()

    def _check_done(self) -> None:
        if self._client_closed and self._upstream_closed and not self.done.done():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self.client_transport.is_closing():
                self.client_transport.close()
            self.done.set_result(None)
            if self._on_done is not None:
                self._on_done(self)
            # Both ends are closed: the references between them go, so nothing waits for the
            # cyclic garbage collector (which runs rarely while serving: server.tune_gc).
            self.upstream.tunnel = None
            self.client.tunnel = None
            self._on_done = None


__all__ = ["BAD_GATEWAY", "GOING_AWAY", "FrameTracker", "Tunnel", "close_frame"]
