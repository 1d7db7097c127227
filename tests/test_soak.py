"""A bounded soak of the real command line: mixed traffic, websockets, token refreshes.

The proxy runs as ``python -m proxy`` in its own process, so its file
descriptors and memory are measured alone (``/proc/<pid>``), against the fake
Google and a fake Cloud Run service that verifies every token. For
``SOAK_REQUESTS`` (100 000 after a 12-second warm-up) or ``SOAK_SECONDS``
(150), whichever comes first, 32 clients send a mix of small and large
downloads, uploads and websocket sessions, while 15-second tokens are
refreshed every few seconds. (On a 2-core machine the 100 000 take about
70 s; the proxy shares the machine with the clients and the fake upstream.)

Checked afterwards: every request succeeded with the exact bytes; the token
was refreshed many times without a single refusal; no socket is left open
towards a client or stuck in CLOSE_WAIT, and every other descriptor is back to
the count measured after the warm-up; resident memory grew by less than 5 MiB
after the warm-up. The figures are printed (``pytest -s``) for the notes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import random
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import pattern_sha256
from tests.test_forward import free_port
from tests.test_sidecar_support import ProxyProcess, clean_env

# Longer than the suite's 120-second default per test.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(300)]

SECONDS = float(os.environ.get("SOAK_SECONDS", "150"))
REQUESTS = int(os.environ.get("SOAK_REQUESTS", "100000"))
WARMUP_SECONDS = 12.0
CONCURRENCY = 32
MiB = 1024 * 1024
#: (weight, kind, size): mostly small requests, some large ones, a few websockets.
MIX = [
    (50, "get", 0),
    (20, "get", 1_000),
    (8, "get", 64 * 1024),
    (1, "get", 1 * MiB),
    (12, "post", 200),
    (5, "post", 64 * 1024),
    (1, "post", 512 * 1024),
    (1, "ws", 3),
]


def fd_snapshot(pid: int, proxy_port: int) -> dict[str, int]:
    """The proxy's descriptors by kind: sockets by TCP state and role, and the rest."""
    inodes: dict[str, tuple[str, int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            local_port = int(parts[1].split(":")[1], 16)
            remote_port = int(parts[2].split(":")[1], 16)
            inodes[parts[9]] = (parts[3], local_port, remote_port)
    counts: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if not target.startswith("socket:["):
            counts["other"] += 1
            continue
        entry = inodes.get(target[8:-1])
        if entry is None:
            counts["other sockets"] += 1  # unix sockets, socketpairs
            continue
        state, local, remote = entry
        if state == "0A":
            counts["listening"] += 1
        elif state == "08":
            counts["close-wait"] += 1
        elif local == proxy_port:
            counts["client connections"] += 1
        else:
            counts["upstream connections"] += 1
    counts["total"] = sum(v for k, v in counts.items())
    return dict(counts)


async def wait_listening(url: str, proxy: ProxyProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url + "/.proxy/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if proxy.proc is not None and proxy.proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    raise AssertionError(f"the proxy did not become ready:\n{proxy.stderr}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Load:
    """Closed-loop clients sending the MIX; every answer is checked byte for byte."""

    def __init__(self, url: str, service) -> None:
        self.url = url
        self.service = service
        self.done: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.bytes = 0
        self.stop_at = 0.0
        self.limit = 0
        self._kinds = [(kind, size) for weight, kind, size in MIX for _ in range(weight)]
        self._payloads = {size: random.Random(size).randbytes(size) for _, kind, size in MIX if kind == "post"}
        self._digests = {size: hashlib.sha256(data).hexdigest() for size, data in self._payloads.items()}
        self._expected = {size: pattern_sha256(size) for _, kind, size in MIX if kind == "get"}

    @property
    def total(self) -> int:
        return sum(self.done.values())

    async def run(self, session: aiohttp.ClientSession, seconds: float, limit: int) -> None:
        self.stop_at = time.monotonic() + seconds
        self.limit = self.total + limit
        await asyncio.gather(*(self._worker(session, i) for i in range(CONCURRENCY)))

    async def _worker(self, session: aiohttp.ClientSession, seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < self.stop_at and self.total < self.limit:
            kind, size = rnd.choice(self._kinds)
            try:
                await getattr(self, "_" + kind)(session, size)
                self.done[kind] += 1
            except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the test
                self.failures.append(f"{kind} {size}: {type(e).__name__}: {e}"[:300])
            if self.total % 5000 == 0:
                self.service.clear()  # the fake's request log is not what is measured

    async def _get(self, session: aiohttp.ClientSession, size: int) -> None:
        async with session.get(f"{self.url}/bytes/{size}", params={"cl": "1"} if size % 2 == 0 else None) as r:
            body = await r.read()
        if r.status != 200 or len(body) != size or hashlib.sha256(body).hexdigest() != self._expected[size]:
            raise AssertionError(f"GET {size}: {r.status}, {len(body)} bytes")
        self.bytes += size

    async def _post(self, session: aiohttp.ClientSession, size: int) -> None:
        async with session.post(f"{self.url}/upload", data=self._payloads[size]) as r:
            answer = await r.json() if r.status == 200 else {"status": r.status, "text": await r.text()}
        if answer != {"len": size, "sha256": self._digests[size]}:
            raise AssertionError(f"POST {size}: {answer}")
        self.bytes += size

    async def _ws(self, session: aiohttp.ClientSession, messages: int) -> None:
        async with session.ws_connect(f"{self.url}/ws") as ws:
            for i in range(messages):
                await ws.send_str(f"message {i}")
                reply = await ws.receive(timeout=30)
                if reply.data != f"message {i}":
                    raise AssertionError(f"websocket echo: {reply}")
            await ws.close()


async def test_soak(google, sa_key, private_service, tmp_path):
    google.token_lifetime = 15  # refreshed about every 5 s
    port = free_port()
    config = {
        "credentials": {"source": "service_account", "key_file": str(sa_key[0])},
        "listen": {"port": port},
        # The access log would be 100k lines of stderr for the test to read: warnings only.
        "log": {"level": "warning"},
        "routes": [{"prefix": "/", "upstream": private_service.url}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proxy = await ProxyProcess(["--config", str(path)], clean_env(tmp_path)).start()
    load = None
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_listening(url, proxy)
        pid = proxy.proc.pid
        load = Load(url, private_service)
        timeout = aiohttp.ClientTimeout(total=60)
        # Warm-up: pools fill, the first refreshes happen, caches settle.
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            await load.run(session, WARMUP_SECONDS, REQUESTS)  # (stops on time)
        warm_requests, warm_tokens = load.total, google.calls["token"]
        await asyncio.sleep(1.0)
        base_fds, base_rss = fd_snapshot(pid, port), rss_kib(pid)
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            await load.run(session, SECONDS, REQUESTS)
        elapsed = time.monotonic() - started
        # The clients are gone: give the proxy a moment to close their sockets.
        for _ in range(100):
            fds = fd_snapshot(pid, port)
            if not fds.get("client connections") and not fds.get("close-wait"):
                break
            await asyncio.sleep(0.1)
        end_rss = rss_kib(pid)
        refreshes = google.calls["token"] - warm_tokens
        measured = load.total - warm_requests
        print(
            f"\nsoak: {measured} requests in {elapsed:.0f} s ({measured / elapsed:.0f}/s) after {warm_requests} warm-up, "
            f"{dict(load.done)}, {load.bytes / MiB:.0f} MiB moved, {len(load.failures)} failed; "
            f"{refreshes} token refreshes; fds {base_fds} -> {fds}; RSS {base_rss / 1024:.1f} -> {end_rss / 1024:.1f} MiB "
            f"({(end_rss - base_rss) / 1024:+.2f} MiB)"
        )
    finally:
        if proxy.proc is not None and proxy.proc.returncode is None:
            proxy.signal()
            await proxy.wait_exit()
        await proxy.stop()
    assert load is not None and not load.failures, load.failures[:10]
    assert "Traceback" not in proxy.stderr, proxy.stderr[-3000:]
    assert load.done["ws"] > 0 and load.done["post"] > 0
    # Several refreshes under load; a token used past its exp would have failed a request
    # (the fake service allows no clock skew).
    assert refreshes >= min(elapsed, SECONDS) / 15, refreshes
    assert not fds.get("client connections") and not fds.get("close-wait"), fds
    # Upstream keep-alive pools may hold up to one connection per client (both pools).
    assert fds.get("upstream connections", 0) <= 2 * CONCURRENCY + 8, fds
    assert fds.get("other", 0) == base_fds.get("other", 0), (base_fds, fds)
    assert fds.get("listening", 0) == base_fds.get("listening", 0)
    assert end_rss - base_rss < 5 * 1024, (base_rss, end_rss)
