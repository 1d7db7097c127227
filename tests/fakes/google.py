"""FakeGoogle: the Google endpoints google-auth talks to, on one loopback port.

One aiohttp app serves:

- ``POST /token``: OAuth 2.0 token endpoint (service-account JWT-bearer grant,
  authorized_user refresh grant). Key files point here through ``token_uri``.
- ``GET /`` and ``/computeMetadata/v1/...``: the metadata server (point
  ``GCE_METADATA_HOST`` and ``GCE_METADATA_IP`` at ``127.0.0.1:PORT``).
- ``POST /v1/projects/-/serviceAccounts/{email}:generateIdToken``: IAM
  Credentials (patch ``google.auth.iam._IAM_IDTOKEN_ENDPOINT`` to
  :attr:`FakeGoogle.iam_idtoken_endpoint`).
- ``POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken``: an
  impersonated access token (patch ``google.auth.iam._IAM_ENDPOINT`` to
  :attr:`FakeGoogle.iam_access_token_endpoint`).

Every access token records the scopes it was issued for (:meth:`caller`), so
a fake Google API can refuse one without the scope it needs.
- ``GET /certs`` (and ``/oauth2/v1/certs``): ``{kid: PEM certificate}``.
- ``GET /mint?audience=A[&email=E&azp=Z&include_email=0]``: a token for the gcloud stub.
- ``GET /mint-access?email=E``: an access token (cloud-platform) for the gcloud stub.

Wire details follow the real services as read from google-auth 2.63 and
gcloud 528 (see /work/shared/notes/google-auth.md).  Fault injection and
counters are per *endpoint name*: ``"token"``, ``"metadata"`` (everything under
``/computeMetadata/``), ``"ping"`` (``GET /``), ``"iam"``, ``"certs"``, ``"mint"``.

Metadata identity caching: like the real server, ``.../identity`` returns the
token it cached for (email, audience, format) until 4 minutes before that
token's ``exp``.  With :attr:`FakeGoogle.token_lifetime` <= 240 s a cached
token is always inside that window, so every call mints a new one.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import google.auth.exceptions
import google.auth.jwt
from aiohttp import web

from .keys import (
    KeyPair,
    google_signing_key,
    key_pair,
    project_of,
    service_account_info,
    sign_jwt,
    unique_id,
    untrusted_key,
    unverified_claims,
)
from .server import BackgroundServer

ENDPOINTS = ("token", "metadata", "ping", "iam", "certs", "mint")

GOOGLE_ISSUER = "https://accounts.google.com"
#: The ``aud`` google-auth puts in every JWT-bearer assertion, whatever token_uri says.
TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: gcloud CLI's OAuth client: ``aud`` of ``gcloud auth print-identity-token`` user tokens.
GCLOUD_CLIENT_ID = "32555940559.apps.googleusercontent.com"
#: ``gcloud auth application-default login``'s OAuth client: ``aud`` of ADC user tokens.
ADC_CLIENT_ID = "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com"
DEFAULT_USER_EMAIL = "developer@example.com"
DEFAULT_PROJECT = "fake-project"
DEFAULT_PROJECT_NUMBER = "123456789012"
#: The shape of a real default compute service account.
DEFAULT_METADATA_EMAIL = f"{DEFAULT_PROJECT_NUMBER}-compute@developer.gserviceaccount.com"
DEFAULT_TOKEN_LIFETIME = 3600
ACCESS_TOKEN_LIFETIME = 3600
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
USER_SCOPES = f"openid https://www.googleapis.com/auth/userinfo.email {CLOUD_PLATFORM_SCOPE}"
#: The real metadata server hands out its cached ID token until this long before exp.
METADATA_CACHE_MARGIN = 240

_METADATA_ROOT = "/computeMetadata/v1/"
_SA_PREFIX = "instance/service-accounts/"
_IAM_DENIED = (
    "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist)."
)
_IAM_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential."
)


@dataclass
class _Fault:
    status: int
    remaining: int | None


@dataclass
class _Hang:
    seconds: float
    remaining: int | None


@dataclass(frozen=True)
class _ServiceAccount:
    email: str
    key: KeyPair
    info: dict[str, str]


@dataclass(frozen=True)
class _User:
    email: str
    client_id: str
    client_secret: str
    refresh_token: str


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _api_error(status: int, state: str, message: str) -> web.Response:
    """A Google API (IAM Credentials) error body."""
    return web.json_response(
        {"error": {"code": status, "message": message, "status": state}}, status=status
    )


def _metadata_text(
    text: str, status: int = 200, content_type: str = "application/text"
) -> web.Response:
    return web.Response(
        text=text, status=status, content_type=content_type, headers={"Metadata-Flavor": "Google"}
    )


class FakeGoogle:
    """The Google token, metadata, IAM Credentials and certs endpoints on one port.

    Controls are thread-safe and meant to be called from the test thread while
    the server runs on its own loop.
    """

    def __init__(self, sock: socket.socket | None = None, port: int = 0) -> None:
        self._lock = threading.Lock()
        #: Requests that arrived per endpoint name (including failed and refused ones).
        self.calls: Counter[str] = Counter()
        #: Requests per ``(endpoint, audience)`` for the token-minting endpoints.
        self.calls_by_audience: Counter[tuple[str, str]] = Counter()
        #: Every token and refresh token handed out, oldest first; never cleared (not
        #: even by reset()), so a test can check none of its own reached a log.
        self.issued: list[str] = []
        self._heal_generation = 0
        self._set_defaults()
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_get("/certs", self._certs)
        app.router.add_get("/oauth2/v1/certs", self._certs)
        app.router.add_get("/mint", self._mint)
        app.router.add_get("/mint-access", self._mint_access)
        app.router.add_get("/", self._ping)
        app.router.add_route("*", _METADATA_ROOT + "{path:.*}", self._metadata)
        app.router.add_post(
            "/v1/projects/-/serviceAccounts/{email}:generateIdToken", self._generate_id_token
        )
        app.router.add_post(
            "/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
            self._generate_access_token,
        )
        self._server = BackgroundServer(app, port=port, sock=sock)

    def _set_defaults(self) -> None:
        # Everything reset() restores; counters are cleared in place so that
        # references a test holds to them stay valid.
        self.calls.clear()
        self.calls_by_audience.clear()
        #: ``exp - iat`` of every ID token minted from now on.
        self.token_lifetime: int = DEFAULT_TOKEN_LIFETIME
        #: The identity of the fake metadata server.
        self.metadata_email: str = DEFAULT_METADATA_EMAIL
        self.metadata_scopes: list[str] = [CLOUD_PLATFORM_SCOPE]
        self._service_accounts: dict[str, _ServiceAccount] = {}
        self._users: dict[str, _User] = {}
        self._access_tokens: dict[str, tuple[str, float]] = {}
        self._access_scopes: dict[str, tuple[str, ...]] = {}
        self._impersonators: dict[str, set[str]] = {}
        self._faults: dict[str, _Fault] = {}
        self._hangs: dict[str, _Hang] = {}
        self._heal_generation += 1  # releases requests hanging right now
        self._identity_cache: dict[tuple[str, str, str], tuple[str, int]] = {}

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Self:
        """Start serving (blocks until listening)."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self._server.url

    @property
    def token_uri(self) -> str:
        """The fake token endpoint, as written into key files."""
        return f"{self.url}/token"

    @property
    def certs_url(self) -> str:
        return f"{self.url}/certs"

    @property
    def metadata_host(self) -> str:
        """``127.0.0.1:PORT``: the value for ``GCE_METADATA_HOST`` / ``GCE_METADATA_IP``."""
        return f"127.0.0.1:{self.port}"

    @property
    def iam_access_token_endpoint(self) -> str:
        """Replacement for ``google.auth.iam._IAM_ENDPOINT`` (generateAccessToken template)."""
        return f"{self.url}/v1/projects/-/serviceAccounts/{{}}:generateAccessToken"

    @property
    def iam_idtoken_endpoint(self) -> str:
        """Replacement for ``google.auth.iam._IAM_IDTOKEN_ENDPOINT`` (a ``str.format`` template)."""
        return f"{self.url}/v1/projects/-/serviceAccounts/{{}}:generateIdToken"

    # -- controls ------------------------------------------------------------

    def reset(self) -> None:
        """Forget registrations, faults, counters and caches; restore default settings."""
        with self._lock:
            self._set_defaults()

    def register_service_account(self, email: str) -> dict[str, str]:
        """Register a service account; returns its JSON key (token_uri = this fake)."""
        key = key_pair(f"sa:{email}")
        info = service_account_info(email, self.token_uri, key)
        with self._lock:
            self._service_accounts[email] = _ServiceAccount(email, key, info)
        return dict(info)

    def write_key_file(self, path: str | Path, email: str) -> Path:
        """Register ``email`` (if needed) and write its JSON key file to ``path``."""
        with self._lock:
            known = self._service_accounts.get(email)
        info = dict(known.info) if known else self.register_service_account(email)
        path = Path(path)
        path.write_text(json.dumps(info, indent=2))
        return path

    def register_user(
        self,
        email: str = DEFAULT_USER_EMAIL,
        client_id: str = ADC_CLIENT_ID,
        client_secret: str = "fake-client-secret",
        refresh_token: str | None = None,
    ) -> dict[str, str]:
        """Register a user login; returns the ``authorized_user`` info (gcloud ADC format)."""
        if not refresh_token:
            refresh_token = f"1//fake-refresh-{secrets.token_urlsafe(16)}"
            self.issued.append(refresh_token)
        with self._lock:
            self._users[refresh_token] = _User(email, client_id, client_secret, refresh_token)
        return {
            "account": "",
            "client_id": client_id,
            "client_secret": client_secret,
            "quota_project_id": DEFAULT_PROJECT,
            "refresh_token": refresh_token,
            "type": "authorized_user",
            "universe_domain": "googleapis.com",
        }

    def write_authorized_user_file(
        self, path: str | Path, email: str = DEFAULT_USER_EMAIL, **kwargs: Any
    ) -> Path:
        """Register a user (see :meth:`register_user`) and write its ADC file to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.register_user(email, **kwargs), indent=2))
        return path

    def allow_impersonation(self, target_email: str, caller_email: str) -> None:
        """Grant ``caller_email`` Token Creator on ``target_email``."""
        with self._lock:
            self._impersonators.setdefault(target_email, set()).add(caller_email)

    def issue_access_token(
        self,
        email: str,
        lifetime: int = ACCESS_TOKEN_LIFETIME,
        scopes: tuple[str, ...] | str | None = None,
    ) -> str:
        """An access token for ``email`` that the fake IAM accepts, for ``scopes``."""
        token = f"ya29.fake-{secrets.token_urlsafe(24)}"
        if isinstance(scopes, str):
            scopes = tuple(scopes.replace(",", " ").split())
        with self._lock:
            self._access_tokens[token] = (email, time.time() + lifetime)
            self._access_scopes[token] = tuple(scopes or ())
            self.issued.append(token)
        return token

    def caller(self, authorization: str) -> tuple[str, tuple[str, ...]] | None:
        """(email, scopes) behind ``Authorization: Bearer ACCESS_TOKEN``, or None if unknown/expired."""
        email = self._caller(authorization)
        if email is None:
            return None
        token = authorization.partition(" ")[2]
        with self._lock:
            scopes = self._access_scopes.get(token, ())
        return email, scopes

    def fail(self, endpoint: str, status: int = 503, count: int | None = None) -> None:
        """Answer ``status`` on ``endpoint`` for the next ``count`` calls (None: until heal)."""
        self._check_endpoint(endpoint)
        with self._lock:
            self._faults[endpoint] = _Fault(status, count)

    def hang(self, endpoint: str, seconds: float, count: int | None = None) -> None:
        """Delay each call to ``endpoint`` by ``seconds`` (cut short by :meth:`heal`)."""
        self._check_endpoint(endpoint)
        with self._lock:
            self._hangs[endpoint] = _Hang(seconds, count)

    def heal(self) -> None:
        """Remove all faults and hangs, and release requests hanging right now."""
        with self._lock:
            self._faults.clear()
            self._hangs.clear()
            self._heal_generation += 1

    @staticmethod
    def _check_endpoint(endpoint: str) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")

    # -- tokens --------------------------------------------------------------

    def certs(self) -> dict[str, str]:
        """``{kid: PEM certificate}`` of the Google signing key, as ``/certs`` serves it."""
        key = google_signing_key()
        return {key.kid: key.cert_pem}

    def mint(
        self,
        aud: str,
        email: str | None = DEFAULT_USER_EMAIL,
        lifetime: int | None = None,
        kid: str | None = None,
        *,
        iat: int | None = None,
        sub: str | None = None,
        azp: str | None = None,
        key: KeyPair | None = None,
        **claims: Any,
    ) -> str:
        """A Google-signed ID token for ``aud``.

        ``email=None`` leaves out ``email``/``email_verified`` (IAM without
        includeEmail).  ``sub`` defaults to a stable id derived from the email;
        ``azp`` defaults to ``sub`` (service-account tokens) and is the OAuth
        client id for user tokens.  Extra keyword arguments become claims.
        """
        now = int(time.time()) if iat is None else iat
        lifetime = self.token_lifetime if lifetime is None else lifetime
        sub = sub or unique_id(email or aud)
        payload: dict[str, Any] = {"aud": aud, "azp": azp or sub}
        if email is not None:
            payload.update(email=email, email_verified=True)
        payload.update(exp=now + lifetime, iat=now, iss=GOOGLE_ISSUER, sub=sub)
        payload.update(claims)
        token = sign_jwt(payload, key or google_signing_key(), kid=kid)
        self.issued.append(token)  # list.append is atomic; callers may hold self._lock
        return token

    def expired_token(self, aud: str, email: str | None = DEFAULT_USER_EMAIL) -> str:
        """A correctly signed token for ``aud`` that expired a minute ago."""
        lifetime = self.token_lifetime
        return self.mint(aud, email, lifetime=lifetime, iat=int(time.time()) - lifetime - 60)

    def mint_untrusted(
        self, aud: str, email: str | None = DEFAULT_USER_EMAIL, **kwargs: Any
    ) -> str:
        """A token with the Google ``kid`` but signed by an unknown key: a bad signature."""
        kwargs.setdefault("kid", google_signing_key().kid)
        return self.mint(aud, email, key=untrusted_key(), **kwargs)

    # -- request plumbing ----------------------------------------------------

    async def _gate(self, endpoint: str, audience: str | None = None) -> web.Response | None:
        """Count the call, then apply any hang and fault; a Response means "answer this"."""
        with self._lock:
            self.calls[endpoint] += 1
            if audience is not None:
                self.calls_by_audience[(endpoint, audience)] += 1
            hang = self._take(self._hangs, endpoint)
            fault = self._take(self._faults, endpoint)
            generation = self._heal_generation
        if hang is not None:
            deadline = time.monotonic() + hang.seconds
            # Poll so heal() releases requests that are hanging right now.
            while self._heal_generation == generation and (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(left, 0.05))
        if fault is not None:
            return self._fault_response(endpoint, fault.status)
        return None

    @staticmethod
    def _take(table: dict[str, Any], endpoint: str) -> Any:
        entry = table.get(endpoint)
        if entry is not None and entry.remaining is not None:
            entry.remaining -= 1
            if entry.remaining <= 0:
                del table[endpoint]
        return entry

    @staticmethod
    def _fault_response(endpoint: str, status: int) -> web.Response:
        message = f"fake Google: injected fault on {endpoint}"
        if endpoint == "token":
            # 5xx and "internal_failure" are what google-auth treats as retryable.
            error = "internal_failure" if status >= 500 else "invalid_grant"
            return _oauth_error(status, error, message)
        if endpoint == "iam":
            state = {403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}
            return _api_error(status, state.get(status, "UNAVAILABLE"), message)
        if endpoint in ("metadata", "ping"):
            return _metadata_text(message, status=status, content_type="text/html")
        return web.Response(text=message, status=status)

    # -- /token --------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        if grant_type == JWT_BEARER_GRANT:
            assertion = str(form.get("assertion", ""))
            try:
                audience = unverified_claims(assertion).get("target_audience")
            except ValueError:
                audience = None
            refused = await self._gate("token", audience if isinstance(audience, str) else None)
            return refused or self._jwt_bearer_grant(assertion)
        if grant_type == "refresh_token":
            with self._lock:
                user = self._users.get(str(form.get("refresh_token", "")))
            refused = await self._gate("token", user.client_id if user else None)
            return refused or self._refresh_grant(form, user)
        refused = await self._gate("token")
        return refused or _oauth_error(
            400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}"
        )

    def _jwt_bearer_grant(self, assertion: str) -> web.Response:
        try:
            issuer = unverified_claims(assertion).get("iss")
        except ValueError:
            return _oauth_error(400, "invalid_grant", "Invalid JWT: malformed assertion.")
        with self._lock:
            account = self._service_accounts.get(str(issuer))
        if account is None:
            return _oauth_error(400, "invalid_grant", "Invalid grant: account not found")
        try:
            claims = google.auth.jwt.decode(
                assertion, certs=account.key.public_pem, audience=TOKEN_AUDIENCE
            )
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            text = str(exc)
            if "signature" in text:
                return _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
            if "audience" in text:
                return _oauth_error(
                    400,
                    "invalid_grant",
                    f"Invalid JWT: Failed audience check. The right audience is {TOKEN_AUDIENCE}",
                )
            return _oauth_error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        if claims["exp"] - claims["iat"] > 3600:
            return _oauth_error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        target_audience = claims.get("target_audience")
        if target_audience:
            return web.json_response({"id_token": self.mint(target_audience, account.email)})
        return web.json_response(
            {
                "access_token": self.issue_access_token(account.email, scopes=claims.get("scope")),
                "expires_in": ACCESS_TOKEN_LIFETIME,
                "token_type": "Bearer",
            }
        )

    def _refresh_grant(self, form: Mapping[str, Any], user: _User | None) -> web.Response:
        if user is None:
            return _oauth_error(400, "invalid_grant", "Bad Request")
        if (form.get("client_id"), form.get("client_secret")) != (
            user.client_id,
            user.client_secret,
        ):
            return _oauth_error(401, "invalid_client", "Unauthorized")
        # Echo requested scopes: google-auth raises if a requested scope is missing.
        scope = str(form.get("scope") or USER_SCOPES)
        return web.json_response(
            {
                "access_token": self.issue_access_token(user.email, scopes=scope),
                "expires_in": ACCESS_TOKEN_LIFETIME - 1,
                "scope": scope,
                "token_type": "Bearer",
                "id_token": self.mint(user.client_id, user.email, azp=user.client_id),
            }
        )

    # -- /certs, /mint -------------------------------------------------------

    async def _certs(self, request: web.Request) -> web.Response:
        refused = await self._gate("certs")
        return refused or web.json_response(
            self.certs(), headers={"Cache-Control": "public, max-age=19000"}
        )

    async def _mint(self, request: web.Request) -> web.Response:
        audience = request.query.get("audience", GCLOUD_CLIENT_ID)
        refused = await self._gate("mint", audience)
        if refused:
            return refused
        email = request.query.get("email", DEFAULT_USER_EMAIL)
        include_email = request.query.get("include_email", "1") != "0"
        token = self.mint(audience, email if include_email else None, azp=request.query.get("azp"))
        return web.Response(text=token, content_type="text/plain")

    async def _mint_access(self, request: web.Request) -> web.Response:
        refused = await self._gate("mint")
        if refused:
            return refused
        email = request.query.get("email", DEFAULT_USER_EMAIL)
        return web.Response(text=self.issue_access_token(email, scopes=USER_SCOPES), content_type="text/plain")

    # -- metadata server -----------------------------------------------------

    async def _ping(self, request: web.Request) -> web.Response:
        refused = await self._gate("ping")
        return refused or _metadata_text("computeMetadata/\n", content_type="text/html")

    async def _metadata(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        audience = request.query.get("audience") if path.endswith("/identity") else None
        refused = await self._gate("metadata", audience)
        if refused:
            return refused
        # The real server refuses requests without the flavor header, and
        # requests that look proxied.
        if (
            request.headers.get("Metadata-Flavor") != "Google"
            or "X-Forwarded-For" in request.headers
        ):
            return _metadata_text(
                'Missing required header "Metadata-Flavor": "Google"\n',
                status=403,
                content_type="text/html",
            )
        fixed = {
            "project/project-id": project_of(self.metadata_email, DEFAULT_PROJECT),
            "project/numeric-project-id": DEFAULT_PROJECT_NUMBER,
            "universe/universe-domain": "googleapis.com",
        }
        if path in fixed:
            return _metadata_text(fixed[path])
        if path.startswith(_SA_PREFIX):
            account, _, leaf = path[len(_SA_PREFIX) :].partition("/")
            if account in ("default", self.metadata_email):
                return self._service_account_metadata(request, leaf.rstrip("/"))
        return _metadata_text("Not Found\n", status=404, content_type="text/html")

    def _service_account_metadata(self, request: web.Request, leaf: str) -> web.Response:
        email = self.metadata_email
        headers = {"Metadata-Flavor": "Google"}
        if leaf == "":
            # google-auth asks for ".../default/?recursive=true"; the trailing slash
            # is optional here.
            if request.query.get("recursive") == "true":
                return web.json_response(
                    {"aliases": ["default"], "email": email, "scopes": self.metadata_scopes},
                    headers=headers,
                )
            return _metadata_text("aliases\nemail\nidentity\nscopes\ntoken\n")
        if leaf == "email":
            return _metadata_text(email)
        if leaf == "aliases":
            return _metadata_text("default\n")
        if leaf == "scopes":
            return _metadata_text("".join(f"{s}\n" for s in self.metadata_scopes))
        if leaf == "token":
            return web.json_response(
                {
                    "access_token": self.issue_access_token(
                        email, scopes=request.query.get("scopes") or tuple(self.metadata_scopes)
                    ),
                    "expires_in": ACCESS_TOKEN_LIFETIME - 1,
                    "token_type": "Bearer",
                },
                headers=headers,
            )
        if leaf == "identity":
            audience = request.query.get("audience")
            if not audience:
                return _metadata_text(
                    "non-empty audience parameter required\n", status=400, content_type="text/html"
                )
            # A raw JWT with a non-JSON content type: google-auth returns the body as text.
            return _metadata_text(
                self._metadata_identity(email, audience, request.query.get("format", "standard")),
                content_type="text/html",
            )
        return _metadata_text("Not Found\n", status=404, content_type="text/html")

    def _metadata_identity(self, email: str, audience: str, token_format: str) -> str:
        now = int(time.time())
        cache_key = (email, audience, token_format)
        with self._lock:
            cached = self._identity_cache.get(cache_key)
        if cached is not None and now < cached[1] - METADATA_CACHE_MARGIN:
            return cached[0]
        claims: dict[str, Any] = {}
        if token_format == "full":
            claims["google"] = {
                "compute_engine": {
                    "instance_id": "1234567890123456789",
                    "instance_name": "fake-instance",
                    "project_id": DEFAULT_PROJECT,
                    "project_number": int(DEFAULT_PROJECT_NUMBER),
                    "zone": "europe-west1-b",
                }
            }
        token = self.mint(audience, email, iat=now, **claims)
        with self._lock:
            self._identity_cache[cache_key] = (token, now + self.token_lifetime)
        return token

    # -- IAM Credentials -----------------------------------------------------

    async def _generate_id_token(self, request: web.Request) -> web.Response:
        target = request.match_info["email"]
        try:
            body = await request.json()
        except ValueError:
            body = None
        audience = body.get("audience") if isinstance(body, dict) else None
        refused = await self._gate("iam", audience if isinstance(audience, str) else None)
        if refused:
            return refused
        caller = self._caller(request.headers.get("Authorization", ""))
        if caller is None:
            return _api_error(401, "UNAUTHENTICATED", _IAM_UNAUTHENTICATED)
        if not isinstance(body, dict) or not isinstance(audience, str) or not audience:
            return _api_error(400, "INVALID_ARGUMENT", "Invalid value for audience.")
        # Each identity in caller -> delegates... -> target needs Token Creator
        # on the next one.
        chain = [caller, *(body.get("delegates") or []), target]
        with self._lock:
            allowed = all(b in self._impersonators.get(c, set()) for b, c in pairwise(chain))
        if not allowed:
            return _api_error(403, "PERMISSION_DENIED", _IAM_DENIED)
        email = target if body.get("includeEmail") else None
        return web.json_response({"token": self.mint(audience, email, sub=unique_id(target))})

    async def _generate_access_token(self, request: web.Request) -> web.Response:
        target = request.match_info["email"]
        try:
            body = await request.json()
        except ValueError:
            body = None
        refused = await self._gate("iam")
        if refused:
            return refused
        caller = self._caller(request.headers.get("Authorization", ""))
        if caller is None:
            return _api_error(401, "UNAUTHENTICATED", _IAM_UNAUTHENTICATED)
        if not isinstance(body, dict) or not body.get("scope"):
            return _api_error(400, "INVALID_ARGUMENT", "Scope is required.")
        chain = [caller, *(body.get("delegates") or []), target]
        with self._lock:
            allowed = all(b in self._impersonators.get(c, set()) for b, c in pairwise(chain))
        if not allowed:
            return _api_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
            )
        token = self.issue_access_token(target, scopes=tuple(body["scope"]))
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + ACCESS_TOKEN_LIFETIME))
        return web.json_response({"accessToken": token, "expireTime": expire})

    def _caller(self, authorization: str) -> str | None:
        """The identity behind ``Authorization: Bearer ...``, or None."""
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            return None
        with self._lock:
            entry = self._access_tokens.get(token)
        if entry is not None:
            email, expires_at = entry
            return email if time.time() < expires_at else None
        # Google APIs also accept a service account's self-signed JWT as a
        # bearer token (google-auth sends one when always_use_jwt_access is on).
        try:
            issuer = unverified_claims(token).get("iss")
        except ValueError:
            return None
        with self._lock:
            account = self._service_accounts.get(str(issuer))
        if account is None:
            return None
        try:
            google.auth.jwt.decode(token, certs=account.key.public_pem)
        except (ValueError, google.auth.exceptions.GoogleAuthError):
            return None
        return account.email
