"""Shared fixtures: the fakes (tests/fakes), and a proxy served on a real loopback port."""

from __future__ import annotations

# First, before anything imports google-auth: reserves the fake metadata server's
# port and points GCE_METADATA_HOST at it (google-auth reads it at import time).
import tests.fakes  # noqa: F401  isort: skip

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app import App, ProxyState, make_app
from proxy.config import Config, parse_config
from proxy.server import ProxyServer

pytest_plugins = ["tests.fakes.fixtures"]


@dataclass
class RunningProxy:
    server: ProxyServer
    config: Config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        return int(self.server.addresses[0][1])

    @property
    def app(self) -> App:
        return self.server.app

    @property
    def state(self) -> ProxyState:
        return self.server.app.state


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Serve the proxy for a config (YAML text, dict or Config) on 127.0.0.1:<free port>.

    The app is built by the real ``make_app`` and served by the production
    server (``ProxyServer``: the engine, its limits and shutdown phases) on a
    free loopback port, without the admin listener; ``ready=True`` waits until
    every route has a token. Keyword arguments go to ``make_app`` (identities, tokens).
    """
    servers: list[ProxyServer] = []

    async def start(config: str | dict[str, Any] | Config, *, ready: bool = True, **kwargs: Any) -> RunningProxy:
        if isinstance(config, str):
            config = yaml.safe_load(config)
        if not isinstance(config, Config):
            config = parse_config(config)
        app = make_app(config, **kwargs)
        served = dataclasses.replace(
            config,
            listen=dataclasses.replace(config.listen, host="127.0.0.1", port=0),
            admin=dataclasses.replace(config.admin, port=None),
        )
        server = ProxyServer(app, served)
        await server.start()
        servers.append(server)
        running = RunningProxy(server, config)
        if ready:
            assert await running.state.tokens.wait_ready(15), [
                running.state.tokens.status(k) for k in running.state.tokens.keys()
            ]
        return running

    yield start
    for server in reversed(servers):
        await server.stop()


@pytest.fixture
def sa_key(google: Any, tmp_path: Path) -> tuple[Path, str]:
    """A service-account key file registered with the fake token endpoint: (path, email)."""
    email = "proxy-sa@test-project.iam.gserviceaccount.com"
    path = google.write_key_file(tmp_path / "key.json", email)
    return Path(path), email


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Every test runs the proxy at DEBUG, so secrets tests see everything it logs."""
    caplog.set_level(logging.DEBUG)


@pytest.fixture(autouse=True)
def _no_issued_token_in_logs(_debug_logs: None, caplog: pytest.LogCaptureFixture, fake_google: Any) -> Iterator[None]:
    """After every test: no token the fake Google handed out during it appears in a log record.

    Covers every in-process proxy of the whole suite at DEBUG (messages and
    tracebacks); subprocesses are checked by their own tests (test_secrets.py).
    """
    start = len(fake_google.issued)
    yield
    issued = fake_google.issued[start:]
    if not issued:
        return
    formatter = logging.Formatter()
    texts = []
    for when in ("setup", "call", "teardown"):
        for record in caplog.get_records(when):
            texts.append(record.getMessage())
            if record.exc_info:
                texts.append(formatter.formatException(record.exc_info))
    text = "\n".join(texts)
    # A JWT's signature alone is as good as a leak; its header is the same for every token.
    leaked = [t for t in issued if t in text or ("." in t and t.rsplit(".", 1)[1] in text)]
    assert not leaked, f"{len(leaked)} token(s) issued by the fake Google appear in the logs, e.g. {leaked[0][:16]}..."
