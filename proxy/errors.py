"""Errors that know their HTTP status and a hint a user can act on.

Messages are written by us, never copied from a response body or a header,
so no token can travel inside one.
"""

from __future__ import annotations

import re


class ProxyError(Exception):
    """A request the proxy answers itself, with a status and a one-line reason."""

    status = 502

    def __init__(self, reason: str, hint: str | None = None, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        if status is not None:
            self.status = status

    def body(self) -> str:
        line = f"idtoken-proxy: {self.status} {self.reason}"
        if self.hint:
            line += f" (hint: {self.hint})"
        return line + "\n"


class BadRequest(ProxyError):
    status = 400


class FramingError(BadRequest):
    """The request's framing cannot be trusted: answered 400, and the connection closed."""


class Forbidden(ProxyError):
    status = 403


class NoRoute(ProxyError):
    status = 404


class UpstreamError(ProxyError):
    status = 502


class UpstreamTimeout(ProxyError):
    status = 504


class TokenUnavailable(ProxyError):
    """No valid token could be had; the client may retry after ``retry_after`` seconds."""

    status = 503

    def __init__(self, reason: str, hint: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(reason, hint)
        self.retry_after = retry_after


class CredentialError(Exception):
    """A credential that is missing or broken: a startup error (exit 3) with a hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s,;\"']+")


def redact(text: str) -> str:
    """Remove anything that looks like a token from text bound for a log or a body."""
    # Every access line passes here: text with neither pattern's start returns as it is.
    if "eyJ" not in text and "bearer" not in text.lower():
        return text
    return _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))


class BodyTooLarge(ProxyError):
    """The request body exceeds ``max_body_bytes``: answered 413, and the connection closed."""

    status = 413


def error_headers(exc: ProxyError) -> list[tuple[str, str]]:
    """The headers of the proxy's own answer to ``exc`` (its body is ``redact(exc.body())``)."""
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if isinstance(exc, TokenUnavailable):
        headers.append(("Retry-After", str(exc.retry_after)))
    return headers
