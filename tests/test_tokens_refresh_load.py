"""Background refresh under steady load: 20-second tokens, several refreshes, zero failed requests.

The PrivateService rejects expired tokens (no clock skew), so a single request
sent with a stale token would fail. An event stream stays open across the
refreshes and must arrive whole. The everyday variant runs for 25 s (the
first token expires at 20 s, so later requests can only succeed with refreshed
ones); the soak variant runs for 70 s (3.5 lifetimes).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from .test_identity_support import client  # noqa: F401

LIFETIME = 20


async def steady_load(proxy_url: str, client, seconds: float, workers: int = 4) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    """``workers`` clients in a loop for ``seconds``: (statuses, requests)."""
    statuses: list[int] = []
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            async with client.get(f"{proxy_url}/w{n}/{i}") as r:
                await r.read()
                statuses.append(r.status)
            i += 1
            await asyncio.sleep(0.02)

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return statuses, len(statuses)


async def run_load(start_proxy, client, google, sa_key, private_service, seconds: float) -> None:  # type: ignore[no-untyped-def]
    google.token_lifetime = LIFETIME
    key_path, _ = sa_key
    # Two routes (one per header mode) share the identity but not the token.
    proxy = await start_proxy(
        {
            "credentials": {"source": "service_account", "key_file": str(key_path)},
            "routes": [
                {"prefix": "/w0", "upstream": private_service.url},
                {"prefix": "/w1", "upstream": private_service.url, "header": "x-serverless-authorization"},
                {"prefix": "/w2", "upstream": private_service.url, "audience": private_service.url + "/b"},
                {"prefix": "/w3", "upstream": private_service.url},
            ],
        }
    )
    private_service.audiences = [private_service.url, private_service.url + "/b"]
    started = time.time()
    events = int(seconds) - 5

    async def stream() -> bytes:
        # One long response open across refreshes: a refresh must not cut it.
        async with client.get(f"{proxy.url}/w0/sse?n={events}&interval=1") as r:
            assert r.status == 200
            return await r.read()

    (statuses, count), streamed = await asyncio.gather(steady_load(proxy.url, client, seconds), stream())
    assert count > 0
    assert streamed.count(b"data: event ") == events and f"id: {events - 1}\n".encode() in streamed
    failed = [s for s in statuses if s != 200]
    assert failed == [], f"{len(failed)} of {count} requests failed: {sorted(set(failed))}"
    # Requests after the first token's expiry carried refreshed tokens (the service checked each one).
    late = [r for r in private_service.requests if r.claims and r.claims["iat"] >= started + LIFETIME - 10]
    assert late and all(r.refused is None for r in private_service.requests)
    assert len({r.claims["iat"] for r in private_service.requests if r.claims}) >= 3
    for key in proxy.state.tokens.keys():
        status = proxy.state.tokens.status(key)
        # After warm-up no request waited for the token endpoint.
        assert status["waited"] == 0, status
        assert status["refreshes"]["error"] == 0, status
        assert status["refreshes"]["ok"] >= 2, status


async def test_background_refresh_under_steady_load(start_proxy, client, google, sa_key, private_service):
    await run_load(start_proxy, client, google, sa_key, private_service, seconds=25)


@pytest.mark.soak
@pytest.mark.timeout(200)
async def test_background_refresh_under_steady_load_soak(start_proxy, client, google, sa_key, private_service):
    await run_load(start_proxy, client, google, sa_key, private_service, seconds=70)
