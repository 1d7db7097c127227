"""``idtoken-proxy mcp URL``: a local stdio MCP server that is a private streamable-HTTP one.

MCP clients that can only launch a process (stdio transport) reach a private MCP
server on Cloud Run through this bridge. Both sides are the MCP SDK's own
transports: its stdio server transport towards the client, its streamable-HTTP
client transport towards the server. The bridge passes JSON-RPC messages through
unchanged and adds, per HTTP request, a current ID token from the proxy's token
cache (refreshed in the background, one retry with a new token after a 401).

Only MCP messages go to stdout; logs go to stderr. A request the server refuses
(401, 403, 5xx) or cannot be sent (unreachable, no token) is answered with a
JSON-RPC error whose message is one line saying why.

The SDK is an optional extra (``pip install 'idtoken-proxy[mcp]'``), imported only
by this command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .config import (
    HEADER_MODES,
    LOG_LEVELS,
    ConfigError,
    Credentials,
    parse_config,
    read_yaml,
)
from .errors import CredentialError, ProxyError, redact
from .ops.logs import setup_logging

if TYPE_CHECKING:
    import httpx2

    from .auth.tokens import TokenCache, TokenKey

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STARTUP = 3
ENV_PREFIX = "IDTOKEN_PROXY_"
INSTALL_HINT = "needs the MCP SDK: pip install 'idtoken-proxy[mcp]'"
#: JSON-RPC error code of the bridge's own errors (the "server error" range).
BRIDGE_ERROR = -32000
#: How much of a refusal's plain-text body may go into the one-line reason.
_REASON_CHARS = 200
_HEADER_NAMES = {"authorization": "Authorization", "x-serverless-authorization": "X-Serverless-Authorization"}


def mcp_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idtoken-proxy mcp",
        description=(
            "Serve a private streamable-HTTP MCP server (Cloud Run, Cloud Functions) to a local MCP client over "
            "stdio, with a current Google-signed ID token (cached, refreshed in the background) on every request. "
            "Only MCP messages go to stdout; "
            "logs go to stderr. Needs: pip install 'idtoken-proxy[mcp]'."
        ),
    )
    p.add_argument("url", help="the MCP endpoint, e.g. https://my-mcp-abc123-uc.a.run.app/mcp")
    p.add_argument("--audience", metavar="AUD", help="token audience (default: the URL without its path, the service URL)")
    p.add_argument("--header", choices=HEADER_MODES, default="authorization", help="header that carries the token (default: authorization)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="use this config's top-level credentials (default: auto, as the proxy) [env IDTOKEN_PROXY_CONFIG]",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="stderr log level (default: info)")
    return p


def _origin(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def _route_config(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str, str, Credentials]:
    """(url, audience, header, credentials), checked by the ordinary config parser."""
    raw: dict[str, Any] = {}
    config_file = args.config or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        loaded = read_yaml(config_file)
        if not isinstance(loaded, dict):
            raise ConfigError([f"{config_file}: must be a YAML mapping"])
        if "credentials" in loaded:
            raw["credentials"] = loaded["credentials"]
    raw["routes"] = [{"upstream": args.url, "audience": args.audience or _origin(args.url), "header": args.header}]
    try:
        config = parse_config(raw, env)
    except ConfigError as e:
        e.errors = [m.replace("routes[0].upstream", "URL").replace("routes[0].", "--") for m in e.errors]
        raise
    route = config.routes[0]
    return args.url, route.audience, route.header, route.credentials


def cmd_mcp(argv: Sequence[str], env: Mapping[str, str]) -> int:
    args = mcp_parser().parse_args(argv)
    try:
        url, audience, header, creds = _route_config(args, env)
    except ConfigError as e:
        print(f"idtoken-proxy mcp: {'; '.join(e.errors)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        import anyio
        import httpx2
        from mcp.client.streamable_http import streamable_http_client
        from mcp.server.stdio import stdio_server
    except ImportError:
        print(f"idtoken-proxy mcp: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_STARTUP
    setup_logging(args.log_level)
    if args.log_level != "debug":
        # httpx2 logs every request at INFO, the SDK its session id: noise for an MCP client's log.
        for name in ("httpx2", "mcp"):
            logging.getLogger(name).setLevel(logging.WARNING)

    from .auth.choose import build_identity
    from .auth.tokens import TokenCache

    try:
        identity = build_identity(creds)
    except CredentialError as e:
        # The message carries its hint already.
        print(f"idtoken-proxy mcp: {e}", file=sys.stderr)
        return EXIT_STARTUP

    async def run() -> None:
        await identity.resolve()
        tokens = TokenCache()
        key = tokens.register(identity, audience)
        await tokens.warm_up()
        log.info("bridging stdio to %s as %s (audience %s, %s header)", url, identity.describe(), audience, header)
        transport = IdTokenTransport(httpx2.AsyncHTTPTransport(), tokens, key, _HEADER_NAMES[header], url)
        # The SDK's own timeouts (30 s, 300 s for streams); redirects are the SDK's business.
        client = httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(30.0, read=300.0), trust_env=True)
        try:
            async with client, stdio_server() as (local_read, local_write), streamable_http_client(url, http_client=client) as (
                remote_read,
                remote_write,
            ):
                await _pump(local_read, local_write, remote_read, remote_write)
        finally:
            await tokens.close()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(run)
    log.info("stdin closed: bridge stopped")
    return EXIT_OK


async def _pump(local_read: Any, local_write: Any, remote_read: Any, remote_write: Any) -> None:
    """Messages both ways until the local client closes stdin."""
    import anyio
    from mcp.shared.message import ClientMessageMetadata, SessionMessage
    from mcp_types import ErrorData, JSONRPCError, JSONRPCRequest, JSONRPCResponse

    headers = _HeaderStamp()

    async def up() -> None:
        async for item in local_read:
            if isinstance(item, Exception):
                log.warning("a line on stdin is not a JSON-RPC message: %s", type(item).__name__)
                error = JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=-32700, message="Parse error: not a JSON-RPC message"))
                await local_write.send(SessionMessage(error))
                continue
            message = item.message
            if isinstance(message, JSONRPCRequest) and message.method == "initialize":
                headers.initialize_id = message.id
            stamp = headers.for_message(message)
            await remote_write.send(SessionMessage(message, metadata=ClientMessageMetadata(headers=stamp or None)))
        # The client closed stdin: the session is over.
        tg.cancel_scope.cancel()

    async def down() -> None:
        async for item in remote_read:
            if isinstance(item, Exception):
                log.warning("from the server: %s", redact(_one_line(item)))
                continue
            message = item.message
            if isinstance(message, JSONRPCResponse) and headers.initialize_id is not None and message.id == headers.initialize_id:
                version = message.result.get("protocolVersion") if isinstance(message.result, dict) else None
                if isinstance(version, str):
                    headers.negotiated = version
            await local_write.send(SessionMessage(message))

    async with anyio.create_task_group() as tg:
        tg.start_soon(up)
        tg.start_soon(down)
    # The stdio transport's writer runs until its stream closes.
    await local_write.aclose()


class _HeaderStamp:
    """The per-message HTTP headers a session would set, for messages that come without one.

    Over stdio a message carries no headers; over streamable HTTP the server wants
    ``MCP-Protocol-Version`` once the handshake is done (and, from 2026-07-28 on,
    ``Mcp-Method`` and ``Mcp-Name`` mirroring the body).
    """

    def __init__(self) -> None:
        self.initialize_id: Any = None
        self.negotiated: str | None = None

    def for_message(self, message: Any) -> dict[str, str]:
        from mcp.shared.inbound import (
            MCP_METHOD_HEADER,
            MCP_NAME_HEADER,
            MCP_PROTOCOL_VERSION_HEADER,
            NAME_BEARING_METHODS,
            encode_header_value,
        )
        from mcp_types import PROTOCOL_VERSION_META_KEY

        method = getattr(message, "method", None)
        params = getattr(message, "params", None)
        meta = params.get("_meta") if isinstance(params, dict) else None
        modern = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
        if isinstance(modern, str) and isinstance(method, str) and isinstance(params, dict):
            stamp = {MCP_PROTOCOL_VERSION_HEADER: modern, MCP_METHOD_HEADER: method}
            name = params.get(NAME_BEARING_METHODS.get(method, ""))
            if isinstance(name, str):
                stamp[MCP_NAME_HEADER] = encode_header_value(name)
            return stamp
        if self.negotiated is not None and method != "initialize":
            return {MCP_PROTOCOL_VERSION_HEADER: self.negotiated}
        return {}


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _json_rpc_error_response(request: httpx2.Request, status: int, reason: str) -> httpx2.Response:
    import httpx2

    body = {"jsonrpc": "2.0", "id": None, "error": {"code": BRIDGE_ERROR, "message": reason}}
    return httpx2.Response(status, json=body, request=request)


try:
    import httpx2 as _httpx2
except ImportError:  # the mcp extra is missing: cmd_mcp says so before this class is used
    _TransportBase: Any = object
else:
    _TransportBase = _httpx2.AsyncBaseTransport


class IdTokenTransport(_TransportBase):  # type: ignore[misc]
    """An httpx2 transport that adds the current ID token to each request to the MCP server.

    A transport rather than an ``httpx2.Auth``: an exception from an auth flow (no
    token, say) would end the SDK's whole streamable-HTTP transport, while here
    every failure becomes a JSON-RPC error for the one request it concerns, and the
    bridge keeps serving. Refusals without a JSON-RPC body (Cloud Run's 401 and
    403 pages, a 5xx from the front end) become a JSON-RPC error with a one-line
    reason too; everything else passes untouched.
    """

    def __init__(self, inner: Any, tokens: TokenCache, key: TokenKey, header: str, url: str) -> None:
        self._inner = inner
        self._tokens = tokens
        self._key = key
        self._header = header
        self._where = _origin(url)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            token = await self._tokens.get(self._key)
        except ProxyError as e:
            log.warning("no ID token for %s: %s", self._key.audience, e)
            return _json_rpc_error_response(request, 503, redact(f"idtoken-proxy: no ID token for {self._key.audience}: {e}"))
        # The body is sent again if a 401 asks for one retry with a new token.
        await request.aread()
        response = await self._send(request, token)
        if response.status_code == 401:
            fresh = await self._tokens.force_refresh(self._key, token)
            if fresh is not None:
                await response.aclose()
                response = await self._send(request, fresh)
        if response.status_code in (401, 403) or response.status_code >= 500:
            return await self._explain(request, response)
        return response

    async def _send(self, request: httpx2.Request, token: str) -> httpx2.Response:
        import httpx2

        request.headers[self._header] = f"Bearer {token}"
        try:
            response: httpx2.Response = await self._inner.handle_async_request(request)
        except httpx2.TransportError as e:
            reason = f"idtoken-proxy: cannot reach {self._where}: {_one_line(e)}"
            log.warning("%s", reason)
            return _json_rpc_error_response(request, 502, redact(reason))
        return response

    async def _explain(self, request: httpx2.Request, response: httpx2.Response) -> httpx2.Response:
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("application/json") or request.method != "POST":
            return response
        body = (await response.aread())[:4096].decode("utf-8", "replace")
        await response.aclose()
        status = response.status_code
        detail = ""
        if content_type.startswith("text/plain"):
            first = next((line.strip() for line in body.splitlines() if line.strip()), "")
            detail = f": {first[:_REASON_CHARS]}" if first else ""
        hint = {
            401: " (is the audience right? pass --audience)",
            403: " (does this identity have roles/run.invoker on the service?)",
        }.get(status, "")
        reason = redact(f"idtoken-proxy: {self._where} refused the request: {status} {response.reason_phrase}{detail}{hint}")
        log.warning("%s", reason)
        return _json_rpc_error_response(request, status, reason)

    async def aclose(self) -> None:
        await self._inner.aclose()
