"""Command line: argv -> config -> logging -> run. The only place that exits.

    idtoken-proxy --config FILE              serve the routes of a YAML file
    idtoken-proxy --service NAME [...]       serve one Cloud Run service (looked up by name) at /
    idtoken-proxy --function NAME [...]      serve one Cloud Function at /
    idtoken-proxy --project P [...]          serve every service of a project at NAME.localhost
    idtoken-proxy --upstream URL [...]       serve one upstream at /
    idtoken-proxy check FILE                 validate a config offline, print the routes
    idtoken-proxy token AUDIENCE             print a fresh ID token
    idtoken-proxy demo [--port 8080]         the whole flow on loopback, no Google account
    idtoken-proxy mcp URL [--audience AUD]   a private MCP server as a local stdio one

Every serving flag can also be set as IDTOKEN_PROXY_<FLAG> (for example
IDTOKEN_PROXY_UPSTREAM, IDTOKEN_PROXY_LOG_LEVEL); flags win over the
environment, which wins over the file, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from . import __version__
from .config import HEADER_MODES, LOG_FORMATS, LOG_LEVELS, Config, ConfigError, parse_config, read_yaml
from .errors import CredentialError
from .ops.logs import setup_logging

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_INTERRUPTED = 130

ENV_PREFIX = "IDTOKEN_PROXY_"

log = logging.getLogger("idtoken_proxy")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the options it was given (for IDTOKEN_PROXY_* defaults)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: list[argparse.Action] = []
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action


def _env_default(parser: _Parser, env: Mapping[str, str]) -> None:
    """Let IDTOKEN_PROXY_<DEST> supply a default for every option."""
    for action in parser.options:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = ENV_PREFIX + action.dest.upper()
        if name in env:
            value: Any = env[name]
            if action.nargs == 0 and action.const is True:  # store_true
                value = value.strip().lower() in ("1", "true", "yes", "on")
            elif callable(action.type):
                try:
                    value = action.type(value)
                except ValueError:
                    parser.error(f"{name}={value!r}: not a valid value for {action.option_strings[-1]}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"{name}={value!r}: must be one of {', '.join(map(str, action.choices))}")
            action.default = value
            action.required = False
        if action.help and action.help is not argparse.SUPPRESS:
            action.help += f" [env {name}]"


def serve_parser() -> _Parser:
    p = _Parser(
        prog="idtoken-proxy",
        description=(
            "Local authenticating reverse proxy for private Cloud Run services and Cloud Functions: "
            "forwards plain requests with a Google-signed ID token for each route's audience."
        ),
        epilog=(
            "Subcommands: `idtoken-proxy check FILE [--resolve]` validates a config; "
            "`idtoken-proxy token AUDIENCE` prints a token; `idtoken-proxy demo` shows the whole flow on "
            "loopback, with no Google account; `idtoken-proxy mcp URL` serves a private MCP server over stdio. Flags win over IDTOKEN_PROXY_* "
            "environment variables, which win over the config file."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="YAML config with one or more routes")
    p.add_argument("--upstream", metavar="URL", help="quick mode: the one service to serve at / (no config file)")
    p.add_argument("--service", metavar="NAME", help="quick mode: a Cloud Run service by name, its URL looked up at startup")
    p.add_argument("--function", metavar="NAME", help="quick mode: a Cloud Function (1st or 2nd gen) by name")
    p.add_argument("--region", metavar="REGION", help="region of --service/--function/--project (default: CLOUDSDK_RUN_REGION, gcloud's run/region)")
    p.add_argument("--project", metavar="PROJECT", help="project of --service/--function; alone: serve every service of PROJECT at http://NAME.localhost:PORT")
    p.add_argument("--tag", metavar="TAG", help="with --service: the revision tag's URL (TAG---...run.app)")
    p.add_argument("--project-number", metavar="NUMBER", help="with --service: fall back to https://NAME-NUMBER.REGION.run.app if the lookup is refused")
    p.add_argument("--all-regions", action="store_true", default=None, help="with --project alone: every region")
    p.add_argument("--functions", action="store_true", default=None, help="with --project alone: functions too")
    p.add_argument(
        "--services-refresh",
        type=float,
        metavar="SECONDS",
        help="with --project alone: list the services again this often (default: 300; 0: never)",
    )
    p.add_argument("--audience", metavar="AUD", help="quick mode: token audience (default: the upstream URL)")
    p.add_argument(
        "--header",
        choices=HEADER_MODES,
        help="quick mode: header that carries the token (default: authorization)",
    )
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: 8080)")
    p.add_argument(
        "--allow-non-loopback",
        action="store_true",
        default=None,
        help="allow listening on a non-loopback address (anyone who reaches it acts with the proxy's identity)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="debug, info (default), warning or error")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="text (default) or json")
    p.add_argument(
        "--admin-port",
        type=int,
        metavar="PORT",
        help="serve health, readiness and metrics (never the proxy) on this port too (default: off)",
    )
    p.add_argument("--admin-host", metavar="HOST", help="address of the admin listener (default: 127.0.0.1; 0.0.0.0 for kubelet probes)")
    p.add_argument(
        "--no-watch",
        action="store_true",
        default=None,
        help="with --config: do not reload when the file changes (SIGHUP still reloads)",
    )
    p.add_argument("--version", action="version", version=f"idtoken-proxy {__version__}")
    return p


_NAME_FLAGS = ("region", "project", "tag", "project_number")
_PROJECT_FLAGS = ("all_regions", "functions", "services_refresh")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def build_config(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """Config from a file or the quick-mode flags, with flags applied on top."""
    modes = [_flag(m) for m in ("config", "upstream", "service", "function") if getattr(args, m)]
    if len(modes) > 1:
        raise ConfigError([f"{' and '.join(modes)}: use one or the other (a config file can hold many routes)"])
    whole_project = not modes and bool(args.project)
    problems = []
    for dest in _NAME_FLAGS if args.config or args.upstream else ():
        if getattr(args, dest) is not None:
            problems.append(f"{_flag(dest)} applies to quick mode by name (--service, --function, --project); set it per route in the config file")
    for dest in _PROJECT_FLAGS:
        if getattr(args, dest) is not None and not whole_project and not (dest == "services_refresh" and args.config):
            problems.append(f"{_flag(dest)} applies to --project without --service or --function")
    if args.function and args.tag:
        problems.append("--tag applies to --service (revision tags are a Cloud Run feature)")
    if whole_project and (args.tag or args.project_number):
        problems.append(f"{_flag('tag' if args.tag else 'project_number')} applies to --service")
    if problems:
        raise ConfigError(problems)
    if args.config:
        raw = read_yaml(args.config)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"{args.config}: must be a YAML mapping with a routes list"])
        for flag in ("audience", "header"):
            if getattr(args, flag) is not None:
                raise ConfigError([f"--{flag} applies to quick mode (--upstream, --service, --function); set it per route in {args.config}"])
        if args.services_refresh is not None:
            raw["services_refresh"] = args.services_refresh
    elif args.upstream or args.service or args.function:
        route: dict[str, Any] = {"upstream": args.upstream} if args.upstream else {}
        if args.service:
            route["service"] = args.service
        if args.function:
            route["function"] = args.function
        for dest in _NAME_FLAGS:
            if getattr(args, dest) is not None:
                route[dest] = getattr(args, dest)
        if args.audience:
            route["audience"] = args.audience
        if args.header:
            route["header"] = args.header
        raw = {"routes": [route]}
    elif whole_project:
        if args.audience or args.header:
            raise ConfigError(["--audience and --header apply to one service (--upstream, --service, --function)"])
        sp: dict[str, Any] = {"project": args.project}
        if args.region:
            sp["region"] = args.region
        if args.all_regions:
            sp["all_regions"] = True
        if args.functions:
            sp["functions"] = True
        raw = {"serve_project": sp}
        if args.services_refresh is not None:
            raw["services_refresh"] = args.services_refresh
    else:
        raise ConfigError(
            ["nothing to serve: pass --service NAME, --function NAME, --project PROJECT, --upstream URL or --config FILE (see --help)"]
        )
    listen = raw.setdefault("listen", {}) if isinstance(raw.get("listen", {}), dict) else raw["listen"]
    if isinstance(listen, dict):
        if args.host is not None:
            listen["host"] = args.host
        if args.port is not None:
            listen["port"] = args.port
        if args.allow_non_loopback:
            listen["allow_non_loopback"] = True
    logc = raw.setdefault("log", {}) if isinstance(raw.get("log", {}), dict) else raw["log"]
    if isinstance(logc, dict):
        if args.log_level:
            logc["level"] = args.log_level
        if args.log_format:
            logc["format"] = args.log_format
    if args.no_watch:
        raw["watch"] = False
    admin = raw.setdefault("admin", {}) if isinstance(raw.get("admin", {}), dict) else raw["admin"]
    if isinstance(admin, dict):
        if args.admin_port is not None:
            admin["port"] = args.admin_port
        if args.admin_host is not None:
            admin["host"] = args.admin_host
    try:
        return parse_config(raw, env)
    except ConfigError as e:
        if not args.config:
            # Quick mode has no file: name the flags, not routes[0].
            e.errors = [m.replace("routes[0].", "--").replace("serve_project.", "--").replace("project_number", "project-number").replace("all_regions", "all-regions") for m in e.errors]
        raise


def _print_errors(title: str, errors: Sequence[str]) -> None:
    print(f"idtoken-proxy: {title}:", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)


def route_table(config: Config) -> str:
    rows = [("NAME", "MATCH", "UPSTREAM", "AUDIENCE", "HEADER", "IDENTITY")]
    for r in config.routes:
        upstream = r.upstream or _unresolved(r)
        rows.append((r.name, f"{r.host or '*'}{r.prefix}", upstream, r.audience or "(its URL)", r.header, r.credentials.source))
    sp = config.serve_project
    if sp is not None and not config.routes:
        where = f"region {sp.region}" if sp.region else ("all regions" if sp.all_regions else "the default region")
        rows.append(
            ("(each)", "NAME.localhost/", f"every {'service and function' if sp.functions else 'service'} of project {sp.project or '(default)'}, {where}", "(its URL)", "authorization", config.credentials.source)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _unresolved(r: Any) -> str:
    where = ", ".join(x for x in (r.project and f"project {r.project}", r.region and f"region {r.region}", r.tag and f"tag {r.tag}") if x)
    return f"({r.by_name}{', ' + where if where else ''})"


def cmd_check(argv: Sequence[str], env: Mapping[str, str]) -> int:
    p = argparse.ArgumentParser(prog="idtoken-proxy check", description="Validate a config file and print its routes.")
    p.add_argument("file", nargs="?", default=env.get(ENV_PREFIX + "CONFIG"), help="the YAML config [env IDTOKEN_PROXY_CONFIG]")
    p.add_argument("--resolve", action="store_true", help="also contact the identity sources and show who each route runs as")
    args = p.parse_args(argv)
    if not args.file:
        p.error("a config FILE is required")
    try:
        config = parse_config(read_yaml(args.file), env)
    except ConfigError as e:
        _print_errors(f"{args.file} has {len(e.errors)} error{'s' * (len(e.errors) != 1)}", e.errors)
        return EXIT_CONFIG
    print(f"{args.file}: OK, {len(config.routes)} route{'s' * (len(config.routes) != 1)}, listening on {config.listen.host}:{config.listen.port}")
    print(route_table(config))
    if args.resolve:
        return _resolve(config, env)
    return EXIT_OK


def _resolve(config: Config, env: Mapping[str, str]) -> int:
    from .app import build_identities
    from .resolve import needs_resolving, resolve_config

    setup_logging("warning")
    try:
        identities = build_identities(config)
    except CredentialError as e:
        print(f"idtoken-proxy: {e}", file=sys.stderr)
        return EXIT_STARTUP

    async def run() -> int:
        nonlocal config
        status = EXIT_OK
        if needs_resolving(config):
            try:
                config, _ = await resolve_config(config, identities, env=env)
            except CredentialError as e:
                print(f"idtoken-proxy: {e}", file=sys.stderr)
                return EXIT_STARTUP
            print("resolved:")
            print(route_table(config))
            for r in config.routes:
                if r.by_name:
                    print(f"{r.name}: {r.by_name}" + (f" in {r.region}" if r.region else "") + f" is {r.upstream}; customAudiences: {', '.join(r.custom_audiences) or 'none'}")
        for ident in identities.values():
            await ident.resolve()
            for line in ident.report():
                print(f"credentials: {line}")
        for r in config.routes:
            ident = identities[r.credentials]
            try:
                m = await ident.fetch(r.audience)
                print(
                    f"{r.name}: audience {r.audience}, source {ident.source}, email {ident.email or 'unknown'}, "
                    f"token audience {m.aud}, valid for {m.exp - __import__('time').time():.0f} s"
                )
                note = ident.audience_note(r.audience, m.aud)
                if note:
                    print(f"{r.name}: warning: {note}")
            except Exception as e:  # noqa: BLE001 - reported per route
                from .auth.tokens import _describe

                hint = getattr(e, "hint", None) or ident.hint_for(e)
                reason = str(e).splitlines()[0] if isinstance(e, CredentialError) else _describe(e)
                print(f"{r.name}: {ident.describe()}: cannot get a token: {reason}" + (f" (hint: {hint})" if hint else ""))
                status = EXIT_STARTUP
        return status

    return asyncio.run(run())


def cmd_token(argv: Sequence[str], env: Mapping[str, str]) -> int:
    p = argparse.ArgumentParser(prog="idtoken-proxy token", description="Print a fresh ID token for AUDIENCE (for scripts).")
    p.add_argument("audience", help="the audience, usually the service URL")
    p.add_argument("--config", metavar="FILE", default=env.get(ENV_PREFIX + "CONFIG"), help="use the config's top-level credentials")
    args = p.parse_args(argv)
    from .auth.choose import build_identity
    from .config import Credentials

    setup_logging("warning")
    creds = Credentials()
    if args.config:
        raw = None
        try:
            raw = read_yaml(args.config)
            if isinstance(raw, dict) and "routes" not in raw:
                raw = {**raw, "routes": [{"upstream": "http://127.0.0.1"}]}
            creds = parse_config(raw, env).credentials
        except ConfigError as e:
            _print_errors(f"{args.config} has errors", e.errors)
            return EXIT_CONFIG
    ident = None
    try:
        ident = build_identity(creds)
        m = asyncio.run(ident.fetch(args.audience))
    except CredentialError as e:
        print(f"idtoken-proxy: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except Exception as e:  # noqa: BLE001
        from .auth.tokens import _describe

        hint = ident.hint_for(e) if ident is not None else None
        print(f"idtoken-proxy: cannot get a token for {args.audience}: {_describe(e)}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
        return EXIT_STARTUP
    note = ident.audience_note(args.audience, m.aud)
    if note:
        print(f"idtoken-proxy: warning: {note}", file=sys.stderr)
    print(m.token)
    return EXIT_OK


def cmd_serve(argv: Sequence[str], env: Mapping[str, str]) -> int:
    parser = serve_parser()
    _env_default(parser, env)
    args = parser.parse_args(argv)
    if not args.config and env.get(ENV_PREFIX + "CONFIG") and not (args.upstream or args.service or args.function):
        args.config = env[ENV_PREFIX + "CONFIG"]
    try:
        config = build_config(args, env)
    except ConfigError as e:
        _print_errors("configuration error" + ("s" if len(e.errors) > 1 else ""), e.errors)
        return EXIT_CONFIG
    setup_logging(config.log.level, config.log.format)

    from .app import build_identities, make_app
    from .server import StartupError, serve, tune_gc

    try:
        identities = build_identities(config)
        if _needs_resolving(config):
            # Routes by name (and a whole project) are looked up before the listener opens.
            from .resolve import resolve_config

            config, jobs = _run(resolve_config(config, identities, quick=not args.config, env=env))
        else:
            jobs = ()
        app = make_app(config, identities=identities, background=jobs)
        reloader = None
        if args.config:
            # A reload reads the file again, with the same flags and environment over it.
            from .reload import Reloader

            def load(_path: str) -> Config:
                return build_config(args, env)

            reloader = Reloader(args.config, config, _no_apply, load=load, status=app.reload_status)
    except CredentialError as e:
        print(f"idtoken-proxy: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    try:
        # Imports done and the app built: what exists now lives as long as the process.
        tune_gc()
        _run(serve(app, config, reloader, env))
    except StartupError as e:
        print(f"idtoken-proxy: {e}", file=sys.stderr)
        return EXIT_STARTUP
    return EXIT_OK


async def _no_apply(config: Config, diff: Any) -> None:
    raise AssertionError("serve() sets the reloader's apply")


def _needs_resolving(config: Config) -> bool:
    # Without importing proxy.resolve (and requests) when every route has its URL.
    return config.serve_project is not None or any(not r.resolved for r in config.routes)


def _run(coro: Any) -> Any:
    """Run on uvloop where it exists, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    if args and args[0] == "check":
        return cmd_check(args[1:], env)
    if args and args[0] == "token":
        return cmd_token(args[1:], env)
    if args and args[0] == "demo":
        from .demo import cmd_demo

        return cmd_demo(args[1:], env, serve=cmd_serve)
    if args and args[0] == "mcp":
        from .mcpbridge import cmd_mcp

        return cmd_mcp(args[1:], env)
    return cmd_serve(args, env)


if __name__ == "__main__":
    sys.exit(main())
