"""Prometheus metrics, one registry per application.

Each app gets its own ``CollectorRegistry`` instead of prometheus-client's
global one, so several apps in one process (tests, or a future multi-app
server) never collide over metric names.

Labels are bounded: route names come from the config, methods are folded into
a fixed set, statuses into classes (``2xx``); there is never a per-path label.
Token state is read from the token cache at scrape time, so the request path
pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .tokens import TokenCache, TokenKey

METRICS_PATH = "/.proxy/metrics"
#: Every metric name here is a classic one, so the body is the 0.0.4 text format
#: that every Prometheus version (and most other scrapers) reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Methods kept as they are; anything else is counted as OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

#: Upstream latency buckets: milliseconds for warm services, tens of seconds for
#: cold starts, up to the default route timeout (300 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class ProxyMetrics:
    """The proxy's metrics and the registry that exposes them.

    ``observe`` is called once per proxied request (by the access logger) with
    what is known once the response is sent.
    """

    def __init__(
        self,
        tokens: TokenCache,
        routes: Sequence[tuple[str, TokenKey]],
        inflight: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "idtoken_proxy_requests",
            "Requests answered, by route, method and status class (route '-' when no route matched).",
            ("route", "method", "status_class"),
            registry=r,
        )
        self.upstream_latency = Histogram(
            "idtoken_proxy_upstream_latency_seconds",
            "Seconds from sending a request upstream to receiving the response headers.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "idtoken_proxy_request_body_bytes",
            "Request body bytes received from clients.",
            ("route",),
            registry=r,
        )
        self.bytes_out = Counter(
            "idtoken_proxy_response_bytes",
            "Response bytes sent to clients (status line, headers and body).",
            ("route",),
            registry=r,
        )
        in_flight = Gauge(
            "idtoken_proxy_requests_in_flight",
            "Proxied requests (and open websockets) being handled right now.",
            registry=r,
        )
        in_flight.set_function(inflight)
        info = Gauge("idtoken_proxy_build_info", "The running version.", ("version",), registry=r)
        info.labels(__version__).set(1)
        r.register(_TokenCollector(tokens, routes))
        # Children by label values: .labels() takes a lock and builds a key each call.
        self._children: dict[tuple[str, str, int], tuple[Counter, Counter, Counter, Histogram]] = {}

    def observe(
        self, route: str, method: str, status: int, bytes_in: int, bytes_out: int, upstream_seconds: float | None
    ) -> None:
        """Count one request; ``upstream_seconds`` is None when nothing was asked upstream."""
        key = (route, method, status // 100)
        children = self._children.get(key)
        if children is None:
            m = method if method in METHODS else "OTHER"
            children = (
                self.requests.labels(route, m, _CLASSES.get(status // 100, "other")),
                self.bytes_in.labels(route),
                self.bytes_out.labels(route),
                self.upstream_latency.labels(route),
            )
            # Bounded: routes x a dozen methods x five classes; unknown methods share OTHER.
            if method in METHODS:
                self._children[key] = children
        requests, b_in, b_out, latency = children
        requests.inc()
        if bytes_in:
            b_in.inc(bytes_in)
        b_out.inc(bytes_out)
        if upstream_seconds is not None:
            latency.observe(upstream_seconds)

    def render(self) -> bytes:
        """The text exposition format of everything in the registry."""
        return generate_latest(self.registry)


class _TokenCollector(Collector):
    """Token refreshes and time to expiry per route, read from the cache when scraped."""

    def __init__(self, tokens: TokenCache, routes: Sequence[tuple[str, TokenKey]]) -> None:
        self._tokens = tokens
        self._routes = list(routes)

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(read=True)

    def _families(self, read: bool = False) -> list[Metric]:
        refreshes = CounterMetricFamily(
            "idtoken_proxy_token_refreshes",
            "Token fetches by route and outcome (ok, error, unchanged: the source returned the token it had).",
            labels=("route", "outcome"),
        )
        expiry = GaugeMetricFamily(
            "idtoken_proxy_token_expiry_seconds",
            "Seconds until the route's current token expires (absent before the first token).",
            labels=("route",),
        )
        valid = GaugeMetricFamily(
            "idtoken_proxy_token_valid",
            "1 when the route has a token it may send, else 0.",
            labels=("route",),
        )
        if read:
            for name, key in self._routes:
                # A route shares its cache entry with every route of the same identity and
                # audience: each route reports the entry's counts.
                st = self._tokens.status(key)
                for outcome, count in st["refreshes"].items():
                    refreshes.add_metric((name, outcome), count)
                if st["expires_in"] is not None:
                    expiry.add_metric((name,), st["expires_in"])
                valid.add_metric((name,), 1.0 if st["valid"] else 0.0)
        return [refreshes, expiry, valid]


async def metrics_handler(request: web.Request, metrics: ProxyMetrics) -> web.Response:
    """``GET /.proxy/metrics``: the Prometheus text format."""
    resp = web.Response(body=metrics.render(), headers={"Cache-Control": "no-store"})
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


def add_routes(app: web.Application, metrics: ProxyMetrics) -> None:
    """Serve ``/.proxy/metrics`` on ``app``."""

    async def handler(request: web.Request) -> web.Response:
        return await metrics_handler(request, metrics)

    app.router.add_get(METRICS_PATH, handler)
