"""Liveness and readiness, for orchestrators (kubelet, Cloud Run, Docker).

``/.proxy/healthz`` (liveness) answers 200 while the process serves HTTP at all.
If it fails, the orchestrator should restart the container. It does not depend
on tokens: a restart would not make Google's endpoints answer.

``/.proxy/readyz`` (readiness) answers 200 only when every route has a token it
may send and the proxy is not shutting down; otherwise 503 with the reason. If
it fails, the orchestrator should hold traffic (and, for a sidecar started as a
Kubernetes init container or a Cloud Run dependency, hold the app's start).
"""

from __future__ import annotations

from collections.abc import Callable

from ..auth.tokens import TokenCache, TokenKey

HEALTHZ_PATH = "/.proxy/healthz"
READYZ_PATH = "/.proxy/readyz"

_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}


class Readiness:
    """Whether the proxy should get traffic: tokens for every route, and not shutting down."""

    def __init__(self, tokens: TokenCache, routes: list[tuple[str, TokenKey]]) -> None:
        self._tokens = tokens
        #: (route name, token key) of every route; a reload sets the new generation's.
        self.routes = routes
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        """From now on readiness fails, whatever the tokens."""
        self.shutting_down = True

    def problems(self) -> list[str]:
        """Why the proxy is not ready (empty when it is); never a token."""
        if self.shutting_down:
            return ["shutting down"]
        if self._tokens.ready():
            return []
        out = []
        for name, key in self.routes:
            if self._tokens.peek(key) is None:
                error = self._tokens.status(key)["last_error"]
                out.append(f"route {name}: no valid token yet" + (f" ({error})" if error else ""))
        # ready() is False but every route has a token: an unrouted key is cold.
        return out or ["tokens are being fetched"]

    @property
    def ready(self) -> bool:
        return not self.problems()


Page = tuple[int, list[tuple[str, str]], bytes]


def healthz() -> Page:
    """Liveness: the event loop answers."""
    return 200, list(_HEADERS.items()), b"ok\n"


def pages(readiness: Readiness) -> dict[str, Callable[[], Page]]:
    """``/.proxy/healthz`` and ``/.proxy/readyz`` (GET and HEAD)."""

    def readyz() -> Page:
        problems = readiness.problems()
        if problems:
            return 503, list(_HEADERS.items()), ("not ready: " + "; ".join(problems) + "\n").encode()
        return 200, list(_HEADERS.items()), b"ready\n"

    return {HEALTHZ_PATH: healthz, READYZ_PATH: readyz}
