"""A token from an environment variable or a file (a sidecar's mounted secret)."""

from __future__ import annotations

import os
import time

from ..errors import CredentialError
from .identity import Identity, Minted, _mtime, minted


class StaticIdentity(Identity):
    """A token from an environment variable or a file (re-read when the file changes)."""

    source = "static"
    chooses_audience = False

    def __init__(self, token_env: str | None = None, token_file: str | None = None) -> None:
        super().__init__()
        self.token_env = token_env
        self.token_file = token_file
        self._mtime: float | None = None
        self._polled: float | None = None
        self._cached: Minted | None = None
        where = f"${token_env}" if token_env else token_file
        self._key = f"static:{token_env or token_file}"
        self.reason = f"token from {where}"
        if token_file:
            # A file may be rewritten by whatever mints the token: look for changes.
            self.poll_interval = 2.0
        m = self._read()  # a missing or malformed token is a startup error
        if token_env and m.exp <= time.time():
            # The environment cannot change under a running process: this can never work.
            raise CredentialError(
                f"the token in ${token_env} expired {time.time() - m.exp:.0f} s ago",
                f"export {token_env}=$(gcloud auth print-identity-token)",
            )

    def describe(self) -> str:
        where = f"${self.token_env}" if self.token_env else self.token_file
        return f"static ({where}{', ' + self.email if self.email else ''})"

    def changed(self) -> bool:
        if self.token_file is None:
            return False
        # Report each change once: a file that stays broken (or gone) is retried on
        # the backoff schedule, not at every poll.
        mtime = _mtime(self.token_file)
        if mtime == self._polled:
            return False
        self._polled = mtime
        return mtime != self._mtime

    def expired_hint(self) -> str | None:
        if self.token_file:
            return f"write a fresh token to {self.token_file} (gcloud auth print-identity-token > {self.token_file})"
        return f"restart with a fresh token in ${self.token_env}"

    def _read(self) -> Minted:
        if self.token_env:
            value = os.environ.get(self.token_env, "").strip()
            if not value:
                raise CredentialError(
                    f"environment variable {self.token_env} is empty or not set",
                    f"export {self.token_env}=$(gcloud auth print-identity-token)",
                )
            where = f"${self.token_env}"
        else:
            assert self.token_file is not None
            try:
                mtime = os.stat(self.token_file).st_mtime
                if self._cached is not None and mtime == self._mtime:
                    return self._cached
                with open(self.token_file, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError as e:
                raise CredentialError(
                    f"cannot read token file {self.token_file}: {e.strerror}",
                    f"gcloud auth print-identity-token > {self.token_file}",
                ) from None
            self._mtime = self._polled = mtime
            where = self.token_file
        value = value.removeprefix("Bearer ").strip()
        try:
            result = minted(value)
        except ValueError as e:
            raise CredentialError(f"the token in {where} is unusable: {e}") from None
        self.email = result.email or self.email
        self._cached = result
        return result

    def _fetch_sync(self, audience: str) -> Minted:
        return self._read()


# --------------------------------------------------------------------------- files and discovery
