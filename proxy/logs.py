"""Logging setup and the access log. A leaf module: anyone may import it.

No line ever carries a token: the access log names route, method, path (query
left out unless asked for), status, size and timings; never a header value.
"""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .errors import redact

ACCESS = logging.getLogger("idtoken_proxy.access")

#: google-auth and urllib3 log assertions and token responses at DEBUG.
_NOISY = ("google.auth", "google.oauth2", "urllib3", "requests", "aiohttp.client")


class _Redacting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Redacting())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


class AccessLogger(AbstractAccessLogger):
    """One line per request: route, method, path, status, bytes, duration."""

    include_query = False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get("idtoken_proxy.route", "-")
        path = request.raw_path if self.include_query else request.raw_path.partition("?")[0]
        self.logger.info(
            '%s "%s %s" %s %s %.1fms',
            route,
            request.method,
            path,
            response.status,
            response.body_length,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
