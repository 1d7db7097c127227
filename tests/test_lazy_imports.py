"""Modules only some paths need stay unloaded until then (the idle-memory budget).

google-auth and requests are imported only when an identity source that needs
them is built; prometheus-client only at the first metrics scrape. Each check
runs in a fresh interpreter, because this test process has google-auth loaded
already (tests/fakes). The watched modules cost ~15 MiB (google-auth's service
account path with requests) and ~1 MiB (prometheus-client) of resident memory;
difflib (~0.15 MiB) is for the "did you mean" of a config error only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent

#: Modules a static-token proxy must not carry until something asks for them.
WATCHED = ["google.auth", "google.oauth2", "google.auth.transport.requests", "requests", "urllib3", "prometheus_client", "difflib"]

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
