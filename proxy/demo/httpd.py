"""A small threaded HTTP/1.1 server for the demo's stand-ins (standard library only)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

#: Largest request body the stand-ins read (a token request is a few KiB).
MAX_BODY = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    """Keep-alive HTTP/1.1 with helpers for complete responses; logs go to ``logging``."""

    protocol_version = "HTTP/1.1"
    #: Bounds a silent client (the proxy's pooled connections idle between requests).
    timeout = 120

    def version_string(self) -> str:
        return "idtoken-proxy-demo"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: " + format, type(self).__name__, *args)

    def read_body(self) -> bytes | None:
        """The request body, or None (after a 413/400 answer) when it is too large or malformed."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.send_text(400, "bad Content-Length\n")
            return None
        if length > MAX_BODY:
            self.send_text(413, "request body too large\n")
            return None
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_text(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, text.encode(), "text/plain; charset=utf-8", headers)

    def send_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, (json.dumps(doc, indent=2) + "\n").encode(), "application/json", headers)


class Server:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 served from a daemon thread."""

    def __init__(self, handler: type[Handler], port: int = 0) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        # Connection threads must not keep the process alive after Ctrl-C.
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"demo-{handler.__name__}", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket (open connections end with the process)."""
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
