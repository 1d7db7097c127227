"""The Date header's value (RFC 9110 5.6.7, IMF-fixdate), without email.utils.

``email.utils.formatdate(seconds, usegmt=True)`` gives the same text, but
importing it brings the email package and calendar (about 0.5 MiB resident) for
one line of formatting. Day and month names are fixed English, never the locale's.
"""

from __future__ import annotations

import time

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """``Sun, 06 Nov 1994 08:49:37 GMT`` for ``seconds`` since the epoch."""
    t = time.gmtime(seconds)
    return f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"


__all__ = ["http_date"]
