"""The main listener's accept queue: large enough for a burst of connections.

The listen backlog is not readable from the socket itself; ``ss`` (iproute2)
reports it for a listening socket as Send-Q (the kernel's sk_max_ack_backlog,
already capped at net.core.somaxconn). Without ``ss`` the test is skipped on a
developer's machine and fails under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from proxy.app import make_app
from proxy.config import parse_config
from proxy.server import LISTEN_BACKLOG, ProxyServer

from .test_sidecar_health import GatedIdentity

SS = shutil.which("ss") or next((p for p in ("/usr/bin/ss", "/bin/ss", "/usr/sbin/ss") if os.access(p, os.X_OK)), None)


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def _listen_backlog(port: int) -> int:
    assert SS is not None
    out = subprocess.run([SS, "-ltnH", f"( sport = :{port} )"], capture_output=True, text=True, check=True, timeout=10).stdout
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    state, _recv_q, send_q = lines[0][:3]
    assert state == "LISTEN", out
    return int(send_q)


async def test_main_listener_backlog_is_the_systems_maximum_not_aiohttps_128() -> None:
    if SS is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: ss (iproute2) not installed")
        pytest.skip("ss (iproute2) not installed")
    config = parse_config({"listen": {"port": 0}, "routes": [{"upstream": "http://127.0.0.1:9"}]}, {})
    ident = GatedIdentity()
    server = ProxyServer(make_app(config, identities={r.credentials: ident for r in config.routes}), config)
    await server.start()
    try:
        port = server.addresses[0][1]
        assert _listen_backlog(port) == min(LISTEN_BACKLOG, _somaxconn())
        # Where somaxconn is at its usual default (4096 since Linux 5.4), aiohttp's 128 is gone.
        assert _listen_backlog(port) > 128 or _somaxconn() <= 128
    finally:
        server.begin_shutdown()
        await server.stop()
