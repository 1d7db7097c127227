"""A tiny metadata server for the benchmark: ID tokens that expire within seconds, and a fetch count.

    python bench/metadata.py PORT LIFETIME

Serves what idtoken-proxy's ``metadata`` source asks for, on 127.0.0.1 only,
with the ``Metadata-Flavor: Google`` header the real server requires and sends:

- ``GET /`` (the ping),
- ``GET /computeMetadata/v1/instance/service-accounts/default/?recursive=true``
  and ``.../default/email`` (the proxy reads the email at startup),
- ``GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=...``:
  a new unsigned JWT on every call, ``exp`` LIFETIME seconds ahead (the real
  server caches its token until 4 minutes before expiry; this one never does,
  so every fetch the proxy makes is a real refresh).

``GET /bench/fetches`` answers with the number of identity tokens served so far,
so the benchmark can count the refreshes inside its measured window; the total
is also printed on SIGTERM. Tokens are not signed: the nginx upstream of the
benchmark does not verify them, and the proxy reads ``exp`` without verifying.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from typing import Any

from aiohttp import web

EMAIL = "bench-metadata@example.invalid"
FLAVOR = {"Metadata-Flavor": "Google"}
SA = "/computeMetadata/v1/instance/service-accounts/"


def unsigned_jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT', 'kid': 'bench'})}.{part(claims)}.c2lnbmF0dXJl"


class Metadata:
    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.fetches = 0

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(text="computeMetadata/\n", headers=FLAVOR)

    async def account(self, request: web.Request) -> web.Response:
        # The real server refuses requests without the flavor header: so does this one,
        # so a client that forgot it fails here as it would on Google Cloud.
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text='Missing required header "Metadata-Flavor": "Google"\n', headers=FLAVOR)
        account, _, leaf = request.match_info["rest"].partition("/")
        if account not in ("default", EMAIL):
            return web.Response(status=404, text="Not Found\n", headers=FLAVOR)
        leaf = leaf.rstrip("/")
        if leaf == "" and request.query.get("recursive") == "true":
            return web.json_response({"aliases": ["default"], "email": EMAIL, "scopes": []}, headers=FLAVOR)
        if leaf == "email":
            return web.Response(text=EMAIL, headers=FLAVOR)
        if leaf == "identity":
            audience = request.query.get("audience")
            if not audience:
                return web.Response(status=400, text="non-empty audience parameter required\n", headers=FLAVOR)
            self.fetches += 1
            now = int(time.time())
            claims = {"aud": audience, "iss": "https://accounts.google.com", "email": EMAIL, "iat": now, "exp": now + self.lifetime}
            print(f"{time.time():.3f} identity token #{self.fetches} for {audience}, exp in {self.lifetime} s", flush=True)
            return web.Response(text=unsigned_jwt(claims), content_type="text/html", headers=FLAVOR)
        return web.Response(status=404, text="Not Found\n", headers=FLAVOR)

    async def count(self, request: web.Request) -> web.Response:
        return web.Response(text=str(self.fetches))


async def main(port: int, lifetime: int) -> None:
    metadata = Metadata(lifetime)
    app = web.Application()
    app.router.add_get("/", metadata.ping)
    app.router.add_get(SA + "{rest:.*}", metadata.account)
    app.router.add_get("/bench/fetches", metadata.count)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready: tokens live {lifetime} s", flush=True)
    await stop.wait()
    print(f"identity tokens served: {metadata.fetches}", flush=True)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
