"""Relaying one HTTP/2 stream to another: DATA with bridged flow control, trailers, resets.

Both directions run at once (gRPC's bidirectional streams need it). Bytes read
from one side are acknowledged to their sender only after the other side took
them, so each side's window is the only buffer. A reset on either side resets
the other at once, so a cancelled RPC is cancelled upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import h2.errors

from .h2common import Headers, Stream, StreamReset
from .h2server import ServerStream
from .h2upstream import UpstreamStream


async def pump_request(client: ServerStream, upstream: Stream) -> None:
    """Client -> upstream until the client's stream ends."""
    while True:
        kind, value = await client.read()
        if kind == "data":
            await upstream.send_data(value)
            client.ack(len(value))
        elif kind == "trailers":
            upstream.send_headers(value, end_stream=True)
        else:
            upstream.end()
            return


async def pump_response(upstream: Stream, client: ServerStream) -> tuple[int, Headers | None]:
    """Upstream -> client, after the response head (already filtered) went out: (body bytes, trailers)."""
    sent = 0
    while True:
        kind, value = await upstream.read()
        if kind == "data":
            await client.send_data(value)
            upstream.ack(len(value))
            sent += len(value)
        elif kind == "trailers":
            client.send_trailers(value)
            return sent, value
        else:
            client.end()
            return sent, None


def link_resets(client: ServerStream, upstream: Stream) -> None:
    """A reset of one side resets the other (RST_STREAM both ways)."""

    def client_reset(exc: StreamReset) -> None:
        upstream.cancel(h2.errors.ErrorCodes.CANCEL)

    def upstream_reset(exc: StreamReset) -> None:
        code = exc.error_code if exc.error_code else h2.errors.ErrorCodes.CANCEL
        client.cancel(code)

    client.on_reset = client_reset
    upstream.on_reset = upstream_reset


async def relay(
    client: ServerStream,
    upstream: UpstreamStream,
    response_head: Callable[[Headers], Headers],
) -> Headers:
    """Relay a stream whose request head went upstream; returns the response head as received."""
    link_resets(client, upstream)
    sending = asyncio.ensure_future(pump_request(client, upstream))
    try:
        head = await upstream.response
        out = response_head(head)
        # A trailers-only answer (gRPC errors) is one HEADERS frame with END_STREAM.
        if upstream.ended_inbound and upstream.next_is_end():
            await upstream.read()
            client.send_headers(out, end_stream=True)
        else:
            client.send_headers(out)
            await pump_response(upstream, client)
        if not sending.done() and client.ended_outbound:
            # The upstream answered in full before the request ended (as a gRPC server may).
            sending.cancel()
            upstream.cancel(h2.errors.ErrorCodes.NO_ERROR)
        return head
    except StreamReset:
        sending.cancel()
        raise
    finally:
        if not sending.done():
            with contextlib.suppress(StreamReset, asyncio.CancelledError):
                await sending
        elif not sending.cancelled() and sending.exception() is not None:
            exc = sending.exception()
            if not isinstance(exc, StreamReset):
                raise exc  # type: ignore[misc]
