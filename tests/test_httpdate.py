"""The Date header's formatting (proxy/engine/httpdate.py) and the status page's escaping.

Both replace a standard-library helper whose module costs resident memory in
every proxy (email.utils, html); each must give exactly the helper's text.
"""

from __future__ import annotations

import html
import random
from email.utils import formatdate

import pytest

from proxy.engine.httpdate import http_date
from proxy.ops.status import _e

# The epoch, RFC 9110's own example, a leap day, the 2038 boundary, a year beyond it,
# the last second of a year, and a Sunday and a Monday (the ends of the day table).
INSTANTS = [0, 784111777, 951782400, 2**31 - 1, 2**31, 4102444800, 1735689599, 1767225600, 1767484800]


@pytest.mark.parametrize("seconds", INSTANTS)
def test_http_date_is_email_utils_formatdate(seconds: int) -> None:
    assert http_date(seconds) == formatdate(seconds, usegmt=True)


def test_http_date_matches_formatdate_across_years() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        seconds = rng.randrange(0, 2**33)
        assert http_date(seconds) == formatdate(seconds, usegmt=True), seconds


def test_http_date_example() -> None:
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize("text", ["", "plain", "<script>alert('x')</script>", 'a "quoted" & <b>', "&amp; already", "'\"<>&"])
def test_status_escape_is_html_escape(text: str) -> None:
    assert _e(text) == html.escape(text)


def test_status_escape_of_none_and_numbers() -> None:
    assert _e(None) == ""
    assert _e(404) == "404"
