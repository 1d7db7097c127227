"""The demo's "private" sample service: it checks every request's ID token as Cloud Run does.

- ``X-Serverless-Authorization`` is checked when present, else ``Authorization``.
- No token: 403. Not ``Bearer <jwt>``, an unknown key, a bad signature, a wrong
  audience, a wrong issuer or an expired token (no clock skew): 401 with
  ``WWW-Authenticate``. Each with a one-line reason.
- The certs are fetched once at start from the stand-in token endpoint (Cloud Run
  caches Google's).

What it serves to a verified caller: ``/`` (who called and the token's claims,
never the token itself; HTML for browsers, text for curl), ``/ws`` (a websocket
echo, RFC 6455) and ``/events`` (an event stream, SSE).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import logging
import struct
import time
import urllib.parse
import urllib.request
from typing import Any

import google.auth.exceptions
import google.auth.jwt

from .httpd import Handler, Server

log = logging.getLogger(__name__)

XSA = "X-Serverless-Authorization"
ISSUERS = ("https://accounts.google.com", "accounts.google.com")
#: Cloud Run's answer header on 401.
WWW_AUTHENTICATE = 'Bearer error="invalid_token" error_description="The access token could not be verified"'
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest websocket message the echo takes (the demo's own page sends a few bytes).
WS_MAX_MESSAGE = 1 << 20
MAX_EVENTS = 100

NOTHING_REACHES_GOOGLE = (
    "This is the idtoken-proxy demo: the token endpoint, this service and the key are local stand-ins, "
    "and nothing reaches Google."
)


class Refused(Exception):
    """A request Cloud Run would refuse: status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def verify(headers: Any, certs: dict[str, str], audience: str) -> tuple[str, dict[str, Any]]:
    """Check a request's token as Cloud Run does: (the header checked, the claims) or Refused."""
    name = XSA if headers.get(XSA) is not None else "Authorization"
    value = headers.get(name)
    if value is None:
        raise Refused(403, "403 Forbidden: no identity token (send it through the proxy)")
    scheme, _, token = value.partition(" ")
    if scheme != "Bearer" or token.count(".") != 2:
        raise Refused(401, f"401 Unauthorized: {name} is not 'Bearer <jwt>'")
    try:
        claims: dict[str, Any] = google.auth.jwt.decode(token, certs=certs, audience=audience)
    except (ValueError, google.auth.exceptions.GoogleAuthError) as e:
        raise Refused(401, f"401 Unauthorized: {_reason(str(e))}") from None
    if claims.get("iss") not in ISSUERS:
        raise Refused(401, "401 Unauthorized: not issued by Google")
    return name, claims


def _reason(message: str) -> str:
    """A one-line reason for a failed decode that never repeats the token."""
    lowered = message.lower()
    for needle, reason in (
        ("certificate for key id", "unknown signing key"),
        ("signature", "invalid signature"),
        ("expired", "token expired"),
        ("too early", "token used before its iat"),
        ("audience", "wrong audience"),
    ):
        if needle in lowered:
            return reason
    return "malformed token"


class PrivateService:
    """The sample service on 127.0.0.1; its URL is also the audience it accepts."""

    def __init__(self, certs_url: str, port: int = 0) -> None:
        self.certs_url = certs_url
        self.certs: dict[str, str] = {}
        handler = type("ServiceHandler", (_ServiceHandler,), {"service": self})
        self._server = Server(handler, port)

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def audience(self) -> str:
        return self.url

    def start(self) -> PrivateService:
        # No proxies: the stand-in is on loopback whatever http_proxy says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.certs_url, timeout=10) as response:
            self.certs = json.load(response)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


class _ServiceHandler(Handler):
    service: PrivateService

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            header, claims = verify(self.headers, self.service.certs, self.service.audience)
        except Refused as r:
            log.info("sample service: %s %s refused: %s", self.command, self.path, r.reason)
            extra = {"WWW-Authenticate": WWW_AUTHENTICATE} if r.status == 401 else {}
            self.send_text(r.status, r.reason + "\n", extra)
            return
        url = urllib.parse.urlsplit(self.path)
        if self.command == "HEAD" and url.path != "/":
            self.send_text(405, "streams answer GET only\n", {"Allow": "GET"})
        elif url.path == "/":
            self._page(header, claims)
        elif url.path == "/ws":
            self._websocket()
        elif url.path == "/events":
            self._events(urllib.parse.parse_qs(url.query))
        else:
            self.send_text(404, "not found: try /, /ws or /events\n")

    def do_POST(self) -> None:
        self.send_text(405, "the demo service answers GET only\n", {"Allow": "GET, HEAD"})

    # -- / -------------------------------------------------------------------

    def _page(self, header: str, claims: dict[str, Any]) -> None:
        email = str(claims.get("email") or claims.get("sub") or "unknown")
        shown = json.dumps(claims, indent=2, sort_keys=True)
        if "text/html" in (self.headers.get("Accept") or ""):
            self.send_bytes(200, _html(email, header, shown).encode(), "text/html; charset=utf-8")
            return
        left = int(claims.get("exp", 0) - time.time())
        self.send_text(
            200,
            f"Hello, {email}!\n"
            f"Your request carried a valid Google-style ID token in {header} "
            f"(signature, audience and expiry checked; {left} s left).\n"
            f"{NOTHING_REACHES_GOOGLE}\n"
            f"Token claims (never the token itself):\n{shown}\n",
        )

    # -- /events -------------------------------------------------------------

    def _events(self, query: dict[str, list[str]]) -> None:
        try:
            count = min(MAX_EVENTS, max(1, int(query.get("count", ["5"])[0])))
            interval = min(10.0, max(0.0, float(query.get("interval", ["1"])[0])))
        except ValueError:
            self.send_text(400, "count and interval must be numbers\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(count):
                if i:
                    time.sleep(interval)
                # One chunk per event, so each one reaches the client as it is sent.
                self._chunk(f"id: {i}\nevent: tick\ndata: event {i + 1} of {count} at {time.strftime('%H:%M:%S')}\n\n".encode())
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # -- /ws -----------------------------------------------------------------

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key") or ""
        upgrade = (self.headers.get("Upgrade") or "").lower() == "websocket"
        connection = "upgrade" in (self.headers.get("Connection") or "").lower()
        if not (upgrade and connection and key and self.headers.get("Sec-WebSocket-Version") == "13"):
            self.send_text(426, "/ws is a websocket: send an RFC 6455 upgrade (Sec-WebSocket-Version: 13)\n", {"Upgrade": "websocket"})
            return
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(ConnectionError, OSError, _Closed):
            _echo(self.rfile, self.wfile)


class _Closed(Exception):
    pass


def _read_exact(rfile: Any, n: int) -> bytes:
    data: bytes = rfile.read(n)
    if len(data) != n:
        raise _Closed
    return data


def _read_frame(rfile: Any) -> tuple[bool, int, bytes]:
    """One client frame: (fin, opcode, unmasked payload)."""
    b0, b1 = _read_exact(rfile, 2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _read_exact(rfile, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _read_exact(rfile, 8))
    if not b1 & 0x80 or length > WS_MAX_MESSAGE:
        # Clients must mask (RFC 6455 5.1); oversized messages are not for this echo.
        raise _Closed
    mask = _read_exact(rfile, 4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(_read_exact(rfile, length)))
    return bool(b0 & 0x80), b0 & 0x0F, payload


def _frame(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def _echo(rfile: Any, wfile: Any) -> None:
    """Echo text and binary messages, answer pings, and close as the client asks."""
    message, kind = b"", 0
    while True:
        fin, opcode, payload = _read_frame(rfile)
        if opcode == 0x8:
            # Echo the close code back, then end the connection.
            wfile.write(_frame(0x8, payload[:2]))
            return
        if opcode == 0x9:
            wfile.write(_frame(0xA, payload))
            continue
        if opcode == 0xA:
            continue
        if opcode in (0x1, 0x2):
            message, kind = payload, opcode
        elif opcode == 0x0 and kind:
            message += payload
        else:
            wfile.write(_frame(0x8, struct.pack("!H", 1002)))
            return
        if len(message) > WS_MAX_MESSAGE:
            wfile.write(_frame(0x8, struct.pack("!H", 1009)))
            return
        if fin:
            wfile.write(_frame(kind, message))
            message, kind = b"", 0


def _html(email: str, header: str, claims: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>idtoken-proxy demo: private service</title>
<style>body{{font-family:system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em}}
.demo{{background:#fff4ce;border:1px solid #e0c060;padding:.6em 1em}}pre{{background:#f4f4f4;padding:.8em;overflow:auto}}</style>
</head><body>
<p class="demo"><b>Demo.</b> {html.escape(NOTHING_REACHES_GOOGLE)}</p>
<h1>Hello, {html.escape(email)}</h1>
<p>This "private" service accepted your request: it carried a valid ID token in <code>{html.escape(header)}</code>,
checked as Cloud Run checks it (signature, audience, expiry). The proxy added it; your browser never saw it.</p>
<h2>The token's claims</h2><p>(never the token itself)</p>
<pre>{html.escape(claims)}</pre>
<h2>Streams through the proxy</h2>
<p>Websocket echo (<code>/ws</code>): <span id="ws">connecting...</span></p>
<p>Event stream (<code>/events</code>): <span id="sse">waiting...</span></p>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
ws.onopen = () => ws.send("hello through the proxy");
ws.onmessage = (m) => {{ document.getElementById("ws").textContent = "echoed: " + m.data; ws.close(1000); }};
ws.onerror = () => {{ document.getElementById("ws").textContent = "failed"; }};
const es = new EventSource("/events?count=3&interval=0.5");
es.addEventListener("tick", (e) => {{ document.getElementById("sse").textContent = e.data; }});
// The stream ends after its last event; without close() EventSource would reconnect.
es.onerror = () => es.close();
</script>
</body></html>
"""
