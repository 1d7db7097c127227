"""The identity commands as users run them: `token`, `check --resolve`, and debug logs without tokens."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

from tests.fakes import GCLOUD_CLIENT_ID

from .test_cli import ROOT, closed_metadata, free_port, run, wait_for_200


def call_with_token(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return int(r.status)


def test_token_prints_a_token_the_service_accepts(clean_env, sa_key, private_service):
    result = run("token", private_service.url, env=clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0])))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    assert call_with_token(private_service.url + "/x", token) == 200
    assert private_service.last.claims["aud"] == private_service.url
    assert private_service.last.claims["email"] == sa_key[1]
    assert token not in result.stderr


def test_token_with_a_config_uses_its_credentials(clean_env, google, private_service, tmp_path):
    key = google.write_key_file(tmp_path / "other.json", "other@fake-project.iam.gserviceaccount.com")
    config = tmp_path / "c.yaml"
    config.write_text(f"credentials: {{source: service_account, key_file: {key}}}\n")
    result = run("token", private_service.url, "--config", str(config), env=clean_env.env())
    assert result.returncode == 0, result.stderr
    assert call_with_token(private_service.url, result.stdout.strip()) == 200
    assert private_service.last.claims["email"] == "other@fake-project.iam.gserviceaccount.com"


def test_token_from_gcloud_warns_about_its_audience_on_stderr(gcloud_stub, clean_env, private_service, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("credentials: {source: gcloud}\n")
    result = run("token", private_service.url, "--config", str(config), env=clean_env.env())
    assert result.returncode == 0, result.stderr
    assert GCLOUD_CLIENT_ID in result.stderr and "Cloud Run accepts it" in result.stderr
    private_service.accept_client_id(GCLOUD_CLIENT_ID)
    assert call_with_token(private_service.url, result.stdout.strip()) == 200


def test_token_without_credentials_exits_3_with_a_hint(clean_env):
    result = run("token", "https://x.run.app", env=closed_metadata(clean_env.env()))
    assert result.returncode == 3, result
    assert "no Google credentials found" in result.stderr
    assert "hint: run `gcloud auth application-default login`" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_token_with_gcloud_logged_out_exits_3_with_the_login_command(gcloud_stub, clean_env, tmp_path):
    gcloud_stub.log_out()
    config = tmp_path / "c.yaml"
    config.write_text("credentials: {source: gcloud}\n")
    result = run("token", "https://x.run.app", "--config", str(config), env=clean_env.env())
    assert result.returncode == 3, result
    assert "hint: run `gcloud auth login`" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_refused_by_the_token_endpoint_exits_3_with_a_hint(clean_env, google, sa_key):
    google.fail("token", 400)
    result = run("token", "https://x.run.app", env=clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0])))
    assert result.returncode == 3, result
    assert "invalid_grant" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_resolve_shows_audience_source_and_email_never_the_token(clean_env, sa_key, private_service, google, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "routes:\n"
        f"  - {{name: api, upstream: {private_service.url}}}\n"
        f"  - {{name: meta, prefix: /m, upstream: {private_service.url}, audience: https://custom.example, credentials: {{source: metadata}}}}\n"
    )
    result = run("check", str(config), "--resolve", env=clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0])))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"api: audience {private_service.url}, source service_account, email {sa_key[1]}, token audience {private_service.url}" in out
    assert f"meta: audience https://custom.example, source metadata, email {google.metadata_email}" in out
    assert "credentials: using service_account" in out and "GOOGLE_APPLICATION_CREDENTIALS=" in out
    assert "eyJ" not in out + result.stderr


def test_check_resolve_without_credentials_exits_3(clean_env, private_service, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"routes:\n  - upstream: {private_service.url}\n")
    result = run("check", str(config), "--resolve", env=closed_metadata(clean_env.env()))
    assert result.returncode == 3, result
    assert "no Google credentials found" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_resolve_reports_a_failing_source_per_route_with_a_hint(clean_env, sa_key, google, tmp_path):
    google.fail("token", 400)
    config = tmp_path / "c.yaml"
    config.write_text("routes:\n  - {name: api, upstream: https://x.run.app}\n")
    result = run("check", str(config), "--resolve", env=clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0])))
    assert result.returncode == 3, result
    assert "api: service_account" in result.stdout and "cannot get a token" in result.stdout and "hint:" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_debug_logging_never_prints_a_token(clean_env, sa_key, private_service, google):
    """`--log-level debug` with google-auth at work (a key file and the metadata server)."""
    google.token_lifetime = 20  # a background refresh happens while the proxy runs
    port = free_port()
    routes = (
        "routes:\n"
        f"  - {{prefix: /a, upstream: {private_service.url}}}\n"
        f"  - {{prefix: /m, upstream: {private_service.url}, credentials: {{source: metadata}}}}\n"
    )
    path = clean_env.home / "c.yaml"
    path.write_text(routes)
    env = clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0]), IDTOKEN_PROXY_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--config", str(path), "--log-level", "debug"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[str] = set()
    try:
        for prefix in ("/a", "/m"):
            wait_for_200(f"http://127.0.0.1:{port}{prefix}/x", proc)
            seen.add(private_service.last.header("Authorization") or "")
        # Wait for a background refresh (20-second tokens refresh within ~8 s).
        wanted = google.calls["token"] + 1
        deadline = time.monotonic() + 30
        while google.calls["token"] < wanted and time.monotonic() < deadline:
            time.sleep(0.2)
        wait_for_200(f"http://127.0.0.1:{port}/a/y", proc)
        seen.add(private_service.last.header("Authorization") or "")
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert " DEBUG " in stderr, "debug logging was not on"
    assert google.calls["token"] >= 2, "no refresh happened while the proxy ran"
    for header in seen:
        token = header.removeprefix("Bearer ")
        assert token and token not in stderr
    assert "eyJ" not in stderr


def test_google_auth_loggers_stay_at_warning_under_debug():
    """The loggers google-auth writes assertions and token responses to are quieted by setup_logging."""
    import logging

    from proxy.ops.logs import setup_logging

    names = ("google", "google.auth", "google.auth.transport.requests", "google.oauth2", "google.oauth2._client", "urllib3")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names})
    try:
        setup_logging("debug")
        assert root.isEnabledFor(logging.DEBUG)
        for name in names[1:]:
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    finally:
        root.handlers[:], level, levels = saved
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
