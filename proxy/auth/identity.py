"""Identity sources: who the proxy is, and how it mints an ID token for an audience.

Every source wraps the standard google-auth code path for its credential type
(or, for ``gcloud``, the gcloud CLI). google-auth is synchronous and its
credentials are not safe to refresh concurrently: ``Identity.fetch`` runs the
mint in a worker thread, one at a time for sources that share one credentials
object, so the event loop never blocks; the token cache (``tokens.py``) makes
sure only one fetch per (identity, audience) is in flight.

``build_identity`` turns a ``credentials:`` block into an identity, and for
``source: auto`` walks the default order (see README "Identity"), recording
what it tried so the startup report can say why a source was or was not used.
Modules only some sources need are imported inside those sources.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Credentials
from ..errors import CredentialError, redact

log = logging.getLogger(__name__)

#: Seconds any single call to a Google endpoint may take (google-auth's default is 120).
HTTP_TIMEOUT = 10.0
#: Seconds a gcloud invocation may take before it is killed.
GCLOUD_TIMEOUT = 30.0
#: Seconds the metadata-server detection may take (google-auth's own ping: up to 3 x 3 s).
METADATA_PING_TIMEOUT = 0.5
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
ADC_FILE = "application_default_credentials.json"

_LOGIN_HINT = "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"


@dataclass(frozen=True)
class Minted:
    token: str
    exp: float  # the JWT's exp, seconds since the epoch
    aud: str | None
    email: str | None = None


def jwt_claims(token: str) -> dict[str, Any]:
    """Decode a JWT's payload without verifying it (we only read exp/aud/email)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (IndexError, ValueError) as e:
        # The message must not carry the token itself.
        raise ValueError(f"not a JWT ({type(e).__name__})") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT (payload is not an object)")
    return claims


def minted(token: str) -> Minted:
    """A token with its ``exp``, ``aud`` and ``email`` read from the JWT (unverified)."""
    claims = jwt_claims(token)
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise ValueError("token has no numeric exp claim")
    aud = claims.get("aud")
    email = claims.get("email")
    return Minted(
        token=token,
        exp=float(exp),
        aud=aud if isinstance(aud, str) else None,
        email=email if isinstance(email, str) else None,
    )


def _request() -> Any:
    """A google-auth transport with a bounded default timeout."""
    import google.auth.transport.requests as gat
    import requests

    class BoundedRequest(gat.Request):
        def __call__(
            self, url: str, method: str = "GET", body: Any = None, headers: Any = None, timeout: float | None = None, **kwargs: Any
        ) -> Any:
            return super().__call__(  # type: ignore[no-untyped-call]
                url, method=method, body=body, headers=headers, timeout=timeout or HTTP_TIMEOUT, **kwargs
            )

    return BoundedRequest(requests.Session())


class _Transport:
    """One google-auth transport per worker thread: a requests.Session is not thread-safe."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = _request()
        return request


class Identity:
    """One identity that can mint ID tokens."""

    #: Short name of the source, as in the config (``service_account``, ``metadata``, ...).
    source: str = ""
    #: Seconds before expiry at which a background refresh starts.
    refresh_margin: float = 300.0
    #: False where the token's audience is fixed by the source (user, gcloud, static).
    chooses_audience: bool = True
    #: Seconds between cheap ``changed()`` checks (a token file); None: never polled.
    poll_interval: float | None = None
    #: Fetches share one google-auth credentials object, which must not refresh concurrently.
    serial: bool = False

    def __init__(self) -> None:
        self.email: str | None = None
        #: Why this identity was chosen (for the startup report).
        self.reason: str = ""
        #: What ``auto`` tried before (and instead of) this one, one line each.
        self.tried: list[str] = []
        self._key: str | None = None
        self._thread_lock = threading.Lock()
        self._transport = _Transport()

    @property
    def key(self) -> str:
        """Identifies this identity in the token cache key."""
        return self._key or f"{self.source}:{id(self):x}"

    def describe(self) -> str:
        """``source (email)``: safe for logs and status pages."""
        who = self.email or "unknown email"
        return f"{self.source} ({who})"

    def report(self) -> list[str]:
        """Startup-report lines: what was picked and why, and what was not."""
        lines = [f"using {self.describe()}" + (f": {self.reason}" if self.reason else "")]
        lines += [f"not used: {t}" for t in self.tried]
        return lines

    async def fetch(self, audience: str) -> Minted:
        """Mint a token for ``audience`` off the event loop."""
        return await asyncio.to_thread(self._fetch_in_thread, audience)

    def _fetch_in_thread(self, audience: str) -> Minted:
        if not self.serial:
            return self._fetch_sync(audience)
        # A thread lock, not an asyncio one: a fetch the cache stopped waiting for
        # still holds it until google-auth returns, so refreshes never overlap.
        with self._thread_lock:
            return self._fetch_sync(audience)

    def _fetch_sync(self, audience: str) -> Minted:
        raise NotImplementedError(f"{type(self).__name__} implements fetch() itself")

    def _minted(self, token: str | None) -> Minted:
        if not token:
            raise ValueError(f"{self.describe()}: google-auth returned no token")
        m = minted(token)
        if m.email and not self.email:
            self.email = m.email
        return m

    async def resolve(self) -> None:
        """Contact the source to learn what it can (email); errors are logged, not raised."""
        return None

    def changed(self) -> bool:
        """Whether the source has a new token since the last fetch (polled every ``poll_interval``)."""
        return False

    def hint_for(self, error: BaseException) -> str | None:
        """What a user can do about a failed fetch."""
        text = str(error)
        if "invalid_grant" in text:
            return "the credential was refused (revoked key or expired login?): create a new key or run `gcloud auth application-default login`"
        if "TransportError" in type(error).__name__ or "Connection" in text or "timed out" in text:
            return "the token endpoint did not answer: check the network (and HTTPS_PROXY)"
        if getattr(error, "retryable", False):
            return "Google's token endpoint is failing; the proxy keeps retrying with backoff (check the network, HTTPS_PROXY, or Google Cloud status)"
        return None

    def expired_hint(self) -> str | None:
        """Hint for a source that handed back a token that is already expired."""
        return "check this machine's clock"

    def audience_note(self, route_audience: str, token_audience: str | None) -> str | None:
        """A warning when the token's audience differs from the route's (sources that do not choose it)."""
        if token_audience == route_audience:
            return None
        return (
            f"the token from {self.describe()} has audience {token_audience!r}, not the route's {route_audience!r}: "
            "the upstream refuses it unless it accepts that audience"
        )


# --------------------------------------------------------------------------- service account


class ServiceAccountIdentity(Identity):
    """A service-account key file: a self-signed JWT exchanged at its token_uri."""

    source = "service_account"

    def __init__(self, key_file: str, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.key_file = key_file
        self.info = info if info is not None else load_json_key(key_file)
        if self.info.get("type") != "service_account":
            raise CredentialError(
                f"{key_file} is a {self.info.get('type')!r} credential, not a service-account key",
                "point key_file at a JSON key of a service account (\"type\": \"service_account\")",
            )
        from google.oauth2 import service_account

        try:
            # Parsed once at startup so a malformed key is a startup error.
            self._base = service_account.IDTokenCredentials.from_service_account_info(
                self.info, target_audience="https://startup-check.invalid"
            )
        except (ValueError, KeyError) as e:
            raise CredentialError(
                f"{key_file}: not a usable service-account key ({type(e).__name__}: {_short(e)})",
                "download a new JSON key: gcloud iam service-accounts keys create KEY.json --iam-account=SA_EMAIL",
            ) from None
        self.email = self.info.get("client_email")
        self._key = f"service_account:{self.email}"
        self.reason = f"key file {key_file}"

    def _fetch_sync(self, audience: str) -> Minted:
        # A new credentials object per audience: nothing shared, so no lock needed.
        creds = self._base.with_target_audience(audience)
        creds.refresh(self._transport.get())
        return self._minted(creds.token)


# --------------------------------------------------------------------------- metadata server


class MetadataIdentity(Identity):
    """The metadata server's identity endpoint (GCE, GKE, Cloud Run, Cloud Functions)."""

    source = "metadata"
    # The metadata server hands out its cached token until 4 minutes before expiry:
    # a refresh asked earlier would only return the same token.
    refresh_margin = 210.0

    def __init__(self) -> None:
        super().__init__()
        self._key = "metadata"
        self.reason = "the metadata server"

    def _fetch_sync(self, audience: str) -> Minted:
        from google.auth import compute_engine

        # use_metadata_identity_endpoint=True: the default would sign through IAM signBlob.
        # format=full is google-auth's default for this endpoint.
        creds = compute_engine.IDTokenCredentials(None, audience, use_metadata_identity_endpoint=True)
        creds.refresh(self._transport.get())
        return self._minted(creds.token)

    async def resolve(self) -> None:
        def lookup() -> str | None:
            response = self._transport.get()(
                url=f"{metadata_root()}/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
                method="GET",
                headers=_METADATA_HEADERS,
            )
            if response.status != 200:
                return None
            info = json.loads(response.data)
            return info.get("email") if isinstance(info, dict) else None

        try:
            self.email = await asyncio.to_thread(lookup)
        except Exception as e:  # noqa: BLE001 - a failed lookup only loses the email in the report
            log.warning("metadata server: could not read the service account email: %s", type(e).__name__)

    def hint_for(self, error: BaseException) -> str | None:
        return "is the metadata server reachable? Off Google Cloud, use a key file or `gcloud auth application-default login`"


# --------------------------------------------------------------------------- impersonation


class ImpersonateIdentity(Identity):
    """A service account impersonated through IAM Credentials ``generateIdToken``.

    The caller is ``source_creds``: Application Default Credentials (a user login,
    a key, the metadata server, or a workload identity federation config), or the
    source inside an ``impersonated_service_account`` file.
    """

    source = "impersonate"
    # One source credentials object (its access token) is shared by every audience.
    serial = True

    def __init__(self, target_credentials: Any, target: str, delegates: tuple[str, ...], via: str) -> None:
        super().__init__()
        self._target = target_credentials
        #: The impersonated account's access-token credentials (also used to look services up).
        self.target_credentials = target_credentials
        self.email = target
        self.delegates = delegates
        self.via = via
        self._key = "impersonate:" + ">".join((*delegates, target))
        self.reason = f"impersonating {target} as {via}"

    @classmethod
    def from_config(cls, target: str, delegates: tuple[str, ...] = ()) -> ImpersonateIdentity:
        """Impersonate ``target`` with Application Default Credentials as the caller."""
        from google.auth import impersonated_credentials

        source_creds, via = adc_source()
        creds = impersonated_credentials.Credentials(
            source_credentials=source_creds,
            target_principal=target,
            target_scopes=[CLOUD_PLATFORM_SCOPE],
            delegates=list(delegates),
        )
        return cls(creds, target, delegates, via)

    @classmethod
    def from_file(cls, path: str, info: dict[str, Any]) -> ImpersonateIdentity:
        """An ``impersonated_service_account`` file (``gcloud auth application-default login --impersonate-service-account``)."""
        from google.auth import impersonated_credentials

        try:
            creds = impersonated_credentials.Credentials.from_impersonated_service_account_info(
                info, scopes=[CLOUD_PLATFORM_SCOPE]
            )
        except (ValueError, KeyError) as e:
            raise CredentialError(
                f"{path}: not usable impersonation credentials ({_short(e)})",
                "run `gcloud auth application-default login --impersonate-service-account=SA_EMAIL` again",
            ) from None
        target = str(creds.service_account_email)
        source_type = (info.get("source_credentials") or {}).get("type", "unknown")
        return cls(creds, target, tuple(info.get("delegates") or ()), f"the {source_type} credentials in {path}")

    def describe(self) -> str:
        return f"impersonate ({self.email})"

    def _fetch_sync(self, audience: str) -> Minted:
        from google.auth import impersonated_credentials

        # include_email: Cloud Run does not need it, but people reading logs and
        # upstreams that check the caller do.
        creds = impersonated_credentials.IDTokenCredentials(self._target, target_audience=audience, include_email=True)
        creds.refresh(self._transport.get())
        return self._minted(creds.token)

    def hint_for(self, error: BaseException) -> str | None:
        text = str(error)
        if "403" in text or "PERMISSION_DENIED" in text or "getOpenIdToken" in text:
            return (
                f"the caller ({self.via}) may not mint tokens for {self.email}: grant it "
                f"roles/iam.serviceAccountOpenIdTokenCreator on {self.email}"
                + (" (and on each delegate)" if self.delegates else "")
            )
        return super().hint_for(error)


# --------------------------------------------------------------------------- user login


class UserIdentity(Identity):
    """A gcloud application-default user login: refresh it and use the returned ``id_token``.

    The token's audience is the OAuth client of the login (not the route's): Cloud
    Run accepts such tokens, IAP and services that check a custom audience do not.
    """

    source = "user"
    chooses_audience = False
    serial = True

    def __init__(self, path: str, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = path
        self._key = f"user:{path}"
        self.reason = f"user login in {path}"
        self._load(info)

    def _load(self, info: dict[str, Any] | None = None) -> None:
        from google.oauth2 import credentials as oauth2_credentials

        self._mtime = _mtime(self.path)
        info = info if info is not None else load_json_key(self.path)
        if info.get("type") != "authorized_user":
            raise CredentialError(
                f"{self.path} is a {info.get('type')!r} credential, not a user login",
                "run `gcloud auth application-default login`",
            )
        try:
            # from_authorized_user_info always uses Google's token endpoint.
            self._creds = oauth2_credentials.Credentials.from_authorized_user_info(info)
        except ValueError as e:
            raise CredentialError(
                f"{self.path}: not a usable user login ({_short(e)})", "run `gcloud auth application-default login`"
            ) from None
        self.client_id = info.get("client_id")

    def describe(self) -> str:
        return f"user ({self.email or self.path})"

    def _fetch_sync(self, audience: str) -> Minted:
        # A new `gcloud auth application-default login` rewrites the file: use it without a restart.
        mtime = _mtime(self.path)
        if mtime is not None and mtime != self._mtime:
            log.info("%s changed: reloading the user login", self.path)
            self._load()
        self._creds.refresh(self._transport.get())
        token = getattr(self._creds, "id_token", None)
        if not token:
            raise CredentialError(
                f"refreshing the login in {self.path} returned no ID token (the login lacks the openid scope)",
                "run `gcloud auth application-default login` again",
            )
        return self._minted(token)

    def hint_for(self, error: BaseException) -> str | None:
        text = str(error)
        if "invalid_grant" in text or "invalid_client" in text or "reauth" in text.lower():
            return "the login was refused (expired or revoked): run `gcloud auth application-default login`"
        return super().hint_for(error)

    def audience_note(self, route_audience: str, token_audience: str | None) -> str | None:
        if token_audience == route_audience:
            return None
        return (
            f"the user token's audience is the OAuth client {token_audience!r}, not {route_audience!r}: "
            "Cloud Run accepts it, but IAP and Cloud Functions or services with a custom audience will not "
            "(use source: impersonate with a service account for those)"
        )


# --------------------------------------------------------------------------- gcloud CLI


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


def load_json_key(path: str) -> dict[str, Any]:
    """A credentials JSON file as a dict; CredentialError (with a hint) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except OSError as e:
        raise CredentialError(
            f"cannot read credentials file {path}: {e.strerror}",
            "check the path, or run `gcloud auth application-default login`",
        ) from None
    except ValueError:
        raise CredentialError(
            f"credentials file {path} is not valid JSON",
            "point it at a service-account key or an application-default credentials file",
        ) from None
    if not isinstance(info, dict):
        raise CredentialError(f"credentials file {path} is not a JSON object")
    return info


def gcloud_adc_path() -> Path:
    """Where ``gcloud auth application-default login`` writes its credentials."""
    config = os.environ.get("CLOUDSDK_CONFIG")
    if config:
        return Path(config) / ADC_FILE
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", Path.home())) / "gcloud" / ADC_FILE
    return Path.home() / ".config" / "gcloud" / ADC_FILE


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return redact(text[:120])


_METADATA_HEADERS = {"Metadata-Flavor": "Google"}


def metadata_root(ping: bool = False) -> str:
    """The metadata server's base URL, from the variables google-auth reads (GCE_METADATA_HOST, _IP)."""
    if ping:
        return "http://" + os.environ.get("GCE_METADATA_IP", "169.254.169.254")
    return "http://" + os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")


def _metadata_available() -> bool:
    """Fast metadata-server detection: one short ping instead of google-auth's 3 x 3 s.

    The same check as google-auth's: the server answers its root with
    ``Metadata-Flavor: Google``.
    """
    try:
        response = _request()(url=metadata_root(ping=True), method="GET", headers=_METADATA_HEADERS, timeout=METADATA_PING_TIMEOUT)
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False
    return bool(response.status == 200 and response.headers.get("Metadata-Flavor") == "Google")


def _external_account_hint(info: dict[str, Any]) -> str:
    url = str(info.get("service_account_impersonation_url") or "")
    m = re.search(r"serviceAccounts/([^/:]+):generateAccessToken", url)
    target = m.group(1) if m else "SA_EMAIL"
    return (
        f"set credentials: {{source: impersonate, service_account: {target}}}; the federated identity "
        f"needs roles/iam.serviceAccountOpenIdTokenCreator on {target}"
    )


def _identity_from_file(path: str, info: dict[str, Any], where: str) -> Identity:
    """The identity a credentials file of any supported type stands for."""
    kind = info.get("type")
    if kind == "service_account":
        return ServiceAccountIdentity(path, info)
    if kind == "authorized_user":
        return UserIdentity(path, info)
    if kind == "impersonated_service_account":
        return ImpersonateIdentity.from_file(path, info)
    if kind == "external_account":
        # A federated identity has no ID token of its own: only a service account it
        # impersonates can have one, and which one is a choice the config must make.
        raise CredentialError(
            f"{where} is a workload identity federation config (external_account), which cannot mint ID tokens by itself",
            _external_account_hint(info),
        )
    raise CredentialError(
        f"{where} has type {kind!r}, which cannot mint ID tokens",
        "use a service-account key, a `gcloud auth application-default login` file, or set credentials.source",
    )


def adc_source() -> tuple[Any, str]:
    """Application Default Credentials, as the caller of an impersonation: (credentials, description).

    The order of ``google.auth.default()`` without its slow parts (a 3 x 3 s
    metadata ping, a gcloud subprocess for the project id): the file named by
    GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default file, the
    metadata server.
    """
    tried: list[str] = []
    env_path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env_path:
        return source_from_file(env_path, load_json_key(env_path)), f"GOOGLE_APPLICATION_CREDENTIALS={env_path}"
    tried.append("GOOGLE_APPLICATION_CREDENTIALS is not set")
    adc = gcloud_adc_path()
    if adc.is_file():
        return source_from_file(str(adc), load_json_key(str(adc))), f"gcloud application-default credentials {adc}"
    tried.append(f"no gcloud application-default credentials at {adc}")
    if _metadata_available():
        from google.auth import compute_engine

        return compute_engine.Credentials(), "the metadata server's service account"
    tried.append(f"no metadata server answered within {METADATA_PING_TIMEOUT:g} s")
    raise CredentialError(
        "impersonation needs credentials to call IAM with, and none were found: " + "; ".join(tried),
        "run `gcloud auth application-default login` as someone allowed to impersonate the service account",
    )


def source_from_file(path: str, info: dict[str, Any]) -> Any:
    """Access-token credentials (cloud-platform scope) from a credentials file of any type."""
    scopes = [CLOUD_PLATFORM_SCOPE]
    kind = info.get("type")
    try:
        if kind == "service_account":
            from google.oauth2 import service_account

            return service_account.Credentials.from_service_account_info(info, scopes=scopes)
        if kind == "authorized_user":
            from google.oauth2 import credentials as oauth2_credentials

            return oauth2_credentials.Credentials.from_authorized_user_info(info, scopes=scopes)
        if kind == "impersonated_service_account":
            from google.auth import impersonated_credentials

            return impersonated_credentials.Credentials.from_impersonated_service_account_info(info, scopes=scopes)
        if kind == "external_account":
            return _external_account(info, scopes)
        if kind == "external_account_authorized_user":
            from google.auth import external_account_authorized_user

            return external_account_authorized_user.Credentials.from_info(info)
    except (ValueError, KeyError) as e:
        raise CredentialError(f"{path}: not usable {kind} credentials ({_short(e)})") from None
    raise CredentialError(f"{path} has type {kind!r}, which cannot call IAM")


def _external_account(info: dict[str, Any], scopes: list[str]) -> Any:
    # The same dispatch as google.auth._default, without its project-id lookup.
    if info.get("subject_token_type") == "urn:ietf:params:aws:token-type:aws4_request":
        from google.auth import aws

        return aws.Credentials.from_info(info, scopes=scopes)
    if (info.get("credential_source") or {}).get("executable") is not None:
        from google.auth import pluggable

        return pluggable.Credentials.from_info(info, scopes=scopes)
    from google.auth import identity_pool

    return identity_pool.Credentials.from_info(info, scopes=scopes)


# --------------------------------------------------------------------------- building


def build_identity(creds: Credentials) -> Identity:
    """Create the identity a credentials block names; raise CredentialError with a hint."""
    if creds.source == "service_account":
        assert creds.key_file
        return ServiceAccountIdentity(creds.key_file)
    if creds.source == "metadata":
        return MetadataIdentity()
    if creds.source == "static":
        return StaticIdentity(creds.token_env, creds.token_file)
    if creds.source == "impersonate":
        assert creds.service_account
        return ImpersonateIdentity.from_config(creds.service_account, creds.delegates)
    if creds.source == "user":
        return _user()
    if creds.source == "gcloud":
        ident, why = GcloudIdentity.detect()
        if ident is None:
            raise CredentialError(
                f"credentials source gcloud: {why}",
                "run `gcloud auth login`" if "account" in why else "install the Google Cloud CLI, or choose another credentials source",
            )
        return ident
    if creds.source == "auto":
        return _auto()
    raise CredentialError(f"credentials source {creds.source!r} is not supported")


def _user() -> Identity:
    env_path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env_path:
        info = load_json_key(env_path)
        if info.get("type") == "authorized_user":
            return UserIdentity(env_path, info)
    adc = gcloud_adc_path()
    if not adc.is_file():
        raise CredentialError(
            f"credentials source user: no gcloud application-default login at {adc}",
            "run `gcloud auth application-default login`",
        )
    return UserIdentity(str(adc))


def _auto() -> Identity:
    """The first usable source in the default order, with what was tried before it."""
    tried: list[str] = []
    later = ["gcloud's application-default credentials", "the metadata server", "the gcloud CLI"]

    def picked(ident: Identity, reason: str, skipped: list[str]) -> Identity:
        ident.reason = reason
        ident.tried = tried + [f"{s} (later in the auto order)" for s in skipped]
        return ident

    env_path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env_path:
        # An explicit setting that does not work is an error, not a reason to guess further.
        info = load_json_key(env_path)
        ident = _identity_from_file(env_path, info, f"GOOGLE_APPLICATION_CREDENTIALS={env_path}")
        return picked(ident, f"GOOGLE_APPLICATION_CREDENTIALS={env_path} ({info.get('type')})", later)
    tried.append("GOOGLE_APPLICATION_CREDENTIALS is not set")

    adc = gcloud_adc_path()
    if adc.is_file():
        info = load_json_key(str(adc))
        ident = _identity_from_file(str(adc), info, f"gcloud's application-default credentials {adc}")
        return picked(ident, f"gcloud application-default credentials {adc} ({info.get('type')})", later[1:])
    tried.append(f"no gcloud application-default credentials at {adc}")

    started = time.monotonic()
    if _metadata_available():
        return picked(MetadataIdentity(), "the metadata server answered", later[2:])
    tried.append(f"no metadata server answered ({time.monotonic() - started:.1f} s)")

    gcloud, why = GcloudIdentity.detect()
    if gcloud is not None:
        return picked(gcloud, f"gcloud CLI at {gcloud.executable} logged in as {gcloud.email}", [])
    tried.append(why)
    raise CredentialError(
        "no Google credentials found: " + "; ".join(tried),
        _LOGIN_HINT if "no active account" not in why else "run `gcloud auth application-default login` (or `gcloud auth login`)",
    )
