"""RSA keys and JWT signing for the fakes.

Keys are generated once per process and cached by name (2048-bit generation
costs ~60 ms each), so every test that registers ``sa@x`` gets the same key.
Signing is written here with ``cryptography`` rather than google-auth so the
fakes do not trust the code they are used to test.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

GOOGLE_KEY_NAME = "google-signing"
UNTRUSTED_KEY_NAME = "untrusted"


@dataclass(frozen=True)
class KeyPair:
    """An RSA key with the PEM forms the fakes hand out."""

    name: str
    private_key: rsa.RSAPrivateKey
    #: sha1 of the public key, hex: the shape of Google's ``private_key_id`` and cert ``kid``s.
    kid: str
    #: PKCS#8 ``BEGIN PRIVATE KEY``, as in a service-account JSON key.
    private_pem: str
    public_pem: str
    #: A self-signed X.509 certificate, the form Google's v1 certs endpoint serves.
    cert_pem: str


_lock = threading.Lock()
_keys: dict[str, KeyPair] = {}


def key_pair(name: str) -> KeyPair:
    """The process-wide key called ``name``, generated on first use (thread-safe)."""
    # One lock around generation: two threads asking for the Google key at once
    # must not end up with two different keys.
    with _lock:
        key = _keys.get(name)
        if key is None:
            key = _keys[name] = _generate(name)
        return key


def google_signing_key() -> KeyPair:
    """The key the fake Google signs ID tokens with; its cert is served at ``/certs``."""
    return key_pair(GOOGLE_KEY_NAME)


def untrusted_key() -> KeyPair:
    """A key nobody trusts, for bad-signature tests."""
    return key_pair(UNTRUSTED_KEY_NAME)


def _generate(name: str) -> KeyPair:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_key = private_key.public_key()
    public_der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fake-{name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(private_key, hashes.SHA256())
    )
    return KeyPair(
        name=name,
        private_key=private_key,
        kid=hashlib.sha1(public_der).hexdigest(),
        private_pem=private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        public_pem=public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(payload: Mapping[str, Any], key: KeyPair, kid: str | None = None) -> str:
    """An RS256 JWT over ``payload`` with header ``kid`` (default: the key's own)."""
    header = {"alg": "RS256", "kid": key.kid if kid is None else kid, "typ": "JWT"}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
    )
    signature = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT without checking anything (raises ValueError if malformed)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise ValueError("malformed JWT") from exc
    if not isinstance(claims, dict):
        raise ValueError("malformed JWT")
    return claims


def unique_id(email: str) -> str:
    """A stable 21-digit numeric id for an identity, the shape of Google's ``sub``/client_id."""
    digits = str(int.from_bytes(hashlib.sha256(email.encode()).digest()[:10], "big"))
    return "1" + digits.zfill(20)[:20]


def project_of(email: str, default: str = "fake-project") -> str:
    """The project in ``name@PROJECT.iam.gserviceaccount.com``, else ``default``."""
    _, _, domain = email.partition("@")
    project, _, rest = domain.partition(".")
    return project if rest == "iam.gserviceaccount.com" else default


def service_account_info(email: str, token_uri: str, key: KeyPair) -> dict[str, str]:
    """A dict shaped exactly like a Google service-account JSON key file."""
    return {
        "type": "service_account",
        "project_id": project_of(email),
        "private_key_id": key.kid,
        "private_key": key.private_pem,
        "client_email": email,
        "client_id": unique_id(email),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
        + urllib.parse.quote(email),
        "universe_domain": "googleapis.com",
    }
