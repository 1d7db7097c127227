"""The fakes are faithful: google-auth's real code paths get tokens the fake Cloud Run accepts.

Run alone with ``python -m pytest -p tests.fakes.fixtures tests/test_fakes.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from aiohttp import web
from google.auth import compute_engine, iam, impersonated_credentials
from google.auth import jwt as google_jwt
from google.auth.compute_engine import _metadata
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2 import credentials as user_credentials
from google.oauth2 import id_token, service_account

from tests.fakes import (
    ADC_CLIENT_ID,
    GCLOUD_CLIENT_ID,
    GZIP_PLAIN,
    SIGNATURE_REMOVED,
    XSA,
    BackgroundServer,
    FakeGoogle,
    PrivateService,
    google_signing_key,
    install_gcloud_stub,
    pattern_bytes,
    pattern_sha256,
)
from tests.fakes.fixtures import CleanEnv
from tests.fakes.gcloud_stub import GcloudStub

pytestmark = pytest.mark.timeout(60)

SA = "runner@fake-project.iam.gserviceaccount.com"
CALLER = "ci@fake-project.iam.gserviceaccount.com"
TARGET = "invoker@fake-project.iam.gserviceaccount.com"
USER = "developer@example.com"
CLOUD_PLATFORM = ["https://www.googleapis.com/auth/cloud-platform"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict:
    return dict(google_jwt.decode(token, verify=False))


@pytest.fixture
def sa_info(google: FakeGoogle) -> dict[str, str]:
    return google.register_service_account(SA)


# -- service-account key -> token endpoint -> private service ---------------


def test_service_account_id_token_is_accepted(
    google: FakeGoogle, private_service: PrivateService, sa_info
):
    creds = service_account.IDTokenCredentials.from_service_account_info(
        sa_info, target_audience=private_service.url
    )
    creds.refresh(Request())

    r = requests.post(
        f"{private_service.url}/anything?x=1", headers=bearer(creds.token), data=b"hello"
    )

    assert r.status_code == 200, r.text
    claims = private_service.last.claims
    assert claims is not None
    assert claims["aud"] == private_service.url
    assert (claims["email"], claims["email_verified"], claims["iss"]) == (
        SA,
        True,
        "https://accounts.google.com",
    )
    assert claims["exp"] - claims["iat"] == 3600
    assert google_jwt._unverified_decode(creds.token)[0]["kid"] == google_signing_key().kid
    assert r.json()["body_len"] == 5
    assert r.json()["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert google.calls["token"] == 1
    assert google.calls_by_audience[("token", private_service.url)] == 1


def test_token_lifetime_is_settable(google: FakeGoogle, sa_info):
    google.token_lifetime = 20
    creds = service_account.IDTokenCredentials.from_service_account_info(
        sa_info, target_audience="https://a"
    )
    creds.refresh(Request())
    claims = claims_of(creds.token)
    assert claims["exp"] - claims["iat"] == 20


def test_token_endpoint_refuses_unknown_account_and_wrong_key(google: FakeGoogle, sa_info):
    stranger = dict(sa_info, client_email="nobody@fake-project.iam.gserviceaccount.com")
    with pytest.raises(RefreshError, match="invalid_grant") as unknown:
        service_account.IDTokenCredentials.from_service_account_info(
            stranger, target_audience="a"
        ).refresh(Request())
    assert "account not found" in str(unknown.value)

    # The right email, signed with another account's key.
    other = google.register_service_account(CALLER)
    forged = dict(other, client_email=SA)
    with pytest.raises(RefreshError, match="Invalid JWT Signature"):
        service_account.IDTokenCredentials.from_service_account_info(
            forged, target_audience="a"
        ).refresh(Request())


def test_jwt_bearer_without_target_audience_returns_access_token(google: FakeGoogle, sa_info):
    creds = service_account.Credentials.from_service_account_info(sa_info, scopes=CLOUD_PLATFORM)
    creds.refresh(Request())
    assert creds.token.startswith("ya29.")
    assert google.calls["token"] == 1


# -- the Cloud Run front -------------------------------------------------------

TokenHeaders = Callable[[FakeGoogle, str], dict[str, str]]

REFUSALS: list[tuple[str, TokenHeaders, int, str]] = [
    ("no token", lambda g, aud: {}, 403, "no identity token"),
    (
        "wrong audience",
        lambda g, aud: bearer(g.mint("https://other.example")),
        401,
        "wrong audience",
    ),
    ("expired", lambda g, aud: bearer(g.expired_token(aud)), 401, "token expired"),
    (
        "expired a second ago (no clock skew)",
        lambda g, aud: bearer(g.mint(aud, iat=int(time.time()) - 11, lifetime=10)),
        401,
        "token expired",
    ),
    ("unknown signing key", lambda g, aud: bearer(g.mint_untrusted(aud)), 401, "invalid signature"),
    ("unknown kid", lambda g, aud: bearer(g.mint(aud, kid="0" * 40)), 401, "unknown signing key"),
    (
        "basic scheme",
        lambda g, aud: {"Authorization": "Basic dXNlcjpwdw=="},
        401,
        "not 'Bearer <jwt>'",
    ),
    (
        "bearer, not a JWT",
        lambda g, aud: {"Authorization": "Bearer opaque"},
        401,
        "not 'Bearer <jwt>'",
    ),
    (
        "bad XSA wins over a good Authorization",
        lambda g, aud: {XSA: f"Bearer {g.mint_untrusted(aud)}", **bearer(g.mint(aud))},
        401,
        "invalid signature",
    ),
    (
        "user token for an unregistered client",
        lambda g, aud: bearer(g.mint(GCLOUD_CLIENT_ID)),
        401,
        "wrong audience",
    ),
]


@pytest.mark.parametrize(
    ("make_headers", "status", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_cloud_run_front_refuses(
    google: FakeGoogle,
    private_service: PrivateService,
    make_headers: TokenHeaders,
    status: int,
    reason: str,
):
    r = requests.get(f"{private_service.url}/x", headers=make_headers(google, private_service.url))

    assert r.status_code == status
    assert reason in r.text and r.text.count("\n") == 1
    assert ("WWW-Authenticate" in r.headers) == (status == 401)
    assert private_service.last.refused == (status, r.text.strip())


def test_xsa_is_checked_and_reaches_the_app_without_signature(
    google: FakeGoogle, private_service: PrivateService
):
    token = google.mint(private_service.url)
    headers = {
        "X-First": "1",
        XSA: f"Bearer {token}",
        "Authorization": "Bearer the-app's-own-token",
    }

    r = requests.get(f"{private_service.url}/echo", headers=headers)

    assert r.status_code == 200, r.text
    seen = {k.lower(): v for k, v in r.json()["headers"]}
    header_and_payload = token.rsplit(".", 1)[0]
    assert seen[XSA.lower()] == f"Bearer {header_and_payload}.{SIGNATURE_REMOVED}"
    assert seen["authorization"] == "Bearer the-app's-own-token"
    record = private_service.last
    assert record.checked_header == XSA
    assert record.header(XSA) == seen[XSA.lower()]
    names = [k.lower() for k, _ in record.headers]
    assert names.index("x-first") < names.index(XSA.lower()) < names.index("authorization")


def test_user_tokens_accepted_for_registered_client_ids(
    google: FakeGoogle, private_service: PrivateService
):
    token = google.mint(GCLOUD_CLIENT_ID, USER, azp=GCLOUD_CLIENT_ID)
    assert requests.get(private_service.url, headers=bearer(token)).status_code == 401
    private_service.accept_client_id(GCLOUD_CLIENT_ID)
    assert requests.get(private_service.url, headers=bearer(token)).status_code == 200


def test_custom_audiences_and_public_service(google: FakeGoogle, fake_google: FakeGoogle):
    with PrivateService(
        certs=google.certs(), audiences=["https://hello-abc-uc.a.run.app"]
    ) as service:
        assert (
            requests.get(service.url, headers=bearer(google.mint(service.url))).status_code == 401
        )
        ok = bearer(google.mint("https://hello-abc-uc.a.run.app"))
        assert requests.get(service.url, headers=ok).status_code == 200
    with PrivateService(require_auth=False) as public:
        assert requests.get(f"{public.url}/status/204").status_code == 204
        assert public.last.claims is None


# -- metadata server -------------------------------------------------------------

METADATA_SCRIPT = """
import json
import google.auth.transport.requests as tr
from google.auth import compute_engine
from google.auth.compute_engine import _metadata
from google.oauth2 import id_token

audience = {audience!r}
request = tr.Request()
creds = compute_engine.IDTokenCredentials(None, audience, use_metadata_identity_endpoint=True)
creds.refresh(request)
fetched = id_token.fetch_id_token(request, audience)
print(json.dumps({{"host": _metadata._GCE_METADATA_HOST, "token": creds.token, "fetched": fetched}}))
"""


def test_metadata_identity_in_a_fresh_process(
    google: FakeGoogle, private_service: PrivateService, clean_env: CleanEnv, tmp_path: Path
):
    # A subprocess, because google-auth reads GCE_METADATA_HOST when it is imported.
    done = subprocess.run(
        [sys.executable, "-c", METADATA_SCRIPT.format(audience=private_service.url)],
        env=clean_env.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)

    assert out["host"] == google.metadata_host
    for token in (out["token"], out["fetched"]):
        assert requests.get(private_service.url, headers=bearer(token)).status_code == 200
        assert private_service.last.claims["email"] == google.metadata_email
    assert private_service.last.claims["google"]["compute_engine"]["project_id"] == "fake-project"
    # fetch_id_token found no key file, pinged, then asked the identity endpoint,
    # which answered from its cache (default lifetime 3600 s).
    assert out["fetched"] == out["token"]
    assert google.calls["ping"] >= 1
    assert google.calls_by_audience[("metadata", private_service.url)] == 2


def test_metadata_env_was_set_before_google_auth_import(google: FakeGoogle):
    assert _metadata._GCE_METADATA_HOST == google.metadata_host


def test_metadata_identity_cache_follows_the_four_minute_rule(google: FakeGoogle):
    def identity(audience: str) -> str:
        url = f"{google.url}/computeMetadata/v1/instance/service-accounts/default/identity"
        r = requests.get(
            url,
            params={"audience": audience, "format": "full"},
            headers={"Metadata-Flavor": "Google"},
        )
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        return r.text

    long_lived = identity("https://long")
    google.token_lifetime = 20
    short_lived = identity("https://short")
    time.sleep(1.05)  # let iat move on, so a new mint differs from the old one

    assert identity("https://long") == long_lived  # cached: > 4 minutes left
    renewed = identity("https://short")  # <= 4 minutes left: minted again
    assert renewed != short_lived
    assert claims_of(renewed)["exp"] - claims_of(renewed)["iat"] == 20


def test_metadata_wire_details(google: FakeGoogle):
    ping = requests.get(f"{google.url}/")
    assert ping.status_code == 200 and ping.headers["Metadata-Flavor"] == "Google"
    root = f"{google.url}/computeMetadata/v1/instance/service-accounts/default"
    assert requests.get(f"{root}/identity", params={"audience": "a"}).status_code == 403
    flavor = {"Metadata-Flavor": "Google"}
    info = requests.get(f"{root}/", params={"recursive": "true"}, headers=flavor).json()
    assert info == {
        "aliases": ["default"],
        "email": google.metadata_email,
        "scopes": CLOUD_PLATFORM,
    }
    assert requests.get(root, params={"recursive": "true"}, headers=flavor).json() == info
    token = requests.get(f"{root}/token", headers=flavor).json()
    assert set(token) == {"access_token", "expires_in", "token_type"}


def test_fetch_id_token_uses_the_key_file(
    google: FakeGoogle,
    private_service: PrivateService,
    clean_env: CleanEnv,
    tmp_path: Path,
    monkeypatch,
):
    key_file = google.write_key_file(tmp_path / "key.json", SA)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))

    token = id_token.fetch_id_token(Request(), private_service.url)

    assert requests.get(private_service.url, headers=bearer(token)).status_code == 200
    assert private_service.last.claims["email"] == SA
    assert google.calls["ping"] == google.calls["metadata"] == 0


# -- IAM Credentials (impersonation) ---------------------------------------------


@pytest.fixture
def fake_iam(google: FakeGoogle, monkeypatch) -> FakeGoogle:
    # google-auth has no override for the generateIdToken URL (iam_endpoint_override
    # covers only generateAccessToken), so patch the one constant it formats.
    monkeypatch.setattr(iam, "_IAM_IDTOKEN_ENDPOINT", google.iam_idtoken_endpoint)
    return google


def impersonated_id_token(source, audience: str, include_email: bool = True) -> str:
    target = impersonated_credentials.Credentials(source, TARGET, CLOUD_PLATFORM)
    creds = impersonated_credentials.IDTokenCredentials(
        target, target_audience=audience, include_email=include_email
    )
    creds.refresh(Request())
    return creds.token


def test_impersonation_from_a_service_account(
    fake_iam: FakeGoogle, private_service: PrivateService
):
    source_info = fake_iam.register_service_account(CALLER)
    source = service_account.Credentials.from_service_account_info(
        source_info, scopes=CLOUD_PLATFORM
    )
    fake_iam.allow_impersonation(TARGET, CALLER)

    token = impersonated_id_token(source, private_service.url)

    assert requests.get(private_service.url, headers=bearer(token)).status_code == 200
    assert private_service.last.claims["email"] == TARGET
    assert (fake_iam.calls["token"], fake_iam.calls["iam"]) == (1, 1)
    assert fake_iam.calls_by_audience[("iam", private_service.url)] == 1
    assert "email" not in claims_of(
        impersonated_id_token(source, private_service.url, include_email=False)
    )


def test_impersonation_from_the_metadata_server(
    fake_iam: FakeGoogle, private_service: PrivateService
):
    fake_iam.allow_impersonation(TARGET, fake_iam.metadata_email)
    token = impersonated_id_token(compute_engine.Credentials(), private_service.url)
    assert requests.get(private_service.url, headers=bearer(token)).status_code == 200
    assert fake_iam.calls["iam"] == 1


def test_impersonation_denied(fake_iam: FakeGoogle):
    source_info = fake_iam.register_service_account(CALLER)
    source = service_account.Credentials.from_service_account_info(
        source_info, scopes=CLOUD_PLATFORM
    )
    with pytest.raises(RefreshError, match="PERMISSION_DENIED"):
        impersonated_id_token(source, "https://a")


def test_iam_authentication_and_delegation(google: FakeGoogle):
    url = google.iam_idtoken_endpoint.format(TARGET)
    body = {"audience": "https://a", "delegates": None, "includeEmail": True}
    assert requests.post(url, json=body, headers=bearer("ya29.unknown")).status_code == 401
    caller = bearer(google.issue_access_token(CALLER))
    assert requests.post(url, json=body, headers=caller).status_code == 403
    google.allow_impersonation("middle@fake-project.iam.gserviceaccount.com", CALLER)
    google.allow_impersonation(TARGET, "middle@fake-project.iam.gserviceaccount.com")
    chained = dict(body, delegates=["middle@fake-project.iam.gserviceaccount.com"])
    r = requests.post(url, json=chained, headers=caller)
    assert r.status_code == 200
    assert claims_of(r.json()["token"])["email"] == TARGET


# -- authorized_user (gcloud ADC) ---------------------------------------------------


def test_authorized_user_refresh_gets_an_id_token(
    google: FakeGoogle, private_service: PrivateService, tmp_path: Path
):
    adc = google.write_authorized_user_file(tmp_path / "application_default_credentials.json", USER)
    creds = user_credentials.Credentials.from_authorized_user_file(str(adc))
    # from_authorized_user_info always sets Google's token endpoint; point it at the fake.
    creds = creds.with_token_uri(google.token_uri)

    creds.refresh(Request())

    claims = google_jwt.decode(creds.id_token, certs=google.certs(), audience=ADC_CLIENT_ID)
    assert (claims["email"], claims["azp"]) == (USER, ADC_CLIENT_ID)
    assert creds.token.startswith("ya29.")
    assert requests.get(private_service.url, headers=bearer(creds.id_token)).status_code == 401
    private_service.accept_client_id(ADC_CLIENT_ID)
    assert requests.get(private_service.url, headers=bearer(creds.id_token)).status_code == 200
    assert google.calls_by_audience[("token", ADC_CLIENT_ID)] == 1


def test_authorized_user_bad_refresh_token_or_secret(google: FakeGoogle):
    info = google.register_user(USER)
    unknown = dict(info, refresh_token="1//revoked")
    with pytest.raises(RefreshError, match="invalid_grant"):
        user_credentials.Credentials.from_authorized_user_info(unknown).with_token_uri(
            google.token_uri
        ).refresh(Request())
    wrong_secret = dict(info, client_secret="nope")
    with pytest.raises(RefreshError, match="invalid_client"):
        user_credentials.Credentials.from_authorized_user_info(wrong_secret).with_token_uri(
            google.token_uri
        ).refresh(Request())


# -- gcloud stub and clean environment ----------------------------------------------


def gcloud(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gcloud", *args],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, **env},
        check=False,
    )


def test_clean_env_hides_the_real_gcloud_and_credentials(clean_env: CleanEnv):
    assert shutil.which("gcloud") is None
    assert os.environ["HOME"] == str(clean_env.home)
    assert os.environ["CLOUDSDK_CONFIG"] == str(clean_env.cloudsdk_config)
    assert list(clean_env.cloudsdk_config.iterdir()) == []
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ
    assert shutil.which("python3") or shutil.which("python")


def test_gcloud_stub_prints_a_user_token(
    google: FakeGoogle, private_service: PrivateService, gcloud_stub: GcloudStub
):
    done = gcloud("auth", "print-identity-token")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = google_jwt.decode(token, certs=google.certs(), audience=GCLOUD_CLIENT_ID)
    assert (claims["email"], claims["azp"]) == (USER, GCLOUD_CLIENT_ID)
    private_service.accept_client_id(GCLOUD_CLIENT_ID)
    assert requests.get(private_service.url, headers=bearer(token)).status_code == 200

    assert gcloud("config", "get-value", "account").stdout.strip() == USER
    # Real gcloud refuses --audiences for user accounts.
    refused = gcloud("auth", "print-identity-token", f"--audiences={private_service.url}")
    assert refused.returncode == 1
    assert "Invalid account type for `--audiences`" in refused.stderr
    assert gcloud_stub.invocations()[0] == ["auth", "print-identity-token"]
    assert google.calls["mint"] == 1


def test_gcloud_stub_service_account_with_audiences(
    google: FakeGoogle, private_service: PrivateService, clean_env: CleanEnv
):
    install_gcloud_stub(clean_env.bin_dir, google.url, account=SA)
    done = gcloud("auth", "print-identity-token", f"--audiences={private_service.url}")
    assert done.returncode == 0, done.stderr
    assert requests.get(private_service.url, headers=bearer(done.stdout.strip())).status_code == 200
    assert private_service.last.claims["email"] == SA


def test_gcloud_stub_logged_out(gcloud_stub: GcloudStub):
    gcloud_stub.log_out()
    done = gcloud("auth", "print-identity-token")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(
        "ERROR: (gcloud.auth.print-identity-token) You do not currently have an active account selected."
    )
    unset = gcloud("config", "get-value", "account")
    assert (unset.returncode, unset.stdout, unset.stderr.strip()) == (0, "", "(unset)")

    gcloud_stub.log_in()
    assert gcloud("auth", "print-identity-token").returncode == 0
    assert gcloud("auth", "print-identity-token", FAKE_GCLOUD_LOGGED_OUT="1").returncode == 1


# -- fault injection ------------------------------------------------------------------


def post_token(google: FakeGoogle) -> requests.Response:
    return requests.post(
        google.token_uri, data={"grant_type": "refresh_token", "refresh_token": "x"}
    )


def test_fail_count_then_auto_heal(google: FakeGoogle):
    google.fail("token", status=503, count=2)
    statuses = [post_token(google).status_code for _ in range(3)]
    assert statuses == [503, 503, 400]
    assert google.calls["token"] == 3


def test_google_auth_retries_a_transient_token_failure(google: FakeGoogle, sa_info):
    google.fail("token", status=503, count=1)
    creds = service_account.IDTokenCredentials.from_service_account_info(
        sa_info, target_audience="https://a"
    )
    creds.refresh(Request())  # google-auth retries 5xx after ~1 s
    assert google.calls["token"] == 2


def test_fail_until_heal(google: FakeGoogle, sa_info):
    google.fail("token", status=400)
    creds = service_account.IDTokenCredentials.from_service_account_info(
        sa_info, target_audience="https://a"
    )
    for _ in range(2):
        with pytest.raises(RefreshError, match="invalid_grant") as info:
            creds.refresh(Request())
        assert info.value.retryable is False
    google.heal()
    creds.refresh(Request())
    assert google.calls["token"] == 3


def test_fault_shapes_per_endpoint(google: FakeGoogle):
    identity = (
        f"{google.url}/computeMetadata/v1/instance/service-accounts/default/identity?audience=a"
    )
    flavor = {"Metadata-Flavor": "Google"}
    google.fail("metadata", status=503, count=1)
    assert requests.get(identity, headers=flavor).status_code == 503
    assert requests.get(identity, headers=flavor).status_code == 200
    google.fail("iam", status=403)
    r = requests.post(google.iam_idtoken_endpoint.format(TARGET), json={"audience": "a"})
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    google.fail("ping", status=500)
    assert requests.get(f"{google.url}/").status_code == 500
    with pytest.raises(ValueError):
        google.fail("nope")


def test_hang_times_out_clients_and_heal_releases_them(google: FakeGoogle):
    google.hang("metadata", seconds=30)
    identity = (
        f"{google.url}/computeMetadata/v1/instance/service-accounts/default/identity?audience=a"
    )
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(identity, headers={"Metadata-Flavor": "Google"}, timeout=0.3)

    results: list[int] = []
    waiter = threading.Thread(
        target=lambda: results.append(
            requests.get(identity, headers={"Metadata-Flavor": "Google"}).status_code
        )
    )
    waiter.start()
    time.sleep(0.2)
    google.heal()
    waiter.join(5)
    assert results == [200]
    assert google.calls["metadata"] == 2


def test_reset_restores_defaults(fake_google: FakeGoogle, sa_info):
    fake_google.token_lifetime = 5
    fake_google.metadata_email = "someone@else"
    fake_google.fail("token")
    fake_google.reset()
    assert (fake_google.token_lifetime, fake_google.calls) == (3600, {})
    assert fake_google.metadata_email.endswith("-compute@developer.gserviceaccount.com")
    r = requests.post(
        fake_google.token_uri,
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "a.b.c"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


# -- the private service's endpoints ----------------------------------------------------


@pytest.fixture
def service(
    google: FakeGoogle, private_service: PrivateService
) -> Iterator[tuple[str, dict[str, str]]]:
    yield private_service.url, bearer(google.mint(private_service.url))


@pytest.mark.parametrize("query, framing", [("", "Transfer-Encoding"), ("?cl=1", "Content-Length")])
def test_bytes_streams_the_pattern(service, query: str, framing: str):
    url, auth = service
    n = 1_000_003
    with requests.get(f"{url}/bytes/{n}{query}", headers=auth, stream=True) as r:
        assert r.status_code == 200 and framing in r.headers
        digest = hashlib.sha256()
        for chunk in r.iter_content(65536):
            digest.update(chunk)
    assert digest.hexdigest() == pattern_sha256(n)
    assert pattern_bytes(5, 250) == bytes([250, 0, 1, 2, 3])


def test_upload_consumes_a_streamed_body(service, private_service: PrivateService):
    url, auth = service
    parts = [pattern_bytes(100_000, i * 100_000) for i in range(3)]
    r = requests.put(f"{url}/upload", headers=auth, data=iter(parts))
    assert r.json() == {"len": 300_000, "sha256": pattern_sha256(300_000)}
    assert private_service.last.header("Transfer-Encoding") == "chunked"


def test_echo_keeps_the_raw_path_and_header_order(service):
    url, auth = service
    conn = http.client.HTTPConnection(url.removeprefix("http://"))
    conn.putrequest("PATCH", "/a%2Fb/./c?q=%2F&q=2", skip_accept_encoding=True)
    conn.putheader("X-B", "2")
    conn.putheader("X-A", "1")
    conn.putheader("Authorization", auth["Authorization"])
    conn.endheaders()
    echo = json.loads(conn.getresponse().read())
    conn.close()
    assert echo["method"] == "PATCH"
    assert echo["path"] == "/a%2Fb/./c?q=%2F&q=2"
    assert echo["query"] == [["q", "/"], ["q", "2"]]
    names = [k for k, _ in echo["headers"]]
    assert names.index("X-B") < names.index("X-A")


def test_simple_endpoints(service, private_service: PrivateService):
    url, auth = service
    r = requests.get(
        f"{url}/redirect",
        params={"to": f"{url}/elsewhere", "status": "307"},
        headers=auth,
        allow_redirects=False,
    )
    assert (r.status_code, r.headers["Location"]) == (307, f"{url}/elsewhere")
    assert requests.get(f"{url}/status/418", headers=auth).status_code == 418
    assert requests.get(f"{url}/cors", headers=auth).headers["Access-Control-Allow-Origin"] == "*"
    cookie = requests.get(f"{url}/set-cookie", headers=auth).headers["Set-Cookie"]
    assert "Domain=127.0.0.1" in cookie
    page = requests.get(f"{url}/page", headers=auth).text
    assert '<script src="/static/app.js">' in page
    assert "document.title" in requests.get(f"{url}/static/app.js", headers=auth).text
    raw = requests.get(f"{url}/gzip", headers=auth, stream=True)
    assert raw.headers["Content-Encoding"] == "gzip"
    body = raw.raw.read(decode_content=False)
    assert body[:2] == b"\x1f\x8b" and len(body) < len(GZIP_PLAIN)
    with pytest.raises(
        (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
    ):
        requests.get(f"{url}/reset-mid-body", headers=auth)


async def test_slow_body_sends_headers_first(service):
    url, auth = service
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(f"{url}/slow-body?seconds=0.5", headers=auth) as r:
            assert r.status == 200
            assert r.content.read_nowait() == b""  # headers are here, the body is not
            assert await r.read() == b"slow body\n"
        assert time.monotonic() - started >= 0.5
        async with session.get(f"{url}/slow?seconds=0.2", headers=auth) as r:
            assert await r.text() == "slow\n"


async def test_sse_flushes_each_event(service):
    url, auth = service
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/sse?n=3&interval=0.3", headers=auth) as r,
    ):
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await r.content.readuntil(b"\n\n")
        assert first == b"id: 0\ndata: event 0\n\n"
        assert not r.content.at_eof()  # the next events are still to come
        rest = await r.read()
    assert rest == b"id: 1\ndata: event 1\n\nid: 2\ndata: event 2\n\n"


async def test_websocket_echo_and_close_code(service, private_service: PrivateService):
    url, auth = service
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/ws", headers=auth, protocols=("chat",)) as ws,
    ):
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert await ws.receive_str() == "hi"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes() == b"\x00\x01"
        await ws.send_str("close:4001")
        message = await ws.receive()
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001
    assert private_service.last.header("Upgrade") == "websocket"


def test_background_server_runs_on_its_own_loop():
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    with BackgroundServer(app) as server:
        assert requests.get(server.url).text == "hello"

        async def where() -> str:
            return threading.current_thread().name

        assert server.call(where) != threading.current_thread().name
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.url, timeout=2)


async def test_fakes_serve_an_async_test_on_another_loop(google: FakeGoogle, sa_info):
    # A blocking google-auth call from a coroutine, as the proxy does via to_thread.
    creds = service_account.IDTokenCredentials.from_service_account_info(
        sa_info, target_audience="https://a"
    )
    await asyncio.to_thread(creds.refresh, Request())
    assert claims_of(creds.token)["aud"] == "https://a"
