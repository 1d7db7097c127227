"""The application factory: the only place that wires the parts together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .auth.choose import build_identity
from .auth.identity import Identity
from .auth.tokens import TokenCache
from .config import Config, ConfigError, Credentials
from .engine.http1 import Body, RequestHead, Response
from .engine.tunnel import Tunnel
from .errors import CredentialError
from .exchange import Exchange, Page
from .ops import health, metrics
from .ops.health import Readiness
from .ops.logs import AccessLog, quiet_token_loggers
from .ops.metrics import ProxyMetrics
from .ops.status import RequestStats, StatusPage
from .policy.guard import Guard
from .policy.router import CompiledRoute, Router, compile_route
from .reload import ReloadStatus

log = logging.getLogger(__name__)


@dataclass
class ProxyState:
    config: Config
    identities: dict[Credentials, Identity]
    tokens: TokenCache
    router: Router
    #: The request path of the main listener (exchange.py).
    forwarder: Exchange | None = None
    extras: dict[str, object] = field(default_factory=dict)
    #: What /.proxy/readyz answers, and the metrics registry.
    readiness: Readiness | None = None
    metrics: ProxyMetrics | None = None
    #: Open websocket tunnels; shutdown closes them with 1001 (going away).
    websockets: set[Tunnel] = field(default_factory=set)
    #: Tasks that run while the proxy serves (a whole project's re-listing,
    #: proxy/resolve/project.py), started after the token warm-up, cancelled at shutdown.
    background: tuple[Callable[[ProxyState], Coroutine[Any, Any, None]], ...] = ()


class _StateKey:
    """``app[STATE]``: the application's ProxyState."""


STATE: Final = _StateKey()


class App:
    """The proxy: its state, the main listener's request path and the admin listener's pages."""

    def __init__(self, state: ProxyState, exchange: Exchange, admin_pages: dict[str, Page], reload_status: ReloadStatus | None = None) -> None:
        self.state = state
        self.exchange = exchange
        self.admin_pages = admin_pages
        self.started = False
        self._background: list[asyncio.Task[None]] = []
        #: Config generation and the last reload's outcome (reload.py; status page, metrics).
        self.reload_status = reload_status or ReloadStatus()

    def __getitem__(self, key: _StateKey) -> ProxyState:
        if key is STATE:
            return self.state
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key is STATE

    async def startup(self) -> None:
        """Learn who we are, report the routes, start fetching tokens (without waiting)."""
        state = self.state
        self.started = True
        for name, via in self.exchange.proxies.items():
            if via is not None:
                log.info("route %s: upstream requests go through the proxy %s (from the environment)", name, via.describe())
        for ident in state.identities.values():
            await ident.resolve()
            # Which source was picked and why the others were not (credentials: auto).
            for line in ident.report():
                log.info("credentials: %s", line)
        for r in state.router.routes:
            ident = state.identities[r.route.credentials]
            log.info(
                "route %s: %s%s -> %s (audience %s, %s header, identity %s%s)",
                r.name,
                r.route.host or "",
                r.route.prefix,
                r.route.upstream,
                r.route.audience,
                r.route.header,
                ident.describe(),
                f"; chosen because {ident.reason}" if ident.reason else "",
            )
        await state.tokens.warm_up()
        self._background = [asyncio.create_task(job(state)) for job in state.background]

    async def reconfigure(self, config: Config, env: Mapping[str, str] | None = None) -> None:
        """Make ``config`` the one requests that start from now on see (a reload).

        Requests, streams and websockets under way keep the request path they
        started on. Identities of unchanged credentials, and the tokens of
        unchanged (identity, audience) keys, are kept (and keep refreshing); new
        keys are fetched at once; keys no route uses any more are dropped.
        Raises ConfigError, changing nothing, when a new identity cannot be built.
        """
        state = self.state
        identities: dict[Credentials, Identity] = {}
        try:
            for route in config.routes:
                creds = route.credentials
                if creds not in identities:
                    identities[creds] = state.identities.get(creds) or build_identity(creds)
            if config.serve_project is not None and config.credentials not in identities:
                identities[config.credentials] = state.identities.get(config.credentials) or build_identity(config.credentials)
            jobs = state.background
            if config.serve_project is not None or any(not r.resolved for r in config.routes):
                from .resolve import resolve_config

                config, jobs = await resolve_config(config, identities, env=env)
            for creds, ident in identities.items():
                if creds not in state.identities:
                    await ident.resolve()
        except CredentialError as e:
            raise ConfigError([str(e)]) from None
        tokens = state.tokens
        compiled = [compile_route(r, tokens.add(identities[r.credentials], r.audience)) for r in config.routes]
        used = {r.token_key for r in compiled}
        for key in tokens.keys():  # noqa: SIM118 (a list of keys, not a dict)
            if key not in used:
                tokens.discard(key)
        old = self.exchange
        router = Router(compiled)
        route_keys = [(r.name, r.token_key) for r in compiled]
        assert state.readiness is not None and state.metrics is not None
        state.readiness.routes = route_keys
        state.metrics.routes = route_keys
        pages: dict[str, Any] = {
            **health.pages(state.readiness),
            **metrics.pages(state.metrics),
            **StatusPage(config, compiled, tokens, old.stats, self.reload_status.as_json).pages(),
        }
        access = AccessLog(config.log.include_query, state.metrics)
        # The transports (and their warm connections) and the open tunnels go on across generations.
        exchange = Exchange(config, router, tokens, Guard(config), old.stats, access, pages, pool=old.pool, h2pool=old.h2pool)
        exchange.tunnels = state.websockets
        exchange.plain_responses = old.plain_responses
        state.config, state.identities, state.router, state.forwarder = config, identities, router, exchange
        self.exchange = exchange
        if jobs is not state.background:
            for task in self._background:
                task.cancel()
            state.background = jobs
            self._background = [asyncio.create_task(job(state)) for job in jobs]

    async def cleanup(self) -> None:
        """Stop the background tasks; close the upstream pool; stop refreshing tokens."""
        if not self.started:
            return
        self.started = False
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.exchange.close()
        await self.state.tokens.close()


class AdminService:
    """The admin listener: health, readiness and metrics only; it never proxies."""

    def __init__(self, pages: dict[str, Any], access: AccessLog | None = None) -> None:
        self.pages = pages

    async def handle(self, head: RequestHead, body: Body, response: Response) -> None:
        path = head.target.partition("?")[0]
        page = self.pages.get(path)
        if page is None:
            response.send(404, [("Content-Type", "text/plain; charset=utf-8")], b"404: Not Found")
            return
        if head.method not in ("GET", "HEAD"):
            response.send(405, [("Allow", "GET, HEAD"), ("Content-Type", "text/plain; charset=utf-8")], b"405: Method Not Allowed")
            return
        status, headers, data = page()
        response.send(status, headers, data)

    def refused(self, head: RequestHead | None, response: Response | None, status: int, reason: str, sent: int) -> None:
        return None


def build_identities(config: Config) -> dict[Credentials, Identity]:
    """One identity per distinct credentials block; raises CredentialError."""
    identities: dict[Credentials, Identity] = {}
    for route in config.routes:
        if route.credentials not in identities:
            identities[route.credentials] = build_identity(route.credentials)
    return identities


def make_app(
    config: Config,
    *,
    identities: dict[Credentials, Identity] | None = None,
    tokens: TokenCache | None = None,
    background: tuple[Callable[[ProxyState], Coroutine[Any, Any, None]], ...] = (),
) -> App:
    """Build the proxy application. Tests pass ``identities``/``tokens`` to inject fakes."""
    # Also when embedded in another program: google-auth's DEBUG records carry tokens.
    quiet_token_loggers()
    if identities is None:
        identities = build_identities(config)
    if tokens is None:
        tokens = TokenCache()
    compiled: list[CompiledRoute] = [
        compile_route(r, tokens.register(identities[r.credentials], r.audience)) for r in config.routes
    ]
    state = ProxyState(config=config, identities=identities, tokens=tokens, router=Router(compiled), background=background)
    route_keys = [(r.name, r.token_key) for r in compiled]
    state.readiness = Readiness(tokens, route_keys)
    state.metrics = ProxyMetrics(tokens, route_keys, inflight=lambda: state.forwarder.inflight if state.forwarder else 0)
    stats = RequestStats(r.name for r in compiled)
    reload_status = ReloadStatus()
    state.metrics.reload_info = reload_status.as_json
    own_pages: dict[str, Any] = {
        **health.pages(state.readiness),
        **metrics.pages(state.metrics),
        **StatusPage(config, compiled, tokens, stats, reload_status.as_json).pages(),
    }
    access = AccessLog(config.log.include_query, state.metrics)
    exchange = Exchange(config, state.router, tokens, Guard(config), stats, access, own_pages)
    exchange.tunnels = state.websockets
    state.forwarder = exchange
    admin_pages: dict[str, Any] = {**health.pages(state.readiness), **metrics.pages(state.metrics)}
    return App(state, exchange, admin_pages, reload_status)


def make_admin_app(state: ProxyState) -> AdminService:
    """The admin listener's service: health, readiness and metrics only; it never proxies."""
    assert state.readiness is not None and state.metrics is not None
    return AdminService({**health.pages(state.readiness), **metrics.pages(state.metrics)})
