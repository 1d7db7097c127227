"""A token never appears in a log line, an error body or an exception message.

Every in-process test of the suite is also checked by the autouse fixture in
tests/conftest.py (no token the fake Google issued during a test reaches a log
record). The tests here go after the paths most likely to leak: error answers
built from upstream and token-endpoint failures, aiohttp's exceptions that carry
request headers, google-auth's own DEBUG logging in a program that embeds the
proxy, and the command line at ``--log-level debug`` under hostile traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import exchange as request_path
from proxy.errors import redact
from tests.rawhttp import Listener, exchange, request
from tests.test_forward import free_port
from tests.test_sidecar_support import ProxyProcess, clean_env

CLIENT_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjbGllbnQifQ.Y2xpZW50LXNpZ25hdHVyZS12YWx1ZQ"
#: Not JWT-shaped, so no redaction pattern would catch it: only not writing it helps.
BASIC_SECRET = "c3VwZXItc2VjcmV0LXVzZXI6cGFzc3dvcmQ"


def sa_config(key_path, *routes, **top):
    return {"credentials": {"source": "service_account", "key_file": str(key_path)}, "routes": list(routes), **top}


def secret_parts(tokens):
    """Each token, and the signature of each JWT (its header is the same for all)."""
    for token in tokens:
        yield token
        if token.count(".") == 2:
            yield token.rsplit(".", 1)[1]


def echo_garbage(reader_writer_listener=None):
    """An upstream that answers nonsense followed by the request it got, token included."""

    async def serve(reader, writer, listener):
        head = await reader.readuntil(b"\r\n\r\n")
        listener.received += head
        writer.write(b"NOT HTTP " + head)
        await writer.drain()
        writer.close()

    return serve


# --------------------------------------------------------------------------- in process, at DEBUG


async def test_error_answers_and_debug_logs_carry_no_token(start_proxy, sa_key, google, private_service, caplog):
    start = len(google.issued)
    garbage = await Listener(echo_garbage()).start()
    silent = await Listener().start()
    try:
        proxy = await start_proxy(
            sa_config(
                sa_key[0],
                {"prefix": "/ok", "upstream": private_service.url},
                {"prefix": "/xsa", "upstream": private_service.url, "header": "x-serverless-authorization"},
                {"prefix": "/garbage", "upstream": garbage.url},
                {"prefix": "/stuck", "upstream": silent.url, "timeout": 0.3},
                {"prefix": "/down", "upstream": f"http://127.0.0.1:{free_port()}"},
            )
        )
        client_auth = [("Authorization", f"Bearer {CLIENT_JWT}")]
        cases = [
            request("GET", "/ok/status/401", client_auth),  # a 401 (and the retry logic) at DEBUG
            request("POST", "/ok/status/500", client_auth, body=b"x" * 100),
            request("GET", "/xsa/status/403", client_auth),  # the client's own Authorization passes here
            request("GET", "/garbage/x", client_auth),
            request("POST", "/garbage/x", body=b"payload"),
            request("GET", "/stuck/x"),
            request("GET", "/down/x"),
            request("GET", f"/nowhere/{CLIENT_JWT}"),
            b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + CLIENT_JWT.encode() + b"\x01\r\n\r\n",
            b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic " + BASIC_SECRET.encode() + b"\x7f\r\n\r\n",
        ]
        replies = [(await exchange(proxy.port, raw, wait_close=False))[0] for raw in cases]
        statuses = [r.status for r in replies]
        assert statuses == [401, 500, 403, 502, 502, 504, 502, 404, 400, 400], statuses
        # The proxy's own token went upstream (so its absence below means something).
        assert any(r.claims for r in private_service.requests)
        secrets = list(secret_parts(google.issued[start:])) + [CLIENT_JWT, CLIENT_JWT.rsplit(".", 1)[1], BASIC_SECRET]
        for reply in replies:
            where = bytes(reply.body) + json.dumps(reply.headers).encode()
            for secret in secrets:
                assert secret.encode() not in where, (reply.status, reply.body)
        text = caplog.text
        assert "DEBUG" in text
        for secret in secrets:
            assert secret not in text
    finally:
        await garbage.stop()
        await silent.stop()


async def test_token_endpoint_echoing_the_signed_assertion_in_its_error(start_proxy, google, tmp_path, caplog):
    """google-auth puts the token endpoint's error text in its exception: it must not travel on."""
    seen = bytearray()

    async def token_endpoint(reader, writer, listener):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        form = await reader.readexactly(length)
        seen.extend(form)
        body = json.dumps({"error": "invalid_grant", "error_description": f"bad request: {form.decode()}"}).encode()
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()

    endpoint = await Listener(token_endpoint).start()
    try:
        key = google.write_key_file(tmp_path / "key.json", "echo-sa@test-project.iam.gserviceaccount.com")
        info = json.loads(key.read_text())
        info["token_uri"] = endpoint.url + "/token"
        key.write_text(json.dumps(info))
        proxy = await start_proxy(sa_config(key, {"upstream": "http://127.0.0.1:9"}), ready=False)
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy.url + "/x") as r:
                assert r.status == 503
                body = await r.text()
            async with client.get(proxy.url + "/.proxy/status", headers={"Accept": "application/json"}) as r:
                status_page = await r.text()
        assertion = dict(p.split("=", 1) for p in seen.decode().split("&"))["assertion"]
        assert assertion.count(".") == 2
        assert "invalid_grant" in body  # the reason is there, the echoed assertion is not
        for text in (body, status_page, caplog.text):
            for secret in secret_parts([assertion]):
                assert secret not in text
    finally:
        await endpoint.stop()


def test_client_response_error_is_formatted_without_its_request_headers():
    token = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2VjcmV0LXNpZ25hdHVyZQ"
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {token}"}))
    info = aiohttp.RequestInfo(URL("http://upstream/x"), "GET", headers, URL("http://upstream/x"))
    error = aiohttp.ClientResponseError(info, (), status=400, message="Bad Request")
    # aiohttp's repr() lists the request headers: the proxy's wording of a failure never uses it.
    assert token in repr(error)
    assert token not in request_path._describe(error)
    assert token not in str(error)
    # Anything else token-shaped is scrubbed from the one line that is kept.
    assert "[redacted" in redact(f"failed: Bearer {token}")


async def test_embedding_program_with_google_auth_logging_at_debug_sees_no_token(start_proxy, sa_key, google, private_service):
    """A program that configures the ``google`` logger at DEBUG with a structured handler."""
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # What a JSON formatter would print: the message and every extra field.
            records.append(f"{record.levelname} {record.name} {record.getMessage()} {record.__dict__!r}")

    names = ("google", "google.auth", "google.oauth2")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    handler = Capture(logging.DEBUG)
    base = logging.getLogger("google")
    try:
        for name in names[1:]:
            logging.getLogger(name).setLevel(logging.NOTSET)  # as in a fresh program
        base.setLevel(logging.DEBUG)
        base.addHandler(handler)
        start = len(google.issued)
        proxy = await start_proxy(sa_config(sa_key[0], {"upstream": private_service.url}))
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy.url + "/x") as r:
                assert r.status == 200
        assert google.issued[start:], "no token was minted"
        debug = [r for r in records if r.startswith("DEBUG")]
        assert debug == [], debug[:1]
        # An explicit choice is respected: asking for google-auth's DEBUG records gets them.
        logging.getLogger("google.auth").setLevel(logging.DEBUG)
        assert logging.getLogger("google.auth.transport.requests").isEnabledFor(logging.DEBUG)
    finally:
        base.removeHandler(handler)
        for name, (level, propagate) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate


# --------------------------------------------------------------------------- the command line


async def test_cli_at_debug_under_hostile_traffic_prints_no_secret(google, sa_key, private_service, tmp_path):
    start = len(google.issued)
    garbage = await Listener(echo_garbage()).start()
    config = {
        "credentials": {"source": "service_account", "key_file": str(sa_key[0])},
        "listen": {"port": 0},
        "routes": [
            {"prefix": "/ok", "upstream": private_service.url},
            {"prefix": "/garbage", "upstream": garbage.url},
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proxy = await ProxyProcess(["--config", str(path), "--log-level", "debug"], clean_env(tmp_path)).start()
    try:
        await proxy.wait_listening(admin=False)
        await proxy.wait_for(lambda: "valid for" in proxy.stderr, "the first token")
        raws = [
            request("GET", "/ok/a", [("Authorization", f"Bearer {CLIENT_JWT}")]),
            request("POST", "/ok/upload", [("Authorization", f"Basic {BASIC_SECRET}")], body=b"b" * 1000),
            request("GET", "/garbage/x"),
            request("POST", "/garbage/x", body=b"payload"),
            b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + CLIENT_JWT.encode() + b"\x01\r\n\r\n",
            b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nAuthorization : Basic " + BASIC_SECRET.encode() + b"\r\n\r\n",
            b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n Authorization: Basic " + BASIC_SECRET.encode() + b"\r\n\r\n",
            b"GET /ok/x HTTP/1.1\r\nHost: localhost\r\nCookie: session=" + BASIC_SECRET.encode() * 300 + b"\r\n\r\n",
            # TLS on the HTTP port: refused, and logged at DEBUG only.
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + BASIC_SECRET.encode() + b"\r\n\r\n",
        ]
        statuses = [(await exchange(proxy.port, raw, wait_close=False))[0].status for raw in raws]
        assert statuses == [200, 200, 502, 502, 400, 400, 400, 431, 400], (statuses, proxy.stderr[-3000:])
        proxy.signal(signal.SIGINT)
        assert await proxy.wait_exit() == 0
    finally:
        await proxy.stop()
        await garbage.stop()
    stderr = proxy.stderr
    assert " DEBUG proxy.engine.http1: refused a request from 127.0.0.1: 400 malformed request" in stderr, "debug logging was not on"
    # The proxy's token reached the upstream, so its absence from the log means something.
    assert private_service.requests[0].claims is not None
    issued = google.issued[start:]
    assert issued
    for secret in [*secret_parts(issued), CLIENT_JWT, CLIENT_JWT.rsplit(".", 1)[1], BASIC_SECRET]:
        assert secret not in stderr
    assert "Traceback" not in stderr
    assert "refused a request from 127.0.0.1: 400 malformed request" in stderr
