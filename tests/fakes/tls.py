"""HTTPS for the fakes: a throwaway CA (trustme) and the private service over TLS.

- :class:`TestCA`: a CA whose certificate is written to ``ca.pem``; a client (the
  proxy) trusts it the standard way, with ``SSL_CERT_FILE`` pointing at that file,
  as OpenSSL reads it. It issues a good certificate for ``localhost``, one for
  another host, and an expired one.
- :class:`TLSPrivateService`: the token-verifying :class:`PrivateService` served
  over TLS at ``https://localhost:PORT`` (its URL is also its default audience).
  It records the SNI name of every TLS handshake it sees (None when the client
  sent none), so tests can count handshakes (keep-alive reuse) and check SNI.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from .private_service import PrivateService
from .server import BackgroundServer

#: The host name the good certificate is for, and the one the fake's URL uses.
HOST = "localhost"
#: The only name in the wrong-host certificate.
WRONG_HOST = "wrong-host.example"


class TestCA:
    """A trustme CA with its certificate written to ``directory/ca.pem``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        self._ca = trustme.CA(organization_name="idtoken-proxy tests")
        self.directory = directory
        #: The file ``SSL_CERT_FILE`` should name.
        self.ca_file = directory / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self, kind: str = "good") -> ssl.SSLContext:
        """A server-side context with a certificate: ``good``, ``wrong-host`` or ``expired``."""
        if kind == "good":
            leaf = self._ca.issue_cert(HOST, "127.0.0.1")
        elif kind == "wrong-host":
            leaf = self._ca.issue_cert(WRONG_HOST)
        elif kind == "expired":
            now = datetime.datetime.now(datetime.timezone.utc)
            leaf = self._ca.issue_cert(
                HOST, "127.0.0.1", not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
            )
        else:
            raise ValueError(f"unknown certificate kind {kind!r}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only (for tests talking to the fake directly)."""
        context = ssl.create_default_context()
        self._ca.configure_trust(context)
        return context


class _TLSServer(BackgroundServer):
    """BackgroundServer with TLS on its listening site."""

    def __init__(self, app: web.Application, context: ssl.SSLContext) -> None:
        super().__init__(app)
        self._context = context

    async def _setup(self) -> int:
        runner = web.AppRunner(self.app, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port: int = runner.addresses[0][1]
        return port


class TLSPrivateService(PrivateService):
    """The private service at ``https://localhost:PORT`` with a certificate from ``ca``."""

    def __init__(self, ca: TestCA, kind: str = "good", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sni_lock = threading.Lock()
        self._sni: list[str | None] = []
        context = ca.server_context(kind)
        # Called once per TLS handshake (ClientHello), SNI or not.
        context.sni_callback = self._on_hello
        self._server = _TLSServer(self._make_app(), context)

    def _on_hello(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        with self._sni_lock:
            self._sni.append(server_name)

    @property
    def handshakes(self) -> list[str | None]:
        """The SNI name of every TLS handshake so far (None: no SNI), oldest first."""
        with self._sni_lock:
            return list(self._sni)

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"
