"""Logging setup and the access log. A leaf module: anyone may import it.

No line ever carries a token: the access log names route, method, path (query
left out unless asked for), status, sizes and timings, never a header value but
the User-Agent; and every record passes a redacting filter on its way out.

Two formats on stderr: ``text`` for people, ``json`` with the fields Cloud
Logging reads from a container's output (``severity``, ``message``,
``httpRequest``), so lines show up structured in Cloud Run and GKE as they are.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sys
import threading
import time
from typing import Any, Protocol

from ..errors import redact

ACCESS = logging.getLogger("idtoken_proxy.access")

#: The proxy's own pages (health, metrics, status) are not proxied requests.
_OWN_PAGES = "/.proxy/"

#: google-auth and urllib3 log assertions and token responses at DEBUG.
_NOISY = ("google.auth", "google.oauth2", "urllib3", "requests", "aiohttp.client", "hpack", "h2")
#: google-auth's loggers: request logs carry the signed assertion and the
#: Authorization header (as ``extra`` fields a structured formatter would print).
#: hpack and h2 log every header they encode or decode at DEBUG, the token among them.
_TOKEN_LOGGERS = ("google.auth", "google.oauth2", "hpack", "h2")

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
        self,
        route: str,
        method: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        upstream_seconds: float | None,
        http_major: int = 1,
    ) -> None: ...



#: Set on access records, whose message is built already redacted (AccessLogger.log).
_CLEAN = "idtoken_proxy_clean"
#: Methods logged as they are; any other (a client may send any token) is redacted.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


class _Redacting(logging.Filter):
    """Scrubs anything token-shaped from the message and any traceback of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.__dict__.get(_CLEAN):
            # The access line: redacted where it was built, no args, no traceback.
            return True
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

    #: access_line needs the request's fields (the text format does not).
    wants_fields = True

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info or record.exc_text:
            # Error Reporting finds a stack trace at the end of the message.
            message = f"{message}\n{record.exc_text or self.formatException(record.exc_info)}"  # type: ignore[arg-type]
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": message,
            "time": _rfc3339(record.created),
            "logger": record.name,
        }
        http = getattr(record, "http_request", None)
        if http is not None:
            _add_access_fields(entry, http, getattr(record, "route", "-"), getattr(record, "upstream_seconds", None))
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))

    def access_line(
        self, name: str, message: str, created: float, msecs: float, fields: HttpRequestFields | None, route: str, upstream: float | None
    ) -> str:
        """What ``format`` makes of an access record with these attributes, without the record."""
        assert fields is not None  # wants_fields
        entry: dict[str, Any] = {"severity": "INFO", "message": message, "time": _rfc3339(created), "logger": name}
        _add_access_fields(entry, fields, route, upstream)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def _add_access_fields(entry: dict[str, Any], http: Any, route: str, upstream: float | None) -> None:
    entry["httpRequest"] = http.as_dict() if isinstance(http, HttpRequestFields) else http
    entry["route"] = route
    if upstream is not None:
        entry["upstreamLatency"] = _duration(upstream)


def _rfc3339(created: float, _cache: dict[int, str] = {}) -> str:  # noqa: B006 - a per-second cache
    """``2024-01-02T03:04:05.678Z``; the part up to the seconds is formatted once a second."""
    second = int(created)
    head = _cache.get(second)
    if head is None:
        _cache.clear()
        head = _cache[second] = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{head}.{int((created - second) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``asctime levelname name: message``, with the time formatted once a second.

    At thousands of access lines a second, ``time.strftime`` per line showed up in profiles.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._head = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # The format string above, without logging's %-formatting machinery (per access line).
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"

    #: The text line is the message: access_line is given no request fields.
    wants_fields = False

    def access_line(
        self, name: str, message: str, created: float, msecs: float, fields: HttpRequestFields | None, route: str, upstream: float | None
    ) -> str:
        """What ``format`` makes of an access record with these attributes, without the record."""
        return f"{self._asctime(created, msecs)} INFO {name}: {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._asctime(record.created, record.msecs)

    def _asctime(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            # logging's default ("%Y-%m-%d %H:%M:%S,mmm"), the part before the milliseconds.
            self._head = time.strftime(self.default_time_format, self.converter(created))
            self._second = second
        return f"{self._head},{int(msecs):03d}"


class LoopBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines of one event-loop iteration at once.

    Under load many responses finish in one iteration of the loop; writing their
    access lines together is one write system call instead of one per request.
    Lines from outside a running loop (startup, other threads) are written at once,
    after anything pending; ``flush`` (logging.shutdown at exit) writes the rest.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    def add_line(self, line: str) -> None:
        """Write a finished line (a formatter's output) as ``handle`` would write a record's."""
        self.acquire()
        try:
            self._add(line + self.terminator)
        finally:
            self.release()

    def _add(self, line: str) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                # As logging does: a broken stderr must not break request handling.
                if logging.raiseExceptions:
                    sys.__stderr__ and sys.__stderr__.write("logging: cannot write to the log stream\n")

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            self._write_pending()
        finally:
            self.release()


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every log record to stderr, redacted, in ``fmt`` (text or json)."""
    global _INSTALLED
    handler = LoopBatchingHandler(sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    handler.addFilter(_Redacting())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _INSTALLED = (handler, list(handler.filters), formatter)
    root.setLevel(level.upper())
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_token_loggers() -> None:
    """Keep google-auth's DEBUG records off where nobody set their level.

    ``setup_logging`` quiets them for the command line; the app factory calls
    this so that a program embedding the proxy, with its own logging at DEBUG,
    does not print token requests either. A level set on these loggers
    explicitly is left alone.
    """
    for name in _TOKEN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def _duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form, as Cloud Logging expects: ``"0.012s"``."""
    return f"{seconds:.6f}s"


class AccessLog:
    """One line per request: route, method, path, status, bytes, duration, upstream latency.

    The request path calls it once a response has been sent, with its final
    size (also for requests the engine refused itself, such as a malformed
    request line); the same call feeds the request metrics (``observer``), so
    they cost no extra work on the request path. A request whose client went
    away before its response was complete ends its line with ``(client gone)``:
    logged 499 with no bytes if the client was sent nothing, as nginx does, else
    with its status and the bytes written so far.
    """

    def __init__(self, include_query: bool = False, observer: RequestObserver | None = None, logger: logging.Logger = ACCESS) -> None:
        self.include_query = include_query
        self.observer = observer
        self.logger = logger

    def log(
        self,
        method: str,
        raw_path: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        route: str = "-",
        upstream: float | None = None,
        remote: str | None = None,
        version: tuple[int, int] = (1, 1),
        agent: str | None = None,
        gone: bool = False,
        grpc_status: str | None = None,
    ) -> None:
        path = raw_path if self.include_query else raw_path.partition("?")[0]
        observer = self.observer
        if observer is not None and not path.startswith(_OWN_PAGES):
            observer.observe(route, method, status, bytes_in, bytes_out, upstream, version[0])
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        # The line is built here, already redacted, and handed to the handlers as a
        # finished record: no caller lookup, no %-formatting, no second redaction pass
        # (this runs for every request). Paths and methods come from the client: scrub
        # anything token-shaped (a JWT in a path); the User-Agent is the only header logged.
        path = redact(path)
        if method not in _METHODS:
            method = redact(method)
        upstream_text = f" upstream {upstream * 1000:.1f}ms" if upstream is not None else ""
        note = f" {CLIENT_GONE_NOTE}" if gone else ""
        # An HTTP/2 stream says so, and a gRPC call's outcome is its grpc-status, not its HTTP 200.
        proto = " HTTP/2" if version[0] == 2 else ""
        grpc = "" if grpc_status is None else f" grpc-status {grpc_status}"
        message = f'{route} "{method} {path}"{proto} {status}{grpc} {bytes_out}B {seconds * 1000:.1f}ms{upstream_text}{note}'
        direct = _direct_handler(logger)
        if direct is not None:
            # The command line's logging, as setup_logging made it: the line its formatter
            # would make of the record, without the record and logging's dispatch of it
            # (tests/test_access_log.py checks that the lines are the same).
            handler, formatter = direct
            created, msecs = _now()
            fields = HttpRequestFields(method, path, status, bytes_out, seconds, remote, version, bytes_in, agent) if formatter.wants_fields else None
            handler.add_line(formatter.access_line(logger.name, message, created, msecs, fields, route, upstream))
            return
        fields = HttpRequestFields(method, path, status, bytes_out, seconds, remote, version, bytes_in, agent)
        record = _access_record(logger.name, message)
        d = record.__dict__
        d["http_request"] = fields
        d["route"] = route
        d["upstream_seconds"] = upstream
        d[_CLEAN] = True
        logger.handle(record)


#: The end of the access line of a request whose client went away before its response was complete.
CLIENT_GONE_NOTE = "(client gone)"
#: nginx's "client closed request": the client went away before the response's head was sent.
CLIENT_CLOSED_REQUEST = 499


class HttpRequestFields:
    """An access record's Cloud Logging ``httpRequest``, built only when a formatter asks.

    The text format never does: these are captured as they are, and converted
    (and the User-Agent redacted) only by ``as_dict``.
    """

    __slots__ = ("agent", "bytes_in", "bytes_out", "method", "path", "remote", "seconds", "status", "version")

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        bytes_out: int,
        seconds: float,
        remote: str | None,
        version: tuple[int, int],
        bytes_in: int,
        agent: str | None,
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.bytes_out = bytes_out
        self.seconds = seconds
        self.remote = remote
        self.version = version
        self.bytes_in = bytes_in
        self.agent = agent

    def as_dict(self) -> dict[str, Any]:
        http: dict[str, Any] = {
            "requestMethod": self.method,
            "requestUrl": self.path,
            "status": self.status,
            "responseSize": str(self.bytes_out),
            "latency": _duration(self.seconds),
            "remoteIp": self.remote or "",
            "protocol": f"HTTP/{self.version[0]}.{self.version[1]}",
        }
        if self.bytes_in:
            # The body only: Cloud Logging's requestSize would include the head, which
            # the access line does not measure.
            http["requestSize"] = str(self.bytes_in)
        if self.agent:
            http["userAgent"] = redact(self.agent[:300])
        return http


def _now(ns: int | None = None) -> tuple[float, float]:
    """(created, msecs) as a LogRecord has them."""
    now = time.time_ns() if ns is None else ns
    return now / 1e9, (now % 1_000_000_000) // 1_000_000 + 0.0


#: The handler setup_logging installed, its filters and its formatter.
_INSTALLED: tuple[LoopBatchingHandler, list[Any], TextFormatter | JsonFormatter] | None = None


def _direct_handler(logger: logging.Logger) -> tuple[LoopBatchingHandler, TextFormatter | JsonFormatter] | None:
    """setup_logging's handler, if an INFO record of ``logger`` would go there and nowhere else.

    That is: nothing was configured since (no filter on the logger, no other
    handler on it, its ancestors or the root, every one of them propagating,
    the handler's filters and formatter as they were), the logger is enabled
    and the handler takes INFO.
    """
    installed = _INSTALLED
    if installed is None:
        return None
    handler, filters, formatter = installed
    root = logging.root
    if (
        logger.filters
        or logger.disabled
        or len(root.handlers) != 1
        or root.handlers[0] is not handler
        or handler.filters != filters
        or handler.formatter is not formatter
        or handler.level > logging.INFO
    ):
        return None
    # Up to the root (filters of ancestors do not apply to records passed up), nothing else takes it.
    node: Any = logger
    while node is not root:
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    return handler, formatter


def _logging_start_ns() -> float:
    """When logging was loaded, as LogRecord.relativeCreated counts from it (public attributes only)."""
    probe = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
    return probe.created * 1e9 - probe.relativeCreated * 1e6


_LOGGING_START_NS = _logging_start_ns()
#: (thread id, logger name) -> the constant attributes of an access record.
_RECORD_TEMPLATES: dict[tuple[int, str], dict[str, Any]] = {}


def _access_record(name: str, message: str) -> logging.LogRecord:
    """An INFO record for ``message``, built without LogRecord.__init__'s lookups.

    The constant part (thread, process, empty source location) is computed once;
    only the message and the timestamps are per record. The result has every
    attribute a LogRecord has, so any formatter or handler can take it.
    """
    key = (threading.get_ident(), name)
    template = _RECORD_TEMPLATES.get(key)
    if template is None:
        template = dict(logging.LogRecord(name, logging.INFO, "", 0, "", None, None).__dict__)
        for per_record in ("msg", "created", "msecs", "relativeCreated"):
            template.pop(per_record)
        template["funcName"] = None
        _RECORD_TEMPLATES[key] = template
    record = logging.LogRecord.__new__(logging.LogRecord)
    d = record.__dict__
    d.update(template)
    now = time.time_ns()
    d["msg"] = message
    d["created"], d["msecs"] = _now(now)
    d["relativeCreated"] = (now - _LOGGING_START_NS) / 1e6
    return record
