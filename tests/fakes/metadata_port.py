"""Reserve the fake metadata server's port before google-auth is imported.

google-auth reads ``GCE_METADATA_HOST`` once, when
``google.auth.compute_engine._metadata`` is imported, and ``GCE_METADATA_IP`` on
every ping.  So the address of the fake Google must be known before anything in
the test process imports google-auth: we bind a listening socket on
127.0.0.1:0 now, point both variables at it, and hand the socket to the
session's :class:`~tests.fakes.google.FakeGoogle` later (aiohttp ``SockSite``).
Connections that arrive before the server starts wait in the listen backlog.

``tests/fakes/__init__.py`` imports this module first, so importing anything
from ``tests.fakes`` reserves the port.  Nothing here imports google-auth.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import warnings

_lock = threading.Lock()
_sock: socket.socket | None = None


def reserved_socket() -> socket.socket:
    """The pre-bound listening socket for the session's fake Google (created once)."""
    global _sock
    with _lock:
        if _sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            _sock = sock
            _point_google_auth_at(f"127.0.0.1:{sock.getsockname()[1]}")
        return _sock


def reserved_port() -> int:
    """The port of :func:`reserved_socket`."""
    port: int = reserved_socket().getsockname()[1]
    return port


def _point_google_auth_at(hostport: str) -> None:
    os.environ["GCE_METADATA_HOST"] = hostport
    os.environ["GCE_METADATA_IP"] = hostport
    # Too late for the environment: someone imported google-auth's metadata
    # module first (e.g. a conftest importing the proxy before the fixtures).
    # Patch the one import-time constant so tests still never reach the real
    # 169.254.169.254, and say so.
    metadata = sys.modules.get("google.auth.compute_engine._metadata")
    if metadata is not None:
        metadata._GCE_METADATA_HOST = hostport  # type: ignore[attr-defined]
        warnings.warn(
            "google.auth.compute_engine._metadata was imported before tests.fakes; "
            "patched its _GCE_METADATA_HOST. Import tests.fakes first.",
            stacklevel=3,
        )


reserved_socket()
