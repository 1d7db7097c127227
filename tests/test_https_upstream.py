"""HTTPS upstreams, as every production upstream is: the token-verifying private service
over TLS with a throwaway CA (tests/fakes/tls.py).

The proxy trusts the CA the standard way, through ``SSL_CERT_FILE`` as OpenSSL reads
it: set with monkeypatch for an in-process proxy (before it builds its SSL context),
passed in the environment of a subprocess proxy. The cases: SNI and hostname
verification, a wrong-host and an expired certificate (502 with a reason), keep-alive
reuse of the TLS connection, and the 1 GiB transfers (soak).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.private_service import pattern_bytes, pattern_sha256
from tests.fakes.tls import HOST, TestCA, TLSPrivateService
from tests.test_sidecar_support import ProxyProcess, clean_env

#: A one-line 502 reason from the proxy starts like this.
PREFIX = "idtoken-proxy: "


@pytest.fixture
def test_ca(tmp_path: Path) -> TestCA:
    directory = tmp_path / "ca"
    directory.mkdir()
    return TestCA(directory)


@pytest.fixture
def https_service(test_ca: TestCA, fake_google: Any) -> Iterator[TLSPrivateService]:
    with TLSPrivateService(test_ca, certs_url=fake_google.certs_url) as service:
        yield service


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sa_config(key: Path, upstream: str, **route: Any) -> dict[str, Any]:
    return {
        "credentials": {"source": "service_account", "key_file": str(key)},
        "routes": [{"prefix": "/", "upstream": upstream, **route}],
    }


@pytest.fixture
def trust_ca(test_ca: TestCA, clean_env: Any, monkeypatch: pytest.MonkeyPatch) -> TestCA:
    """The test CA is what SSL_CERT_FILE names (no proxies, no real credentials around)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return test_ca


def one_line_reason(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    assert text.startswith(PREFIX), repr(text)
    return text


# --------------------------------------------------------------------------- in-process proxy


async def test_get_over_https_sends_sni_and_the_token_for_the_https_audience(start_proxy, client, sa_key, https_service, trust_ca):
    proxy = await start_proxy(sa_config(sa_key[0], https_service.url))
    async with client.get(f"{proxy.url}/hello?x=1") as r:
        assert r.status == 200, await r.text()
        body = json.loads(await r.text())
    assert body["path"] == "/hello?x=1"
    seen = https_service.last
    # The private service verified the signature; the audience is the https URL.
    assert seen.claims is not None and seen.claims["aud"] == f"https://{HOST}:{https_service.port}"
    assert seen.header("Host") == f"{HOST}:{https_service.port}"
    # One handshake, and it named the route's host.
    assert https_service.handshakes == [HOST]


async def test_ip_upstream_sends_no_sni_and_is_verified_against_the_ip(start_proxy, client, sa_key, https_service, trust_ca):
    # RFC 6066: no IP literal in SNI; the certificate's IP address entry is what is checked.
    upstream = f"https://127.0.0.1:{https_service.port}"
    proxy = await start_proxy(sa_config(sa_key[0], upstream, audience=https_service.url))
    async with client.get(f"{proxy.url}/hello") as r:
        assert r.status == 200, await r.text()
    assert https_service.last.header("Host") == f"127.0.0.1:{https_service.port}"
    assert https_service.handshakes == [None]


async def test_ssl_cert_dir_is_honoured_too(start_proxy, client, sa_key, https_service, test_ca, clean_env, monkeypatch, tmp_path):
    # A hashed certificate directory, as `openssl rehash` (c_rehash) makes and OpenSSL reads.
    openssl = shutil.which("openssl", path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin:/bin")
    if openssl is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: openssl not installed (apt-get install -y openssl; tests/run.sh does it)")
        pytest.skip("openssl not installed (apt-get install -y openssl)")
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(test_ca.ca_file, certs / "test-ca.pem")
    subprocess.run([openssl, "rehash", str(certs)], check=True, capture_output=True, timeout=30)
    assert any(p.suffix == ".0" for p in certs.iterdir()), list(certs.iterdir())
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    proxy = await start_proxy(sa_config(sa_key[0], https_service.url))
    async with client.get(f"{proxy.url}/hello") as r:
        assert r.status == 200, await r.text()
    assert https_service.last.claims is not None
    assert https_service.handshakes == [HOST]


async def test_without_the_ca_the_upstream_is_not_trusted(start_proxy, client, sa_key, https_service, clean_env, monkeypatch):
    # The control for the test above: what makes the fake trusted is SSL_CERT_FILE.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    proxy = await start_proxy(sa_config(sa_key[0], https_service.url))
    async with client.get(f"{proxy.url}/hello") as r:
        assert r.status == 502
        reason = one_line_reason(await r.text())
    assert "TLS" in reason and https_service.url in reason, reason
    assert https_service.requests == []


async def test_keep_alive_reuses_one_tls_connection(start_proxy, client, sa_key, https_service, trust_ca):
    proxy = await start_proxy(sa_config(sa_key[0], https_service.url))
    for i in range(6):
        async with client.get(f"{proxy.url}/n/{i}") as r:
            assert r.status == 200, await r.text()
            await r.read()
    assert [r.raw_path for r in https_service.requests] == [f"/n/{i}" for i in range(6)]
    # Six requests one after the other, one TLS handshake.
    assert https_service.handshakes == [HOST]


@pytest.mark.parametrize("kind", ["wrong-host", "expired"])
async def test_bad_certificate_is_refused_with_502_and_a_reason(start_proxy, client, sa_key, test_ca, trust_ca, fake_google, kind):
    with TLSPrivateService(test_ca, kind, certs_url=fake_google.certs_url) as service:
        proxy = await start_proxy(sa_config(sa_key[0], service.url))
        async with client.get(f"{proxy.url}/hello") as r:
            assert r.status == 502
            reason = one_line_reason(await r.text())
        assert "TLS certificate" in reason and service.url in reason, reason
        # Not a single request got through: the token never left.
        assert service.requests == []
        assert service.handshakes == [HOST]


@pytest.mark.parametrize(("kind", "words"), [("wrong-host", ("hostname",)), ("expired", ("expired",))])
async def test_bad_certificate_reason_says_what_is_wrong(start_proxy, client, sa_key, test_ca, trust_ca, fake_google, kind, words):
    with TLSPrivateService(test_ca, kind, certs_url=fake_google.certs_url) as service:
        proxy = await start_proxy(sa_config(sa_key[0], service.url))
        async with client.get(f"{proxy.url}/hello") as r:
            assert r.status == 502
            reason = one_line_reason(await r.text()).lower()
        assert all(w in reason for w in words), reason


async def test_post_over_https_trusts_ssl_cert_file_set_before_the_proxy_starts(start_proxy, client, sa_key, https_service, trust_ca):
    proxy = await start_proxy(sa_config(sa_key[0], https_service.url))
    data = pattern_bytes(300_000)
    async with client.post(f"{proxy.url}/upload", data=data) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------- subprocess proxy (the CLI)


async def start_cli_listening(tmp_path: Path, key: Path, upstream: str, ca: TestCA, **env: str) -> ProxyProcess:
    config = sa_config(key, upstream)
    config["listen"] = {"port": 0}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proxy = ProxyProcess(["--config", str(path)], clean_env(tmp_path, SSL_CERT_FILE=str(ca.ca_file), **env))
    await proxy.start()
    try:
        await proxy.wait_listening(admin=False)
    except BaseException:
        await proxy.stop()
        raise
    return proxy


async def test_cli_trusts_ssl_cert_file_for_get_post_and_websocket(tmp_path, client, sa_key, https_service, test_ca):
    proxy = await start_cli_listening(tmp_path, sa_key[0], https_service.url, test_ca)
    try:
        async with client.get(f"{proxy.url}/hello") as r:
            assert r.status == 200, await r.text()
        data = pattern_bytes(300_000)
        async with client.post(f"{proxy.url}/upload", data=data) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        async with client.ws_connect(f"{proxy.url}/ws") as ws:
            await ws.send_str("over tls")
            assert (await ws.receive_str(timeout=10)) == "over tls"
        assert all(r.claims is not None for r in https_service.requests)
        assert set(https_service.handshakes) == {HOST}
    finally:
        await proxy.stop()


GIB = 1 << 30


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_one_gib_download_over_https_is_intact(tmp_path, sa_key, https_service, test_ca):
    proxy = await start_cli_listening(tmp_path, sa_key[0], https_service.url, test_ca)
    try:
        digest, size = hashlib.sha256(), 0
        timeout = aiohttp.ClientTimeout(total=540, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(f"{proxy.url}/bytes/{GIB}?cl=1") as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Length"] == str(GIB)
            async for chunk in r.content.iter_chunked(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        assert size == GIB
        assert digest.hexdigest() == pattern_sha256(GIB)
    finally:
        await proxy.stop()


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_one_gib_upload_over_https_is_intact(tmp_path, sa_key, https_service, test_ca):
    proxy = await start_cli_listening(tmp_path, sa_key[0], https_service.url, test_ca)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        step = 1 << 20
        for start in range(0, GIB, step):
            chunk = pattern_bytes(step, start)
            digest.update(chunk)
            yield chunk

    try:
        timeout = aiohttp.ClientTimeout(total=540, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.put(f"{proxy.url}/upload", data=body()) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer == {"len": GIB, "sha256": digest.hexdigest()}
    finally:
        await proxy.stop()
