"""Identity sources: who the proxy is, and how it mints an ID token for an audience.

Every source wraps the standard google-auth code path for its credential type.
google-auth is synchronous: ``Identity.fetch`` runs the mint in a worker thread
so the event loop never blocks, and the token cache (``tokens.py``) makes sure
only one fetch per (identity, audience) is in flight.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .config import Credentials
from .errors import CredentialError

log = logging.getLogger(__name__)

#: Seconds any single call to a Google endpoint may take (google-auth's default is 120).
HTTP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Minted:
    token: str
    exp: float  # the JWT's exp, seconds since the epoch
    aud: str | None


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
    claims = jwt_claims(token)
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)):
        raise ValueError("token has no numeric exp claim")
    aud = claims.get("aud")
    return Minted(token=token, exp=float(exp), aud=aud if isinstance(aud, str) else None)


def _request() -> Any:
    """A google-auth transport with a bounded default timeout."""
    import google.auth.transport.requests as gat
    import requests

    class BoundedRequest(gat.Request):
        def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            return super().__call__(*args, timeout=timeout or HTTP_TIMEOUT, **kwargs)

    return BoundedRequest(requests.Session())


class Identity(ABC):
    """One identity that can mint ID tokens."""

    #: Short name of the source, as in the config (``service_account``, ``metadata``, ...).
    source: str = ""
    #: Seconds before expiry at which a background refresh starts.
    refresh_margin: float = 300.0
    #: False where the token's audience is fixed by the source (user, gcloud, static).
    chooses_audience: bool = True

    def __init__(self) -> None:
        self.email: str | None = None
        #: Why this identity was chosen (for the startup report).
        self.reason: str = ""
        self._lock: asyncio.Lock | None = None

    @property
    def key(self) -> str:
        """Identifies this identity in the token cache key."""
        return f"{self.source}:{self.email or id(self)}"

    def describe(self) -> str:
        who = self.email or "unknown email"
        return f"{self.source} ({who})"

    async def fetch(self, audience: str) -> Minted:
        """Mint a token for ``audience`` off the event loop."""
        return await asyncio.to_thread(self._fetch_sync, audience)

    async def resolve(self) -> None:
        """Contact the source to learn what it can (email); errors are logged, not raised."""
        return None

    @abstractmethod
    def _fetch_sync(self, audience: str) -> Minted: ...


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
        self._transport = _request()

    def _fetch_sync(self, audience: str) -> Minted:
        creds = self._base.with_target_audience(audience)
        creds.refresh(self._transport)
        return minted(creds.token)


class MetadataIdentity(Identity):
    """The metadata server's identity endpoint (GCE, GKE, Cloud Run, Cloud Functions)."""

    source = "metadata"
    # The metadata server hands out its cached token until 4 minutes before expiry:
    # a refresh asked earlier would only return the same token.
    refresh_margin = 210.0

    def __init__(self) -> None:
        super().__init__()
        self._transport = _request()

    def _fetch_sync(self, audience: str) -> Minted:
        from google.auth import compute_engine

        # use_metadata_identity_endpoint=True: the default would sign through IAM signBlob.
        creds = compute_engine.IDTokenCredentials(None, audience, use_metadata_identity_endpoint=True)
        creds.refresh(self._transport)
        return minted(creds.token)

    async def resolve(self) -> None:
        def lookup() -> str | None:
            from google.auth.compute_engine import _metadata

            info = _metadata.get_service_account_info(self._transport)
            return info.get("email") if isinstance(info, dict) else None

        try:
            self.email = await asyncio.to_thread(lookup)
        except Exception as e:  # noqa: BLE001 - a failed lookup only loses the email in the report
            log.warning("metadata server: could not read the service account email: %s", type(e).__name__)


class StaticIdentity(Identity):
    """A token from an environment variable or a file (re-read when the file changes)."""

    source = "static"
    chooses_audience = False

    def __init__(self, token_env: str | None = None, token_file: str | None = None) -> None:
        super().__init__()
        self.token_env = token_env
        self.token_file = token_file
        self._mtime: float | None = None
        self._cached: Minted | None = None
        where = f"${token_env}" if token_env else token_file
        self.reason = f"token from {where}"
        self._read()  # a missing or malformed token is a startup error

    @property
    def key(self) -> str:
        return f"static:{self.token_env or self.token_file}"

    def describe(self) -> str:
        where = f"${self.token_env}" if self.token_env else self.token_file
        return f"static ({where}{', ' + self.email if self.email else ''})"

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
            self._mtime = mtime
            where = self.token_file
        value = value.removeprefix("Bearer ").strip()
        try:
            result = minted(value)
        except ValueError as e:
            raise CredentialError(f"the token in {where} is unusable: {e}") from None
        claims = jwt_claims(value)
        self.email = claims.get("email") if isinstance(claims.get("email"), str) else self.email
        self._cached = result
        return result

    def _fetch_sync(self, audience: str) -> Minted:
        return self._read()


def load_json_key(path: str) -> dict[str, Any]:
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


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text[:120]


def _metadata_available() -> bool:
    """Fast metadata-server detection: one short ping instead of google-auth's 3 x 3 s."""
    from google.auth.compute_engine import _metadata

    try:
        return bool(_metadata.ping(_request(), timeout=0.5, retry_count=1))
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


def build_identity(creds: Credentials) -> Identity:
    """Create the identity a credentials block names; raise CredentialError with a hint."""
    if creds.source == "service_account":
        assert creds.key_file
        return ServiceAccountIdentity(creds.key_file)
    if creds.source == "metadata":
        ident: Identity = MetadataIdentity()
        ident.reason = "source: metadata"
        return ident
    if creds.source == "static":
        return StaticIdentity(creds.token_env, creds.token_file)
    if creds.source == "auto":
        return _auto()
    raise CredentialError(f"credentials source {creds.source!r} is not supported yet")


def _auto() -> Identity:
    tried: list[str] = []
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        info = load_json_key(path)
        if info.get("type") == "service_account":
            ident: Identity = ServiceAccountIdentity(path, info)
            ident.reason = f"GOOGLE_APPLICATION_CREDENTIALS={path} (service account key)"
            return ident
        raise CredentialError(
            f"GOOGLE_APPLICATION_CREDENTIALS={path} has type {info.get('type')!r}, which cannot mint ID tokens",
        )
    tried.append("GOOGLE_APPLICATION_CREDENTIALS is not set")
    started = time.monotonic()
    if _metadata_available():
        ident = MetadataIdentity()
        ident.reason = "the metadata server answered"
        return ident
    tried.append(f"no metadata server answered ({time.monotonic() - started:.1f} s)")
    raise CredentialError(
        "no Google credentials found: " + "; ".join(tried),
        "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file",
    )
