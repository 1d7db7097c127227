"""pytest fixtures for the fakes.

Load them as a plugin, from ``tests/conftest.py``::

    import tests.fakes  # noqa: F401  -- first: reserves the fake metadata port
    pytest_plugins = ["tests.fakes.fixtures"]

or on the command line: ``python -m pytest -p tests.fakes.fixtures ...``.

Import order: google-auth reads ``GCE_METADATA_HOST`` when
``google.auth.compute_engine._metadata`` is imported.  Importing anything from
``tests.fakes`` (this module included) first binds a listening socket on
127.0.0.1:0 and sets ``GCE_METADATA_HOST`` and ``GCE_METADATA_IP`` to
``127.0.0.1:<port>`` (see :mod:`tests.fakes.metadata_port`); the session's
``fake_google`` then serves on that very socket.  A conftest body runs before
its ``pytest_plugins`` are loaded, so a conftest that imports google-auth or the
proxy must import ``tests.fakes`` before them.  (If it is late anyway, the
constant is patched and a warning says so.)  ``GCE_METADATA_TIMEOUT`` is left at
google-auth's default.

Fixtures:

- ``fake_google`` (session, autouse): the running :class:`FakeGoogle`; not reset.
- ``google``: the same fake, reset before and after the test.  Make it
  autouse in a conftest with ``@pytest.fixture(autouse=True)`` over it if wanted.
- ``private_service``: a started :class:`PrivateService` trusting the fake's certs.
- ``clean_env``: no real credentials, config or gcloud reachable (see :class:`CleanEnv`).
- ``gcloud_stub``: a stub ``gcloud`` first on the clean PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .gcloud_stub import GcloudStub, install_gcloud_stub
from .google import FakeGoogle
from .metadata_port import reserved_port, reserved_socket
from .private_service import PrivateService

#: Tools a test subprocess may reasonably want on PATH (linked, never gcloud).
_TOOLS = ("sh", "bash", "env", "cat", "echo", "true", "false", "sleep", "kill", "ls", "grep")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_CLEARED_PREFIXES = ("GOOGLE_", "CLOUDSDK_", "GCE_", "GCLOUD_")


@pytest.fixture(scope="session", autouse=True)
def fake_google() -> Iterator[FakeGoogle]:
    """The session's fake Google, serving on the port reserved at import time.

    Autouse: GCE_METADATA_HOST points at the reserved port from import on, and a
    listening socket nobody serves would make google-auth's metadata ping hang
    for its full timeouts (3 s x 3) in any test that forgot this fixture.
    """
    fake = FakeGoogle(sock=reserved_socket()).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def google(fake_google: FakeGoogle) -> Iterator[FakeGoogle]:
    """The session's fake Google, reset to defaults before and after the test."""
    fake_google.reset()
    yield fake_google
    fake_google.reset()


@pytest.fixture
def private_service(fake_google: FakeGoogle) -> Iterator[PrivateService]:
    """A started fake Cloud Run service that trusts the fake Google's signing key."""
    with PrivateService(certs_url=fake_google.certs_url) as service:
        yield service


@dataclass(frozen=True)
class CleanEnv:
    """Paths of the scrubbed environment ``clean_env`` installed."""

    home: Path
    #: ``CLOUDSDK_CONFIG``: empty, so no gcloud ADC file or login is found.
    cloudsdk_config: Path
    #: First on PATH; ``gcloud_stub`` installs here.
    bin_dir: Path
    path: str

    def env(self, **extra: str) -> dict[str, str]:
        """A copy of the (clean) environment for a subprocess, plus ``extra``."""
        return {**os.environ, **extra}


def _tools_dir(root: Path, original_path: str) -> list[str]:
    """PATH entries that give python and a few tools but can never reach a real gcloud."""
    tools = root / "tools"
    tools.mkdir()
    entries = [str(tools)]
    python_dir = os.path.dirname(sys.executable)
    if shutil.which("gcloud", path=python_dir) is None:
        # The interpreter's own bin dir also holds console scripts (idtoken-proxy).
        entries.append(python_dir)
    else:
        for name in ("python", "python3"):
            (tools / name).symlink_to(sys.executable)
    for name in _TOOLS:
        found = shutil.which(name, path=original_path)
        if found is not None and not (tools / name).exists():
            (tools / name).symlink_to(found)
    return entries


@pytest.fixture
def clean_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> CleanEnv:
    """Hide real credentials, gcloud config and the real gcloud from the test.

    HOME and CLOUDSDK_CONFIG point at empty temp dirs; GOOGLE_*, CLOUDSDK_*,
    GCE_*, GCLOUD_* and proxy variables are removed; GCE_METADATA_HOST/IP point
    at the fake; PATH is a temp bin dir, python's dir and links to a few tools.
    """
    root = tmp_path_factory.mktemp("clean-env")
    home, config, bin_dir = root / "home", root / "home" / ".config" / "gcloud", root / "bin"
    for d in (config, bin_dir):
        d.mkdir(parents=True)
    original_path = os.environ.get("PATH", os.defpath)
    for name in list(os.environ):
        if name.startswith(_CLEARED_PREFIXES) or name.lower() in _PROXY_VARS:
            monkeypatch.delenv(name)
    monkeypatch.delenv("FAKE_GCLOUD_LOGGED_OUT", raising=False)
    path = os.pathsep.join([str(bin_dir), *_tools_dir(root, original_path)])
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(config))
    metadata = f"127.0.0.1:{reserved_port()}"
    monkeypatch.setenv("GCE_METADATA_HOST", metadata)
    monkeypatch.setenv("GCE_METADATA_IP", metadata)
    # The whole point: a test must never run the developer's real gcloud.
    assert shutil.which("gcloud", path=path) is None, f"real gcloud reachable on {path}"
    return CleanEnv(home=home, cloudsdk_config=config, bin_dir=bin_dir, path=path)


@pytest.fixture
def gcloud_stub(clean_env: CleanEnv, fake_google: FakeGoogle) -> GcloudStub:
    """A logged-in stub ``gcloud`` (user developer@example.com) first on the clean PATH."""
    stub = GcloudStub(install_gcloud_stub(clean_env.bin_dir, fake_google.url))
    assert shutil.which("gcloud") == str(stub.path)
    return stub
