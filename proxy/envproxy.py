"""Outbound HTTP proxies from the environment, resolved once per route at startup.

Users behind a corporate proxy expect ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``
to be honoured. Reading them per request (as aiohttp's ``trust_env=True`` did,
in an executor thread, together with ``~/.netrc``, whose Basic credentials it
then sent to the upstream) costs ~120 us a request, so each route gets its
proxy (or none) from here, once, and ``~/.netrc`` is never read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .engine.upstream import Via


@dataclass(frozen=True)
class UpstreamProxy:
    """The proxy a route's requests go through, and its credentials (from its URL only)."""

    #: The proxy URL without credentials.
    url: str
    #: ``Proxy-Authorization`` when the proxy URL carries user:password, else empty.
    headers: Mapping[str, str]
    host: str = ""
    port: int = 0

    def describe(self) -> str:
        """The proxy URL (credentials are kept apart, in ``headers``), for logs."""
        return self.url

    def via(self) -> Via:
        """The proxy as the upstream transport takes it."""
        return Via(self.host, self.port, self.headers.get("Proxy-Authorization"))


def env_proxies(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{scheme: proxy URL, "no": NO_PROXY}`` from the environment, as urllib reads it.

    Lower-case names win over upper-case ones, as in urllib and curl.
    """
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for lower_first in (False, True):
        for name, value in environ.items():
            lname = name.lower()
            if value and lname.endswith("_proxy") and (name == lname) == lower_first:
                found[lname[: -len("_proxy")]] = value
    return found


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str] | None = None) -> UpstreamProxy | None:
    """The proxy for requests to ``scheme://host:port``, or None (direct, or NO_PROXY).

    ``ALL_PROXY`` applies when there is no proxy for the scheme itself.
    """
    proxies = env_proxies(environ)
    raw = proxies.get(scheme) or proxies.get("all")
    if not raw:
        return None
    # Only with a proxy configured: urllib.request brings http.client and email (~2 MiB resident).
    from urllib import request as _urllib_request

    host_lit = f"[{host}]" if ":" in host else host
    # urllib's NO_PROXY matching (suffixes, "*", host:port entries); untyped in typeshed.
    bypass = _urllib_request.proxy_bypass_environment  # type: ignore[attr-defined]
    if bypass(f"{host_lit}:{port}", proxies) or bypass(host, proxies):
        return None
    if "://" not in raw:
        # curl and urllib accept "host:port" for an http proxy.
        raw = "http://" + raw
    parts = urlsplit(raw)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    headers = {"Proxy-Authorization": Via.basic(unquote(parts.username), unquote(parts.password or ""))} if parts.username else {}
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return UpstreamProxy(url=f"{parts.scheme}://{netloc}", headers=headers, host=host, port=port)


__all__ = ["UpstreamProxy", "env_proxies", "proxy_for"]
