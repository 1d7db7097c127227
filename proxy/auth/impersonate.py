"""A service account impersonated through IAM Credentials generateIdToken."""

from __future__ import annotations

from typing import Any

from ..errors import CredentialError
from .adc import adc_source
from .identity import CLOUD_PLATFORM_SCOPE, Identity, Minted, _short


class ImpersonateIdentity(Identity):
    """A service account impersonated through IAM Credentials ``generateIdToken``.

    The caller is ``source_creds``: Application Default Credentials (a user login,
    a key, the metadata server, or a workload identity federation config), or the
    source inside an ``impersonated_service_account`` file.
    """

    source = "impersonate"
    # One source credentials object (its access token) is shared by every audience.
    serial = True

    def __init__(self, target_credentials: Any, target: str, delegates: tuple[str, ...], via: str) -> None:
        super().__init__()
        self._target = target_credentials
        #: The impersonated account's access-token credentials (also used to look services up).
        self.target_credentials = target_credentials
        self.email = target
        self.delegates = delegates
        self.via = via
        self._key = "impersonate:" + ">".join((*delegates, target))
        self.reason = f"impersonating {target} as {via}"

    @classmethod
    def from_config(cls, target: str, delegates: tuple[str, ...] = ()) -> ImpersonateIdentity:
        """Impersonate ``target`` with Application Default Credentials as the caller."""
        from google.auth import impersonated_credentials

        source_creds, via = adc_source()
        creds = impersonated_credentials.Credentials(
            source_credentials=source_creds,
            target_principal=target,
            target_scopes=[CLOUD_PLATFORM_SCOPE],
            delegates=list(delegates),
        )
        return cls(creds, target, delegates, via)

    @classmethod
    def from_file(cls, path: str, info: dict[str, Any]) -> ImpersonateIdentity:
        """An ``impersonated_service_account`` file (``gcloud auth application-default login --impersonate-service-account``)."""
        from google.auth import impersonated_credentials

        try:
            creds = impersonated_credentials.Credentials.from_impersonated_service_account_info(
                info, scopes=[CLOUD_PLATFORM_SCOPE]
            )
        except (ValueError, KeyError) as e:
            raise CredentialError(
                f"{path}: not usable impersonation credentials ({_short(e)})",
                "run `gcloud auth application-default login --impersonate-service-account=SA_EMAIL` again",
            ) from None
        target = str(creds.service_account_email)
        source_type = (info.get("source_credentials") or {}).get("type", "unknown")
        return cls(creds, target, tuple(info.get("delegates") or ()), f"the {source_type} credentials in {path}")

    def describe(self) -> str:
        return f"impersonate ({self.email})"

    def _fetch_sync(self, audience: str) -> Minted:
        from google.auth import impersonated_credentials

        # include_email: Cloud Run does not need it, but people reading logs and
        # upstreams that check the caller do.
        creds = impersonated_credentials.IDTokenCredentials(self._target, target_audience=audience, include_email=True)
        creds.refresh(self._transport.get())
        return self._minted(creds.token)

    def hint_for(self, error: BaseException) -> str | None:
        text = str(error)
        if "403" in text or "PERMISSION_DENIED" in text or "getOpenIdToken" in text:
            return (
                f"the caller ({self.via}) may not mint tokens for {self.email}: grant it "
                f"roles/iam.serviceAccountOpenIdTokenCreator on {self.email}"
                + (" (and on each delegate)" if self.delegates else "")
            )
        return super().hint_for(error)


# --------------------------------------------------------------------------- user login
