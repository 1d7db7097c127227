"""Loopback fakes of Google's auth endpoints, a private Cloud Run service and gcloud.

Importing this package reserves the fake metadata server's port and sets
``GCE_METADATA_HOST``/``GCE_METADATA_IP`` *before* google-auth is imported (see
:mod:`tests.fakes.metadata_port`); keep that import first.  Fixtures live in
:mod:`tests.fakes.fixtures` (``pytest_plugins = ["tests.fakes.fixtures"]``).
"""

from .metadata_port import reserved_port, reserved_socket  # isort: skip  (must run first)

from .gcloud_stub import GcloudStub, install_gcloud_stub
from .google import (
    ADC_CLIENT_ID,
    DEFAULT_METADATA_EMAIL,
    DEFAULT_USER_EMAIL,
    GCLOUD_CLIENT_ID,
    TOKEN_AUDIENCE,
    FakeGoogle,
)
from .keys import (
    KeyPair,
    google_signing_key,
    key_pair,
    service_account_info,
    sign_jwt,
    untrusted_key,
)
from .private_service import (
    GZIP_PLAIN,
    SIGNATURE_REMOVED,
    XSA,
    PrivateService,
    RecordedRequest,
    pattern_bytes,
    pattern_sha256,
)
from .server import BackgroundServer

__all__ = [
    "ADC_CLIENT_ID",
    "DEFAULT_METADATA_EMAIL",
    "DEFAULT_USER_EMAIL",
    "GCLOUD_CLIENT_ID",
    "GZIP_PLAIN",
    "SIGNATURE_REMOVED",
    "TOKEN_AUDIENCE",
    "XSA",
    "BackgroundServer",
    "FakeGoogle",
    "GcloudStub",
    "KeyPair",
    "PrivateService",
    "RecordedRequest",
    "google_signing_key",
    "install_gcloud_stub",
    "key_pair",
    "pattern_bytes",
    "pattern_sha256",
    "reserved_port",
    "reserved_socket",
    "service_account_info",
    "sign_jwt",
    "untrusted_key",
]
