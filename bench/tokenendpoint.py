"""A tiny OAuth token endpoint for the benchmark's service-account key credentials.

    python bench/tokenendpoint.py PORT KEYFILE

Writes a service-account key file (a fresh RSA key, ``token_uri`` pointing here)
to KEYFILE, then serves ``POST /token`` on 127.0.0.1 as Google's endpoint does for
google-auth's ID-token flow: the signed JWT-bearer assertion comes in as a form
field, and the answer is ``{"id_token": ...}``, an unsigned JWT for the assertion's
``target_audience`` that lives an hour (the nginx upstream of the benchmark checks
no token; the proxy reads ``exp`` without verifying). The assertion's signature is
not checked: this measures the proxy, not the endpoint.

So idtoken-proxy runs with ``credentials: {source: service_account, key_file: KEYFILE}``:
the code path (google-auth's service_account module, cryptography's RSA signing)
and the memory users with real credentials have. ``GET /bench/fetches`` answers
with the number of tokens served so far.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Run as a script from bench/: its directory is on sys.path.
from metadata import unsigned_jwt

EMAIL = "bench-sa@bench-project.iam.gserviceaccount.com"


def write_key_file(path: Path, token_uri: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    info = {
        "type": "service_account",
        "project_id": "bench-project",
        "private_key_id": "bench-key",
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "1000000000000",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info, indent=2))
    path.chmod(0o600)


def _claims(assertion: str) -> dict[str, object]:
    payload = assertion.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


class Endpoint:
    def __init__(self) -> None:
        self.fetches = 0

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assertion = str(form.get("assertion", ""))
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or assertion.count(".") != 2:
            return web.json_response({"error": "invalid_grant", "error_description": "expected a JWT-bearer assertion"}, status=400)
        audience = _claims(assertion).get("target_audience")
        if not audience:
            return web.json_response({"error": "invalid_request", "error_description": "no target_audience"}, status=400)
        self.fetches += 1
        now = int(time.time())
        claims = {"aud": audience, "iss": "https://accounts.google.com", "email": EMAIL, "iat": now, "exp": now + 3600}
        return web.json_response({"id_token": unsigned_jwt(claims)})

    async def count(self, request: web.Request) -> web.Response:
        return web.Response(text=str(self.fetches))


async def main(port: int, key_file: Path) -> None:
    write_key_file(key_file, f"http://127.0.0.1:{port}/token")
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/token", endpoint.token)
    app.router.add_get("/bench/fetches", endpoint.count)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready: key file {key_file}", flush=True)
    await stop.wait()
    print(f"ID tokens served: {endpoint.fetches}", flush=True)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
