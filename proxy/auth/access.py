"""Access tokens (cloud-platform scope) from the same sources as a route's ID tokens.

Looking a service up by name (proxy/resolve/) calls the Cloud Run Admin and
Cloud Functions APIs, which take an OAuth access token, not an ID token. The
caller is the identity the route already runs as, so that one login (a key
file, a user login, impersonation, the metadata server, the gcloud CLI) does
both jobs. A ``static`` identity has only an ID token: the lookup then uses
Application Default Credentials.

Every credentials object here is google-auth's own, refreshed by
``AuthorizedSession``; the gcloud CLI is wrapped in a small
``google.auth.credentials.Credentials`` subclass that runs
``gcloud auth print-access-token``.
"""

from __future__ import annotations

import datetime
import logging
import subprocess
from typing import Any

import google.auth.credentials

from ..errors import CredentialError, redact
from .adc import adc_source, source_from_file
from .gcloud import GCLOUD_TIMEOUT, GcloudIdentity, _gcloud_env
from .identity import CLOUD_PLATFORM_SCOPE, Identity, jwt_claims, load_json_key
from .impersonate import ImpersonateIdentity
from .metadata import MetadataIdentity
from .service_account import ServiceAccountIdentity
from .static import StaticIdentity
from .user import UserIdentity

log = logging.getLogger(__name__)

#: Scopes asked for on a user login's refresh: all of them are in a gcloud ADC login.
USER_SCOPES = ("openid", "https://www.googleapis.com/auth/userinfo.email", CLOUD_PLATFORM_SCOPE)
#: gcloud's access tokens live an hour; refreshed well before that.
GCLOUD_ACCESS_LIFETIME = datetime.timedelta(minutes=45)


class GcloudAccessCredentials(google.auth.credentials.Credentials):
    """``gcloud auth print-access-token`` as google-auth credentials."""

    def __init__(self, executable: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.executable = executable

    def refresh(self, request: Any) -> None:
        try:
            result = subprocess.run(
                [self.executable, "auth", "print-access-token"],
                capture_output=True,
                text=True,
                timeout=GCLOUD_TIMEOUT,
                stdin=subprocess.DEVNULL,
                env=_gcloud_env(),
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CredentialError(f"gcloud auth print-access-token failed ({type(e).__name__})") from None
        if result.returncode != 0:
            lines = [line for line in redact(result.stderr).splitlines() if line.strip()]
            raise CredentialError(
                f"gcloud auth print-access-token failed: {(lines[-1] if lines else f'exit status {result.returncode}')[:200]}",
                "run `gcloud auth login`",
            )
        self.token = result.stdout.strip()
        self.expiry = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + GCLOUD_ACCESS_LIFETIME


def access_credentials(identity: Identity) -> tuple[Any, str]:
    """google-auth credentials with the cloud-platform scope for ``identity``, and who they are."""
    if isinstance(identity, ServiceAccountIdentity):
        return source_from_file(identity.key_file, identity.info), identity.describe()
    if isinstance(identity, MetadataIdentity):
        from google.auth import compute_engine

        return compute_engine.Credentials(), identity.describe()
    if isinstance(identity, ImpersonateIdentity):
        # The impersonation's own access-token credentials (IAM generateAccessToken).
        return identity.target_credentials, identity.describe()
    if isinstance(identity, UserIdentity):
        from google.oauth2 import credentials as oauth2_credentials

        # openid and email too (a login has them): the refresh then names the user.
        info = load_json_key(identity.path)
        try:
            creds = oauth2_credentials.Credentials.from_authorized_user_info(info, scopes=list(USER_SCOPES))
        except ValueError as e:
            raise CredentialError(f"{identity.path}: not a usable user login ({type(e).__name__})", "run `gcloud auth application-default login`") from None
        return creds, identity.describe()
    if isinstance(identity, GcloudIdentity):
        return GcloudAccessCredentials(identity.executable), identity.describe()
    if isinstance(identity, StaticIdentity):
        creds, via = adc_source()
        log.info("looking services up as %s: a static token cannot call Google APIs", via)
        return creds, via
    raise CredentialError(f"credentials source {identity.source} cannot call Google APIs")


def who(credentials: Any, fallback: str) -> str:
    """The principal behind ``credentials`` once refreshed, for a permission message."""
    email = getattr(credentials, "service_account_email", None)
    if isinstance(email, str) and "@" in email:
        return email
    id_token = getattr(credentials, "id_token", None)
    if isinstance(id_token, str):
        try:
            claimed = jwt_claims(id_token).get("email")
        except ValueError:
            claimed = None
        if isinstance(claimed, str):
            return claimed
    return fallback


__all__ = ["CLOUD_PLATFORM_SCOPE", "GcloudAccessCredentials", "access_credentials", "who"]
