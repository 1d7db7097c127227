"""Running the application: listeners, signals and the shutdown phases."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from aiohttp import web

from .config import Config, is_loopback_host
from .logs import ACCESS, AccessLogger

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The proxy could not start (port in use, ...): exit 3 with this message."""


def runner_kwargs(config: Config) -> dict[str, Any]:
    """Server settings for the main listener (also used by the tests' servers)."""
    AccessLogger.include_query = config.log.include_query
    return dict(
        # A client that goes away cancels its handler, and so the upstream request.
        handler_cancellation=True,
        # aiohttp's keep-alive timer also bounds the wait for a request head.
        keepalive_timeout=config.limits.keepalive_timeout,
        # Bodies pass through as they are.
        auto_decompress=False,
        access_log_class=AccessLogger,
        access_log=ACCESS,
        shutdown_timeout=config.shutdown_timeout,
    )


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    return web.AppRunner(app, handle_signals=False, **runner_kwargs(config))


async def serve(app: web.Application, config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully. A second signal exits at once."""
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {config.listen.host}:{config.listen.port}: {e.strerror or e}") from None
    if not is_loopback_host(config.listen.host):
        log.warning(
            "listening on %s, which is not loopback: anyone who can reach it acts with this proxy's Google identity",
            config.listen.host,
        )
    for addr in runner.addresses:
        log.info("listening on http://%s:%s", *addr[:2])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down (in-flight requests get %g s)", signal.Signals(signum).name, config.shutdown_timeout)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        # Phases: stop accepting, drain in-flight requests up to the deadline, cancel the rest.
        await runner.cleanup()
        log.info("stopped")
