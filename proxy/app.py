"""The application factory: the only place that wires the parts together."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from .ops import health, metrics
from .config import RESERVED_PREFIX, Config, Credentials
from .forward import Forwarder
from .policy.guard import CORS_ORIGIN, Guard
from .ops.health import Readiness
from .auth.identity import Identity, build_identity
from .limits import FRONT_DOOR
from .ops.logs import OBSERVER, quiet_token_loggers
from .ops.metrics import ProxyMetrics
from .policy.router import CompiledRoute, Router, compile_route
from .ops.status import RequestStats, StatusPage
from .auth.tokens import TokenCache
from .upstream import LeanClient

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ProxyState:
    config: Config
    identities: dict[Credentials, Identity]
    tokens: TokenCache
    router: Router
    forwarder: Forwarder | None = None
    extras: dict[str, object] = field(default_factory=dict)
    #: Set by make_app: what /.proxy/readyz answers, and the metrics registry.
    readiness: Readiness | None = None
    metrics: ProxyMetrics | None = None
    #: Open client websockets; shutdown closes them with 1001 (going away).
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    #: Tasks that run while the proxy serves (a whole project's re-listing,
    #: proxy/resolve/project.py), started after the token warm-up, cancelled at shutdown.
    background: tuple[Callable[[ProxyState], Coroutine[Any, Any, None]], ...] = ()


STATE = web.AppKey("state", ProxyState)


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
) -> web.Application:
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

    @web.middleware
    async def unroutable(request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp's router matches origin-form paths only: for "*" (OPTIONS *),
        # absolute-form and authority-form (CONNECT) targets, the proxy gives its own answer.
        if request.match_info.http_exception is not None:
            return await proxy(request)
        return await handler(request)

    # The browser guard runs first, before any token is fetched or upstream contacted.
    guard = Guard(config)
    app = web.Application(middlewares=[guard.middleware, unroutable])
    app.on_response_prepare.append(guard.on_response_prepare)
    app[STATE] = state
    app[OBSERVER] = state.metrics
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_token_lifecycle)

    async def proxy(request: web.Request) -> web.StreamResponse:
        assert state.forwarder is not None
        return await state.forwarder(request)

    # The proxy's own endpoints go before the catch-all route.
    health.add_routes(app, state.readiness)
    metrics.add_routes(app, state.metrics)
    stats = RequestStats(r.name for r in compiled)
    StatusPage(config, compiled, tokens, stats).add_routes(app)
    app.router.add_route("*", "/{tail:.*}", proxy)
    app[FRONT_DOOR] = ProxyFrontDoor(app, state, guard, stats)
    return app


class ProxyFrontDoor:
    """The main listener's request handler: proxied requests in one pass.

    The Application's router, middlewares and response signals cost more per
    request than the proxying itself. A request for a proxied path (origin-form,
    outside ``/.proxy``) that the guard lets through as it is goes straight to
    the forwarder, and the two response hooks (the guard's CORS headers, the
    status page's counts) are called directly as its headers go out. Everything
    else takes the Application's way, where the guard middleware and the same
    hooks do the same work: the proxy's own pages, refusals and CORS preflights,
    targets aiohttp's router does not match, and ``Expect`` (aiohttp's handling
    of ``100-continue`` lives there).

    aiohttp has no public hook for this: the door calls the Application's
    ``_make_request`` (with its ``_cls`` argument) and ``_handle``, and overrides
    ``Request._prepare_hook``. tests/test_front_door.py runs each case both ways
    and checks which way was taken, so a change in those fails there.
    """

    def __init__(self, app: web.Application, state: ProxyState, guard: Guard, stats: RequestStats) -> None:
        self.app = app
        self.state = state
        self.guard = guard
        self.stats = stats
        door = self

        class ProxyRequest(web.Request):
            def get(self, key: Any, default: Any = None) -> Any:
                # The request's own dict (aiohttp keeps it in _state), without
                # Mapping.get's two Python calls and a KeyError for each missing key:
                # several lookups per request, most of them for keys not set.
                return self._state.get(key, default)

            @property
            def plain_response(self) -> bool:
                """Whether the hook below leaves this request's response headers as they are
                (as long as the upstream sent no CORS headers): then the upstream's head may
                be relayed as bytes (forward.py, _PlainResponse)."""
                return self._match_info is None and door.guard.adds_nothing(self)

            # The hook aiohttp calls as a response's headers go out; requests that
            # went through the Application (match_info set) get its signals as before.
            async def _prepare_hook(self, response: web.StreamResponse) -> None:
                if self._match_info is None:
                    door.guard.finish_headers(self, response)
                    door.stats.count(self, response)
                else:
                    await super()._prepare_hook(response)

        self._request_class = ProxyRequest

    def make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        # aiohttp's Application builds its requests here; only the class differs.
        return self.app._make_request(message, payload, protocol, writer, task, _cls=self._request_class)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = request.raw_path
        headers = request.headers
        if raw.startswith("/") and not raw.startswith(RESERVED_PREFIX) and hdrs.EXPECT not in headers:
            verdict = self.guard.decide(request.method, headers)
            if verdict.allowed and not verdict.preflight:
                if verdict.cors_origin is not None:
                    request[CORS_ORIGIN] = verdict.cors_origin
                forwarder = self.state.forwarder
                assert forwarder is not None  # set at startup, before the listener opens
                return await forwarder(request)  # type: ignore[arg-type]
        return await self.app._handle(request)  # type: ignore[arg-type]


def make_admin_app(state: ProxyState) -> web.Application:
    """The admin listener's app: health, readiness and metrics only; it never proxies."""
    assert state.readiness is not None and state.metrics is not None
    admin = web.Application()
    health.add_routes(admin, state.readiness)
    metrics.add_routes(admin, state.metrics)
    return admin


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """One process-wide ClientSession with a keep-alive pool."""
    state = app[STATE]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    session = aiohttp.ClientSession(
        connector=connector,
        # Never share cookies between clients: each upstream Set-Cookie goes to the client.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Bytes pass as they are: no decompression, no re-encoding.
        auto_decompress=False,
        # Per-route timeouts are applied around the wait for response headers only.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        # HTTPS_PROXY / NO_PROXY are honoured, but resolved once per route by the
        # forwarder (envproxy.py): trust_env would read them, and ~/.netrc, per request.
        trust_env=False,
    )
    lean = LeanClient()
    state.forwarder = Forwarder(state.router, state.tokens, session, websockets=state.websockets, lean=lean)
    for name, via in state.forwarder.proxies.items():
        if via is not None:
            log.info("route %s: upstream requests go through the proxy %s (from the environment)", name, via.describe())
    yield
    lean.close()
    await session.close()


async def _token_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Learn who we are, report the routes, start fetching tokens; stop refreshing on exit."""
    state = app[STATE]
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
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(job(state)) for job in state.background]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await state.tokens.close()
