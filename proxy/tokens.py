"""The ID token cache: one entry per (identity, audience), refreshed ahead of expiry.

- A request takes the cached token with a dictionary lookup and an expiry check.
- Refreshes happen in the background, ahead of expiry (with jitter), one fetch at
  a time per key; concurrent cold requests all wait on that one fetch.
- Freshness comes from the JWT's ``exp``, never from google-auth's ``expired``,
  which applies its own 3m45s threshold.
- While refreshes fail the still-valid token keeps serving and the refresh is
  retried with backoff; with no valid token, requests fail closed with 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache

from .errors import CredentialError, TokenUnavailable, redact
from .identity import Identity, Minted

log = logging.getLogger(__name__)

#: A token with less than this left is never sent (it could expire in flight).
MIN_TTL = 5.0
#: Backoff between failed refreshes: first, then doubled up to the cap.
RETRY_FIRST = 1.0
RETRY_CAP = 60.0


@dataclass(frozen=True)
class TokenKey:
    identity: str
    audience: str


@dataclass
class _Entry:
    identity: Identity
    audience: str
    minted: Minted | None = None
    fetched_at: float = 0.0  # wall clock of the last successful fetch
    inflight: asyncio.Task[Minted] | None = None
    timer: asyncio.TimerHandle | None = None
    failures: int = 0
    last_error: str | None = None
    last_hint: str | None = None
    next_attempt: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0, "unchanged": 0})


class TokenCache:
    """ID tokens for every (identity, audience) the routes need."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        wait: float = 10.0,
        max_entries: int = 1024,
        on_refresh: Callable[[TokenKey, str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._wait = wait
        self._entries: LRUCache[TokenKey, _Entry] = LRUCache(maxsize=max_entries)
        self._on_refresh = on_refresh
        self._closed = False

    def register(self, identity: Identity, audience: str) -> TokenKey:
        """Declare a key that will be asked for; warm-up and refresh cover it."""
        key = TokenKey(identity.key, audience)
        if key not in self._entries:
            self._entries[key] = _Entry(identity, audience)
        return key

    def keys(self) -> list[TokenKey]:
        return list(self._entries.keys())

    async def get(self, key: TokenKey) -> str:
        """The current token for ``key``; waits (bounded) only when none is valid."""
        entry = self._entries[key]
        m = entry.minted
        if m is not None and m.exp - self._clock() > MIN_TTL:
            return m.token
        return await self._wait_fresh(key, entry)

    def peek(self, key: TokenKey) -> Minted | None:
        """The cached token if still valid, without waiting or fetching."""
        entry = self._entries.get(key)
        if entry is None or entry.minted is None or entry.minted.exp - self._clock() <= MIN_TTL:
            return None
        return entry.minted

    async def _wait_fresh(self, key: TokenKey, entry: _Entry) -> str:
        task = self._start(key, entry)
        try:
            m = await asyncio.wait_for(asyncio.shield(task), self._wait)
        except asyncio.TimeoutError:
            raise TokenUnavailable(
                f"timed out after {self._wait:g} s waiting for an ID token from {entry.identity.describe()}",
                entry.last_hint or "is the token endpoint or metadata server reachable?",
            ) from None
        except TokenUnavailable:
            raise
        except Exception:  # the task already recorded and logged why
            raise self._unavailable(entry) from None
        return m.token

    def _unavailable(self, entry: _Entry) -> TokenUnavailable:
        retry = max(1, round(entry.next_attempt - time.monotonic())) if entry.next_attempt else 5
        return TokenUnavailable(
            f"no ID token for audience {entry.audience}: {entry.last_error or 'unknown error'}",
            entry.last_hint,
            retry_after=retry,
        )

    def _start(self, key: TokenKey, entry: _Entry) -> asyncio.Task[Minted]:
        """Start a fetch for ``key`` unless one is already in flight (single-flight)."""
        if entry.inflight is None:
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
            entry.inflight = asyncio.get_running_loop().create_task(self._fetch(key, entry))
            # A background refresh nobody awaits must not warn "exception never retrieved".
            entry.inflight.add_done_callback(lambda t: t.cancelled() or t.exception())
        return entry.inflight

    async def _fetch(self, key: TokenKey, entry: _Entry) -> Minted:
        ident = entry.identity
        try:
            try:
                m = await ident.fetch(entry.audience)
            except CredentialError as e:
                raise _Failure(str(e).splitlines()[0], e.hint) from None
            except Exception as e:  # google-auth raises many types; we report them all the same way
                raise _Failure(_describe(e), _hint(ident, e)) from None
            now = self._clock()
            if m.exp - now <= MIN_TTL:
                raise _Failure(
                    f"{ident.describe()} returned a token that expires in {m.exp - now:.0f} s",
                    "check this machine's clock" if m.exp > now - 3600 else None,
                )
        except _Failure as f:
            entry.failures += 1
            entry.counts["error"] += 1
            entry.last_error, entry.last_hint = f.reason, f.hint
            delay = min(RETRY_CAP, RETRY_FIRST * 2 ** (entry.failures - 1)) * random.uniform(0.8, 1.2)
            entry.next_attempt = time.monotonic() + delay
            valid = entry.minted is not None and entry.minted.exp - self._clock() > MIN_TTL
            log.warning(
                "token refresh failed for %s as %s (%s; retry in %.0f s%s)",
                entry.audience,
                ident.describe(),
                f.reason,
                delay,
                ", still serving the current token" if valid else "",
            )
            self._notify(key, "error")
            entry.inflight = None
            self._schedule(key, entry, delay)
            raise TokenUnavailable(f.reason, f.hint, retry_after=max(1, round(delay))) from None
        unchanged = entry.minted is not None and m.exp == entry.minted.exp
        entry.inflight = None
        entry.failures = 0
        entry.last_error = entry.last_hint = None
        entry.next_attempt = 0.0
        if unchanged:
            # The source handed back the token it had (the metadata server caches until
            # 4 minutes before expiry): try again later, never in a loop.
            entry.counts["unchanged"] += 1
            self._notify(key, "unchanged")
            remaining = m.exp - now
            self._schedule(key, entry, max(5.0, min(30.0, remaining / 4)))
            return m
        first = entry.minted is None
        entry.minted = m
        entry.fetched_at = now
        entry.counts["ok"] += 1
        self._notify(key, "ok")
        delay = refresh_delay(m.exp - now, ident.refresh_margin)
        (log.info if first else log.debug)(
            "token for %s from %s valid for %.0f s; next refresh in %.0f s",
            entry.audience,
            ident.describe(),
            m.exp - now,
            delay,
        )
        self._schedule(key, entry, delay)
        return m

    def _schedule(self, key: TokenKey, entry: _Entry, delay: float) -> None:
        if self._closed:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(delay, self._start, key, entry)

    def _notify(self, key: TokenKey, outcome: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(key, outcome)

    async def warm_up(self) -> None:
        """Start a fetch for every registered key; failures are logged and retried."""
        for key, entry in list(self._entries.items()):
            if entry.minted is None:
                self._start(key, entry)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every key has a valid token (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            await asyncio.sleep(0.05)
        return self.ready()

    def ready(self) -> bool:
        return all(self.peek(k) is not None for k in self._entries.keys())

    async def close(self) -> None:
        self._closed = True
        tasks = []
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
            if entry.inflight is not None:
                entry.inflight.cancel()
                tasks.append(entry.inflight)
        # The worker thread of a cancelled fetch finishes on its own; we only stop waiting.
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self, key: TokenKey) -> dict[str, Any]:
        """What may be shown about a key: never the token."""
        entry = self._entries[key]
        m = entry.minted
        now = self._clock()
        return {
            "identity": entry.identity.describe(),
            "source": entry.identity.source,
            "email": entry.identity.email,
            "audience": entry.audience,
            "token_audience": m.aud if m else None,
            "expires_in": round(m.exp - now, 1) if m else None,
            "valid": m is not None and m.exp - now > MIN_TTL,
            "last_error": entry.last_error,
            "refreshes": dict(entry.counts),
        }


class _Failure(Exception):
    def __init__(self, reason: str, hint: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def refresh_delay(remaining: float, margin: float) -> float:
    """Seconds until the next background refresh of a token with ``remaining`` seconds left.

    Normally ``margin`` before expiry, minus up to 10% jitter so that many keys do
    not refresh at once; for tokens too short for that, at about half their life.
    """
    if remaining > 2 * margin:
        return remaining - margin - random.uniform(0, 0.1 * margin)
    return max(0.5, remaining / 2 * random.uniform(0.9, 1.0))


def _describe(e: BaseException) -> str:
    """A one-line, token-free description of a google-auth failure."""
    text = str(e.args[0]) if e.args else ""
    first = text.splitlines()[0] if text else ""
    return redact(f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__)


def _hint(ident: Identity, e: BaseException) -> str | None:
    text = str(e)
    if "invalid_grant" in text:
        return "the credential was refused (revoked key or expired login?): create a new key or run `gcloud auth application-default login`"
    if ident.source == "metadata":
        return "is the metadata server reachable? Off Google Cloud, use a key file or `gcloud auth application-default login`"
    if "TransportError" in type(e).__name__ or "Connection" in text:
        return "the token endpoint did not answer: check the network (and HTTPS_PROXY)"
    return None
