"""Logging setup and the access log. A leaf module: anyone may import it.

No line ever carries a token: the access log names route, method, path (query
left out unless asked for), status, sizes and timings, never a header value but
the User-Agent; and every record passes a redacting filter on its way out.

Two formats on stderr: ``text`` for people, ``json`` with the fields Cloud
Logging reads from a container's output (``severity``, ``message``,
``httpRequest``), so lines show up structured in Cloud Run and GKE as they are.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Protocol

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger

from .errors import redact

ACCESS = logging.getLogger("idtoken_proxy.access")

#: Request keys the proxy handler fills in for the access log and the metrics.
ROUTE = "idtoken_proxy.route"
UPSTREAM_SECONDS = "idtoken_proxy.upstream_seconds"
#: The proxy's own pages (health, metrics, status) are not proxied requests.
_OWN_PAGES = "/.proxy/"

#: google-auth and urllib3 log assertions and token responses at DEBUG.
_NOISY = ("google.auth", "google.oauth2", "urllib3", "requests", "aiohttp.client")

#: Python levels to Cloud Logging's LogSeverity names.
_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class RequestObserver(Protocol):
    """Receives one call per proxied request, after the response is sent (the metrics)."""

    def observe(
        self, route: str, method: str, status: int, bytes_in: int, bytes_out: int, upstream_seconds: float | None
    ) -> None: ...


#: Set on the main application by the app factory; the server hands it to the access logger.
OBSERVER = web.AppKey("observer", RequestObserver)


class _Redacting(logging.Filter):
    """Scrubs anything token-shaped from the message and any traceback of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            # Formatter.format uses exc_text when set: redact the traceback once, here.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the fields Cloud Logging understands.

    ``severity`` and ``message`` are lifted into the LogEntry; ``httpRequest``
    becomes the entry's HttpRequest; every other field lands in ``jsonPayload``.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info or record.exc_text:
            # Error Reporting finds a stack trace at the end of the message.
            message = f"{message}\n{record.exc_text or self.formatException(record.exc_info)}"  # type: ignore[arg-type]
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": message,
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "logger": record.name,
        }
        http = getattr(record, "http_request", None)
        if http is not None:
            entry["httpRequest"] = http
            entry["route"] = getattr(record, "route", "-")
            upstream = getattr(record, "upstream_seconds", None)
            if upstream is not None:
                entry["upstreamLatency"] = _duration(upstream)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every log record to stderr, redacted, in ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Redacting())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def _duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form, as Cloud Logging expects: ``"0.012s"``."""
    return f"{seconds:.6f}s"


class AccessLogger(AbstractAccessLogger):
    """One line per request: route, method, path, status, bytes, duration, upstream latency.

    aiohttp calls it once a response has been sent, with its final size (also for
    requests it refused itself, such as a malformed request line); the same call
    feeds the request metrics (``observer``), so they cost no extra work on the
    request path.
    """

    include_query = False
    observer: RequestObserver | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        raw_path = request.raw_path
        path = raw_path if self.include_query else raw_path.partition("?")[0]
        route: str = request.get(ROUTE, "-")
        upstream: float | None = request.get(UPSTREAM_SECONDS)
        status = response.status
        bytes_in = request.content.total_bytes
        bytes_out = response.body_length
        observer = self.observer
        if observer is not None and not path.startswith(_OWN_PAGES):
            observer.observe(route, request.method, status, bytes_in, bytes_out, upstream)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        # Paths come from the client: scrub anything token-shaped (a JWT in a path).
        path = redact(path)
        http: dict[str, Any] = {
            "requestMethod": request.method,
            "requestUrl": path,
            "status": status,
            "responseSize": str(bytes_out),
            "latency": _duration(time),
            "remoteIp": request.remote or "",
            "protocol": f"HTTP/{request.version.major}.{request.version.minor}",
        }
        if bytes_in:
            # The body only: Cloud Logging's requestSize would include the head, which
            # aiohttp does not measure.
            http["requestSize"] = str(bytes_in)
        agent = request.headers.get(hdrs.USER_AGENT)
        if agent:
            http["userAgent"] = redact(agent[:300])
        upstream_text = f" upstream {upstream * 1000:.1f}ms" if upstream is not None else ""
        self.logger.info(
            '%s "%s %s" %s %sB %.1fms%s',
            route,
            request.method,
            path,
            status,
            bytes_out,
            time * 1000,
            upstream_text,
            extra={"http_request": http, "route": route, "upstream_seconds": upstream},
        )

    @property
    def enabled(self) -> bool:
        # Always called, even with the access log below the level: it also feeds the metrics.
        return True


def access_logger_class(include_query: bool, observer: RequestObserver | None = None) -> type[AccessLogger]:
    """The access logger for a listener.

    ``include_query`` logs query strings (they may hold secrets); ``observer``
    (the metrics) gets one call per request.
    """
    return type("AccessLogger", (AccessLogger,), {"include_query": include_query, "observer": observer})
