"""The gcloud CLI's login: ``gcloud auth print-identity-token``."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess

from ..errors import CredentialError, redact
from .identity import Identity, Minted

#: Seconds a gcloud invocation may take before it is killed.
GCLOUD_TIMEOUT = 30.0


class GcloudIdentity(Identity):
    """``gcloud auth print-identity-token`` as a subprocess, for laptops where gcloud is logged in.

    ``--audiences`` is passed where gcloud allows it (service-account logins and
    impersonation); for a user account gcloud refuses it, and the token's audience
    is gcloud's own OAuth client.
    """

    source = "gcloud"
    chooses_audience = False

    def __init__(self, executable: str, account: str | None) -> None:
        super().__init__()
        self.executable = executable
        self.email = account
        self._key = "gcloud"
        self.reason = f"gcloud CLI at {executable} (account {account or 'unknown'})"
        #: Whether gcloud accepts --audiences for this login; None until the first fetch.
        self._audiences: bool | None = None
        self._lock: asyncio.Lock | None = None

    @classmethod
    def detect(cls) -> tuple[GcloudIdentity | None, str]:
        """The gcloud CLI on PATH with an active account, or None and why not."""
        path = shutil.which("gcloud")
        if path is None:
            return None, "gcloud is not on PATH"
        try:
            result = subprocess.run(
                [path, "config", "get-value", "account"],
                capture_output=True,
                text=True,
                timeout=GCLOUD_TIMEOUT,
                stdin=subprocess.DEVNULL,
                env=_gcloud_env(),
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{path} config get-value account failed ({type(e).__name__})"
        account = result.stdout.strip()
        if result.returncode != 0 or not account or account == "(unset)":
            return None, f"gcloud at {path} has no active account"
        return cls(path, account), ""

    async def fetch(self, audience: str) -> Minted:
        # One gcloud at a time: concurrent runs contend for gcloud's credential store.
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._audiences is not False:
                code, out, err = await self._run("auth", "print-identity-token", f"--audiences={audience}")
                if code == 0:
                    self._audiences = True
                    self.chooses_audience = True
                    return self._parse(out)
                if "Invalid account type for `--audiences`" not in err:
                    raise _gcloud_failure(err, code)
                # A user account: gcloud only mints tokens for its own OAuth client.
                self._audiences = False
            code, out, err = await self._run("auth", "print-identity-token")
            if code != 0:
                raise _gcloud_failure(err, code)
            return self._parse(out)

    def _parse(self, out: str) -> Minted:
        try:
            return self._minted(out.strip())
        except ValueError as e:
            # Never echo what gcloud printed: it may be a token after all.
            raise CredentialError(
                f"gcloud auth print-identity-token printed something that is not a token ({e})",
                "run `gcloud auth print-identity-token` yourself to see what it prints",
            ) from None

    async def _run(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            self.executable,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_gcloud_env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), GCLOUD_TIMEOUT)
        except TimeoutError:
            raise CredentialError(
                f"`gcloud {args[0]} {args[1]}` did not finish within {GCLOUD_TIMEOUT:g} s",
                "run `gcloud auth print-identity-token` yourself: is it waiting for a reauthentication?",
            ) from None
        finally:
            # Timed out or cancelled (shutdown): no gcloud outlives the fetch.
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    def hint_for(self, error: BaseException) -> str | None:
        return getattr(error, "hint", None) or "run `gcloud auth print-identity-token` yourself to see gcloud's message"

    def audience_note(self, route_audience: str, token_audience: str | None) -> str | None:
        if token_audience == route_audience:
            return None
        return (
            f"gcloud's token for {self.email or 'the active account'} has audience {token_audience!r} "
            f"(gcloud's OAuth client), not {route_audience!r}: Cloud Run accepts it, but IAP and Cloud Functions "
            "or services with a custom audience will not (log gcloud in as, or impersonate, a service account "
            "to get --audiences)"
        )


def _gcloud_env() -> dict[str, str]:
    # Never wait for an answer on a terminal nobody is looking at.
    return {**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}


_GCLOUD_ERROR = re.compile(r"^ERROR:\s*(?:\([^)]*\)\s*)?(.*)$")
_GCLOUD_COMMAND = re.compile(r"\$\s*(gcloud [^\n]+)")


def _gcloud_failure(stderr: str, code: int) -> CredentialError:
    """gcloud's stderr as one reason line and one hint (what to run)."""
    stderr = redact(stderr)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    message = next((m.group(1) for line in lines if (m := _GCLOUD_ERROR.match(line))), None)
    if message is None:
        message = lines[-1] if lines else f"exit status {code}"
    command = _GCLOUD_COMMAND.search(stderr)
    if command:
        hint = f"run `{command.group(1).strip()}`"
    elif "reauth" in stderr.lower() or "login" in stderr.lower():
        hint = "run `gcloud auth login`"
    else:
        hint = "run `gcloud auth print-identity-token` yourself to see gcloud's full message"
    return CredentialError(f"gcloud auth print-identity-token failed: {message[:200]}", hint)


# --------------------------------------------------------------------------- static token
