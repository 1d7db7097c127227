"""Shared helpers for the sidecar tests (no tests here).

- ``mint_jwt``: a JWT with a unique signature, for the ``static`` credentials source.
- ``Upstream``: a local aiohttp service on loopback whose slow endpoint is held
  open by the test (no sleeps), and which records the Authorization it saw.
- ``ProxyProcess``: the real CLI (``python -m proxy``) in a subprocess with a
  clean environment, its stderr collected line by line; listening ports are
  read from its own startup log lines.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent

#: Bounds for waiting on a subprocess: generous, they only stop a hung test.
WAIT = 30.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(audience: str = "http://127.0.0.1", lifetime: float = 3600, email: str = "sidecar@example.com") -> str:
    """An RS256-shaped JWT: the proxy reads ``exp`` from it; nobody verifies the signature here."""
    header = {"alg": "RS256", "typ": "JWT", "kid": "test"}
    claims = {"aud": audience, "exp": int(time.time() + lifetime), "iat": int(time.time()), "email": email}
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(secrets.token_bytes(64))))


class Upstream:
    """A loopback HTTP service: ``/hello``, ``/echo`` (POST), ``/status/{n}`` and ``/slow``.

    ``/slow`` answers only when the test calls ``release()``; ``slow_arrived`` is set
    when a request reaches it.
    """

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        self.slow_arrived = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> Upstream:
        app = web.Application()
        app.router.add_get("/hello", self._hello)
        app.router.add_post("/echo", self._echo)
        app.router.add_get("/status/{n}", self._status)
        app.router.add_get("/slow", self._slow)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self._release.set()

    async def _hello(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        return web.Response(text="hello")

    async def _echo(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        return web.Response(body=await request.read())

    async def _status(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        return web.Response(status=int(request.match_info["n"]), text="as asked")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        self.slow_arrived.set()
        await self._release.wait()
        return web.Response(text="slow but complete " + "x" * 1000)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment with no credentials, no gcloud and no HTTP proxies."""
    python_dir = os.path.dirname(sys.executable)
    return {
        "PATH": python_dir,
        "HOME": str(home),
        "CLOUDSDK_CONFIG": str(home / "gcloud"),
        "LANG": "C.UTF-8",
        **extra,
    }


def write_config(path: Path, upstream: str, **top: Any) -> Path:
    """A config with one static-token route ``up`` at ``/`` to ``upstream`` (ports 0)."""
    config: dict[str, Any] = {
        "credentials": {"source": "static", "token_env": "SIDECAR_TEST_TOKEN"},
        "listen": {"port": 0},
        "admin": {"port": 0},
        "routes": [{"name": "up", "prefix": "/", "upstream": upstream}],
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


_LISTEN = re.compile(r"(admin )?listening on http://([0-9.]+):(\d+)")


class ProxyProcess:
    """``python -m proxy ARGS`` with stderr collected; ``port``/``admin_port`` from its log."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.lines: list[str] = []
        self.port: int | None = None
        self.admin_port: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> ProxyProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *self.args,
            env=self.env,
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            text = line
            if line.startswith("{"):
                try:
                    text = json.loads(line)["message"]
                except (ValueError, KeyError):
                    pass
            m = _LISTEN.search(text)
            if m:
                if m.group(1):
                    self.admin_port = int(m.group(3))
                else:
                    self.port = int(m.group(3))
            self._changed.set()
        self._changed.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, what: Callable[[], bool], description: str) -> None:
        """Wait until ``what()`` holds, or fail with the log so far."""

        async def loop() -> None:
            while not what():
                if self.proc is not None and self.proc.returncode is not None and self._reader and self._reader.done():
                    raise AssertionError(f"proxy exited ({self.proc.returncode}) before {description}:\n{self.stderr}")
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), 0.2)
                except TimeoutError:
                    pass

        try:
            await asyncio.wait_for(loop(), WAIT)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {description}:\n{self.stderr}") from None

    async def wait_listening(self, admin: bool = True) -> None:
        await self.wait_for(lambda: self.port is not None and (self.admin_port is not None or not admin), "the listeners")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self) -> int:
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), WAIT)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"proxy did not exit within {WAIT:g} s:\n{self.stderr}") from None
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> None:
        """Kill it if it is still running (cleanup after a failed test)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def eventually(check: Callable[[], Awaitable[bool]], description: str, attempts: int = 600) -> None:
    """Poll ``check`` a bounded number of times (state reached, not a time limit)."""
    for _ in range(attempts):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {description}")


async def get_status(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()
