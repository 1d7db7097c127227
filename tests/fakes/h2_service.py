"""H2PrivateService: a plain-HTTP private service that speaks h2c, and checks ID tokens.

Cloud Run with end-to-end HTTP/2 hands the container h2c. This fake is an ASGI
app served by hypercorn (an HTTP/2 server of its own, on h2) in a thread, with
Cloud Run's token rules (as :class:`PrivateService`): ``X-Serverless-Authorization``
if present, else ``Authorization``; none is 403, a bad one 401.

- ``GET /bytes/N``: N pattern bytes (``pattern_bytes``), streamed in 64 KiB parts;
- ``POST /upload``: ``{"len": ..., "sha256": ...}`` of the body;
- anything else: ``{"path": ..., "http_version": ...}``.

Every request's method, path, HTTP version and checked claims are recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import google.auth.exceptions
import google.auth.jwt
from hypercorn.asyncio import serve
from hypercorn.config import Config

from .private_service import pattern_bytes

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class H2Request:
    method: str
    path: str
    http_version: str
    claims: dict[str, Any] | None


class H2PrivateService:
    def __init__(self, certs_url: str) -> None:
        self._certs_url = certs_url
        self._certs: dict[str, str] = {}
        self.requests: list[H2Request] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        with urllib.request.urlopen(self._certs_url, timeout=10) as response:
            self._certs = json.load(response)
        self._thread = threading.Thread(target=self._run, name="h2-private-service", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("hypercorn did not start")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            config = Config()
            config.bind = [f"127.0.0.1:{self.port}"]
            config.accesslog = None
            config.errorlog = None
            # Big bodies both ways: no request size cap, generous windows.
            config.h2_max_inbound_frame_size = 1 << 20
            task = asyncio.ensure_future(serve(self._app, config, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
            for _ in range(300):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        break
                except OSError:
                    await asyncio.sleep(0.05)
            self._ready.set()
            await task

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ the app
    def _verify(self, headers: dict[str, str]) -> tuple[int, str, dict[str, Any] | None]:
        name = "x-serverless-authorization" if "x-serverless-authorization" in headers else "authorization"
        value = headers.get(name)
        if value is None:
            return 403, "403 Forbidden: no identity token", None
        scheme, _, token = value.partition(" ")
        if scheme != "Bearer" or token.count(".") != 2:
            return 401, f"401 Unauthorized: {name} is not 'Bearer <jwt>'", None
        try:
            claims = google.auth.jwt.decode(token, certs=self._certs, audience=self.url)
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            return 401, f"401 Unauthorized: {str(exc).splitlines()[0][:80]}", None
        return 200, "", claims

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, reason, claims = self._verify(headers)
        path = scope["raw_path"].decode("latin-1")
        self.requests.append(H2Request(scope["method"], path, scope["http_version"], claims))
        if status != 200:
            await _answer(send, status, reason.encode() + b"\n", "text/plain")
            return
        if scope["method"] == "POST" and path == "/upload":
            digest = hashlib.sha256()
            length = 0
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                digest.update(chunk)
                length += len(chunk)
                if not message.get("more_body"):
                    break
            await _answer(send, 200, json.dumps({"len": length, "sha256": digest.hexdigest()}).encode(), "application/json")
            return
        if path.startswith("/bytes/"):
            n = int(path.removeprefix("/bytes/"))
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % n), (b"content-type", b"application/octet-stream")]})
            for start in range(0, n, 65536):
                part = pattern_bytes(min(65536, n - start), start)
                await send({"type": "http.response.body", "body": part, "more_body": start + 65536 < n})
            if n == 0:
                await send({"type": "http.response.body", "body": b""})
            return
        body = json.dumps({"path": path, "http_version": scope["http_version"]}).encode()
        await _answer(send, 200, body, "application/json")


async def _answer(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
