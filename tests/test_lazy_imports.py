"""Modules only some paths need stay unloaded until then (the idle-memory budget).

google-auth and requests are imported only when an identity source that needs
them is built; prometheus-client only at the first metrics scrape. Each check
runs in a fresh interpreter, because this test process has google-auth loaded
already (tests/fakes). The watched modules cost ~15 MiB (google-auth's service
account path with requests) and ~1 MiB (prometheus-client) of resident memory;
difflib (~0.15 MiB) is for the "did you mean" of a config error only. The
HTTP/2 side (h2, hpack, hyperframe: 1-2 MiB) loads with the first connection
that opens with the HTTP/2 preface.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.logs import quiet_token_loggers
from tests.fakes.h2_service import H2PrivateService

ROOT = Path(__file__).resolve().parent.parent

#: Modules a static-token proxy must not carry until something asks for them.
WATCHED = ["google.auth", "google.oauth2", "google.auth.transport.requests", "requests", "urllib3", "prometheus_client", "difflib"]
#: The HTTP/2 side: libraries and our modules that import them.
HTTP2 = ["h2", "hpack", "hyperframe", "proxy.engine.h2common", "proxy.engine.h2server", "proxy.engine.h2upstream", "proxy.engine.h2relay"]
#: Standard-library and third-party modules a running HTTP/1.1 proxy has no use for
#: (urllib.request only with an outbound proxy; yarl never: the proxy builds no URLs):
#: each of ~0.5-2 MiB resident with what it brings.
INCIDENTAL = ["email", "http.client", "urllib.request", "yarl", "html"]
#: The HTTP/2 client, looked up before clean_env narrows PATH.
CURL = shutil.which("curl")

# Runs in the child: the command line's own config path, the real app and server on
# loopback, one proxied request, then one scrape; prints what was loaded when.
STATIC_SCRIPT = r"""
import asyncio, json, os, sys

config_path, watched = sys.argv[1], json.loads(sys.argv[2])

def loaded():
    return sorted(m for m in watched if m in sys.modules)

from proxy.__main__ import build_config, serve_parser
from proxy.app import STATE, build_identities, make_app
from proxy.server import ProxyServer
import aiohttp

out = {"after_import": loaded()}
config = build_config(serve_parser().parse_args(["--config", config_path]), os.environ)
app = make_app(config, identities=build_identities(config))
out["after_build"] = loaded()

async def main():
    server = ProxyServer(app, config)
    await server.start()
    try:
        assert await app[STATE].tokens.wait_ready(20)
        base = "http://127.0.0.1:%d" % server.addresses[0][1]
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/hello") as r:
                out["proxied"] = [r.status, await r.text()]
            out["after_request"] = loaded()
            async with s.get(base + "/.proxy/metrics") as r:
                out["metrics"] = [r.status, await r.text()]
            out["after_scrape"] = loaded()
    finally:
        await server.stop()

asyncio.run(main())
print(json.dumps(out))
"""

# Runs in the child: a service-account identity built from a config and one token
# fetched from the fake token endpoint named in the key file.
SERVICE_ACCOUNT_SCRIPT = r"""
import asyncio, json, os, sys

config_path, watched, audience = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]

def loaded():
    return sorted(m for m in watched if m in sys.modules)

from proxy.__main__ import build_config, serve_parser
from proxy.app import build_identities

out = {"after_import": loaded()}
config = build_config(serve_parser().parse_args(["--config", config_path]), os.environ)
(ident,) = build_identities(config).values()
out["after_build"] = loaded()
m = asyncio.run(ident.fetch(audience))
out["token"] = {"aud": m.aud, "email": m.email, "source": ident.source}
print(json.dumps(out))
"""


# Runs in the child: the real app and server on loopback (as in STATIC_SCRIPT), HTTP/1.1
# requests, then HTTP/2 ones with curl; prints what of the HTTP/2 side was loaded when.
HTTP2_SCRIPT = r"""
import asyncio, json, os, subprocess, sys

config_path, watched, curl = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]

def loaded():
    return sorted(m for m in watched if m in sys.modules)

from proxy.__main__ import build_config, serve_parser
from proxy.app import STATE, build_identities, make_app
from proxy.server import ProxyServer

out = {"after_import": loaded()}
config = build_config(serve_parser().parse_args(["--config", config_path]), os.environ)
app = make_app(config, identities=build_identities(config))

async def h1_get(port, path):
    # A raw HTTP/1.1 client: an HTTP library would import the very modules watched.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (path.encode(), port))
    data = await reader.read()
    writer.close()
    return data.split(b"\r\n", 1)[0].decode()

def h2_get(url):
    done = subprocess.run([curl, "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}", url], capture_output=True, timeout=60)
    return done.stdout.decode(errors="replace").rsplit("\n", 1)[-1] + done.stderr.decode(errors="replace")

async def main():
    server = ProxyServer(app, config)
    await server.start()
    try:
        assert await app[STATE].tokens.wait_ready(20)
        out["after_start"] = loaded()
        port = server.addresses[0][1]
        base = "http://127.0.0.1:%d" % port
        out["http1"] = await h1_get(port, "/hello")
        out["after_http1"] = loaded()
        out["http2"] = await asyncio.to_thread(h2_get, base + "/hello")
        out["after_http2"] = loaded()
        out["http2_again"] = await asyncio.to_thread(h2_get, base + "/hello")
    finally:
        await server.stop()

asyncio.run(main())
print(json.dumps(out))
"""


def run_child(script: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=90
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_static_token_proxy_loads_neither_google_auth_nor_prometheus_until_scraped(
    tmp_path: Path, clean_env: Any, google: Any, private_service: Any
) -> None:
    # A real Google-signed (fake) token: the private service verifies it as Cloud Run would.
    token = google.mint(private_service.url)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        "credentials: {source: static, token_env: LAZY_TEST_TOKEN}\n"
        f"routes:\n  - name: svc\n    upstream: {private_service.url}\n"
    )
    out = run_child(STATIC_SCRIPT, str(config), json.dumps(WATCHED), env=clean_env.env(LAZY_TEST_TOKEN=token))

    assert out["proxied"][0] == 200, out["proxied"]
    assert private_service.last.claims["aud"] == private_service.url
    assert out["after_import"] == []
    assert out["after_build"] == []
    assert out["after_request"] == []
    # The first scrape loads prometheus-client, and only it; the request was counted before.
    assert out["after_scrape"] == ["prometheus_client"]
    status, text = out["metrics"]
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }
    key = ("idtoken_proxy_requests_total", (("method", "GET"), ("protocol", "HTTP/1.1"), ("route", "svc"), ("status_class", "2xx")))
    assert samples[key] == 1
    assert samples[("idtoken_proxy_upstream_latency_seconds_count", (("route", "svc"),))] == 1
    assert samples[("idtoken_proxy_token_valid", (("route", "svc"),))] == 1


def test_service_account_source_imports_google_auth_when_built(
    tmp_path: Path, clean_env: Any, google: Any, sa_key: tuple[Path, str]
) -> None:
    key_file, email = sa_key
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"credentials: {{source: service_account, key_file: '{key_file}'}}\n"
        "routes:\n  - upstream: https://svc-abc-uc.a.run.app\n"
    )
    audience = "https://svc-abc-uc.a.run.app"
    out = run_child(SERVICE_ACCOUNT_SCRIPT, str(config), json.dumps(WATCHED), audience, env=clean_env.env())

    assert out["after_import"] == []
    # Building the source is what brings google-auth (and its requests transport) in.
    assert "google.oauth2" in out["after_build"]
    assert out["token"] == {"aud": audience, "email": email, "source": "service_account"}
    assert google.calls["token"] == 1


def test_http2_side_loads_with_the_first_http2_connection_and_incidental_modules_never(tmp_path: Path, clean_env: Any, google: Any, fake_google: Any) -> None:
    curl = CURL
    if curl is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("curl is not installed (tests/run.sh installs it)")
        pytest.skip("curl is not installed")
    # The upstream runs in this process: hpack would log its headers, the token among them, at DEBUG.
    quiet_token_loggers()
    with H2PrivateService(fake_google.certs_url) as service:
        token = google.mint(service.url)
        config = tmp_path / "proxy.yaml"
        config.write_text(
            "listen: {host: 127.0.0.1, port: 0}\n"
            "credentials: {source: static, token_env: LAZY_TEST_TOKEN}\n"
            f"routes:\n  - name: svc\n    upstream: {service.url}\n"
        )
        out = run_child(HTTP2_SCRIPT, str(config), json.dumps(HTTP2 + INCIDENTAL), curl, env=clean_env.env(LAZY_TEST_TOKEN=token))
        seen = [r.http_version for r in service.requests]

    assert out["after_import"] == []
    assert out["after_start"] == []
    # An HTTP/1.1 request (to an HTTP/2-capable upstream: HTTP/1.1 goes upstream as HTTP/1.1) loads none of it.
    assert out["http1"] == "HTTP/1.1 200 OK"
    assert out["after_http1"] == []
    # The first connection with the HTTP/2 preface loads it, and the request goes through end to end over HTTP/2.
    assert out["http2"] == "2 200", out["http2"]
    assert out["after_http2"] == sorted(HTTP2)
    assert out["http2_again"] == "2 200", out["http2_again"]
    assert seen == ["1.1", "2", "2"]
