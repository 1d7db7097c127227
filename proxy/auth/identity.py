"""Identity sources: who the proxy is, and how it mints an ID token for an audience.

Every source wraps the standard google-auth code path for its credential type
(or, for ``gcloud``, the gcloud CLI). google-auth is synchronous and its
credentials are not safe to refresh concurrently: ``Identity.fetch`` runs the
mint in a worker thread, one at a time for sources that share one credentials
object, so the event loop never blocks; the token cache (``tokens.py``) makes
sure only one fetch per (identity, audience) is in flight.

Each source is a module of its own (``service_account``, ``metadata``,
``impersonate``, ``user``, ``gcloud``, ``static``); ``adc`` finds Application
Default Credentials, and ``choose.build_identity`` turns a ``credentials:``
block into an identity, walking the default order for ``source: auto``.
Modules only some sources need are imported inside those sources.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CredentialError, redact

log = logging.getLogger(__name__)

#: Seconds any single call to a Google endpoint may take (google-auth's default is 120).
HTTP_TIMEOUT = 10.0
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
