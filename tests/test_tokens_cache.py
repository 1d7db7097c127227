"""The token cache: single-flight, expiry from the JWT, failures, recovery.

Real google-auth against the fake token and metadata endpoints; the proxy on a
real port where the behaviour is end to end. A clock is injected into the cache
where a test needs time to jump (laptop sleep).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from proxy.config import Credentials
from proxy.errors import TokenUnavailable
from proxy.auth.identity import Identity, Minted, ServiceAccountIdentity, StaticIdentity, build_identity
from proxy.auth.tokens import MIN_TTL, TokenCache, refresh_delay

from .test_identity_support import client, eventually  # noqa: F401


def sa_route(key, upstream: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {"credentials": {"source": "service_account", "key_file": str(key)}, "routes": [{"upstream": upstream}]}


class SkewedClock:
    """Wall clock plus an offset the test moves (a laptop that slept, a clock that jumped)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


# --------------------------------------------------------------------------- refresh timing (pure)


@pytest.mark.parametrize(
    "remaining, margin, low, high",
    [
        (3600, 300, 3600 - 300 - 30, 3600 - 300),  # ~5 min ahead, up to 10% of the margin earlier
        (3600, 210, 3600 - 210 - 21, 3600 - 210),  # metadata: ~3.5 min ahead, inside its 4-min cache window
        (20, 300, (20 - MIN_TTL) / 2 * 0.9, (20 - MIN_TTL) / 2),  # short-lived: half of the usable rest
        (600, 300, (600 - MIN_TTL) / 2 * 0.9, (600 - MIN_TTL) / 2),
        (6, 300, 0.5, 0.5),  # nearly gone: soon, but not in a loop
    ],
)
def test_refresh_delay(remaining, margin, low, high):
    for _ in range(50):
        assert low <= refresh_delay(remaining, margin) <= high


def test_metadata_refresh_lands_inside_the_servers_cache_window():
    # The metadata server returns its cached token until 4 minutes before exp:
    # the refresh must come later than that to get a new one.
    for _ in range(50):
        assert 3600 - refresh_delay(3600, 210) < 240


# --------------------------------------------------------------------------- single-flight


async def test_200_concurrent_cold_gets_cause_one_fetch(google, sa_key):
    google.hang("token", 0.5, count=1)  # the fetch is still in flight when all 200 ask
    cache = TokenCache()
    key = cache.register(ServiceAccountIdentity(str(sa_key[0])), "https://aud.example")
    try:
        tokens = await asyncio.gather(*(cache.get(key) for _ in range(200)))
    finally:
        await cache.close()
    assert len(set(tokens)) == 1
    assert google.calls_by_audience[("token", "https://aud.example")] == 1


async def test_200_concurrent_cold_requests_through_the_proxy_cause_one_fetch(start_proxy, client, google, sa_key, private_service):
    google.hang("token", 1.0, count=1)
    proxy = await start_proxy(sa_route(sa_key[0], private_service.url), ready=False)

    async def one(i: int) -> int:
        async with client.get(f"{proxy.url}/r/{i}") as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert google.calls_by_audience[("token", private_service.url)] == 1
    assert len(private_service.requests) == 200


class CountingIdentity(Identity):
    """Records how many fetches run at once in worker threads."""

    source = "static"

    def __init__(self, google, serial: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.google = google
        self.serial = serial
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def _fetch_sync(self, audience: str) -> Minted:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(0.2)
        with self._lock:
            self.running -= 1
        return self._minted(self.google.mint(audience))


@pytest.mark.parametrize("serial", [True, False])
async def test_one_refresh_per_credentials_object_at_a_time(google, serial):
    ident = CountingIdentity(google, serial)
    cache = TokenCache()
    keys = [cache.register(ident, f"https://aud-{i}.example") for i in range(5)]
    try:
        await asyncio.gather(*(cache.get(k) for k in keys))
    finally:
        await cache.close()
    if serial:
        assert ident.max_running == 1
    else:
        # Sources without shared credentials fetch audiences in parallel.
        assert ident.max_running > 1


async def test_a_fetch_never_blocks_the_event_loop(start_proxy, client, google, sa_key, private_service):
    google.hang("token", 3.0, count=1)
    proxy = await start_proxy(sa_route(sa_key[0], private_service.url), ready=False)
    (key,) = proxy.state.tokens.keys()
    async with client.get(f"{proxy.url}/.proxy/healthz") as r:
        assert r.status == 200
    # The fetch was still hanging while the loop answered.
    assert proxy.state.tokens.peek(key) is None
    google.heal()


# --------------------------------------------------------------------------- expiry


async def test_an_expired_token_is_never_sent(start_proxy, client, google, private_service, tmp_path):
    """A static token file; then the clock jumps past its exp (laptop sleep): 503, nothing sent."""
    path = tmp_path / "token"
    path.write_text(google.mint(private_service.url, lifetime=600))
    clock = SkewedClock()
    tokens = TokenCache(clock=clock, wait=2)
    proxy = await start_proxy(
        {"credentials": {"source": "static", "token_file": str(path)}, "routes": [{"upstream": private_service.url}]},
        tokens=tokens,
    )
    async with client.get(proxy.url + "/before") as r:
        assert r.status == 200
    clock.offset = 700
    async with client.get(proxy.url + "/after") as r:
        body = await r.text()
        assert r.status == 503, body
        assert int(r.headers["Retry-After"]) >= 1
    assert "expired" in body and f"write a fresh token to {path}" in body
    assert [req.raw_path for req in private_service.requests] == ["/before"]
    assert not proxy.state.tokens.ready()


async def test_a_token_file_that_is_already_expired_is_refused(start_proxy, client, google, private_service, tmp_path):
    path = tmp_path / "token"
    path.write_text(google.expired_token(private_service.url))
    proxy = await start_proxy(
        {"credentials": {"source": "static", "token_file": str(path)}, "routes": [{"upstream": private_service.url}]},
        ready=False,
    )
    async with client.get(proxy.url + "/x") as r:
        body = await r.text()
        assert r.status == 503
    assert "expired" in body and "eyJ" not in body
    assert private_service.requests == []
    # A fresh token written to the file is picked up without a restart.
    path.write_text(google.mint(private_service.url))

    async def works() -> bool:
        async with client.get(proxy.url + "/x") as r:
            return r.status == 200

    await eventually(works)


async def test_after_a_clock_jump_a_new_token_is_fetched_before_sending(start_proxy, client, google, sa_key, private_service):
    clock = SkewedClock()
    google.token_lifetime = 60
    proxy = await start_proxy(sa_route(sa_key[0], private_service.url), tokens=TokenCache(clock=clock))
    async with client.get(proxy.url + "/a") as r:
        assert r.status == 200
    first = private_service.last.header("Authorization")
    # The background timer has not fired (the machine slept), but the wall clock moved on.
    google.token_lifetime = 3600
    clock.offset = 120
    async with client.get(proxy.url + "/b") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.header("Authorization") != first
    assert google.calls_by_audience[("token", private_service.url)] == 2


# --------------------------------------------------------------------------- failures


async def test_token_endpoint_failing_after_a_token_is_cached(start_proxy, client, google, sa_key, private_service):
    """20-second tokens; the token endpoint fails from the first refresh on: requests keep succeeding."""
    google.token_lifetime = 20
    proxy = await start_proxy(sa_route(sa_key[0], private_service.url))
    (key,) = proxy.state.tokens.keys()
    google.fail("token", 503)
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            async with client.get(proxy.url + "/x") as r:
                await r.read()
                statuses.append(r.status)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(load())
    try:
        # The scheduled refresh fails (google-auth retries 5xx for ~3 s inside it).
        await eventually(lambda: proxy.state.tokens.status(key)["refreshes"]["error"] >= 1, timeout=25)
        status = proxy.state.tokens.status(key)
        assert status["valid"] and "internal_failure" in status["last_error"]
        google.heal()
        await eventually(lambda: proxy.state.tokens.status(key)["refreshes"]["ok"] >= 2, timeout=20)
        assert proxy.state.tokens.status(key)["last_error"] is None
    finally:
        stop.set()
        await task
    assert statuses and set(statuses) == {200}, statuses
    assert proxy.state.tokens.status(key)["waited"] == 0


async def test_token_endpoint_down_from_the_start_then_recovery(start_proxy, client, google, sa_key, private_service):
    google.fail("token", 503)
    proxy = await start_proxy(sa_route(sa_key[0], private_service.url), ready=False)
    async with client.get(proxy.url + "/x") as r:
        body = await r.text()
        assert r.status == 503, body
        assert int(r.headers["Retry-After"]) >= 1
        assert r.headers["Cache-Control"] == "no-store"
    assert "internal_failure" in body and "hint:" in body
    # While backing off, requests are answered at once (no fetch per request).
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 503
    assert private_service.requests == []
    async with client.get(proxy.url + "/.proxy/readyz") as r:
        assert r.status == 503
    google.heal()

    async def works() -> bool:
        async with client.get(proxy.url + "/x") as r:
            return r.status == 200

    await eventually(works, timeout=30)
    async with client.get(proxy.url + "/.proxy/readyz") as r:
        assert r.status == 200


async def test_unchanged_token_is_retried_later_not_in_a_loop(google, clean_env):
    """The metadata server returns its cached token when asked too early."""
    clock = SkewedClock()
    cache = TokenCache(clock=clock)
    ident = build_identity(Credentials(source="metadata"))
    key = cache.register(ident, "https://aud.example")
    try:
        token = await cache.get(key)
        clock.offset = 120  # old enough for a forced refresh
        assert await cache.force_refresh(key, token) is None  # the same token came back
        assert cache.status(key)["refreshes"]["unchanged"] == 1
        calls = google.calls_by_audience[("metadata", "https://aud.example")]
        assert calls == 2
        await asyncio.sleep(1.0)
        # No fetch loop: the next try is scheduled later (at least a second away).
        assert google.calls_by_audience[("metadata", "https://aud.example")] == calls
    finally:
        await cache.close()


async def test_no_valid_token_waits_bounded_then_503(google, sa_key):
    google.hang("token", 5.0, count=1)
    cache = TokenCache(wait=0.5)
    key = cache.register(ServiceAccountIdentity(str(sa_key[0])), "https://aud.example")
    try:
        with pytest.raises(TokenUnavailable) as e:
            await cache.get(key)
        assert e.value.status == 503 and "timed out after 0.5 s" in e.value.reason
        assert e.value.hint
    finally:
        google.heal()
        await cache.close()


async def test_static_identity_in_cache_reports_its_audience(google, monkeypatch):
    monkeypatch.setenv("ID_TOKEN", google.mint("https://their.example"))
    cache = TokenCache()
    key = cache.register(StaticIdentity(token_env="ID_TOKEN"), "https://route.example")
    try:
        await cache.get(key)
        status = cache.status(key)
    finally:
        await cache.close()
    assert status["token_audience"] == "https://their.example"
    assert status["audience_note"] and "https://route.example" in status["audience_note"]
    assert "eyJ" not in str(status)
