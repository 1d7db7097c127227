"""A service-account key file: google-auth's IDTokenCredentials, signed with the key."""

from __future__ import annotations

from typing import Any

from ..errors import CredentialError
from .identity import Identity, Minted, _short, load_json_key


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
