"""The ID token cache: one entry per (identity, audience), refreshed ahead of expiry.

- A request takes the cached token with a dictionary lookup and an expiry check.
- Refreshes happen in the background, ahead of expiry (with jitter), one fetch at
  a time per key; concurrent cold requests all wait on that one fetch.
- Freshness comes from the JWT's ``exp``, never from google-auth's ``expired``,
  which applies its own 3m45s threshold. A token whose ``exp`` has passed (or is
  about to) is never handed out, whatever the timers think (laptop sleep, clock
  jumps).
- While refreshes fail the still-valid token keeps serving and the refresh is
  retried with backoff; with no valid token, requests fail closed with 503.
- ``force_refresh`` serves the one retry after an upstream 401 (``reauth.py``),
  rate-limited per key.
- Two clocks: the wall clock (``clock=``, injectable) for the JWT's ``exp``; the
  event loop's monotonic clock for the refresh timers and the backoff alike, so
  that a test on a loop whose clock it moves drives both without sleeping.
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

from ..errors import CredentialError, TokenUnavailable, redact
from .identity import Identity, Minted

log = logging.getLogger(__name__)

#: A token with less than this left is never sent (it could expire in flight).
MIN_TTL = 5.0
#: Backoff between failed refreshes: first, then doubled up to the cap.
RETRY_FIRST = 1.0
#: Cap while a valid token still serves (the refresh started minutes before expiry).
RETRY_CAP = 60.0
#: Cap while there is no valid token: requests get 503 until the next attempt succeeds.
RETRY_CAP_COLD = 10.0
#: Seconds one fetch may take before it counts as failed (google-auth retries inside).
FETCH_TIMEOUT = 60.0
#: A forced refresh (after a 401) needs a current token at least this old...
FORCE_MIN_AGE = 60.0
#: ...and at most one happens per key in this many seconds.
FORCE_INTERVAL = 60.0


@dataclass(frozen=True)
class TokenKey:
    identity: str
    audience: str


@dataclass
class _Entry:
    identity: Identity
    audience: str
    minted: Minted | None = None
    fetched_at: float = 0.0  # clock() of the last successful fetch
    inflight: asyncio.Task[Minted] | None = None
    timer: asyncio.TimerHandle | None = None
    refresh_at: float = 0.0  # loop time of the next planned fetch
    failures: int = 0
    last_error: str | None = None
    last_hint: str | None = None
    next_attempt: float = 0.0  # loop time of the next attempt after a failure
    forced_at: float | None = None  # clock() of the last forced refresh
    noted_aud: str | None = None  # token audience the mismatch warning was logged for
    note: str | None = None
    waited: int = 0  # requests that found no valid token and had to wait
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

    def add(self, identity: Identity, audience: str) -> TokenKey:
        """``register`` at run time (a service that appeared): the first fetch starts now."""
        key = self.register(identity, audience)
        entry = self._entries[key]
        if not self._closed and entry.minted is None and entry.inflight is None and entry.timer is None:
            self._start(key, entry)
        return key

    def discard(self, key: TokenKey) -> None:
        """Forget a key no route uses any more: its refresh timer stops."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.timer is not None:
                entry.timer.cancel()
            if entry.inflight is not None:
                entry.inflight.cancel()

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
        entry.waited += 1
        if entry.inflight is None and entry.failures and asyncio.get_running_loop().time() < entry.next_attempt:
            # Backing off after a failure: answer now rather than hammer the source
            # once per request; the scheduled attempt brings recovery.
            raise self._unavailable(entry)
        task = self._start(key, entry)
        try:
            m = await asyncio.wait_for(asyncio.shield(task), self._wait)
        except TimeoutError:
            raise TokenUnavailable(
                f"timed out after {self._wait:g} s waiting for an ID token from {entry.identity.describe()}",
                entry.last_hint or "is the token endpoint or metadata server reachable?",
            ) from None
        except Exception:  # the task already recorded and logged why
            raise self._unavailable(entry) from None
        if m.exp - self._clock() <= MIN_TTL:
            raise self._unavailable(entry)
        return m.token

    def _unavailable(self, entry: _Entry) -> TokenUnavailable:
        retry = max(1, round(entry.next_attempt - asyncio.get_running_loop().time())) if entry.next_attempt else 5
        return TokenUnavailable(
            f"no ID token for audience {entry.audience}: {entry.last_error or 'no valid token'}",
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
                m = await asyncio.wait_for(ident.fetch(entry.audience), FETCH_TIMEOUT)
            except TimeoutError:
                raise _Failure(f"{ident.describe()} did not answer within {FETCH_TIMEOUT:g} s", ident.hint_for(TimeoutError("timed out"))) from None
            except CredentialError as e:
                raise _Failure(redact(str(e).splitlines()[0]), e.hint) from None
            except Exception as e:  # google-auth raises many types; we report them all the same way
                raise _Failure(_describe(e), ident.hint_for(e)) from None
            now = self._clock()
            if m.exp - now <= MIN_TTL:
                expired = m.exp <= now
                raise _Failure(
                    f"{ident.describe()} returned a token that "
                    + (f"expired {now - m.exp:.0f} s ago" if expired else f"expires in {m.exp - now:.0f} s"),
                    ident.expired_hint(),
                )
        except _Failure as f:
            entry.inflight = None
            self._failed(key, entry, f)
            raise TokenUnavailable(f.reason, f.hint, retry_after=max(1, round(entry.next_attempt - asyncio.get_running_loop().time()))) from None
        entry.inflight = None
        entry.failures = 0
        entry.last_error = entry.last_hint = None
        entry.next_attempt = 0.0
        if entry.minted is not None and m.exp == entry.minted.exp:
            # The source handed back the token it had (the metadata server caches until
            # 4 minutes before expiry; a token file nobody rewrote): try again later,
            # never in a loop.
            if m.token != entry.minted.token:
                # Minted within the same second: no longer-lived, but newer; keep it.
                entry.minted, entry.fetched_at = m, now
            entry.counts["unchanged"] += 1
            self._notify(key, "unchanged")
            self._schedule(key, entry, max(1.0, min(30.0, (m.exp - now - MIN_TTL) / 4)))
            return m
        first = entry.minted is None
        entry.minted = m
        entry.fetched_at = now
        entry.counts["ok"] += 1
        self._notify(key, "ok")
        self._note_audience(entry, m)
        delay = refresh_delay(m.exp - now, ident.refresh_margin)
        (log.info if first else log.debug)(
            "token for %s from %s valid for %.0f s%s; next refresh in %.0f s",
            entry.audience,
            ident.describe(),
            m.exp - now,
            f" (token audience {m.aud})" if m.aud != entry.audience else "",
            delay,
        )
        self._schedule(key, entry, delay)
        return m

    def _failed(self, key: TokenKey, entry: _Entry, f: _Failure) -> None:
        entry.failures += 1
        entry.counts["error"] += 1
        entry.last_error, entry.last_hint = f.reason, f.hint
        m = entry.minted
        left = m.exp - self._clock() - MIN_TTL if m is not None else 0.0
        cap = RETRY_CAP if left > 0 else RETRY_CAP_COLD
        delay = min(cap, RETRY_FIRST * 2 ** (entry.failures - 1)) * random.uniform(0.8, 1.2)
        if left > 0:
            # Try again well before the token that still serves runs out.
            delay = max(0.5, min(delay, left / 2))
        entry.next_attempt = asyncio.get_running_loop().time() + delay
        log.warning(
            "token refresh failed for %s as %s (%s; retry in %.0f s%s)%s",
            entry.audience,
            entry.identity.describe(),
            f.reason,
            delay,
            ", still serving the current token" if left > 0 else "",
            f"; hint: {f.hint}" if f.hint and entry.failures == 1 else "",
        )
        self._notify(key, "error")
        self._schedule(key, entry, delay)

    def _note_audience(self, entry: _Entry, m: Minted) -> None:
        """Warn (once per token audience) when the source chose an audience other than the route's."""
        if m.aud == entry.noted_aud:
            return
        entry.noted_aud = m.aud
        entry.note = entry.identity.audience_note(entry.audience, m.aud)
        if entry.note:
            log.warning("route audience %s: %s", entry.audience, entry.note)

    def _schedule(self, key: TokenKey, entry: _Entry, delay: float) -> None:
        if self._closed:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.refresh_at = loop.time() + delay
        poll = entry.identity.poll_interval
        entry.timer = loop.call_later(min(delay, poll) if poll else delay, self._due, key, entry)

    def _due(self, key: TokenKey, entry: _Entry) -> None:
        """Timer callback: refresh when planned, or earlier when the source changed (a token file)."""
        entry.timer = None
        if self._closed or entry.inflight is not None:
            return
        left = entry.refresh_at - asyncio.get_running_loop().time()
        if left > 0.01 and not entry.identity.changed():
            self._schedule(key, entry, left)
            return
        self._start(key, entry)

    def _notify(self, key: TokenKey, outcome: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(key, outcome)

    async def force_refresh(self, key: TokenKey, rejected: str) -> str | None:
        """A token other than ``rejected`` (which the upstream answered 401 to), or None.

        Used for the one retry after a 401. Returns the cached token if a refresh
        already replaced ``rejected``; otherwise fetches a new one, at most once per
        key per ``FORCE_INTERVAL`` and never while the current token is younger than
        ``FORCE_MIN_AGE`` (a fresh token that is refused will not be helped by
        another). None means "do not retry".
        """
        entry = self._entries.get(key)
        if entry is None or self._closed:
            return None
        now = self._clock()
        m = entry.minted
        if m is not None and m.token != rejected and m.exp - now > MIN_TTL:
            return m.token
        task = entry.inflight
        if task is None:
            if m is not None and now - entry.fetched_at < FORCE_MIN_AGE:
                log.debug("401 for %s: the token is %.0f s old, not refreshing", entry.audience, now - entry.fetched_at)
                return None
            if entry.forced_at is not None and now - entry.forced_at < FORCE_INTERVAL:
                log.debug("401 for %s: refreshed %.0f s ago already", entry.audience, now - entry.forced_at)
                return None
            entry.forced_at = now
            log.info("upstream refused the token for %s (401): fetching a new one", entry.audience)
            task = self._start(key, entry)
        try:
            fresh = await asyncio.wait_for(asyncio.shield(task), self._wait)
        except Exception:  # noqa: BLE001 - recorded by the fetch; the client gets the 401
            return None
        if fresh.token == rejected or fresh.exp - self._clock() <= MIN_TTL:
            return None
        return fresh.token

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
        return all(self.peek(k) is not None for k in self._entries)

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
            "audience_note": entry.note,
            "expires_in": round(m.exp - now, 1) if m else None,
            "valid": m is not None and m.exp - now > MIN_TTL,
            "last_error": entry.last_error,
            "refreshes": dict(entry.counts),
            "waited": entry.waited,
        }


class _Failure(Exception):
    def __init__(self, reason: str, hint: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def refresh_delay(remaining: float, margin: float) -> float:
    """Seconds until the next background refresh of a token with ``remaining`` seconds left.

    Normally ``margin`` before expiry, minus up to 10% jitter so that many keys do
    not refresh at once; for tokens too short for that, about half way through
    what is left of their usable life (``remaining - MIN_TTL``).
    """
    if remaining > 2 * margin:
        return remaining - margin - random.uniform(0, 0.1 * margin)
    return max(0.5, (remaining - MIN_TTL) / 2 * random.uniform(0.9, 1.0))


def _describe(e: BaseException) -> str:
    """A one-line, token-free description of a google-auth failure."""
    text = str(e.args[0]) if e.args else ""
    first = text.splitlines()[0] if text else ""
    return redact(f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__)
