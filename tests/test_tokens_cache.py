"""The token cache: single-flight, expiry from the JWT, failures, recovery.

Real google-auth against the fake token and metadata endpoints; the proxy on a
real port where the behaviour is end to end. A clock is injected into the cache
where a test needs time to jump (laptop sleep).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from proxy.config import Credentials
from proxy.errors import TokenUnavailable
from proxy.auth.choose import build_identity
from proxy.auth.identity import Identity, Minted
from proxy.auth.service_account import ServiceAccountIdentity
from proxy.auth.static import StaticIdentity
from proxy.auth.tokens import MIN_TTL, TokenCache, TokenKey, refresh_delay

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


# --------------------------------------------------------------------------- timing, on a clock the test moves
#
# The cache's refresh timers and its backoff both run on the event loop's clock. These
# tests run the cache on a loop whose clock moves only when the test moves it (and a
# wall clock that moves with it), so minutes of refreshes and retries pass in an instant
# and exactly which fetch happened when is known: no sleeping, no timing assertions.

AUD = "https://aud.example"
#: Steps of the loop clock while timing retries: every measured gap is exact to this
#: (TOL: plus what adding up floats loses).
STEP = 0.05
TOL = STEP + 1e-3
#: Wall time at loop time 0: a whole second, so a token minted at 0 expires at loop time == lifetime.
WALL_START = float(int(time.time()))
SAME = "the previous token again"
NEWER = "a new token with the previous one's exp"


class ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock reads ``now``, which only the test moves."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


def on_manual_clock(scenario):  # type: ignore[no-untyped-def]
    with asyncio.Runner(loop_factory=ManualClockLoop) as runner:
        runner.run(scenario(runner.get_loop()))


class Scripted(Identity):
    """Answers each fetch as scripted: the answers are used in order, the last one repeats.

    A number is a lifetime: a new Google-signed token issued now. ``SAME`` hands back
    the previous token (what the metadata server does when asked early), ``NEWER`` a new
    token with the previous one's exp; an exception is raised as the fetch's failure.
    """

    source = "service_account"

    def __init__(self, google, loop: ManualClockLoop, *answers) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.google, self.loop = google, loop
        self.answers = list(answers)
        self.fetched_at: list[float] = []  # loop time of every fetch
        self.gate: asyncio.Event | None = None  # when set, a fetch waits for it
        self.source_changed = False
        self.last: Minted | None = None
        self.token_aud: str | None = None  # a source that picks its own audience (a token file)

    def wall(self) -> float:
        return WALL_START + self.loop.now

    def changed(self) -> bool:
        return self.source_changed

    async def fetch(self, audience: str) -> Minted:
        self.fetched_at.append(self.loop.now)
        self.source_changed = False
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        now = int(self.wall())
        if answer == SAME:
            assert self.last is not None
            return self.last
        lifetime = int(self.last.exp) - now if answer == NEWER and self.last else answer
        self.last = self._minted(self.google.mint(self.token_aud or audience, lifetime=lifetime, iat=now, n=len(self.fetched_at)))
        return self.last


async def settle() -> None:
    """Let everything that is due run: no fetch here waits on I/O, so a few turns finish it."""
    for _ in range(12):
        await asyncio.sleep(0)


async def run_for(loop: ManualClockLoop, seconds: float, step: float = STEP) -> None:
    end = loop.now + seconds
    while loop.now < end - 1e-9:
        loop.now = min(end, loop.now + step)
        await settle()


async def next_fetch(loop: ManualClockLoop, ident: Scripted, *, within: float, step: float = STEP) -> float:
    """Move the clock until the cache fetches again (at most ``within`` s); the wait."""
    n, start = len(ident.fetched_at), loop.now
    while len(ident.fetched_at) == n:
        assert loop.now - start < within, f"no fetch within {within} s"
        loop.now += step
        await settle()
    return loop.now - start


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_with_no_token_failed_fetches_are_retried_from_1_s_doubling_to_10_s(google):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, OSError("token endpoint unreachable"))
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            with pytest.raises(TokenUnavailable) as first:
                await cache.get(key)
            assert "token endpoint unreachable" in first.value.reason
            assert first.value.retry_after == 1
            # During the backoff a request is answered at once: no fetch of its own.
            for _ in range(3):
                with pytest.raises(TokenUnavailable) as e:
                    await cache.get(key)
                assert e.value.retry_after == 1
            assert len(ident.fetched_at) == 1
            # The retries come from the cache's own timer, with or without requests.
            await run_for(loop, 60)
            # Retry-After tells a client when the next attempt is.
            with pytest.raises(TokenUnavailable) as e:
                await cache.get(key)
            wait = await next_fetch(loop, ident, within=13)
            assert abs(e.value.retry_after - wait) <= 1, (e.value.retry_after, wait)
            # Recovery: the next attempt's token serves.
            ident.answers = [3600]
            await next_fetch(loop, ident, within=13)
            assert cache.peek(key) is not None and await cache.get(key) == ident.last.token
            assert cache.status(key)["last_error"] is None and cache.ready()
        finally:
            await cache.close()
        retries = gaps(ident.fetched_at)
        assert len(retries) >= 8, ident.fetched_at
        for i, gap in enumerate(retries):
            nominal = min(10, 2**i)  # RETRY_FIRST doubled, RETRY_CAP_COLD
            assert 0.8 * nominal - TOL <= gap <= 1.2 * nominal + TOL, (i, retries)

    on_manual_clock(scenario)


def test_while_a_token_serves_failed_refreshes_back_off_to_60_s_but_retry_before_it_runs_out(google, caplog):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600, OSError("token endpoint unreachable"))
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            token = await cache.get(key)
            await run_for(loop, 0.25)
            assert cache.status(key)["expires_in"] == 3599.8
            # The refresh starts 5 minutes before exp (minus up to 10% of that, jitter).
            caplog.clear()
            wait = await next_fetch(loop, ident, within=3600, step=1.0)
            assert 3270 <= wait + 0.25 <= 3300 + 1.0
            (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert warning.startswith(f"token refresh failed for {AUD} as service_account")
            assert "OSError: token endpoint unreachable; retry in 1 s, still serving the current token" in warning
            # The outage, up to 6 s before exp: the cached token serves every request at once.
            await run_for(loop, 3594 - loop.now)
            assert await cache.get(key) == token
            assert cache.status(key)["waited"] == 1 and cache.status(key)["valid"]  # the cold first one only
            # Under 5 s left, it is never handed out again: the cache fails closed.
            await run_for(loop, 1.2)
            assert cache.peek(key) is None and not cache.ready()
            with pytest.raises(TokenUnavailable):
                await cache.get(key)
        finally:
            await cache.close()
        refresh = ident.fetched_at[1:]
        for i, (at, gap) in enumerate(zip(refresh, gaps(refresh))):
            nominal = min(60, 2**i)  # RETRY_FIRST doubled, RETRY_CAP while a token serves
            half_left = (3600 - MIN_TTL - at) / 2
            low, high = (max(0.5, min(f * nominal, half_left)) for f in (0.8, 1.2))
            assert low - TOL <= gap <= high + TOL, (i, at, gap)
        assert max(gaps(refresh)) > 40  # the backoff reached the 60 s cap (x 0.8 to 1.2)
        assert refresh[-1] > 3600 - MIN_TTL - 1.5  # retried until the token was no use

    on_manual_clock(scenario)


def test_after_a_recovery_the_backoff_starts_again_from_1_s(google):
    async def scenario(loop: ManualClockLoop) -> None:
        down = OSError("token endpoint unreachable")
        ident = Scripted(google, loop, 3600, down, down, down, 3600, down)
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            await cache.get(key)
            await next_fetch(loop, ident, within=3600, step=1.0)
            waits = [await next_fetch(loop, ident, within=10) for _ in range(3)]
            assert cache.status(key)["last_error"] is None  # the fourth attempt worked
            await next_fetch(loop, ident, within=3600, step=1.0)  # its refresh fails
            waits.append(await next_fetch(loop, ident, within=10))
        finally:
            await cache.close()
        for wait, nominal in zip(waits, [1, 2, 4, 1]):
            assert 0.8 * nominal - TOL <= wait <= 1.2 * nominal + TOL, waits

    on_manual_clock(scenario)


@pytest.mark.parametrize(
    "lifetime, expected",
    [
        # Handed back early, a long-lived token is asked for again every 30 s.
        (3600, lambda at: 30.0),
        # Near its end: a quarter of what is left, never sooner than 1 s (no fetch loop).
        (20, lambda at: max(1.0, min(30.0, (20 - MIN_TTL - at) / 4))),
    ],
)
def test_an_unchanged_token_is_asked_for_again_later_and_a_new_one_then_serves(google, lifetime, expected):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, lifetime, SAME, SAME, SAME, 3600)
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            first = await cache.get(key)
            await next_fetch(loop, ident, within=lifetime, step=1.0 if lifetime > 60 else STEP)
            waits = [await next_fetch(loop, ident, within=31) for _ in range(3)]
            assert cache.status(key)["refreshes"] == {"ok": 2, "error": 0, "unchanged": 3}
            token = await cache.get(key)
            assert token != first and token == ident.last.token
        finally:
            await cache.close()
        for at, wait in zip(ident.fetched_at[1:], waits):
            assert abs(wait - expected(at)) <= TOL, (ident.fetched_at, waits)

    on_manual_clock(scenario)


def test_a_newer_token_with_the_same_exp_replaces_the_cached_one(google):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600, NEWER)
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            first = await cache.get(key)
            await next_fetch(loop, ident, within=3600, step=1.0)
            assert ident.last is not None and ident.last.token != first
            assert await cache.get(key) == ident.last.token
            assert cache.status(key)["refreshes"]["unchanged"] == 1
        finally:
            await cache.close()

    on_manual_clock(scenario)


def test_a_token_file_that_changed_is_read_at_the_next_poll_not_at_the_planned_refresh(google):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600)
        ident.poll_interval = 2.0
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            first = await cache.get(key)
            await run_for(loop, 30, step=0.5)
            assert len(ident.fetched_at) == 1  # polled, unchanged: no fetch
            ident.source_changed = True
            assert await next_fetch(loop, ident, within=3) <= 2.0 + TOL
            assert await cache.get(key) != first
        finally:
            await cache.close()

    on_manual_clock(scenario)


def test_a_token_the_source_returns_already_expiring_is_refused_and_retried(google):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3, -60, 3600)
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            with pytest.raises(TokenUnavailable) as e:
                await cache.get(key)
            assert "returned a token that expires in 3 s" in e.value.reason
            await next_fetch(loop, ident, within=2)
            with pytest.raises(TokenUnavailable) as e:
                await cache.get(key)
            # Issued (whole seconds) 60 s before the loop's second, a fraction ago.
            assert re.search(r"returned a token that expired 6[01] s ago$", e.value.reason), e.value.reason
            assert e.value.hint == "check this machine's clock"
            await next_fetch(loop, ident, within=3)
            assert await cache.get(key) == ident.last.token
        finally:
            await cache.close()

    on_manual_clock(scenario)


def test_a_401_for_a_token_a_refresh_already_replaced_gets_the_new_one_without_a_fetch(google):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600)
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            rejected = await cache.get(key)
            await next_fetch(loop, ident, within=3600, step=1.0)
            newer = await cache.get(key)
            assert newer != rejected
            assert await cache.force_refresh(key, rejected) == newer
            assert len(ident.fetched_at) == 2
        finally:
            await cache.close()

    on_manual_clock(scenario)


def test_a_401_while_a_refresh_is_in_flight_waits_for_that_one_fetch(google):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600)
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            rejected = await cache.get(key)
            ident.gate = asyncio.Event()
            await next_fetch(loop, ident, within=3600, step=1.0)  # the refresh, held up
            retry = asyncio.create_task(cache.force_refresh(key, rejected))
            await settle()
            assert not retry.done()
            ident.gate.set()
            await settle()
            assert retry.done() and retry.result() == ident.last.token != rejected
            assert len(ident.fetched_at) == 2  # one fetch served both
            assert await cache.get(key) == ident.last.token
        finally:
            await cache.close()

    on_manual_clock(scenario)


def test_forced_refreshes_need_a_token_a_minute_old_and_come_at_most_once_a_minute(google, caplog):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600, SAME, 3600, 3600, OSError("token endpoint unreachable"))
        cache = TokenCache(clock=ident.wall)
        key = cache.register(ident, AUD)
        try:
            a = await cache.get(key)
            seen = []
            for at, rejected in ((10, a), (61, a), (80, a), (100, a)):
                await run_for(loop, at - loop.now, step=1.0)
                seen.append((at, await cache.force_refresh(key, rejected), len(ident.fetched_at)))
            b = cache.peek(key).token  # the refresh planned 30 s after the unchanged answer
            assert seen == [
                (10, None, 1),  # 10 s old: a fresh token that is refused is not helped by another
                (61, None, 2),  # fetched, but the source handed back the same token
                (80, None, 2),  # forced 19 s ago: not again yet
                (100, b, 3),  # the planned refresh at 91 replaced it: that one, no fetch
            ]
            await run_for(loop, 152 - loop.now, step=1.0)
            caplog.clear()
            c = await cache.force_refresh(key, b)
            assert c is not None and c == ident.last.token != b and len(ident.fetched_at) == 4
            # Operators see why a fetch happened out of turn.
            assert [r.getMessage() for r in caplog.records if r.levelname == "INFO"] == [
                f"upstream refused the token for {AUD} (401): fetching a new one"
            ]
            # A failed forced fetch means no retry; the token it meant to replace still serves.
            await run_for(loop, 70, step=1.0)
            assert await cache.force_refresh(key, c) is None
            assert len(ident.fetched_at) == 5
            assert await cache.get(key) == c
            assert await cache.force_refresh(TokenKey("nobody", AUD), c) is None
        finally:
            await cache.close()
        assert await cache.force_refresh(key, c) is None  # closed

    on_manual_clock(scenario)


def test_every_fetch_outcome_is_reported_for_its_key_and_logged(google, caplog):
    async def scenario(loop: ManualClockLoop) -> None:
        ident = Scripted(google, loop, 3600, SAME, OSError("token endpoint unreachable"), 3600)
        ident.token_aud = "https://their.example"
        outcomes: list[tuple[TokenKey, str]] = []
        cache = TokenCache(clock=ident.wall, on_refresh=lambda k, outcome: outcomes.append((k, outcome)))
        key = cache.register(ident, AUD)
        try:
            caplog.clear()
            await cache.get(key)
            # The first token is news (INFO), with the audience the source chose.
            (first,) = [r for r in caplog.records if r.name == "proxy.auth.tokens" and r.levelname == "INFO"]
            assert first.getMessage().startswith(
                f"token for {AUD} from service_account (developer@example.com) valid for 3600 s (token audience https://their.example); next refresh in"
            )
            for _ in range(3):
                await next_fetch(loop, ident, within=3600, step=1.0)
            caplog.clear()
            await next_fetch(loop, ident, within=3600, step=1.0)
            # Later ones are routine (DEBUG).
            assert not [r for r in caplog.records if r.name == "proxy.auth.tokens" and r.levelname == "INFO"]
            assert any(r.getMessage().startswith(f"token for {AUD} from") for r in caplog.records if r.levelname == "DEBUG")
        finally:
            await cache.close()
        assert outcomes == [(key, "ok"), (key, "unchanged"), (key, "error"), (key, "ok"), (key, "ok")]

    on_manual_clock(scenario)
