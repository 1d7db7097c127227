"""A user's login: gcloud's application-default credentials (authorized_user)."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import CredentialError
from .identity import Identity, Minted, _mtime, _short, load_json_key

log = logging.getLogger(__name__)


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
