"""Outbound HTTP proxies from the environment, resolved once per route at startup.

Users behind a corporate proxy expect ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``
to be honoured. aiohttp's ``trust_env=True`` does that per request, in an
executor thread, and also reads ``~/.netrc`` for each request and adds its
Basic credentials for the upstream host: that costs ~120 us per request, sends
``.netrc`` passwords to the upstream in ``x-serverless-authorization`` mode,
and fails outright in ``authorization`` mode (aiohttp refuses an Authorization
header together with netrc auth). So the client session runs with
``trust_env=False`` and each route gets its proxy (or none) from here, once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib import request as _urllib_request

import aiohttp
from aiohttp import hdrs
from yarl import URL


@dataclass(frozen=True)
class UpstreamProxy:
    """The proxy a route's requests go through, and its credentials (from its URL only)."""

    url: URL
    #: ``Proxy-Authorization`` when the proxy URL carries user:password, else empty.
    headers: Mapping[str, str]

    def describe(self) -> str:
        """The proxy URL (credentials are kept apart, in ``auth``), for logs."""
        return str(self.url)


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
    host_lit = f"[{host}]" if ":" in host else host
    # urllib's NO_PROXY matching (suffixes, "*", host:port entries); untyped in typeshed.
    bypass = _urllib_request.proxy_bypass_environment  # type: ignore[attr-defined]
    if bypass(f"{host_lit}:{port}", proxies) or bypass(host, proxies):
        return None
    if "://" not in raw:
        # curl and urllib accept "host:port" for an http proxy.
        raw = "http://" + raw
    url = URL(raw)
    headers = {str(hdrs.PROXY_AUTHORIZATION): aiohttp.encode_basic_auth(url.user, url.password or "")} if url.user else {}
    return UpstreamProxy(url=url.with_user(None), headers=headers)


__all__ = ["UpstreamProxy", "env_proxies", "proxy_for"]
