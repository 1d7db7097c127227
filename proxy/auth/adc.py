"""Application Default Credentials as access-token credentials: the caller of an impersonation, the Admin API's bearer."""

from __future__ import annotations

import os
from typing import Any

from ..errors import CredentialError
from .identity import CLOUD_PLATFORM_SCOPE, METADATA_PING_TIMEOUT, _metadata_available, _short, gcloud_adc_path, load_json_key


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
