"""Which identity a ``credentials:`` block names, and the default order for ``source: auto``."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from ..config import Credentials
from ..errors import CredentialError
from .gcloud import GcloudIdentity
from .identity import _LOGIN_HINT, Identity, _metadata_available, gcloud_adc_path, load_json_key
from .impersonate import ImpersonateIdentity
from .metadata import MetadataIdentity
from .service_account import ServiceAccountIdentity
from .static import StaticIdentity
from .user import UserIdentity


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
