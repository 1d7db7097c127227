"""The command line by name: every "the API says no" message word for word, exit 3, no traceback, no token.

Each case runs ``python -m proxy`` as a user would, against the fake APIs and
the fake token endpoint (the key file in GOOGLE_APPLICATION_CREDENTIALS).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from .test_names_support import PROJECT, REGION, _cloud_apis, apis, key_env, run_cli, write_gcloud_config  # noqa: F401

#: Found before clean_env narrows PATH.
CURL = shutil.which("curl")
OTHER = "my-project"  # not the metadata server's project: no project number, no fallback


def assert_startup_failure(result: subprocess.CompletedProcess[str], google: object, *lines: str) -> None:
    assert result.returncode == 3, (result.returncode, result.stderr)
    # The message and its hint close stderr (log lines, e.g. retries, may come before).
    assert result.stderr.splitlines()[-len(lines):] == list(lines), result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("idtoken-proxy:")][:-1], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    issued = google.issued  # type: ignore[attr-defined]
    assert not [t for t in issued if t in result.stderr or t in result.stdout]


def test_service_not_found(apis, key_env, google):
    apis.run.grant(key_env)
    result = run_cli("--service", "hello", "--region", REGION, "--project", OTHER)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: service hello not found in project {OTHER}, region {REGION}",
        f"  hint: run `gcloud run services list --project {OTHER} --region {REGION}` to see the services there",
    )
    assert apis.run.calls["get"] == 1


def test_function_not_found(apis, key_env, google):
    apis.functions.grant(key_env)
    result = run_cli("--function", "fn", "--region", REGION, "--project", OTHER)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: function fn not found in project {OTHER}, region {REGION}",
        f"  hint: run `gcloud functions list --project {OTHER} --regions {REGION}` to see the functions there",
    )


def test_service_permission_denied_names_the_permission_and_the_identity(apis, key_env, google):
    apis.run.add_service("hello", project=OTHER)
    result = run_cli("--service", "hello", "--region", REGION, "--project", OTHER)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: {key_env} lacks permission run.services.get on service hello in project {OTHER}, region {REGION}",
        f"  hint: grant it roles/run.viewer (`gcloud run services add-iam-policy-binding hello --region {REGION} --project {OTHER} "
        f"--member=serviceAccount:{key_env} --role=roles/run.viewer`), or give the project number (project_number, --project-number) "
        "to use the deterministic URL, or the URL itself (upstream, --upstream)",
    )


def test_function_permission_denied(apis, key_env, google):
    apis.functions.add_function("fn", project=OTHER)
    result = run_cli("--function", "fn", "--region", REGION, "--project", OTHER)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: {key_env} lacks permission cloudfunctions.functions.get on function fn in project {OTHER}, region {REGION}",
        f"  hint: grant it roles/cloudfunctions.viewer on project {OTHER}, or give the URL itself (upstream, --upstream)",
    )


@pytest.mark.parametrize("kind", ["service", "function"])
def test_api_not_enabled(apis, key_env, google, kind):
    api = apis.run if kind == "service" else apis.functions
    api.disable()
    result = run_cli(f"--{kind}", "hello", "--region", REGION, "--project", OTHER)
    name, host = ("Cloud Run Admin API", "run.googleapis.com") if kind == "service" else ("Cloud Functions API", "cloudfunctions.googleapis.com")
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: the {name} ({host}) is not enabled in project {OTHER}",
        f"  hint: run `gcloud services enable {host} --project {OTHER}`, or give the URL itself (upstream, --upstream)",
    )


def test_api_failing_after_retries(apis, key_env, google):
    apis.run.grant(key_env)
    apis.run.fail(503)
    result = run_cli("--service", "hello", "--region", REGION, "--project", OTHER)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: the Cloud Run Admin API (run.googleapis.com) answered 503 UNAVAILABLE, 3 attempts for service hello "
        f"in project {OTHER}, region {REGION}: fake Cloud Run Admin API: injected fault",
        "  hint: try again in a minute (Google Cloud status: https://status.cloud.google.com), or give the URL itself (upstream, --upstream)",
    )
    assert apis.run.calls["get"] == 3


def test_api_unreachable(apis, key_env, google, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    result = run_cli("--service", "hello", "--region", REGION, "--project", OTHER, env={"CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": dead})
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: cannot reach the Cloud Run Admin API (run.googleapis.com) at {dead} to look up service hello (ConnectionError)",
        "  hint: check the network (and HTTPS_PROXY), or the CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN variable; or give the URL itself (upstream, --upstream)",
    )


def test_no_region_says_where_to_set_one(apis, key_env, google):
    result = run_cli("--service", "hello", "--project", OTHER)
    assert_startup_failure(
        result,
        google,
        "idtoken-proxy: service hello: no region given or configured",
        "  hint: pass --region, set CLOUDSDK_RUN_REGION, or run `gcloud config set run/region REGION`",
    )
    assert apis.run.calls["get"] == 0


def test_whole_project_without_list_permission_suggests_naming_services(apis, key_env, google):
    apis.run.grant(key_env, "run.services.get")
    result = run_cli("--project", OTHER, "--region", REGION)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: {key_env} lacks permission run.services.list in project {OTHER}, region {REGION}",
        f"  hint: grant it roles/run.viewer on project {OTHER}, or name the services one by one "
        "(--service NAME, or routes[].service in a config file)",
    )


def test_whole_project_without_a_region_offers_all_regions(apis, key_env, google):
    result = run_cli("--project", OTHER)
    assert_startup_failure(
        result,
        google,
        f"idtoken-proxy: serving project {OTHER}: no region given or configured",
        "  hint: pass --region REGION, or --all-regions to serve every region; or set CLOUDSDK_RUN_REGION",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--service", "hello", "--upstream", "https://x.run.app"), "--upstream and --service: use one or the other"),
        (("--function", "f", "--tag", "green"), "--tag applies to --service (revision tags are a Cloud Run feature)"),
        (("--upstream", "https://x.run.app", "--region", "us-central1"), "--region applies to quick mode by name (--service, --function, --project); set it per route in the config file"),
        (("--service", "hello", "--all-regions"), "--all-regions applies to --project without --service or --function"),
        (("--project", "my-project", "--region", "us-central1", "--all-regions"), "--all-regions: use region or all-regions, not both"),
        (("--service", "Hello_",), "--service: must be a service name"),
    ],
)
def test_bad_by_name_command_lines_exit_2(args, message, clean_env):
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_shows_the_new_flags():
    out = run_cli("--help").stdout
    for flag in ("--service NAME", "--function NAME", "--region REGION", "--project PROJECT", "--tag TAG", "--project-number NUMBER", "--all-regions", "--functions", "--services-refresh SECONDS", "proxy-authorization"):
        assert flag in out, flag


def test_check_resolve_shows_the_url_and_custom_audiences(apis, key_env, google, tmp_path):
    apis.run.add_service("hello", uri="https://hello-abc-uc.a.run.app", custom_audiences=["https://api.example.com", "hello-aud"])
    apis.run.grant(key_env)
    config = tmp_path / "c.yaml"
    config.write_text(f"routes:\n  - service: hello\n    region: {REGION}\n    project: {PROJECT}\n")
    offline = run_cli("check", str(config))
    assert offline.returncode == 0, offline.stderr
    assert f"(service hello, project {PROJECT}, region {REGION})" in offline.stdout
    assert apis.run.calls["get"] == 0  # check without --resolve stays offline
    result = run_cli("check", str(config), "--resolve")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"hello: service hello in {REGION} is https://hello-abc-uc.a.run.app; customAudiences: https://api.example.com, hello-aud"
        in result.stdout.splitlines()
    )
    assert apis.run.calls["get"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_quick_mode_by_name_serves_curl(apis, key_env, google, private_service, clean_env):
    """``idtoken-proxy --service hello --region R``, the README's first example, end to end with curl."""
    if CURL is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("curl is needed in CI (tests/run.sh installs it)")
        pytest.skip("curl is not installed (tests/run.sh installs it)")
    write_gcloud_config(clean_env.cloudsdk_config, "default", {"core": {"project": PROJECT}})
    apis.run.add_service("hello", uri=private_service.url)
    apis.run.grant(key_env)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--service", "hello", "--region", REGION, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 30
        out = None
        while time.monotonic() < deadline:
            out = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/x"], capture_output=True, text=True)
            if out.stdout == "200":
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        assert out is not None and out.stdout == "200", out
        assert private_service.last.claims["aud"] == private_service.url
    finally:
        proc.send_signal(signal.SIGTERM)
        logs, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, logs
    assert f"service hello in project {PROJECT} (from gcloud configuration default" in logs
    assert f"region {REGION} (from --region) is {private_service.url}" in logs
    assert not [t for t in google.issued if t in logs]
