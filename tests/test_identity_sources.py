"""Every credentials source, through the real google-auth code paths against the fakes.

Tokens are checked by the PrivateService (signature, expiry, audience, as Cloud
Run does); the fakes' call counters show what was asked of Google.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from proxy.config import Credentials
from proxy.errors import CredentialError
from proxy.auth.choose import build_identity
from proxy.auth.gcloud import GcloudIdentity
from proxy.auth.impersonate import ImpersonateIdentity
from proxy.auth.user import UserIdentity
from tests.fakes import ADC_CLIENT_ID, DEFAULT_USER_EMAIL, GCLOUD_CLIENT_ID, install_gcloud_stub

from .test_identity_support import client, eventually, iam, no_metadata, sa_email, user_token_endpoint  # noqa: F401

ADC = "application_default_credentials.json"


def one_route(upstream: str, **creds: object) -> dict[str, object]:
    return {"credentials": creds, "routes": [{"upstream": upstream}]}


def identity_of(proxy) -> object:  # type: ignore[no-untyped-def]
    (ident,) = set(proxy.state.identities.values())
    return ident


# --------------------------------------------------------------------------- service_account and metadata


async def test_service_account_key(start_proxy, client, sa_key, private_service, google, clean_env, caplog):
    key, email = sa_key
    proxy = await start_proxy(one_route(private_service.url, source="service_account", key_file=str(key)))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["aud"] == private_service.url
    assert private_service.last.claims["email"] == email
    assert google.calls_by_audience[("token", private_service.url)] == 1
    assert f"credentials: using service_account ({email}): key file {key}" in caplog.text


async def test_metadata_server(start_proxy, client, private_service, google, clean_env):
    proxy = await start_proxy(one_route(private_service.url, source="metadata"))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    claims = private_service.last.claims
    assert claims["aud"] == private_service.url and claims["email"] == google.metadata_email
    # format=full: the instance details are in the token.
    assert "compute_engine" in claims["google"]
    assert identity_of(proxy).email == google.metadata_email
    assert google.calls_by_audience[("metadata", private_service.url)] == 1
    assert identity_of(proxy).refresh_margin == 210.0


# --------------------------------------------------------------------------- impersonate


async def test_impersonate_with_a_key_file_as_caller(start_proxy, client, private_service, iam, clean_env, tmp_path, monkeypatch):
    caller, target = sa_email("caller"), sa_email("target")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(iam.write_key_file(tmp_path / "caller.json", caller)))
    iam.allow_impersonation(target, caller)
    proxy = await start_proxy(one_route(private_service.url, source="impersonate", service_account=target))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    claims = private_service.last.claims
    assert claims["aud"] == private_service.url
    # include_email=True: the token names the impersonated account.
    assert claims["email"] == target
    assert iam.calls_by_audience[("iam", private_service.url)] == 1
    assert identity_of(proxy).describe() == f"impersonate ({target})"


async def test_impersonate_through_delegates(start_proxy, client, private_service, iam, clean_env, tmp_path, monkeypatch):
    caller, middle, target = sa_email("caller"), sa_email("middle"), sa_email("target")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(iam.write_key_file(tmp_path / "caller.json", caller)))
    # The fake checks every link of caller -> delegates -> target.
    iam.allow_impersonation(middle, caller)
    iam.allow_impersonation(target, middle)
    proxy = await start_proxy(one_route(private_service.url, source="impersonate", service_account=target, delegates=[middle]))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["email"] == target


async def test_impersonate_with_the_gcloud_user_login_as_caller(start_proxy, client, private_service, iam, user_token_endpoint, clean_env):
    target = sa_email("target")
    iam.write_authorized_user_file(clean_env.cloudsdk_config / ADC)
    iam.allow_impersonation(target, DEFAULT_USER_EMAIL)
    proxy = await start_proxy(one_route(private_service.url, source="impersonate", service_account=target))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["email"] == target
    assert "gcloud application-default credentials" in identity_of(proxy).reason


async def test_impersonate_with_the_metadata_server_as_caller(start_proxy, client, private_service, iam, clean_env):
    target = sa_email("target")
    iam.allow_impersonation(target, iam.metadata_email)
    proxy = await start_proxy(one_route(private_service.url, source="impersonate", service_account=target))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["email"] == target
    assert "metadata server" in identity_of(proxy).reason


async def test_impersonate_refused_answers_503_with_the_role_to_grant(start_proxy, client, private_service, iam, clean_env, tmp_path, monkeypatch):
    caller, target = sa_email("caller"), sa_email("target")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(iam.write_key_file(tmp_path / "caller.json", caller)))
    proxy = await start_proxy(one_route(private_service.url, source="impersonate", service_account=target), ready=False)
    async with client.get(proxy.url + "/x") as r:
        body = await r.text()
        assert r.status == 503, body
        assert int(r.headers["Retry-After"]) >= 1
    assert "roles/iam.serviceAccountOpenIdTokenCreator" in body and target in body
    assert private_service.requests == []


def test_impersonate_with_a_workload_identity_federation_config_as_caller(clean_env, tmp_path, monkeypatch):
    # Building needs no network: the federated token is exchanged on the first fetch.
    path = tmp_path / "wif.json"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/gh",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": str(tmp_path / "oidc-token")},
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    ident = build_identity(Credentials(source="impersonate", service_account=sa_email("deployer")))
    assert isinstance(ident, ImpersonateIdentity) and ident.email == sa_email("deployer")
    assert ident.reason == f"impersonating {sa_email('deployer')} as GOOGLE_APPLICATION_CREDENTIALS={path}"


def test_impersonate_without_any_caller_credentials_is_a_startup_error(clean_env, no_metadata):
    with pytest.raises(CredentialError) as e:
        build_identity(Credentials(source="impersonate", service_account=sa_email("target")))
    text = str(e.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS is not set" in text
    assert str(clean_env.cloudsdk_config / ADC) in text
    assert "no metadata server" in text
    assert e.value.hint and "gcloud auth application-default login" in e.value.hint


async def test_impersonated_service_account_file(client, private_service, iam, user_token_endpoint, clean_env, tmp_path, monkeypatch, start_proxy):
    # What `gcloud auth application-default login --impersonate-service-account=...` writes.
    target = sa_email("target")
    user = iam.register_user()
    path = tmp_path / "impersonated.json"
    path.write_text(
        json.dumps(
            {
                "type": "impersonated_service_account",
                "service_account_impersonation_url": f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{target}:generateAccessToken",
                "source_credentials": user,
                "delegates": [],
            }
        )
    )
    iam.allow_impersonation(target, DEFAULT_USER_EMAIL)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    proxy = await start_proxy(one_route(private_service.url, source="auto"))
    assert isinstance(identity_of(proxy), ImpersonateIdentity)
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["email"] == target
    assert private_service.last.claims["aud"] == private_service.url


# --------------------------------------------------------------------------- user


async def test_user_login_token_carries_the_oauth_client_audience(start_proxy, client, private_service, user_token_endpoint, clean_env, caplog):
    user_token_endpoint.write_authorized_user_file(clean_env.cloudsdk_config / ADC)
    # Cloud Run accepts user tokens whose audience is the OAuth client.
    private_service.accept_client_id(ADC_CLIENT_ID)
    proxy = await start_proxy(one_route(private_service.url, source="user"))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    claims = private_service.last.claims
    assert claims["aud"] == ADC_CLIENT_ID and claims["email"] == DEFAULT_USER_EMAIL
    (key,) = proxy.state.tokens.keys()
    status = proxy.state.tokens.status(key)
    assert status["token_audience"] == ADC_CLIENT_ID and status["email"] == DEFAULT_USER_EMAIL
    # The startup warning: which audience, and where it will not work.
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and ADC_CLIENT_ID in r.getMessage()]
    assert warning and "Cloud Run accepts it" in warning[0] and "IAP" in warning[0]
    assert private_service.url in warning[0]


async def test_user_login_is_reloaded_when_gcloud_rewrites_the_file(user_token_endpoint, clean_env):
    google = user_token_endpoint
    path = google.write_authorized_user_file(clean_env.cloudsdk_config / ADC, email="first@example.com")
    ident = build_identity(Credentials(source="user"))
    assert isinstance(ident, UserIdentity)
    assert (await ident.fetch("https://aud")).email == "first@example.com"
    google.write_authorized_user_file(path, email="second@example.com")
    os.utime(path, (time.time() + 5, time.time() + 5))  # a distinct mtime even on coarse clocks
    assert (await ident.fetch("https://aud")).email == "second@example.com"


async def test_revoked_user_login_answers_503_with_the_login_command(start_proxy, client, private_service, user_token_endpoint, clean_env):
    (clean_env.cloudsdk_config / ADC).write_text(
        json.dumps({"type": "authorized_user", "client_id": ADC_CLIENT_ID, "client_secret": "s", "refresh_token": "1//revoked"})
    )
    proxy = await start_proxy(one_route(private_service.url, source="user"), ready=False)
    async with client.get(proxy.url + "/x") as r:
        body = await r.text()
        assert r.status == 503, body
        assert "Retry-After" in r.headers
    assert "invalid_grant" in body and "gcloud auth application-default login" in body


def test_user_without_a_login_is_a_startup_error(clean_env):
    with pytest.raises(CredentialError) as e:
        build_identity(Credentials(source="user"))
    assert str(clean_env.cloudsdk_config / ADC) in str(e.value)
    assert e.value.hint == "run `gcloud auth application-default login`"


# --------------------------------------------------------------------------- gcloud


async def test_gcloud_user_account_gets_gcloud_audience_tokens(start_proxy, client, private_service, gcloud_stub, caplog):
    private_service.accept_client_id(GCLOUD_CLIENT_ID)
    config = {
        "credentials": {"source": "gcloud"},
        "routes": [
            {"prefix": "/a", "upstream": private_service.url},
            {"prefix": "/b", "upstream": private_service.url, "audience": "https://custom.example"},
        ],
    }
    proxy = await start_proxy(config)
    for path in ("/a/x", "/b/y"):
        async with client.get(proxy.url + path) as r:
            assert r.status == 200, await r.text()
        assert private_service.last.claims["aud"] == GCLOUD_CLIENT_ID
        assert private_service.last.claims["email"] == DEFAULT_USER_EMAIL
    calls = gcloud_stub.invocations()
    assert calls[0] == ["config", "get-value", "account"]
    # --audiences is tried once; gcloud refuses it for a user account, and it is not tried again.
    assert sum(1 for c in calls if any(a.startswith("--audiences=") for a in c)) == 1
    assert calls.count(["auth", "print-identity-token"]) == 2
    assert "Cloud Run accepts it" in caplog.text and "https://custom.example" in caplog.text


async def test_gcloud_service_account_login_gets_the_route_audience(start_proxy, client, private_service, clean_env, google, caplog):
    account = sa_email("ci")
    stub = install_gcloud_stub(clean_env.bin_dir, google.url, account=account)
    proxy = await start_proxy(one_route(private_service.url, source="gcloud"))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["aud"] == private_service.url
    assert private_service.last.claims["email"] == account
    calls = [json.loads(line) for line in (stub.parent / "gcloud-calls.jsonl").read_text().splitlines()]
    assert ["auth", "print-identity-token", f"--audiences={private_service.url}"] in calls
    assert "Cloud Run accepts it" not in caplog.text


def test_gcloud_logged_out_is_a_startup_error(gcloud_stub):
    gcloud_stub.log_out()
    with pytest.raises(CredentialError) as e:
        build_identity(Credentials(source="gcloud"))
    assert "no active account" in str(e.value)
    assert e.value.hint == "run `gcloud auth login`"


def test_gcloud_not_on_path_is_a_startup_error(clean_env):
    with pytest.raises(CredentialError) as e:
        build_identity(Credentials(source="gcloud"))
    assert "gcloud is not on PATH" in str(e.value)


async def test_gcloud_failure_becomes_one_line_and_a_hint(gcloud_stub):
    ident = build_identity(Credentials(source="gcloud"))
    gcloud_stub.log_out()
    with pytest.raises(CredentialError) as e:
        await ident.fetch("https://aud")
    reason = str(e.value).splitlines()[0]
    assert reason == "gcloud auth print-identity-token failed: You do not currently have an active account selected."
    assert e.value.hint == "run `gcloud auth login`"


async def test_gcloud_that_hangs_is_killed(clean_env, monkeypatch, tmp_path):
    pid_file = tmp_path / "pid"
    script = clean_env.bin_dir / "gcloud"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = config ]; then echo someone@example.com; exit 0; fi\n'
        f'echo $$ > {pid_file}\nexec sleep 60\n'
    )
    script.chmod(0o755)
    monkeypatch.setattr("proxy.auth.gcloud.GCLOUD_TIMEOUT", 1.0)
    ident = build_identity(Credentials(source="gcloud"))
    assert isinstance(ident, GcloudIdentity)
    with pytest.raises(CredentialError) as e:
        await ident.fetch("https://aud")
    assert "did not finish within 1 s" in str(e.value)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --------------------------------------------------------------------------- static


async def test_static_token_from_the_environment(start_proxy, client, private_service, google, clean_env, monkeypatch):
    monkeypatch.setenv("ID_TOKEN", google.mint(private_service.url))
    proxy = await start_proxy(one_route(private_service.url, source="static", token_env="ID_TOKEN"))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.header("Authorization") == f"Bearer {os.environ['ID_TOKEN']}"


async def test_static_token_file_is_reread_when_it_changes(start_proxy, client, private_service, google, clean_env, tmp_path):
    path = tmp_path / "token"
    first = google.mint(private_service.url, lifetime=3600)
    path.write_text(first + "\n")
    proxy = await start_proxy(one_route(private_service.url, source="static", token_file=str(path)))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200
    assert private_service.last.header("Authorization") == f"Bearer {first}"

    second = google.mint(private_service.url, lifetime=1800)
    path.write_text(second)
    os.utime(path, (time.time() + 5, time.time() + 5))

    async def upstream_sees_second() -> bool:
        async with client.get(proxy.url + "/x") as r:
            assert r.status == 200
        return private_service.last.header("Authorization") == f"Bearer {second}"

    await eventually(upstream_sees_second)


async def test_static_token_for_another_audience_is_shown_with_a_warning(start_proxy, private_service, google, clean_env, monkeypatch, caplog):
    monkeypatch.setenv("ID_TOKEN", google.mint("https://somewhere-else.example"))
    proxy = await start_proxy(one_route(private_service.url, source="static", token_env="ID_TOKEN"))
    (key,) = proxy.state.tokens.keys()
    assert proxy.state.tokens.status(key)["token_audience"] == "https://somewhere-else.example"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("https://somewhere-else.example" in w and private_service.url in w for w in warnings), warnings


def test_expired_static_token_in_the_environment_is_a_startup_error(google, monkeypatch):
    monkeypatch.setenv("ID_TOKEN", google.expired_token("https://aud"))
    with pytest.raises(CredentialError) as e:
        build_identity(Credentials(source="static", token_env="ID_TOKEN"))
    assert "expired" in str(e.value) and "eyJ" not in str(e.value)


@pytest.mark.parametrize("content", ["", "not a token", "eyJhbGciOiJub25lIn0.eyJhdWQiOiJ4In0.sig"])
def test_unusable_static_token_file_is_a_startup_error(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(CredentialError) as e:
        build_identity(Credentials(source="static", token_file=str(path)))
    assert str(path) in str(e.value)
    assert "eyJ" not in str(e.value)
