"""Fixtures for the tests of services by name (no tests here).

``apis`` starts the fake Cloud Run Admin and Cloud Functions APIs (once per
session), resets them for each test and points gcloud's endpoint override
variables at them; ``serve_by_name`` runs a config through the same steps as
the command line (identities, resolution, app) and serves it on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google.auth.iam as google_iam
import pytest

from proxy.app import build_identities
from proxy.config import parse_config
from proxy.resolve import resolve_config
from tests.fakes.cloud_apis import FakeFunctionsApi, FakeRunApi

PROJECT = "fake-project"
REGION = "us-central1"
ADC = "application_default_credentials.json"


@dataclass
class Apis:
    run: FakeRunApi
    functions: FakeFunctionsApi


@pytest.fixture(scope="session")
def _cloud_apis(fake_google: Any) -> Iterator[Apis]:
    run, functions = FakeRunApi(fake_google), FakeFunctionsApi(fake_google)
    run.start()
    functions.start()
    try:
        yield Apis(run, functions)
    finally:
        run.stop()
        functions.stop()


@pytest.fixture
def apis(_cloud_apis: Apis, google: Any, clean_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Apis]:
    """Both fake APIs, empty, with the override variables set (in a clean environment)."""
    _cloud_apis.run.reset()
    _cloud_apis.functions.reset()
    monkeypatch.setenv("CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN", _cloud_apis.run.url)
    monkeypatch.setenv("CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDFUNCTIONS", _cloud_apis.functions.url)
    yield _cloud_apis
    _cloud_apis.run.heal()
    _cloud_apis.functions.heal()


@pytest.fixture
def iam_access(google: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point google-auth's IAM generateIdToken and generateAccessToken calls at the fake.

    google-auth formats both URLs from module constants (no public override for
    the ID token one), so the two constants are patched.
    """
    monkeypatch.setattr(google_iam, "_IAM_IDTOKEN_ENDPOINT", google.iam_idtoken_endpoint)
    monkeypatch.setattr(google_iam, "_IAM_ENDPOINT", google.iam_access_token_endpoint)
    return google


@pytest.fixture
def key_env(google: Any, clean_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """GOOGLE_APPLICATION_CREDENTIALS names a registered service account's key: its email."""
    email = "names-sa@fake-project.iam.gserviceaccount.com"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(google.write_key_file(tmp_path / "key.json", email)))
    return email


ServeByName = Callable[..., Awaitable[Any]]


@pytest.fixture
def serve_by_name(start_proxy: Any) -> ServeByName:
    """Resolve a config (dict) as ``idtoken-proxy`` does at startup, then serve it."""

    async def serve(raw: dict[str, Any], *, ready: bool = True, quick: bool = False) -> Any:
        config = parse_config(raw)
        identities = build_identities(config)
        resolved, jobs = await resolve_config(config, identities, quick=quick)
        return await start_proxy(resolved, ready=ready, identities=identities, background=jobs)

    return serve


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` in a subprocess (the caller's environment, plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def write_gcloud_config(root: Path, name: str, properties: dict[str, dict[str, str]], *, activate: bool = True) -> Path:
    """A gcloud configuration as gcloud writes it: ``configurations/config_NAME`` (INI) and ``active_config``."""
    (root / "configurations").mkdir(parents=True, exist_ok=True)
    path = root / "configurations" / f"config_{name}"
    path.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) for section, values in properties.items()))
    if activate:
        (root / "active_config").write_text(name)
    return path


def write_user_adc(google: Any, root: Path) -> Path:
    """gcloud's application-default user login in ``root`` (CLOUDSDK_CONFIG)."""
    return google.write_authorized_user_file(root / ADC)


def json_of(text: str) -> Any:
    return json.loads(text)
