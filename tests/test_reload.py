"""Config reload with real processes, real signals and real files.

The proxy runs as ``python -m proxy --config FILE``; two private services that
verify tokens stand behind it, reached with two service-account keys (the fake
Google's token endpoint counts each mint). A reload comes from SIGHUP, from
rewriting the file in place, from an editor-style rename, or from a
ConfigMap-style ``..data`` symlink swap.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import PrivateService

from .test_sidecar_support import ProxyProcess, clean_env, eventually

pytestmark = pytest.mark.timeout(240)


def _config(tmp: Path, key: Path, service: PrivateService, *, name: str, origins: list[str], **top: Any) -> dict[str, Any]:
    return {
        "listen": {"port": 0},
        "admin": {"port": 0},
        "credentials": {"source": "service_account", "key_file": str(key)},
        "allowed_origins": origins,
        "routes": [
            {"name": "app", "prefix": "/", "upstream": service.url},
            {"name": name, "prefix": f"/{name}", "upstream": service.url},
        ],
        **top,
    }


def _write(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


class Stack:
    def __init__(self, tmp: Path, google: Any) -> None:
        self.tmp = tmp
        self.google = google
        self.a = PrivateService(certs_url=google.certs_url).start()
        self.b = PrivateService(certs_url=google.certs_url).start()
        self.email_a = "reload-a@fake-project.iam.gserviceaccount.com"
        self.email_b = "reload-b@fake-project.iam.gserviceaccount.com"
        self.key_a = google.write_key_file(tmp / "a.json", self.email_a)
        self.key_b = google.write_key_file(tmp / "b.json", self.email_b)
        self.path = tmp / "config.yaml"
        self.proxy: ProxyProcess | None = None

    def config_a(self, **top: Any) -> dict[str, Any]:
        return _config(self.tmp, self.key_a, self.a, name="only-a", origins=["http://localhost:3000"], **top)

    def config_b(self, **top: Any) -> dict[str, Any]:
        return _config(self.tmp, self.key_b, self.b, name="only-b", origins=["http://localhost:4000"], **top)

    async def start(self, config: dict[str, Any], *args: str, path: Path | None = None) -> ProxyProcess:
        if path is None:
            _write(self.path, config)
        self.proxy = ProxyProcess(["--config", str(path or self.path), *args], clean_env(self.tmp))
        await self.proxy.start()
        await self.proxy.wait_listening()
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: _ok(s, f"{self.proxy.admin_url}/.proxy/readyz"), "readiness")  # type: ignore[union-attr]
        return self.proxy

    async def status(self) -> dict[str, Any]:
        assert self.proxy is not None
        async with aiohttp.ClientSession() as s, s.get(f"{self.proxy.url}/.proxy/status.json") as r:
            return dict(await r.json())

    async def wait_generation(self, generation: int) -> dict[str, Any]:
        doc: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal doc
            doc = await self.status()
            return int(doc["generation"]) >= generation

        await eventually(reached, f"config generation {generation}")
        return doc

    def close(self) -> None:
        self.a.stop()
        self.b.stop()


async def _ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def stack(tmp_path: Path, google: Any) -> AsyncIterator[Stack]:
    s = Stack(tmp_path, google)
    try:
        yield s
    finally:
        if s.proxy is not None:
            await s.proxy.stop()
        s.close()


# --------------------------------------------------------------------------- under load


@pytest.mark.soak  # bounded load: everyday runs skip it, .ci/run runs it
async def test_ten_reloads_under_load_lose_no_request(stack: Stack) -> None:
    proxy = await stack.start(stack.config_a())
    results: list[tuple[int, str]] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as s:
            i = 0
            while not stop.is_set():
                try:
                    async with s.get(f"{proxy.url}/echo?c={n}&i={i}") as r:
                        body = await r.text()
                        results.append((r.status, body))
                        if r.status != 200:
                            failures.append(f"{r.status} {body[:200]}")
                except aiohttp.ClientError as e:
                    failures.append(repr(e))
                i += 1

    clients = [asyncio.ensure_future(client(n)) for n in range(3)]
    started = time.monotonic()
    for i in range(10):
        # Alternate the two configs: routes, credentials and allowed origins all change.
        if i % 2 == 0:
            _write(stack.path, stack.config_b())
        else:
            _write(stack.path, stack.config_a())
        proxy.signal(signal.SIGHUP)
        await stack.wait_generation(i + 2)
        await asyncio.sleep(max(0.0, (i + 1) * 2.0 - (time.monotonic() - started)))
    stop.set()
    await asyncio.gather(*clients)
    assert failures == [], failures[:5]
    assert len(results) > 100
    # Each request went where its own config sent it: A's upstream with A's identity, or B's with B's.
    seen = {(r.claims or {}).get("email") for r in stack.a.requests if r.raw_path.startswith("/echo")}
    assert seen == {stack.email_a}
    seen = {(r.claims or {}).get("email") for r in stack.b.requests if r.raw_path.startswith("/echo")}
    assert seen == {stack.email_b}
    assert stack.a.requests and stack.b.requests
    doc = await stack.status()
    assert doc["generation"] == 11 and doc["reloads"] == {"ok": 10, "error": 0}
    # The last config (A) serves: its route exists, B's is gone, and its origin is the allowed one.
    assert doc["browser"]["allowed_origins"] == ["http://localhost:3000"]
    assert [r["name"] for r in doc["routes"]] == ["app", "only-a"]
    reload_lines = [line for line in proxy.lines if "config reloaded (SIGHUP)" in line]
    assert len(reload_lines) == 10 and "added only-a; removed only-b; changed app" in reload_lines[-1]
    took = [float(line.split(" in ", 1)[1].split(" ms", 1)[0]) for line in reload_lines]
    print(f"\nreload: {len(results)} requests during 10 reloads, {len(failures)} failed; reload took {min(took):.0f} to {max(took):.0f} ms")


async def test_websocket_and_stream_survive_five_reloads(stack: Stack) -> None:
    proxy = await stack.start(stack.config_a())
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"{proxy.url}/ws")
        async with s.get(f"{proxy.url}/sse?n=12&interval=0.5") as stream:
            assert stream.status == 200
            for i in range(5):
                _write(stack.path, stack.config_b() if i % 2 == 0 else stack.config_a())
                proxy.signal(signal.SIGHUP)
                await stack.wait_generation(i + 2)
                await ws.send_str(f"ping {i}")
                reply = await asyncio.wait_for(ws.receive(), 10)
                assert reply.data == f"ping {i}"
            body = await asyncio.wait_for(stream.read(), 30)
        assert body.count(b"data:") == 12
        await ws.close()


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ("routes: [unclosed\n", "not valid YAML"),
        (None, "bogus_key"),
        (None, "NOT_SET_ANYWHERE"),
    ],
    ids=["bad-yaml", "unknown-key", "unset-variable"],
)
async def test_a_broken_file_keeps_the_old_config(stack: Stack, broken: str | None, said: str) -> None:
    proxy = await stack.start(stack.config_a())
    if broken is None:
        raw = stack.config_b(bogus_key=1) if said == "bogus_key" else stack.config_b()
        if said == "NOT_SET_ANYWHERE":
            raw["routes"][1]["upstream"] = "${NOT_SET_ANYWHERE}"
        text = json.dumps(raw)
    else:
        text = broken
    stack.path.write_text(text)  # in place, as an editor without a swap file does
    async with aiohttp.ClientSession() as s:

        async def failed() -> bool:
            doc = await stack.status()
            return str(doc.get("last_reload") or "").startswith("failed at ")

        await eventually(failed, "the failed reload on the status page")
        doc = await stack.status()
        assert said in doc["last_reload"] and doc["generation"] == 1
        async with s.get(f"{proxy.url}/only-a/x") as r:
            assert r.status == 200
        assert any(said in line and "ERROR" in line for line in proxy.lines), proxy.stderr
        async with s.get(f"{proxy.url}/.proxy/") as r:
            assert "last reload: failed at" in await r.text()
        # Fixing the file applies it.
        _write(stack.path, stack.config_b())
        await stack.wait_generation(2)
        async with s.get(f"{proxy.url}/only-b/x") as r:
            assert r.status == 200
        async with s.get(f"{proxy.admin_url}/.proxy/metrics") as r:
            text = await r.text()
        assert 'idtoken_proxy_config_reloads_total{outcome="error"} 1.0' in text
        assert "idtoken_proxy_config_generation 2.0" in text


# --------------------------------------------------------------------------- how files change


def _kubelet_swap(volume: Path, stamp: str, config: dict[str, Any]) -> None:
    """The kubelet's atomic_writer: a new timestamped dir, then ..data swapped to it."""
    data = volume / stamp
    data.mkdir()
    (data / "config.yaml").write_text(json.dumps(config))
    tmp = volume / "..data_tmp"
    tmp.symlink_to(stamp)
    os.replace(tmp, volume / "..data")
    if not (volume / "config.yaml").is_symlink():
        (volume / "config.yaml").symlink_to("..data/config.yaml")


async def test_configmap_symlink_swap_is_picked_up(stack: Stack, tmp_path: Path) -> None:
    volume = tmp_path / "configmap"
    volume.mkdir()
    _kubelet_swap(volume, "..2026_12_01_10_00_00.000000001", stack.config_a())
    proxy = await stack.start({}, path=volume / "config.yaml")
    _kubelet_swap(volume, "..2026_12_01_10_05_00.000000002", stack.config_b())
    doc = await stack.wait_generation(2)
    assert [r["name"] for r in doc["routes"]] == ["app", "only-b"]
    assert any("config reloaded (file changed)" in line for line in proxy.lines)


async def test_editor_rename_is_picked_up(stack: Stack) -> None:
    await stack.start(stack.config_a())
    _write(stack.path, stack.config_b())  # write-then-rename
    doc = await stack.wait_generation(2)
    assert [r["name"] for r in doc["routes"]] == ["app", "only-b"]


async def test_sighup_with_no_watch(stack: Stack) -> None:
    proxy = await stack.start(stack.config_a(), "--no-watch")
    _write(stack.path, stack.config_b())
    await asyncio.sleep(2.5)  # several polls' worth: the watch would have seen it
    assert (await stack.status())["generation"] == 1
    proxy.signal(signal.SIGHUP)
    doc = await stack.wait_generation(2)
    assert [r["name"] for r in doc["routes"]] == ["app", "only-b"]


# --------------------------------------------------------------------------- tokens and readiness


async def test_unchanged_keys_keep_their_tokens(stack: Stack) -> None:
    proxy = await stack.start(stack.config_a())
    minted = len(stack.google.issued)
    # Only the allowed origins change: the (identity, audience) keys stay.
    _write(stack.path, {**stack.config_a(), "allowed_origins": ["http://localhost:5000"]})
    proxy.signal(signal.SIGHUP)
    await stack.wait_generation(2)
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/only-a/x") as r:
        assert r.status == 200
    assert len(stack.google.issued) == minted


async def test_a_new_route_is_not_ready_until_its_token_arrives(stack: Stack) -> None:
    proxy = await stack.start(stack.config_a())
    stack.google.hang("token", 6, count=1)
    raw = stack.config_a()
    raw["routes"].append({"name": "late", "prefix": "/late", "upstream": stack.b.url, "credentials": {"source": "service_account", "key_file": str(stack.key_b)}})
    _write(stack.path, raw)
    await stack.wait_generation(2)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.admin_url}/.proxy/readyz") as r:
            assert r.status == 503
            assert "route late" in await r.text()
        # Routes whose token was kept still serve meanwhile.
        async with s.get(f"{proxy.url}/only-a/x") as r:
            assert r.status == 200
        await eventually(lambda: _ok(s, f"{proxy.admin_url}/.proxy/readyz"), "the new route's token")
        async with s.get(f"{proxy.url}/late/x") as r:
            assert r.status == 200


async def test_a_listen_port_change_is_warned_and_not_applied(stack: Stack) -> None:
    proxy = await stack.start(stack.config_a())
    old_port = proxy.port
    _write(stack.path, {**stack.config_b(), "listen": {"port": 1}})
    proxy.signal(signal.SIGHUP)
    await stack.wait_generation(2)
    assert any("listen.port: 0 -> 1 needs a restart" in line for line in proxy.lines), proxy.stderr
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{old_port}/only-b/x") as r:
        assert r.status == 200


async def test_quick_mode_ignores_sighup(tmp_path: Path, google: Any, private_service: PrivateService) -> None:
    key = google.write_key_file(tmp_path / "k.json", "quick@fake-project.iam.gserviceaccount.com")
    env = clean_env(tmp_path, GOOGLE_APPLICATION_CREDENTIALS=str(key))
    proxy = ProxyProcess(["--upstream", private_service.url, "--port", "0"], env)
    await proxy.start()
    try:
        await proxy.wait_listening(admin=False)
        proxy.signal(signal.SIGHUP)
        await proxy.wait_for(lambda: any("SIGHUP: nothing to reload" in line for line in proxy.lines), "the SIGHUP line")
        async with aiohttp.ClientSession() as s:
            await eventually(lambda: _ok(s, f"{proxy.url}/x"), "a proxied 200 after SIGHUP")
    finally:
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit() == 0
