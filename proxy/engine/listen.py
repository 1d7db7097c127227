"""Listening sockets whose connections are accepted in batches.

uvloop (libuv) accepts one connection per turn of the event loop. Under load a
turn lasts as long as handling every ready socket takes, so a burst of new
connections (a load test, a browser's or a test runner's parallel connections,
a mesh reconnecting) waits in the kernel's queue: with 1,000 connections opened
at once (bench/run.py, c1000) hundreds were still unaccepted after 9 s and the
p99 latency was 5-7 s, though no request spent more than 0.25 s in the proxy.
Python's own event loop accepts up to its backlog per turn.

``Listener`` does the same on any loop: it owns the listening sockets,
accepts up to ``ACCEPT_BATCH`` connections each time one is readable and hands
each to the protocol factory with ``loop.connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Connections accepted per readiness event at most, so that accepting cannot
#: starve the requests already being served (asyncio accepts up to its backlog).
ACCEPT_BATCH = 128
#: Out of file descriptors (or kernel memory): stop accepting this long, as
#: asyncio does; the kernel keeps the waiting connections queued meanwhile.
_PAUSE_SECONDS = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener:
    """Listening sockets whose connections go to ``factory`` (a protocol factory)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket], factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._loop = loop
        self._sockets = sockets
        self._factory = factory
        self._addresses = [sock.getsockname() for sock in sockets]
        self._serving = False
        self._adopting: set[asyncio.Task[None]] = set()
        #: The most connections one readiness event accepted (tests check that batching happens).
        self.largest_batch = 0

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def start(self) -> None:
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        accepted = 0
        try:
            while accepted < ACCEPT_BATCH:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue  # the client gave up while queued
                except OSError as e:
                    if e.errno not in _RESOURCE_ERRORS:
                        raise
                    log.warning("cannot accept connections (%s); pausing for %g s", e.strerror, _PAUSE_SECONDS)
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(_PAUSE_SECONDS, self._resume, sock)
                    return
                accepted += 1
                conn.setblocking(False)
                task = self._loop.create_task(self._adopt(conn))
                self._adopting.add(task)
                task.add_done_callback(self._adopting.discard)
        finally:
            self.largest_batch = max(self.largest_batch, accepted)

    def _resume(self, sock: socket.socket) -> None:
        if self._serving and sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock=conn)
        except OSError as e:
            # The client reset the connection before it could be set up: nothing to serve.
            log.debug("dropped an accepted connection (%s)", e.strerror or type(e).__name__)
            conn.close()

    def close(self) -> None:
        """Stop accepting: the listening sockets close (connections already accepted stay)."""
        if not self._serving:
            return
        self._serving = False
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def is_serving(self) -> bool:
        return self._serving

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port, ...) of each listening socket."""
        return list(self._addresses)

    @classmethod
    def open(
        cls, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int, *, backlog: int, loop: asyncio.AbstractEventLoop | None = None
    ) -> Listener:
        """Bind ``host``:``port`` (every address of it) and start accepting; OSError if it cannot bind."""
        listener = cls(loop or asyncio.get_running_loop(), bind(host, port, backlog), factory)
        listener.start()
        return listener


def bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, as loop.create_server binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: "::" must not also take IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address {address!r}: {(e.strerror or '').lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


__all__ = ["ACCEPT_BATCH", "Listener", "bind"]
