"""The demo's stand-in for Google's OAuth 2.0 token endpoint and its signing certs.

It speaks the service-account flow exactly as google-auth does against Google:
``POST /token`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
and an RS256 ``assertion`` signed with the service account's key (``aud`` is
always ``https://oauth2.googleapis.com/token``, whatever ``token_uri`` says),
answered with ``{"id_token": JWT}``. ID tokens are RS256 with a ``kid``, signed
with a key generated at start, and its certificate is served at ``/certs`` as
``{kid: PEM}`` (the shape of Google's v1 certs endpoint). ``/demo/stats`` counts
what was minted. Nothing here talks to Google.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import google.auth.crypt
import google.auth.exceptions
import google.auth.jwt

# cryptography comes with google-auth (it verifies RS256 with it): no new dependency.
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .httpd import Handler, Server

log = logging.getLogger(__name__)

ISSUER = "https://accounts.google.com"
#: The ``aud`` of every JWT-bearer assertion google-auth signs.
ASSERTION_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME = 3600


@dataclass(frozen=True)
class KeyPair:
    """An RSA key and the PEM forms the demo hands out."""

    kid: str
    private_pem: str
    public_pem: str
    cert_pem: str


def generate_key(name: str) -> KeyPair:
    """A fresh 2048-bit RSA key with a self-signed certificate (Google serves certificates)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"idtoken-proxy demo {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        # The shape of Google's kids and private_key_ids: a hex sha1.
        kid=hashlib.sha1(der).hexdigest(),
        private_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        public_pem=public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


def numeric_id(text: str) -> str:
    """A stable 21-digit id, the shape of Google's ``sub`` and ``client_id``."""
    return "1" + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")).zfill(20)[:20]


class TokenIssuer:
    """The stand-in token endpoint for one service account, on 127.0.0.1."""

    def __init__(self, email: str, port: int = 0) -> None:
        self.email = email
        self.signing_key = generate_key("token signing")
        self.account_key = generate_key("service account")
        self._signer = google.auth.crypt.RSASigner.from_string(self.signing_key.private_pem, self.signing_key.kid)
        self._lock = threading.Lock()
        #: ID tokens minted through the key flow, and refused token requests.
        self.minted = 0
        self.refused = 0
        self.audiences: dict[str, int] = {}
        handler = type("IssuerHandler", (_IssuerHandler,), {"issuer": self})
        self._server = Server(handler, port)

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def certs_url(self) -> str:
        return f"{self.url}/certs"

    def start(self) -> TokenIssuer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def certs(self) -> dict[str, str]:
        return {self.signing_key.kid: self.signing_key.cert_pem}

    def key_info(self) -> dict[str, str]:
        """A service-account JSON key, shaped as Google's, whose token_uri is this endpoint."""
        project = self.email.partition("@")[2].partition(".")[0]
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": self.account_key.kid,
            "private_key": self.account_key.private_pem,
            "client_email": self.email,
            "client_id": numeric_id(self.email),
            "auth_uri": f"{self.url}/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": self.certs_url,
            "client_x509_cert_url": f"{self.url}/robot/{urllib.parse.quote(self.email)}",
            "universe_domain": "googleapis.com",
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"id_tokens_minted": self.minted, "refused": self.refused, "by_audience": dict(self.audiences)}

    def exchange(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """Answer one token request: (status, JSON body), as Google's endpoint words it."""
        grant = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        if grant != JWT_BEARER:
            return self._refuse(400, "unsupported_grant_type", f"Invalid grant_type: {grant}")
        try:
            claims = google.auth.jwt.decode(assertion, certs=self.account_key.public_pem, audience=ASSERTION_AUDIENCE)
        except (ValueError, google.auth.exceptions.GoogleAuthError):
            return self._refuse(400, "invalid_grant", "Invalid JWT Signature.")
        if claims.get("iss") != self.email or claims.get("exp", 0) - claims.get("iat", 0) > 3600:
            return self._refuse(400, "invalid_grant", "Invalid JWT: wrong issuer or lifetime.")
        audience = claims.get("target_audience")
        if not isinstance(audience, str) or not audience:
            # The demo hands out ID tokens only (no access tokens for Google APIs).
            return self._refuse(400, "invalid_scope", "The demo issues ID tokens only: target_audience is required.")
        token = self.mint(audience)
        with self._lock:
            self.minted += 1
            self.audiences[audience] = self.audiences.get(audience, 0) + 1
        log.info("stand-in token endpoint: minted an ID token for %s, audience %s", self.email, audience)
        return 200, {"id_token": token}

    def mint(self, audience: str) -> str:
        now = int(time.time())
        sub = numeric_id(self.email)
        payload = {
            "aud": audience,
            "azp": sub,
            "email": self.email,
            "email_verified": True,
            "exp": now + TOKEN_LIFETIME,
            "iat": now,
            "iss": ISSUER,
            "sub": sub,
        }
        token: bytes = google.auth.jwt.encode(self._signer, payload)
        return token.decode()

    def _refuse(self, status: int, error: str, description: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.refused += 1
        log.warning("stand-in token endpoint: refused a token request: %s", description)
        return status, {"error": error, "error_description": description}


class _IssuerHandler(Handler):
    issuer: TokenIssuer

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/certs", "/oauth2/v1/certs"):
            self.send_json(200, self.issuer.certs(), {"Cache-Control": "public, max-age=3600"})
        elif path == "/demo/stats":
            self.send_json(200, self.issuer.stats())
        elif path == "/":
            self.send_text(200, "idtoken-proxy demo: a stand-in for Google's token endpoint (POST /token, GET /certs, GET /demo/stats). Nothing here reaches Google.\n")
        else:
            self.send_text(404, "not found\n")

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/token":
            self.send_text(404, "not found\n")
            return
        body = self.read_body()
        if body is None:
            return
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        status, doc = self.issuer.exchange(form)
        self.send_json(status, doc)
