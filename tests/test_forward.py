"""The proxy end to end: real google-auth against the fake token endpoint, a fake
Cloud Run service that verifies every token, and the proxy on a real port."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes import GZIP_PLAIN, PrivateService, pattern_sha256

MiB = 1024 * 1024


@pytest.fixture
def two_services(fake_google):
    with PrivateService(certs_url=fake_google.certs_url) as a, PrivateService(certs_url=fake_google.certs_url) as b:
        yield a, b


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # The test client must not decompress or add headers of its own either.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


async def test_two_routes_two_audiences_two_header_modes(start_proxy, client, sa_key, two_services, google):
    a, b = two_services
    key, email = sa_key
    proxy = await start_proxy(
        sa_config(
            key,
            {"prefix": "/a", "upstream": a.url},
            {"prefix": "/b", "upstream": b.url, "header": "x-serverless-authorization"},
        )
    )
    async with client.get(f"{proxy.url}/a/x", headers={"Authorization": "Bearer client-own"}) as r:
        assert r.status == 200, await r.text()
    async with client.get(f"{proxy.url}/b/y", headers={"Authorization": "Basic app-credential"}) as r:
        assert r.status == 200, await r.text()

    ra, rb = a.last, b.last
    assert (ra.raw_path, rb.raw_path) == ("/x", "/y")
    assert ra.claims["aud"] == a.url and ra.claims["email"] == email
    assert rb.claims["aud"] == b.url
    assert ra.checked_header == "Authorization"
    assert ra.header_values("Authorization") != ["Bearer client-own"]
    # Serverless mode: the token travels in XSA and the app's own Authorization is untouched.
    assert rb.checked_header == "X-Serverless-Authorization"
    assert rb.header_values("Authorization") == ["Basic app-credential"]
    # One mint per audience, made ahead of the requests.
    assert google.calls_by_audience[("token", a.url)] == 1
    assert google.calls_by_audience[("token", b.url)] == 1


async def test_prefix_is_stripped_onto_the_upstream_base_path_and_query_kept(start_proxy, client, sa_key, fake_google):
    with PrivateService(certs_url=fake_google.certs_url) as svc:
        svc.audiences = [svc.url + "/fn"]
        proxy = await start_proxy(sa_config(sa_key[0], {"prefix": "/hello", "upstream": svc.url + "/fn"}))
        raw_query = "a=1&b=%20x&c=%2F&d=&d=2&e=caf%C3%A9"
        for path, expected in [
            (f"/hello/x/y?{raw_query}", f"/fn/x/y?{raw_query}"),
            ("/hello", "/fn"),
            ("/hello/", "/fn/"),
            ("/hello/a%2Fb", "/fn/a%2Fb"),
        ]:
            # Raw bytes: an HTTP client library would normalise the query itself.
            status, body = await raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            assert status.startswith(b"HTTP/1.1 200"), (path, status, body)
            assert svc.last.raw_path == expected
            assert svc.last.claims["aud"] == svc.url + "/fn"
        async with client.get(f"{proxy.url}/helloworld") as r:
            assert r.status == 404
            assert "configured prefixes: /hello" in await r.text()


async def test_hop_by_hop_and_client_credentials_are_stripped(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    request = (
        "GET /echo HTTP/1.1\r\n"
        f"Host: localhost:{proxy.port}\r\n"
        "Connection: keep-alive, X-Secret, Authorization\r\n"
        "X-Secret: s3cret\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Proxy-Authorization: Basic cHJveHk=\r\n"
        "Forwarded: for=1.2.3.4\r\n"
        "X-Forwarded-For: 1.2.3.4\r\n"
        "X-Forwarded-Host: evil.example\r\n"
        "X_Forwarded_Proto: https\r\n"
        "X-Serverless-Authorization: Bearer forged\r\n"
        "Authorization: Bearer forged\r\n"
        "X-App: kept\r\n"
        "\r\n"
    )
    status, _ = await raw_exchange(proxy.port, request.encode())
    assert status.startswith(b"HTTP/1.1 200"), status
    rec = private_service.last
    names = {k.lower() for k, _ in rec.headers}
    for dropped in ("x-secret", "keep-alive", "te", "proxy-authorization", "forwarded", "x_forwarded_proto", "x-serverless-authorization"):
        assert dropped not in names, (dropped, rec.headers)
    assert rec.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.header_values("X-Forwarded-Host") == [f"localhost:{proxy.port}"]
    assert rec.header_values("X-Forwarded-Proto") == ["http"]
    assert rec.header_values("Host") == [private_service.host]
    assert rec.header_values("X-App") == ["kept"]
    assert rec.checked_header == "Authorization" and rec.claims is not None
    assert "forged" not in rec.header("Authorization")


async def test_client_adds_no_headers_of_its_own(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    body = b'{"k": 1}'
    request = f"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    status, _ = await raw_exchange(proxy.port, request)
    assert status.startswith(b"HTTP/1.1 200"), status
    names = {k.lower() for k, _ in private_service.last.headers}
    assert not names & {"user-agent", "accept-encoding", "accept", "content-type"}, names
    assert private_service.last.body_len == len(body)


@pytest.mark.parametrize(
    "target, reason",
    [
        ("http://evil.example/x", b"absolute-form"),
        ("https://evil.example/", b"absolute-form"),
        ("*", b"OPTIONS *"),
        ("/a/../b", b". or .."),
        ("/a/%2e%2e/b", b". or .."),
        ("/a/%2E/b", b". or .."),
    ],
)
async def test_targets_that_are_not_forwarded(start_proxy, sa_key, private_service, target, reason):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    method = "OPTIONS" if target == "*" else "GET"
    status, body = await raw_exchange(proxy.port, f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert status.startswith(b"HTTP/1.1 400"), status
    assert reason in body
    assert private_service.requests == []


async def test_connect_is_refused(start_proxy, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    status, body = await raw_exchange(proxy.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
    # 403: the browser guard refuses the foreign Host before the forwarder sees it.
    assert status.split(b" ")[1] in (b"400", b"403", b"405"), status
    assert private_service.requests == []


@pytest.mark.parametrize("path", ["//evil.example/x", "/http://evil.example/x", "/%2F%2Fevil.example/x"])
async def test_paths_that_look_like_hosts_stay_on_the_configured_host(start_proxy, sa_key, private_service, path):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    status, _ = await raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert status.startswith(b"HTTP/1.1 200"), status
    assert private_service.last.raw_path == path
    assert private_service.last.header("Host") == private_service.host


async def test_redirect_is_not_followed_and_location_is_rewritten(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"prefix": "/svc", "upstream": private_service.url}))
    cases = [
        (f"{private_service.url}/next?x=1", f"http://127.0.0.1:{proxy.port}/svc/next?x=1"),
        ("/login", "/svc/login"),
        ("https://accounts.google.com/o/oauth2/auth", "https://accounts.google.com/o/oauth2/auth"),
    ]
    for to, expected in cases:
        async with client.get(f"{proxy.url}/svc/redirect", params={"to": to}, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == expected
    assert len(private_service.requests) == len(cases)  # nothing followed


async def test_large_upload_and_download_stream_intact(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    size = 50 * MiB
    chunk = bytes(range(256)) * 256  # 64 KiB

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    expected = hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
    # Chunked upload (no Content-Length): streamed, not buffered.
    async with client.post(f"{proxy.url}/upload", data=body()) as r:
        assert r.status == 200
        assert await r.json() == {"len": size, "sha256": expected}
    for cl in ("0", "1"):
        digest, n = hashlib.sha256(), 0
        async with client.get(f"{proxy.url}/bytes/{size}", params={"cl": cl}) as r:
            assert r.status == 200
            if cl == "1":
                assert r.headers["Content-Length"] == str(size)
            async for piece in r.content.iter_any():
                digest.update(piece)
                n += len(piece)
        assert (n, digest.hexdigest()) == (size, pattern_sha256(size))


async def test_concurrent_downloads_with_slow_readers_arrive_intact(start_proxy, client, sa_key, private_service):
    # GET bodies take the lean path, whose connections share one read buffer and
    # pause reading while a client is behind: interleave many, some read slowly.
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))

    async def fetch(i: int) -> tuple[int, str]:
        size = 3 * MiB + 7 * i
        digest, n = hashlib.sha256(), 0
        async with client.get(f"{proxy.url}/bytes/{size}", params={"cl": str(i % 2)}) as r:
            assert r.status == 200
            async for piece in r.content.iter_chunked(48 * 1024 + i):
                digest.update(piece)
                n += len(piece)
                if i % 3 == 0:
                    await asyncio.sleep(0.002)
        assert (n, digest.hexdigest()) == (size, pattern_sha256(size)), i
        return n, digest.hexdigest()

    assert len(await asyncio.gather(*(fetch(i) for i in range(8)))) == 8


async def test_a_stalled_client_pauses_the_upstream_and_gets_every_byte(start_proxy, sa_key, private_service, monkeypatch):
    # A GET body with a Content-Length is piped from the upstream connection to the
    # client's; while the client reads nothing, reading from the upstream must pause
    # (the pipe waits for the client's transport to drain) and then resume intact.
    from proxy.engine.upstream import UpstreamConnection

    paused = []
    pipe = UpstreamConnection.pipe

    async def observed(self, sink, drain):
        pause_reading = self.transport.pause_reading

        def recorded():
            paused.append(1)
            pause_reading()

        self.transport.pause_reading = recorded
        return await pipe(self, sink, drain)

    # Only to see that reading paused once the body was being piped: the pipe runs unchanged.
    monkeypatch.setattr(UpstreamConnection, "pipe", observed)
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    size = 16 * MiB
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", proxy.port))
        await loop.sock_sendall(s, f"GET /bytes/{size}?cl=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await asyncio.sleep(1.0)  # the stall
        assert paused, "reading from the upstream never paused for the stalled client"
        data = bytearray()
        while chunk := await loop.sock_recv(s, 1 << 20):
            data += chunk
    finally:
        s.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert (len(body), hashlib.sha256(body).hexdigest()) == (size, pattern_sha256(size))


async def test_content_is_never_decompressed(start_proxy, client, sa_key, private_service):
    import gzip

    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    async with client.get(f"{proxy.url}/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        raw = await r.read()
    assert gzip.decompress(raw) == GZIP_PLAIN
    assert private_service.last.header_values("Accept-Encoding") == ["gzip"]


async def test_unreachable_upstream_is_502(start_proxy, client, sa_key):
    port = free_port()
    proxy = await start_proxy(sa_config(sa_key[0], {"prefix": "/down", "upstream": f"http://127.0.0.1:{port}"}))
    async with client.get(f"{proxy.url}/down/x") as r:
        assert r.status == 502
        text = await r.text()
    assert "cannot connect" in text and "127.0.0.1" in text
    assert "eyJ" not in text


async def test_slow_upstream_is_504_but_a_slow_body_is_not_cut(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url, "timeout": 0.5}))
    async with client.get(f"{proxy.url}/slow", params={"seconds": "3"}) as r:
        assert r.status == 504
        assert "within 0.5 s" in await r.text()
    async with client.get(f"{proxy.url}/slow-body", params={"seconds": "1"}) as r:
        assert r.status == 200
        assert await r.read() == b"slow body\n"


async def test_no_token_is_503_with_retry_after_and_no_upstream_call(start_proxy, client, sa_key, private_service, google):
    google.fail("token", status=503)
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}), ready=False)
    async with client.get(f"{proxy.url}/x") as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        text = await r.text()
    assert text.startswith("idtoken-proxy: 503 ") and text.count("\n") == 1
    assert private_service.requests == []
    # Recovery without restart: once the endpoint heals, the retry finds a token.
    google.heal()
    assert await proxy.state.tokens.wait_ready(15)
    async with client.get(f"{proxy.url}/x") as r:
        assert r.status == 200


async def test_upstream_reset_mid_body_aborts_the_client_connection(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(f"{proxy.url}/reset-mid-body") as r:
            assert r.status == 200
            await r.read()


async def test_upstream_error_statuses_pass_through(start_proxy, client, sa_key, private_service):
    proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
    for code in (204, 304, 404, 418, 500):
        async with client.get(f"{proxy.url}/status/{code}") as r:
            assert r.status == code
    async with client.head(f"{proxy.url}/bytes/1000", params={"cl": "1"}) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "1000", await r.text()
        assert await r.read() == b""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_exchange(port: int, data: bytes, timeout: float = 10) -> tuple[bytes, bytes]:
    """Send raw bytes, read one response: (status line, body). Connection: close semantics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, _, header_block = head.partition(b"\r\n")
        length = None
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length is not None:
            body = await asyncio.wait_for(reader.readexactly(length), timeout)
        else:
            body = b""
        return status, body
    finally:
        writer.close()
