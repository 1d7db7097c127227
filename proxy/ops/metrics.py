"""Prometheus metrics, one registry per application.

Each app gets its own ``CollectorRegistry`` instead of prometheus-client's
global one, so several apps in one process (tests, or a future multi-app
server) never collide over metric names.

Labels are bounded: route names come from the config, methods are folded into
a fixed set, statuses into classes (``2xx``); there is never a per-path label.
Token state is read from the token cache at scrape time, so the request path
pays nothing for it.

Requests are counted here in plain numbers; prometheus-client (about 1 MiB of
resident memory) is imported at the first scrape, by ``exposition.py``, which
turns these counts into metric families. A proxy nobody scrapes, the usual
case on a laptop, never loads it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..auth.tokens import TokenCache, TokenKey

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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


class RequestCount:
    """Requests answered for one (route, method, status class)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        #: When this label set was first seen (the ``_created`` sample, as prometheus-client's own counters).
        self.created = time.time()


class RouteCounts:
    """Body bytes both ways and the upstream latency histogram of one route."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "created", "latency_sum")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        #: Per-bucket (not cumulative) counts; one more than LATENCY_BUCKETS, for +Inf.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.created = time.time()


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
        self.tokens = tokens
        self.routes = list(routes)
        #: The config generation and reload counts (reload.py's ReloadStatus.as_json).
        self.reload_info: Callable[[], dict[str, Any]] | None = None
        self.inflight = inflight
        #: (route, method or OTHER, status class, protocol) -> count, in the order first seen.
        self.requests: dict[tuple[str, str, str, str], RequestCount] = {}
        #: Route name ("-" when no route matched) -> its counts, in the order first seen.
        self.by_route: dict[str, RouteCounts] = {}
        # Both counters of a (route, method, status // 100), so a request costs one lookup.
        self._children: dict[tuple[str, str, int, int], tuple[RequestCount, RouteCounts]] = {}
        self._registry: CollectorRegistry | None = None

    def observe(
        self,
        route: str,
        method: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        upstream_seconds: float | None,
        http_major: int = 1,
    ) -> None:
        """Count one request (an HTTP/2 stream is one); ``upstream_seconds`` is None when nothing was asked upstream."""
        key = (route, method, status // 100, http_major)
        children = self._children.get(key)
        if children is None:
            protocol = "HTTP/2" if http_major == 2 else "HTTP/1.1"
            label = (route, method if method in METHODS else "OTHER", _CLASSES.get(status // 100, "other"), protocol)
            count = self.requests.get(label)
            if count is None:
                count = self.requests[label] = RequestCount()
            counts = self.by_route.get(route)
            if counts is None:
                counts = self.by_route[route] = RouteCounts()
            children = (count, counts)
            # Bounded: routes x a dozen methods x five classes; unknown methods share OTHER.
            if method in METHODS:
                self._children[key] = children
        count, counts = children
        count.value += 1
        counts.bytes_in += bytes_in
        counts.bytes_out += bytes_out
        if upstream_seconds is not None:
            # The first bucket whose upper bound is >= the value, as prometheus-client's Histogram.
            counts.buckets[bisect_left(LATENCY_BUCKETS, upstream_seconds)] += 1
            counts.latency_sum += upstream_seconds

    @property
    def registry(self) -> CollectorRegistry:
        """This app's registry; built, and prometheus-client imported, on first use."""
        if self._registry is None:
            from .exposition import build_registry

            self._registry = build_registry(self)
        return self._registry

    def render(self) -> bytes:
        """The text exposition format of everything in the registry."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def pages(metrics: ProxyMetrics) -> dict[str, Callable[[], tuple[int, list[tuple[str, str]], bytes]]]:
    """``GET /.proxy/metrics``: the Prometheus text format."""

    def page() -> tuple[int, list[tuple[str, str]], bytes]:
        return 200, [("Content-Type", CONTENT_TYPE), ("Cache-Control", "no-store")], metrics.render()

    return {METRICS_PATH: page}
