"""Notice an upstream connection lost in the middle of a response body.

aiohttp's client (3.14) leaves a response body waiting forever when its parser
gives up in the middle of that body (a malformed chunk after a good one): the
protocol closes the connection and records the error, but the body's
``StreamReader`` never gets it, so a proxy relaying the body would hang with
the client connection open, neither complete nor aborted.

``LostBodyWatch`` closes that gap with aiohttp's public ``closed`` future of
the connection's protocol: when the connection goes away while a body relayed
through it is unfinished, the body fails with ``ClientPayloadError`` and the
relay aborts the client connection as for any upstream that breaks off.
"""

from __future__ import annotations

import asyncio
import weakref
from functools import partial

import aiohttp
from aiohttp.client_proto import ResponseHandler


class _Slot:
    """The body currently relayed through one upstream connection (or None)."""

    __slots__ = ("content",)

    def __init__(self) -> None:
        self.content: aiohttp.StreamReader | None = None


class LostBodyWatch:
    """Fails the body of a response whose upstream connection is lost before its end."""

    def __init__(self) -> None:
        # One slot and one callback per pooled connection, however many responses
        # it carries, so nothing accumulates on a long-lived connection.
        self._slots: weakref.WeakKeyDictionary[ResponseHandler, _Slot] = weakref.WeakKeyDictionary()

    def start(self, response: aiohttp.ClientResponse) -> _Slot | None:
        """Watch ``response``'s connection while its body is relayed; pass the result to stop()."""
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None:
            return None  # the body is complete already: the connection went back to the pool
        slot = self._slots.get(protocol)
        if slot is None:
            slot = self._slots[protocol] = _Slot()
            closed = protocol.closed
            if closed is None:
                # Lost before we looked: fail the body now if it is unfinished.
                slot.content = response.content
                _lost(slot, None)
                return None
            closed.add_done_callback(partial(_lost, slot))
        slot.content = response.content
        return slot

    @staticmethod
    def stop(slot: _Slot | None, response: aiohttp.ClientResponse) -> None:
        """The relay of ``response`` is over (complete or not)."""
        # The connection may already carry the next response: clear only our own.
        if slot is not None and slot.content is response.content:
            slot.content = None


def _lost(slot: _Slot, closed: asyncio.Future[None] | None) -> None:
    if closed is not None and not closed.cancelled():
        closed.exception()  # retrieved: an unclean close must not be reported as unhandled
    content = slot.content
    slot.content = None
    if content is not None and not content.is_eof() and content.exception() is None:
        content.set_exception(aiohttp.ClientPayloadError("upstream connection lost before the end of the body"))


__all__ = ["LostBodyWatch"]
