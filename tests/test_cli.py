"""The command line as users run it: real processes, exit codes, messages, no tracebacks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_metadata(env: dict[str, str]) -> dict[str, str]:
    """No metadata server: point google-auth at a port nobody listens on."""
    dead = f"127.0.0.1:{free_port()}"
    return {**env, "GCE_METADATA_HOST": dead, "GCE_METADATA_IP": dead}


def test_check_prints_the_route_table():
    result = run("check", "config.example.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK, 6 routes" in result.stdout
    assert re.search(r"^hello +\*/hello +https://hello-abc123-uc\.a\.run\.app +https://hello-abc123-uc\.a\.run\.app +authorization", result.stdout, re.M), result.stdout


def test_check_reports_every_error_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: x}\nroutes:\n  - upstream: http://remote.example\n    prefx: /a\n")
    result = run("check", str(bad))
    assert result.returncode == 2
    assert "has 3 errors" in result.stderr
    assert "listen.port: must be a number, got a string" in result.stderr
    assert "routes[0].upstream: plain http:// to a remote host" in result.stderr
    assert "routes[0].prefx: unknown key (did you mean 'prefix'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file_exits_2_without_traceback(tmp_path):
    result = run("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "nothing to serve: pass --service NAME, --function NAME, --project PROJECT, --upstream URL or --config FILE"),
        (("--upstream", "http://remote.example"), "--upstream: plain http:// to a remote host"),
        (("--upstream", "ftp://x"), "--upstream: must start with https://"),
        (("--upstream", "https://x.run.app", "--host", "0.0.0.0"), "listen.host: 0.0.0.0 is not a loopback address"),
        (("--config", "config.example.yaml", "--upstream", "https://x.run.app"), "use one or the other"),
    ],
)
def test_bad_command_lines_exit_2_with_the_reason(args, message):
    result = run(*args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_value_exits_2():
    result = run("--upstream", "https://x.run.app", "--header", "bearer")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_help_lists_the_flags_and_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--config", "--upstream", "--audience", "--header", "--host", "--port", "IDTOKEN_PROXY_UPSTREAM", "check FILE", "token AUDIENCE"):
        assert flag in result.stdout, flag


def test_no_credentials_exits_3_with_a_hint(clean_env):
    result = run("--upstream", "https://x.run.app", env=closed_metadata(clean_env.env()))
    assert result.returncode == 3, result
    assert "no Google credentials found" in result.stderr
    assert "gcloud auth application-default login" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content", ["{not json", '{"type": "service_account", "client_email": "a@b"}'])
def test_malformed_key_file_exits_3(clean_env, tmp_path, content):
    key = tmp_path / "key.json"
    key.write_text(content)
    env = closed_metadata(clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(key)))
    result = run("--upstream", "https://x.run.app", env=env)
    assert result.returncode == 3, result
    assert str(key) in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_exits_3(clean_env, sa_key):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0]))
        result = run("--upstream", "https://x.run.app", "--port", str(port), env=env)
    assert result.returncode == 3, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_quick_mode_serves_a_private_service_end_to_end(clean_env, sa_key, private_service):
    port = free_port()
    env = clean_env.env(GOOGLE_APPLICATION_CREDENTIALS=str(sa_key[0]), IDTOKEN_PROXY_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--upstream", private_service.url],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = wait_for_200(f"http://127.0.0.1:{port}/hello?x=1", proc)
        assert b'"path": "/hello?x=1"' in body
        assert private_service.last.claims["aud"] == private_service.url
        assert private_service.last.claims["email"] == sa_key[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    # The startup report names the route, its audience and the identity's email; never the token.
    assert f"audience {private_service.url}" in stderr and sa_key[1] in stderr
    assert "eyJ" not in stderr


def wait_for_200(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return bytes(r.read())
        except (urllib.error.URLError, ConnectionError) as e:
            last = e
            time.sleep(0.1)
    raise AssertionError(f"no 200 from {url}: {last}")


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "idtoken-proxy"]
    assert ep.value == "proxy.__main__:main"
    assert os.path.exists(ROOT / "proxy" / "__main__.py")
