"""Running the application: listeners, signals and the shutdown phases.

Two listeners: the main one proxies (loopback unless explicitly opted out); the
optional admin one (``admin.port``) serves only health, readiness and metrics,
carries no identity and so may bind the pod address for kubelet probes and
Prometheus scrapes.

Shutdown on SIGTERM or SIGINT, in phases: readiness turns 503; the main
listener stops accepting and idle keep-alive connections close; websockets get a
1001 (going away) close frame; in-flight requests get up to ``shutdown_timeout``
seconds to finish, the rest are cancelled; then the admin listener closes and
the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from .app import App, make_admin_app
from .config import Config, is_loopback_host
from .engine.h2lazy import LazyH2Connections
from .engine.http1 import ServerState, Service
from .engine.listen import Listener
from .ops.logs import setup_logging
from .reload import ConfigDiff, Reloader

log = logging.getLogger(__name__)

#: Exit status when a second signal cuts the graceful shutdown short.
EXIT_FORCED = 1
#: Listen backlog of the main listener. A backlog of 128 (aiohttp's default) overflows when
#: many clients connect at once (a load test, a test runner's browsers, a mesh
#: reconnecting): the kernel drops the handshakes beyond it and each of those
#: clients waits out a SYN retransmit (1 s, then 3 s, 7 s). The kernel caps the
#: value at net.core.somaxconn (4096 by default since Linux 5.4), so this asks
#: for what the system allows, as Go's net.Listen does.
LISTEN_BACKLOG = 4096


#: The cyclic garbage collector's thresholds while serving (see tune_gc).
GC_THRESHOLDS = (50_000, 10, 10)


def tune_gc() -> None:
    """Tune the cyclic garbage collector for serving; the command line calls it once, before the loop starts.

    Measured under load (bench/run.py, 100 B responses): with Python's defaults
    (700, 10, 10) collections took about 6 % of the CPU at 64 connections and
    about 18 % at 1,000: full collections walking every object the imports
    created, and older-generation ones walking the objects of requests in
    flight, promoted by frequent young collections. Freezing what exists at
    startup (imported modules, the app) takes those out of every collection,
    and a larger first generation lets most request objects go by reference
    counting before a collection sees them.

    The first generation's threshold counts objects made less objects freed,
    and each young collection walks every young object alive, so with many
    requests in flight it runs often and long while finding nothing: at 1,000
    connections, 10,000 meant about 220 young collections in 12 s of load,
    about 5 ms each, none of which freed an object. 50,000 takes CPU per
    request there from about 163 to 151 us (three runs each); at 64
    connections collections are rare either way. The cost: objects in
    reference cycles (the proxy's request path makes none in that load) wait
    until 50,000 have built up, a few MiB at most.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class StartupError(Exception):
    """The proxy could not start (port in use, ...): exit 3 with this message."""


async def close_websockets(app: App) -> None:
    """Send every open client websocket a 1001 (going away) close frame, and wait for them to end."""
    await app.exchange.close_tunnels(app.state.config.shutdown_timeout)


class ProxyServer:
    """The main listener and the optional admin listener of one application."""

    def __init__(self, app: App, config: Config, admin_app: Service | None = None) -> None:
        self.app = app
        self.config = config
        self.state = app.state
        if admin_app is None and config.admin.port is not None:
            admin_app = make_admin_app(self.state)
        self.admin_app = admin_app
        #: The main listener's connections (engine/http1.py), and the admin's.
        self.main: ServerState | None = None
        self.admin: ServerState | None = None
        self.listener: Listener | None = None
        self.admin_listener: Listener | None = None
        self._started = False
        self._stopped = False

    @property
    def addresses(self) -> list[Any]:
        """(host, port, ...) of the main listener's sockets."""
        return self.listener.addresses if self.listener is not None else []

    @property
    def admin_addresses(self) -> list[Any]:
        return self.admin_listener.addresses if self.admin_listener is not None else []

    async def start(self) -> None:
        """Start the token lifecycle and both listeners; raise StartupError if one cannot bind."""
        config = self.config
        loop = asyncio.get_running_loop()
        # Resolves identities and starts fetching tokens (without waiting).
        await self.app.startup()
        self._started = True
        # HTTP/2 with prior knowledge on the same port (engine/h2server.py), each stream on the
        # request path of the moment (a reload swaps it); h2 is imported at the first such connection.
        h2 = LazyH2Connections(lambda stream: self.app.exchange.handle_h2(stream), config.limits.keepalive_timeout)
        self.main = ServerState(self.app.exchange, config.limits, loop, h2=h2)
        try:
            # Accepts connections in batches: uvloop's own accept takes one per loop turn (listen.py).
            self.listener = Listener.open(self.main, config.listen.host, config.listen.port, backlog=LISTEN_BACKLOG)
        except OSError as e:
            await self.app.cleanup()
            self._stopped = True
            raise StartupError(f"cannot listen on {config.listen.host}:{config.listen.port}: {e.strerror or e}") from None
        if not is_loopback_host(config.listen.host):
            log.warning(
                "listening on %s, which is not loopback: anyone who can reach it acts with this proxy's Google identity",
                config.listen.host,
            )
        for addr in self.listener.addresses:
            log.info("listening on http://%s:%s", *addr[:2])
        # The admin listener starts after the main one, so readiness can never be 200
        # while the proxy itself does not listen yet.
        if self.admin_app is not None:
            host, port = config.admin.host, config.admin.port
            assert port is not None
            self.admin = ServerState(self.admin_app, config.limits, loop)
            try:
                self.admin_listener = Listener.open(self.admin, host, port, backlog=128)
            except OSError as e:
                self.listener.close()
                await self.app.cleanup()
                self._stopped = True
                raise StartupError(f"cannot listen on {host}:{port} (admin): {e.strerror or e}") from None
            for addr in self.admin_listener.addresses:
                log.info("admin listening on http://%s:%s (health, readiness, metrics)", *addr[:2])

    async def reconfigure(self, config: Config, env: Mapping[str, str] | None = None) -> None:
        """A reload: requests from now on take the new config's path; listen and admin stay."""
        await self.app.reconfigure(config, env)
        if self.main is not None:
            self.main.service = self.app.exchange
            # New connections get the new limits; connections open now keep theirs.
            self.main.limits = config.limits
        if config.log != self.config.log:
            setup_logging(config.log.level, config.log.format)
        self.config = dataclasses.replace(config, listen=self.config.listen, admin=self.config.admin)

    def begin_shutdown(self) -> None:
        """Phase 1: readiness turns 503 on both listeners, before anything closes."""
        assert self.state.readiness is not None
        self.state.readiness.begin_shutdown()

    async def stop(self) -> None:
        """Shut down in phases (see the module docstring); safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.begin_shutdown()
        forwarder = self.state.forwarder
        inflight = forwarder.inflight if forwarder is not None else 0
        if inflight:
            log.info("waiting up to %g s for %d in-flight request%s", self.config.shutdown_timeout, inflight, "s" * (inflight != 1))
        if self._started:
            # Phase 2: stop accepting (the listening socket closes) and close idle keep-alive connections.
            if self.listener is not None:
                self.listener.close()
            if self.main is not None:
                self.main.stop_accepting()
            # Phase 3: websockets get 1001 (going away).
            await self.app.exchange.close_tunnels(self.config.shutdown_timeout)
            # Phase 4: in-flight requests get up to shutdown_timeout, then are cancelled.
            if self.main is not None:
                await self.main.drain(self.config.shutdown_timeout)
            # Then the upstream pool and the token refresh timers.
            await self.app.cleanup()
        # Phase 5: the admin listener goes last, so probes see 503 (not a refused
        # connection) for as long as requests are draining.
        if self.admin_listener is not None:
            self.admin_listener.close()
        if self.admin is not None:
            self.admin.stop_accepting()
            await self.admin.drain(1.0)
        log.info("stopped")


async def serve(app: App, config: Config, reloader: Reloader | None = None, env: Mapping[str, str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully. A second signal exits at once.

    SIGHUP, and a change to the config file (unless ``watch: false``), reload
    the config through ``reloader`` (reload.py); without one there is nothing to reload.
    """
    server = ProxyServer(app, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    if reloader is not None:

        async def apply(new: Config, diff: ConfigDiff) -> None:
            await server.reconfigure(new, env)

        reloader.apply = apply

    def on_hangup() -> None:
        if reloader is None:
            log.info("SIGHUP: nothing to reload (no config file: the command line's routes stay)")
        else:
            reloader.trigger("SIGHUP")

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: exiting now", name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_FORCED)
        log.info("%s: shutting down (in-flight requests get %g s)", name, config.shutdown_timeout)
        # Readiness fails at once, even while startup is still under way.
        server.begin_shutdown()
        stop.set()

    # Installed before startup, so a signal during startup still shuts down cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await server.start()
        if reloader is not None and config.watch:
            reloader.start_watch()
            log.info("watching %s: a change is applied without a restart (SIGHUP too)", reloader.path)
        await stop.wait()
    finally:
        if reloader is not None:
            reloader.stop()
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
