"""The Prometheus side of the metrics: ``ProxyMetrics``' counts as metric families.

Imported by ``ProxyMetrics.registry`` at the first scrape, and the only module
that imports prometheus-client, so a proxy that is never scraped does not
carry it. Everything is read when scraped: the request counts kept by
``metrics.py``, the in-flight gauge and the token cache.

The families and samples are the ones prometheus-client's own ``Counter``,
``Histogram`` and ``Gauge`` would give (``_total``, ``_bucket``/``_count``/
``_sum``, and ``_created`` unless ``PROMETHEUS_DISABLE_CREATED_SERIES`` is set).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__
from .metrics import LATENCY_BUCKETS

if TYPE_CHECKING:
    from .metrics import ProxyMetrics

#: The ``le`` labels of the latency histogram, +Inf last, spelled as prometheus-client's Histogram does.
_LE = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]  # untyped upstream


def created_series() -> bool:
    """Whether to expose ``_created`` samples: prometheus-client's own switch (its README), read the same way."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


def build_registry(metrics: ProxyMetrics) -> CollectorRegistry:
    """A registry of its own for one app's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RequestCollector(metrics))
    registry.register(_TokenCollector(metrics))
    return registry


class _RequestCollector(Collector):
    """Requests, latency, bytes, in-flight requests and the build info, in that order."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families(read=True)

    def _families(self, read: bool = False) -> list[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "idtoken_proxy_requests",
            "Requests answered (an HTTP/2 stream is one), by route, method, status class and protocol (route '-' when no route matched).",
            labels=("route", "method", "status_class", "protocol"),
        )
        latency = HistogramMetricFamily(
            "idtoken_proxy_upstream_latency_seconds",
            "Seconds from sending a request upstream to receiving the response headers.",
            labels=("route",),
        )
        bytes_in = CounterMetricFamily(
            "idtoken_proxy_request_body_bytes",
            "Request body bytes received from clients.",
            labels=("route",),
        )
        bytes_out = CounterMetricFamily(
            "idtoken_proxy_response_bytes",
            "Response bytes sent to clients (status line, headers and body).",
            labels=("route",),
        )
        in_flight = GaugeMetricFamily(
            "idtoken_proxy_requests_in_flight",
            "Proxied requests (and open websockets) being handled right now.",
        )
        info = GaugeMetricFamily("idtoken_proxy_build_info", "The running version.", labels=("version",))
        reloads = CounterMetricFamily(
            "idtoken_proxy_config_reloads", "Config reloads, by outcome (error: the old config kept serving).", labels=("outcome",)
        )
        generation = GaugeMetricFamily("idtoken_proxy_config_generation", "The config generation serving (1 at start, +1 per applied reload).")
        if read:
            created = created_series()
            for labels, count in m.requests.items():
                requests.add_metric(labels, count.value, created=count.created if created else None)
            for route, c in m.by_route.items():
                cumulative, total = [], 0
                for le, n in zip(_LE, c.buckets, strict=True):
                    total += n
                    cumulative.append((le, float(total)))
                latency.add_metric((route,), cumulative, c.latency_sum)
                if created:
                    latency.add_sample(latency.name + "_created", {"route": route}, c.created)
                bytes_in.add_metric((route,), c.bytes_in, created=c.created if created else None)
                bytes_out.add_metric((route,), c.bytes_out, created=c.created if created else None)
            in_flight.add_metric((), m.inflight())
            info.add_metric((__version__,), 1)
            if m.reload_info is not None:
                r = m.reload_info()
                for outcome, n in r["reloads"].items():
                    reloads.add_metric((outcome,), n)
                generation.add_metric((), r["generation"])
        return [requests, latency, bytes_in, bytes_out, in_flight, info, reloads, generation]


class _TokenCollector(Collector):
    """Token refreshes and time to expiry per route, read from the cache when scraped."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self._tokens = metrics.tokens
        # Read when scraped: a reload brings another generation's routes.
        self._metrics = metrics

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
            for name, key in self._metrics.routes:
                # A route shares its cache entry with every route of the same identity and
                # audience: each route reports the entry's counts.
                st = self._tokens.status(key)
                for outcome, count in st["refreshes"].items():
                    refreshes.add_metric((name, outcome), count)
                if st["expires_in"] is not None:
                    expiry.add_metric((name,), st["expires_in"])
                valid.add_metric((name,), 1.0 if st["valid"] else 0.0)
        return [refreshes, expiry, valid]
