"""``idtoken-proxy demo``: the whole flow on one machine, with no Google account.

Three things on loopback, in one process:

1. a stand-in for Google's token endpoint (:mod:`.issuer`), signing ID tokens with
   an RSA key generated at start;
2. a "private" sample service (:mod:`.service`) that checks every token as Cloud
   Run does;
3. the proxy in front of it, configured the ordinary way: a ``service_account``
   key file in a temporary directory whose ``token_uri`` is the stand-in, a YAML
   config, and the ordinary serve command. google-auth, the token cache, the
   guard and the forwarder run exactly as they do against Google.

Ctrl-C stops all three; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .issuer import TokenIssuer
from .service import NOTHING_REACHES_GOOGLE, PrivateService

#: The demo's service account (a made-up project: the key exists only for the stand-in).
DEMO_EMAIL = "demo-caller@idtoken-proxy-demo.iam.gserviceaccount.com"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STARTUP = 3
ENV_PREFIX = "IDTOKEN_PROXY_"

ServeCommand = Callable[[Sequence[str], Mapping[str, str]], int]


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idtoken-proxy demo",
        description=(
            "See the proxy work with no Google account: starts a stand-in token endpoint, a private sample "
            "service that checks tokens as Cloud Run does, and the proxy in front of it, all on loopback. "
            "Nothing reaches Google. Ctrl-C stops it."
        ),
    )
    p.add_argument("--port", type=int, default=8080, help="the proxy's port (default: 8080)")
    return p


def config_text(port: int, key_file: str, upstream: str) -> str:
    """The YAML the demo's proxy runs with, as printed for the user to copy."""
    return (
        "# idtoken-proxy demo config. For your own service: set upstream to its URL and\n"
        "# drop the credentials block (the default, auto, finds your gcloud login).\n"
        "listen:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "credentials:\n"
        "  source: service_account\n"
        f"  key_file: {json.dumps(key_file)}  # the demo's key; its token_uri is the stand-in\n"
        "routes:\n"
        f"  - upstream: {upstream}  # e.g. https://hello-abc123-uc.a.run.app\n"
    )


def banner(port: int, issuer: TokenIssuer, service: PrivateService, config_path: Path, config: str) -> str:
    proxy = f"http://localhost:{port}"
    return "\n".join(
        [
            "",
            "idtoken-proxy demo",
            f"  {NOTHING_REACHES_GOOGLE}",
            "",
            f"  token endpoint (stand-in)  {issuer.token_uri}",
            f"  private sample service     {service.url}",
            f"  the proxy                  {proxy}  (as {DEMO_EMAIL})",
            "",
            "Try:",
            *_aligned(
                [
                    (f"curl -i {service.url}/", "direct: 403, no token"),
                    (f"curl {proxy}/", f"through the proxy: 200, Hello, {DEMO_EMAIL}!"),
                    (f"curl -N {proxy}/events", "an event stream through the proxy"),
                    (f"curl {issuer.url}/demo/stats", "the ID tokens the stand-in minted"),
                ]
            ),
            f"  {proxy}/ in a browser: the claims, a websocket echo and an event stream",
            f"  status page: {proxy}/.proxy/",
            "",
            f"The config it runs ({config_path}):",
            *(f"  {line}" for line in config.splitlines()),
            "",
            "Your own service: idtoken-proxy --upstream https://YOUR-SERVICE.run.app  (Ctrl-C stops the demo)",
            "",
        ]
    )


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(command) for command, _ in rows)
    return [f"  {command.ljust(width)}  # {note}" for command, note in rows]


def _port_free(port: int) -> str | None:
    """None if 127.0.0.1:port can be bound now, else why not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def cmd_demo(argv: Sequence[str], env: Mapping[str, str], serve: ServeCommand) -> int:
    """Run the demo; ``serve`` is the ordinary serve command (argv, env) -> exit status."""
    args = demo_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"idtoken-proxy demo: --port {args.port}: must be between 1 and 65535", file=sys.stderr)
        return EXIT_USAGE
    busy = _port_free(args.port)
    if busy is not None:
        print(f"idtoken-proxy demo: cannot listen on 127.0.0.1:{args.port}: {busy} (hint: pick another with --port)", file=sys.stderr)
        return EXIT_STARTUP
    # The stand-ins are on loopback: a corporate http_proxy must not see these requests.
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
        filter(None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])
    )
    # Only the demo's own settings: IDTOKEN_PROXY_UPSTREAM and friends are for the user's proxy.
    serve_env = {k: v for k, v in env.items() if not k.startswith(ENV_PREFIX)}
    issuer: TokenIssuer | None = None
    service: PrivateService | None = None
    with tempfile.TemporaryDirectory(prefix="idtoken-proxy-demo-") as tmp:
        try:
            issuer = TokenIssuer(DEMO_EMAIL).start()
            service = PrivateService(issuer.certs_url).start()
            key_file = Path(tmp, "demo-key.json")
            # A key file is a secret, even this one: owner-only, as gcloud writes them.
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(issuer.key_info(), f, indent=2)
            config = config_text(args.port, str(key_file), service.url)
            config_path = Path(tmp, "config.yaml")
            config_path.write_text(config)
            print(banner(args.port, issuer, service, config_path, config), flush=True)
            status = serve(["--config", str(config_path)], serve_env)
        except KeyboardInterrupt:
            # Ctrl-C before the proxy took over the signals: stop what started.
            status = EXIT_OK
        finally:
            if service is not None:
                service.stop()
            if issuer is not None:
                issuer.stop()
    print("idtoken-proxy demo: stopped; the temporary key and config are removed.", file=sys.stderr, flush=True)
    return status
