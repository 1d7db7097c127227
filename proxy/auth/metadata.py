"""The metadata server's service account (Compute Engine, GKE, Cloud Run)."""

from __future__ import annotations

import asyncio
import json
import logging

from .identity import _METADATA_HEADERS, Identity, Minted, metadata_root

log = logging.getLogger(__name__)


class MetadataIdentity(Identity):
    """The metadata server's identity endpoint (GCE, GKE, Cloud Run, Cloud Functions)."""

    source = "metadata"
    # The metadata server hands out its cached token until 4 minutes before expiry:
    # a refresh asked earlier would only return the same token.
    refresh_margin = 210.0

    def __init__(self) -> None:
        super().__init__()
        self._key = "metadata"
        self.reason = "the metadata server"

    def _fetch_sync(self, audience: str) -> Minted:
        from google.auth import compute_engine

        # use_metadata_identity_endpoint=True: the default would sign through IAM signBlob.
        # format=full is google-auth's default for this endpoint.
        creds = compute_engine.IDTokenCredentials(None, audience, use_metadata_identity_endpoint=True)
        creds.refresh(self._transport.get())
        return self._minted(creds.token)

    async def resolve(self) -> None:
        def lookup() -> str | None:
            response = self._transport.get()(
                url=f"{metadata_root()}/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
                method="GET",
                headers=_METADATA_HEADERS,
            )
            if response.status != 200:
                return None
            info = json.loads(response.data)
            return info.get("email") if isinstance(info, dict) else None

        try:
            self.email = await asyncio.to_thread(lookup)
        except Exception as e:  # noqa: BLE001 - a failed lookup only loses the email in the report
            log.warning("metadata server: could not read the service account email: %s", type(e).__name__)

    def hint_for(self, error: BaseException) -> str | None:
        return "is the metadata server reachable? Off Google Cloud, use a key file or `gcloud auth application-default login`"


# --------------------------------------------------------------------------- impersonation
