"""The access line takes a short way to the command line's own handler, with the same result.

While the logging configuration is the one setup_logging made, AccessLogger
writes the line its handler's formatter would make of the record, without the
record; anything configured since (another handler, a filter, a level) sends
the record through Logger.handle like any other. Both ways must write the same line.
"""

from __future__ import annotations

import io
import json
import logging

import pytest

import proxy.__main__  # noqa: F401 - its logger "idtoken_proxy" sits between the access logger and the root, as in the command line
from proxy.ops import logs
from proxy.ops.logs import ACCESS, AccessLog, HttpRequestFields, JsonFormatter, TextFormatter, setup_logging


@pytest.fixture
def cli_logging():
    """setup_logging as the command line calls it, undone afterwards (pytest's own handlers back)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._INSTALLED, ACCESS.level)
    ACCESS.setLevel(logging.NOTSET)

    def setup(fmt: str) -> io.StringIO:
        setup_logging("info", fmt)
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        return stream

    yield setup
    root.handlers[:], level, logs._INSTALLED, access_level = saved
    root.setLevel(level)
    ACCESS.setLevel(access_level)
    ACCESS.filters.clear()
    ACCESS.handlers.clear()
    ACCESS.propagate = True
    logging.getLogger("idtoken_proxy").handlers.clear()


def _log_one(dispatched: list[int], monkeypatch, agent: str = "curl/8") -> None:
    handle = ACCESS.handle

    def counted(record):
        dispatched.append(1)
        handle(record)

    monkeypatch.setattr(ACCESS, "handle", counted)
    # A request for /svc/a?secret=1 on route svc: 100 bytes out, 12.3 ms, 4.2 ms upstream.
    AccessLog(include_query=False).log("GET", "/svc/a?secret=1", 200, 0, 100, 0.0123, "svc", 0.0042, "127.0.0.1", (1, 1), agent)
    for h in logging.getLogger().handlers:
        h.flush()


def _without_time(line: str, fmt: str) -> object:
    if fmt == "json":
        entry = json.loads(line)
        entry.pop("time")
        return entry
    return line.split(" ", 2)[2]  # after "date time,ms"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_short_way_writes_what_logging_would(fmt, cli_logging, monkeypatch):
    stream = cli_logging(fmt)
    assert ACCESS.parent is logging.getLogger("idtoken_proxy")
    direct: list[int] = []
    _log_one(direct, monkeypatch, agent="Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln")
    assert direct == []  # the short way: Logger.handle was not called

    # Anything configured since: the record goes through logging like any other.
    extra = logging.StreamHandler(io.StringIO())
    extra.setLevel(logging.CRITICAL)  # takes nothing here, but it is there
    logging.getLogger().addHandler(extra)
    dispatched: list[int] = []
    _log_one(dispatched, monkeypatch, agent="Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln")
    assert dispatched == [1]

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert _without_time(lines[0], fmt) == _without_time(lines[1], fmt)
    assert "/svc/a" in lines[0] and "secret" not in lines[0] and "eyJ" not in lines[0]


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
@pytest.mark.parametrize("upstream", [0.0042, None])
def test_a_formatters_access_line_is_its_format_of_the_record_to_the_byte(formatter, upstream):
    fields = HttpRequestFields("GET", "/x", 200, 123, 0.5, "127.0.0.1", (1, 1), 7, "agent/1")
    for created_ns in (1_700_000_000_123_456_789, 1_700_000_000_999_999_999, 1_700_000_001_000_000_000):
        record = logs._access_record("idtoken_proxy.access", 'r "GET /x" 200 123B 500.0ms')
        record.created, record.msecs = logs._now(created_ns)
        record.__dict__.update(http_request=fields, route="r", upstream_seconds=upstream)
        created, msecs = logs._now(created_ns)
        line = formatter.access_line("idtoken_proxy.access", 'r "GET /x" 200 123B 500.0ms', created, msecs, fields, "r", upstream)
        assert line == formatter.format(record)


@pytest.mark.parametrize(
    "change, lines",
    [
        (lambda: ACCESS.addFilter(lambda record: False), 0),
        (lambda: logging.getLogger().handlers[0].setLevel(logging.WARNING), 0),
        (lambda: ACCESS.addHandler(logging.NullHandler()), 1),
        (lambda: setattr(ACCESS, "propagate", False), 0),
        (lambda: logging.getLogger("idtoken_proxy").addHandler(logging.NullHandler()), 1),
        (lambda: logging.getLogger().handlers[0].setFormatter(logging.Formatter("%(message)s")), 1),
    ],
    ids=["filter on the logger", "handler level", "handler on the logger", "no propagation", "handler on an ancestor", "another formatter"],
)
def test_any_change_to_the_configuration_takes_logging_s_way(change, lines, cli_logging, monkeypatch):
    stream = cli_logging("text")
    change()
    dispatched: list[int] = []
    _log_one(dispatched, monkeypatch)
    assert dispatched == [1]
    # Logging decides: filtered or not propagated, the line never reaches the handler;
    # with a handler of its own the logger still passes it on.
    assert len(stream.getvalue().splitlines()) == lines
