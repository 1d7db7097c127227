"""``source: auto``: each step of the default order, in a clean environment.

GOOGLE_APPLICATION_CREDENTIALS (any supported type), then gcloud's
application-default credentials file, then the metadata server, then the gcloud
CLI on PATH. The identity records why it was picked and what was not used.
"""

from __future__ import annotations

import json

import pytest

from proxy.config import Credentials
from proxy.errors import CredentialError
from proxy.auth.choose import build_identity
from proxy.auth.gcloud import GcloudIdentity
from proxy.auth.impersonate import ImpersonateIdentity
from proxy.auth.metadata import MetadataIdentity
from proxy.auth.service_account import ServiceAccountIdentity
from proxy.auth.user import UserIdentity
from tests.fakes import DEFAULT_USER_EMAIL

from .test_identity_support import no_metadata, sa_email, user_token_endpoint  # noqa: F401

ADC = "application_default_credentials.json"
AUTO = Credentials()


def test_google_application_credentials_service_account_key(clean_env, sa_key, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(sa_key[0]))
    # A gcloud login is there too: the explicit setting wins.
    (clean_env.cloudsdk_config / ADC).write_text(json.dumps({"type": "authorized_user"}))
    ident = build_identity(AUTO)
    assert isinstance(ident, ServiceAccountIdentity) and ident.email == sa_key[1]
    assert ident.reason == f"GOOGLE_APPLICATION_CREDENTIALS={sa_key[0]} (service_account)"
    assert ident.report()[0].startswith(f"using service_account ({sa_key[1]})")
    assert "not used: the metadata server (later in the auto order)" in ident.report()


def test_google_application_credentials_user_login(clean_env, google, tmp_path, monkeypatch):
    path = google.write_authorized_user_file(tmp_path / "adc.json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    ident = build_identity(AUTO)
    assert isinstance(ident, UserIdentity) and ident.path == str(path)
    assert "(authorized_user)" in ident.reason


def test_google_application_credentials_impersonated_service_account(clean_env, google, tmp_path, monkeypatch):
    target = sa_email("target")
    path = tmp_path / "imp.json"
    path.write_text(
        json.dumps(
            {
                "type": "impersonated_service_account",
                "service_account_impersonation_url": f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{target}:generateAccessToken",
                "source_credentials": google.register_user(),
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    ident = build_identity(AUTO)
    assert isinstance(ident, ImpersonateIdentity) and ident.email == target


def test_google_application_credentials_external_account_needs_a_service_account(clean_env, tmp_path, monkeypatch):
    target = sa_email("deployer")
    path = tmp_path / "wif.json"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/gh",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "service_account_impersonation_url": f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{target}:generateAccessToken",
                "credential_source": {"file": str(tmp_path / "oidc-token")},
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(CredentialError) as e:
        build_identity(AUTO)
    assert "external_account" in str(e.value)
    assert e.value.hint and f"source: impersonate, service_account: {target}" in e.value.hint


@pytest.mark.parametrize("content", [None, "{not json", '["a list"]', '{"type": "gdch_service_account"}'])
def test_broken_google_application_credentials_is_an_error_not_a_fallthrough(clean_env, tmp_path, monkeypatch, content):
    path = tmp_path / "creds.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    with pytest.raises(CredentialError) as e:
        build_identity(AUTO)
    assert str(path) in str(e.value)


def test_gcloud_adc_file_from_cloudsdk_config(clean_env, google):
    google.write_authorized_user_file(clean_env.cloudsdk_config / ADC)
    ident = build_identity(AUTO)
    assert isinstance(ident, UserIdentity)
    assert ident.path == str(clean_env.cloudsdk_config / ADC)
    assert ident.tried[0] == "GOOGLE_APPLICATION_CREDENTIALS is not set"


def test_gcloud_adc_file_under_home_without_cloudsdk_config(clean_env, google, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CONFIG")
    path = clean_env.home / ".config" / "gcloud" / ADC
    google.write_authorized_user_file(path)
    ident = build_identity(AUTO)
    assert isinstance(ident, UserIdentity) and ident.path == str(path)


def test_gcloud_adc_file_with_a_service_account_key(clean_env, google):
    google.write_key_file(clean_env.cloudsdk_config / ADC, sa_email("adc"))
    ident = build_identity(AUTO)
    assert isinstance(ident, ServiceAccountIdentity) and ident.email == sa_email("adc")


def test_metadata_server_when_no_files(clean_env, gcloud_stub):
    ident = build_identity(AUTO)
    assert isinstance(ident, MetadataIdentity)
    assert ident.reason == "the metadata server answered"
    assert ident.tried[:2] == [
        "GOOGLE_APPLICATION_CREDENTIALS is not set",
        f"no gcloud application-default credentials at {clean_env.cloudsdk_config / ADC}",
    ]
    # gcloud is on PATH but comes later in the order.
    assert ident.tried[2] == "the gcloud CLI (later in the auto order)"
    assert gcloud_stub.invocations() == []


def test_gcloud_cli_when_nothing_else(clean_env, no_metadata, gcloud_stub):
    ident = build_identity(AUTO)
    assert isinstance(ident, GcloudIdentity) and ident.email == DEFAULT_USER_EMAIL
    assert any(t.startswith("no metadata server answered") for t in ident.tried)
    assert ident.reason.startswith(f"gcloud CLI at {gcloud_stub.path}")


def test_nothing_found_lists_every_step_and_what_to_run(clean_env, no_metadata):
    with pytest.raises(CredentialError) as e:
        build_identity(AUTO)
    text = str(e.value)
    for step in (
        "GOOGLE_APPLICATION_CREDENTIALS is not set",
        f"no gcloud application-default credentials at {clean_env.cloudsdk_config / ADC}",
        "no metadata server answered",
        "gcloud is not on PATH",
    ):
        assert step in text
    assert e.value.hint and "gcloud auth application-default login" in e.value.hint


def test_gcloud_logged_out_is_not_picked(clean_env, no_metadata, gcloud_stub):
    gcloud_stub.log_out()
    with pytest.raises(CredentialError) as e:
        build_identity(AUTO)
    assert f"gcloud at {gcloud_stub.path} has no active account" in str(e.value)


async def test_startup_report_names_the_pick_and_the_rest(start_proxy, clean_env, google, private_service, caplog):
    await start_proxy({"routes": [{"upstream": private_service.url}]})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("credentials: ")]
    assert lines[0] == f"credentials: using metadata ({google.metadata_email}): the metadata server answered"
    assert "credentials: not used: GOOGLE_APPLICATION_CREDENTIALS is not set" in lines
    assert "credentials: not used: the gcloud CLI (later in the auto order)" in lines
