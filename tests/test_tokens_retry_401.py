"""One retry with a fresh token after an upstream 401, and only where the rules allow it.

The PrivateService answers 401 to a token with a bad signature, as Cloud Run
does. An identity that first mints such a token (then good ones) stands in for a
token the upstream stopped accepting. The cache gets a clock the test moves, so
that "the current token is at least a minute old" needs no waiting.
"""

from __future__ import annotations

import hashlib
import os
import time

from proxy.config import Credentials
from proxy.auth.identity import Identity, Minted
from proxy.auth.tokens import TokenCache

from .test_identity_support import client  # noqa: F401


class SkewedClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class FirstTokensRefused(Identity):
    """Mints ``bad`` tokens with an untrusted signature (the upstream answers 401), then good ones."""

    source = "service_account"

    def __init__(self, google, bad: int = 1) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.google = google
        self.bad = bad
        self.fetches = 0
        self.email = "retry@fake-project.iam.gserviceaccount.com"

    def _fetch_sync(self, audience: str) -> Minted:
        self.fetches += 1
        # A distinct claim per fetch: tokens minted within one second differ anyway.
        if self.fetches <= self.bad:
            return self._minted(self.google.mint_untrusted(audience, email=self.email, n=self.fetches))
        return self._minted(self.google.mint(audience, email=self.email, n=self.fetches))


async def proxy_with(start_proxy, ident, upstream: str, header: str = "authorization"):  # type: ignore[no-untyped-def]
    clock = SkewedClock()
    proxy = await start_proxy(
        {"routes": [{"upstream": upstream, "header": header}]},
        identities={Credentials(): ident},
        tokens=TokenCache(clock=clock),
    )
    return proxy, clock


async def test_get_is_retried_once_with_a_new_token(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 61  # the current token is over a minute old
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    first, second = private_service.requests
    assert first.refused is not None and first.refused[0] == 401
    assert second.refused is None and second.raw_path == "/x"
    assert first.header("Authorization") != second.header("Authorization")
    assert ident.fetches == 2
    # Later requests use the new token directly.
    async with client.get(proxy.url + "/y") as r:
        assert r.status == 200
    assert len(private_service.requests) == 3 and ident.fetches == 2


async def test_small_post_is_retried_with_the_same_body(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 61
    body = os.urandom(64 * 1024)  # exactly the limit: buffered, so it can be sent again
    async with client.post(proxy.url + "/upload", data=body, headers={"Content-Type": "application/octet-stream"}) as r:
        assert r.status == 200, await r.text()
        echoed = await r.json()
    assert echoed == {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    refused, accepted = private_service.requests
    assert refused.refused is not None and accepted.body_sha256 == hashlib.sha256(body).hexdigest()
    assert accepted.header("Content-Length") == str(len(body))
    assert accepted.header_values("Content-Type") == ["application/octet-stream"]


async def test_post_with_a_streamed_body_is_not_retried(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 61

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b"x" * 1000

    async with client.post(proxy.url + "/upload", data=chunks()) as r:
        assert r.status == 401
    assert len(private_service.requests) == 1 and ident.fetches == 1


async def test_body_over_64_kib_is_not_retried(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 61
    async with client.put(proxy.url + "/upload", data=b"y" * (64 * 1024 + 1)) as r:
        assert r.status == 401
    assert len(private_service.requests) == 1 and ident.fetches == 1


async def test_no_retry_while_the_token_is_less_than_a_minute_old(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 30
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 401
        # The upstream's own 401 reaches the client as it was.
        assert "WWW-Authenticate" in r.headers
    assert len(private_service.requests) == 1 and ident.fetches == 1


async def test_403_is_never_retried(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google, bad=0)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 61
    async with client.get(proxy.url + "/status/403") as r:
        assert r.status == 403
    assert len(private_service.requests) == 1 and ident.fetches == 1


async def test_never_retried_in_x_serverless_authorization_mode(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url, header="x-serverless-authorization")
    clock.offset = 61
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 401
    assert len(private_service.requests) == 1 and ident.fetches == 1


async def test_an_apps_own_401_is_retried_once_then_passed_on(start_proxy, client, google, private_service):
    ident = FirstTokensRefused(google, bad=0)
    proxy, clock = await proxy_with(start_proxy, ident, private_service.url)
    clock.offset = 61
    async with client.get(proxy.url + "/status/401") as r:
        assert r.status == 401
    # In authorization mode a 401 cannot be told apart from Cloud Run's: one retry, no more.
    assert [req.raw_path for req in private_service.requests] == ["/status/401", "/status/401"]
    assert ident.fetches == 2


async def test_at_most_one_forced_refresh_per_minute(start_proxy, client, google, private_service, tmp_path):
    """A token file whose token the upstream refuses: refreshing returns the same token."""
    path = tmp_path / "token"
    path.write_text(google.mint_untrusted(private_service.url))
    clock = SkewedClock()
    config = {"credentials": {"source": "static", "token_file": str(path)}, "routes": [{"upstream": private_service.url}]}
    proxy = await start_proxy(config, tokens=TokenCache(clock=clock))
    (key,) = proxy.state.tokens.keys()
    clock.offset = 61
    async with client.get(proxy.url + "/a") as r:
        assert r.status == 401
    # The forced refresh happened, found the same token, and so did not retry.
    assert proxy.state.tokens.status(key)["refreshes"]["unchanged"] == 1
    assert len(private_service.requests) == 1
    clock.offset = 61 + 30
    async with client.get(proxy.url + "/b") as r:
        assert r.status == 401
    assert proxy.state.tokens.status(key)["refreshes"]["unchanged"] == 1  # rate-limited: no refresh
    clock.offset = 61 + 61
    async with client.get(proxy.url + "/c") as r:
        assert r.status == 401
    assert proxy.state.tokens.status(key)["refreshes"]["unchanged"] == 2
    assert len(private_service.requests) == 3
