"""Configuration: frozen dataclasses and a loader that reports every error at once.

Every error names the field it is about (``routes[1].upstream: ...``), so a user
can fix a file in one pass. This module imports nothing from the package.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

HEADER_MODES = ("authorization", "x-serverless-authorization", "proxy-authorization")
SOURCES = ("auto", "service_account", "metadata", "impersonate", "user", "gcloud", "static")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
NAVIGATION_POLICIES = ("allow", "refuse")
#: Paths under this prefix belong to the proxy itself (status, health, metrics).
RESERVED_PREFIX = "/.proxy"
#: Seconds between re-listings of a whole project's services (serve_project).
SERVICES_REFRESH = 300.0
#: Cloud Run service and Cloud Functions names: letters, digits, - and _ (functions).
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_REGION = re.compile(r"[a-z]+(-[a-z]+)*[0-9]+")
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]|[a-z][a-z0-9.-]*:[a-z][a-z0-9-]{4,28}[a-z0-9]")


class ConfigError(Exception):
    """One or more problems with the configuration, each naming its field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Credentials:
    """Where ID tokens come from (see README "Identity")."""

    source: str = "auto"
    key_file: str | None = None
    service_account: str | None = None
    delegates: tuple[str, ...] = ()
    token_env: str | None = None
    token_file: str | None = None


@dataclass(frozen=True)
class Route:
    name: str
    prefix: str
    upstream: str
    audience: str
    header: str = "authorization"
    timeout: float = 300.0
    host: str | None = None
    allow_insecure_http: bool = False
    credentials: Credentials = field(default_factory=Credentials)
    max_body_bytes: int | None = None
    #: By name instead of by URL (exactly one of upstream, service, function):
    #: resolved at startup (proxy/resolve/), which fills in upstream and audience.
    service: str | None = None
    function: str | None = None
    region: str | None = None
    project: str | None = None
    tag: str | None = None
    project_number: str | None = None
    #: The service's customAudiences, as the Admin API reported them (shown, not used).
    custom_audiences: tuple[str, ...] = ()

    @property
    def by_name(self) -> str | None:
        """``service hello`` / ``function fn`` for a route named by name, else None."""
        if self.service:
            return f"service {self.service}"
        if self.function:
            return f"function {self.function}"
        return None

    @property
    def resolved(self) -> bool:
        return bool(self.upstream)

    @property
    def upstream_parts(self) -> tuple[str, str, int, str]:
        """(scheme, host, port, base path without trailing slash)."""
        u = urlsplit(self.upstream)
        scheme = u.scheme
        port = u.port or (443 if scheme == "https" else 80)
        return scheme, (u.hostname or ""), port, u.path.rstrip("/")


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080
    allow_non_loopback: bool = False


@dataclass(frozen=True)
class Admin:
    host: str = "127.0.0.1"
    port: int | None = None


@dataclass(frozen=True)
class Limits:
    #: Seconds a client has to send a complete request head (slowloris).
    header_timeout: float = 10.0
    #: Seconds an idle keep-alive connection is kept open.
    keepalive_timeout: float = 75.0
    #: Concurrent client connections; further ones get a 503 and are closed (limits.py).
    max_connections: int = 1024
    #: Request body cap in bytes; None streams any size.
    max_body_bytes: int | None = None


@dataclass(frozen=True)
class Log:
    level: str = "info"
    format: str = "text"
    include_query: bool = False


@dataclass(frozen=True)
class ServeProject:
    """Serve every service of a project, each at ``http://NAME.localhost:PORT``."""

    project: str | None = None
    region: str | None = None
    all_regions: bool = False
    functions: bool = False


@dataclass(frozen=True)
class Config:
    routes: tuple[Route, ...]
    listen: Listen = field(default_factory=Listen)
    admin: Admin = field(default_factory=Admin)
    credentials: Credentials = field(default_factory=Credentials)
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    cross_site_navigation: str = "allow"
    limits: Limits = field(default_factory=Limits)
    log: Log = field(default_factory=Log)
    #: Seconds in-flight requests get to finish after SIGTERM.
    shutdown_timeout: float = 8.0
    #: Reload when the config file changes (SIGHUP reloads either way).
    watch: bool = True
    serve_project: ServeProject | None = None
    #: Seconds between re-listings in serve_project mode; 0: never.
    services_refresh: float = SERVICES_REFRESH


# --------------------------------------------------------------------------- reading


class _Section:
    """Reads one mapping, recording errors under its path instead of raising."""

    def __init__(self, data: Any, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.error("", f"must be a mapping, got {_kind(data)}")
            data = {}
        self.data: dict[str, Any] = dict(data)
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        if not key:
            return self.path or "config"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, check: Callable[[Any], str | None] | None = None) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # YAML's `true` is an int subclass in Python: never accept it as a number.
        if isinstance(value, bool) and bool not in kinds:
            self.error(key, f"must be {_names(kinds)}, got {_kind(value)}")
            return default
        if not isinstance(value, kinds):
            self.error(key, f"must be {_names(kinds)}, got {_kind(value)}")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.error(key, problem)
                return default
        return value

    def string(self, key: str, default: str | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
        return self.get(key, str, default, check)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        lowered = value.lower()
        if lowered not in choices:
            self.error(key, f"must be one of {', '.join(choices)}, got {value!r}{_suggest(lowered, choices)}")
            return default
        return lowered

    def number(self, key: str, default: Any, minimum: float, maximum: float | None = None, integer: bool = False) -> Any:
        kinds: tuple[type, ...] = (int,) if integer else (int, float)

        def check(v: Any) -> str | None:
            if v < minimum or (maximum is not None and v > maximum):
                bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
                return f"must be {bound}, got {v}"
            return None

        value = self.get(key, kinds, default, check)
        return float(value) if (value is not None and not integer) else value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self.get(key, bool, default))

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key, list, [])
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.error(f"{key}[{i}]", f"must be a non-empty string, got {_kind(item)}")
            else:
                out.append(item)
        return tuple(out)

    def finish(self) -> None:
        known = sorted(self.seen)
        for key in self.data:
            if key not in self.seen:
                self.error(str(key), f"unknown key{_suggest(str(key), known)}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__
    )


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_kind(k()) if k is not bool else "a boolean" for k in kinds))


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    import difflib  # only for a config with a typo: not loaded by a running proxy

    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def is_loopback_host(host: str) -> bool:
    """True for localhost names and loopback IP addresses."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- env expansion

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, path: str, env: Mapping[str, str], errors: list[str]) -> Any:
    """Replace ``${VAR}`` (and ``${VAR:-default}``) in every string; ``$$`` is a literal ``$``."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path or 'config'}: environment variable {name} is not set")
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", env, errors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: expand_env(v, f"{path}.{k}" if path else str(k), env, errors) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- sections


def _credentials(data: Any, path: str, errors: list[str], inherited: Credentials | None) -> Credentials:
    s = _Section(data, path, errors)
    source = s.choice("source", SOURCES, "auto")
    creds = Credentials(
        source=source,
        key_file=s.string("key_file"),
        service_account=s.string("service_account"),
        delegates=s.strings("delegates"),
        token_env=s.string("token_env"),
        token_file=s.string("token_file"),
    )
    # Each source takes only its own keys, so a misplaced key is not silently ignored.
    own = {
        "auto": set(),
        "service_account": {"key_file"},
        "metadata": set(),
        "impersonate": {"service_account", "delegates"},
        "user": set(),
        "gcloud": set(),
        "static": {"token_env", "token_file"},
    }[source]
    for key in ("key_file", "service_account", "delegates", "token_env", "token_file"):
        if s.has(key) and key not in own:
            s.error(key, f"does not apply to source {source}")
    if source == "service_account" and not creds.key_file:
        s.error("key_file", "is required for source service_account")
    if source == "impersonate" and not creds.service_account:
        s.error("service_account", "is required for source impersonate (the email of the service account to impersonate)")
    if source == "static" and bool(creds.token_env) == bool(creds.token_file):
        s.error("", "source static needs exactly one of token_env or token_file")
    s.finish()
    return creds


def _upstream(s: _Section, allow_http: bool) -> str | None:
    value = s.string("upstream")
    if value is None:
        if not s.has("upstream"):
            s.error(
                "upstream",
                "is required (the service URL, e.g. https://hello-abc123-uc.a.run.app), "
                "or name the service instead: service: NAME or function: NAME",
            )
        return None
    return check_upstream(s, value, allow_http)


def validate_upstream(value: str, allow_http: bool = False) -> tuple[str | None, list[str]]:
    """(normalised URL or None, the problems): a URL from elsewhere (an API) held to the config's rules."""
    errors: list[str] = []
    return check_upstream(_Section({}, "", errors), value, allow_http), [e.removeprefix("upstream: ") for e in errors]


def check_upstream(s: _Section, value: str, allow_http: bool) -> str | None:
    """The normalised upstream URL, or None after recording what is wrong with it."""
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as e:
        s.error("upstream", f"is not a valid URL: {e}")
        return None
    problems = []
    if u.scheme not in ("http", "https"):
        problems.append("must start with https:// (or http:// for a local service)")
    elif not u.hostname:
        problems.append("has no host")
    if u.username is not None or u.password is not None:
        problems.append("must not contain a user name or password")
    if u.query or u.fragment or value.endswith(("?", "#")):
        problems.append("must not contain a query or fragment")
    if any(seg in (".", "..") for seg in u.path.split("/")):
        problems.append("must not contain . or .. path segments")
    if problems:
        s.error("upstream", f"{'; '.join(problems)}: {value!r}")
        return None
    if u.scheme == "http" and not allow_http and not is_loopback_host(u.hostname or ""):
        s.error(
            "upstream",
            f"plain http:// to a remote host would send the token in clear text: {value!r}; "
            "use https:// or set allow_insecure_http: true",
        )
        return None
    netloc = (u.hostname or "").lower()
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port is not None:
        netloc = f"{netloc}:{port}"
    return f"{u.scheme}://{netloc}{u.path.rstrip('/')}"


def _prefix(s: _Section) -> str:
    def check(v: str) -> str | None:
        if not v.startswith("/"):
            return f"must start with '/', got {v!r}"
        if any(c in v for c in "?#%") or any(c.isspace() for c in v):
            return f"must be a plain path without '?', '#', '%' or spaces, got {v!r}"
        if any(seg in (".", "..") for seg in v.split("/")):
            return f"must not contain . or .. segments, got {v!r}"
        if v == RESERVED_PREFIX or v.startswith(RESERVED_PREFIX + "/"):
            return f"{RESERVED_PREFIX}/ is reserved for the proxy's own pages"
        return None

    value: str = s.string("prefix", "/", check)
    return value.rstrip("/") or "/"


def _route(data: Any, index: int, errors: list[str], default_creds: Credentials, global_body: int | None) -> Route | None:
    s = _Section(data, f"routes[{index}]", errors)
    before = len(errors)
    allow_http = s.boolean("allow_insecure_http", False)
    named = [k for k in ("upstream", "service", "function") if s.has(k)]
    if len(named) > 1:
        s.error(named[1], f"a route names exactly one of upstream, service and function; this one names {' and '.join(named)}")
    by_name = _by_name(s, named)
    if "service" in by_name or "function" in by_name:
        s.raw("upstream")  # reported above if present
        upstream: str | None = ""
    else:
        upstream = _upstream(s, allow_http)
    prefix = _prefix(s)
    host = s.string("host", None, _check_host_name)
    audience = s.string("audience", None, lambda v: None if v.strip() else "must not be empty")
    header = s.choice("header", HEADER_MODES, "authorization")
    timeout = s.number("timeout", 300.0, 0.001)
    name = s.string("name", None, lambda v: None if re.fullmatch(r"[A-Za-z0-9_.:/-]+", v) else "may contain only letters, digits and _ . : / -")
    creds = default_creds
    if s.has("credentials"):
        creds = _credentials(s.raw("credentials"), f"{s.path}.credentials", errors, default_creds)
    body = s.number("max_body_bytes", global_body, 0, integer=True)
    s.finish()
    if upstream is None or len(errors) > before:
        return None
    if name is None:
        name = _default_name(host, upstream, prefix) if upstream else (by_name.get("service") or by_name.get("function") or "route") + (
            "" if prefix == "/" else prefix
        )
    return Route(
        name=name,
        prefix=prefix,
        upstream=upstream,
        # A route by name gets its audience at resolution: "" means "the URL found".
        audience=audience or upstream,
        header=header,
        timeout=timeout,
        host=host.lower() if host else None,
        allow_insecure_http=allow_http,
        credentials=creds,
        max_body_bytes=body,
        **by_name,
    )


def _by_name(s: _Section, named: list[str]) -> dict[str, Any]:
    """The service/function keys of a route by name ({} for a route by URL)."""
    kind = next((k for k in ("service", "function") if k in named), None)
    s.raw("function" if kind == "service" else "service")  # a second one is reported by the caller
    out: dict[str, Any] = {}
    if kind is not None:
        out[kind] = s.string(kind, None, lambda v: check_name(v, kind))
        if out[kind] is None:
            out[kind] = "-"  # already reported; keeps the route from being taken for one by URL
    for key, check in (("region", check_region), ("project", check_project)):
        if s.has(key) and kind is None:
            s.error(key, "applies only to a route by name (service: or function:)")
        value = s.string(key, None, check)
        if value is not None:
            out[key] = value
    tag = s.string("tag", None, lambda v: None if re.fullmatch(r"[a-z][a-z0-9-]{0,45}", v) else f"must be a revision tag (lower-case letters, digits and -), got {v!r}")
    if tag is not None:
        if kind != "service":
            s.error("tag", "applies only to a route with service: (revision tags are a Cloud Run feature)")
        out["tag"] = tag
    number = s.get("project_number", (str, int), None, lambda v: None if re.fullmatch(r"[0-9]{6,20}", str(v)) else f"must be the numeric project number, got {v!r}")
    if number is not None:
        if kind is None:
            s.error("project_number", "applies only to a route by name (service: or function:)")
        out["project_number"] = str(number)
    return out


def check_name(v: str, kind: str = "service") -> str | None:
    if not _NAME.fullmatch(v) or (kind == "service" and not re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", v)):
        what = "lower-case letters, digits and -" if kind == "service" else "letters, digits, - and _"
        return f"must be a {kind} name ({what}, starting with a letter), got {v!r}"
    return None


def check_region(v: str) -> str | None:
    return None if _REGION.fullmatch(v) else f"must be a region like us-central1, got {v!r}"


def check_project(v: str) -> str | None:
    return None if _PROJECT.fullmatch(v) else f"must be a project ID like my-project-123, got {v!r}"


def _default_name(host: str | None, upstream: str, prefix: str) -> str:
    """``hello-abc123-uc`` for https://hello-abc123-uc.a.run.app, plus the prefix."""
    u = urlsplit(upstream)
    hostname = u.hostname or "route"
    if host:
        base = host.split(".")[0]
    elif is_loopback_host(hostname) or re.fullmatch(r"[0-9.]+|.*:.*", hostname):
        base = f"{hostname}:{u.port}" if u.port else hostname
    else:
        base = hostname.split(".")[0]
    return base + ("" if prefix == "/" else prefix)


def _check_host_name(v: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?", v):
        return f"must be a host name without scheme, port or path, got {v!r}"
    return None


def _check_origin(v: str) -> str | None:
    problem = f"must be an origin like http://localhost:3000 (scheme, host and optional port only), got {v!r}"
    try:
        u = urlsplit(v)
        # Raises for a port that is no number or out of range, or a host that is no name.
        normalize_origin(v, strict=True)
    except ValueError as e:
        return f"{problem} ({e})"
    if u.scheme not in ("http", "https") or not u.hostname or u.username is not None:
        return problem
    # A single trailing "/" is forgiven (normalised away); any other path is not an origin.
    if u.path not in ("", "/") or "?" in v or "#" in v:
        return problem
    return None


def normalize_origin(value: str, *, strict: bool = False) -> str:
    """An ``allowed_origins`` entry as a browser serialises its ``Origin`` header.

    Lower case, no trailing slash, and no port when it is the scheme's default:
    browsers send ``http://example.test``, never ``http://example.test:80``. A
    non-ASCII host becomes its IDNA (punycode) form and an IPv6 address its
    compressed form, as browsers write them. Without ``strict``, a value that
    cannot be parsed comes back lower-cased only (``Config`` built in code).
    """
    try:
        u = urlsplit(value.strip())
        port = u.port
        host = u.hostname or ""
        if host and not host.isascii():
            host = host.encode("idna").decode("ascii")
        if ":" in host:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
    except (ValueError, UnicodeError):
        if strict:
            raise
        return value.lower().rstrip("/")
    scheme = u.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + ("" if port is None or port == default else f":{port}")


def parse_config(raw: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate a decoded YAML document; raise ConfigError listing every problem."""
    errors: list[str] = []
    raw = expand_env(raw, "", os.environ if env is None else env, errors)
    top = _Section(raw, "", errors)

    ls = _Section(top.raw("listen"), "listen", errors)
    listen = Listen(
        host=ls.string("host", "127.0.0.1", lambda v: None if v.strip() else "must not be empty"),
        port=ls.number("port", 8080, 0, 65535, integer=True),
        allow_non_loopback=ls.boolean("allow_non_loopback", False),
    )
    if not listen.allow_non_loopback and not is_loopback_host(listen.host):
        ls.error(
            "host",
            f"{listen.host} is not a loopback address: anyone who can reach it would act with the proxy's "
            "Google identity; set listen.allow_non_loopback: true (or --allow-non-loopback) if that is intended",
        )
    ls.finish()

    ad = _Section(top.raw("admin"), "admin", errors)
    admin = Admin(host=ad.string("host", "127.0.0.1"), port=ad.number("port", None, 0, 65535, integer=True))
    ad.finish()

    creds = _credentials(top.raw("credentials"), "credentials", errors, None) if top.has("credentials") else Credentials()

    lim = _Section(top.raw("limits"), "limits", errors)
    limits = Limits(
        header_timeout=lim.number("header_timeout", 10.0, 0.1),
        keepalive_timeout=lim.number("keepalive_timeout", 75.0, 0.1),
        max_connections=lim.number("max_connections", 1024, 1, integer=True),
        max_body_bytes=lim.number("max_body_bytes", None, 0, integer=True),
    )
    lim.finish()

    lg = _Section(top.raw("log"), "log", errors)
    log = Log(
        level=lg.choice("level", LOG_LEVELS, "info"),
        format=lg.choice("format", LOG_FORMATS, "text"),
        include_query=lg.boolean("include_query", False),
    )
    lg.finish()

    allowed_hosts = top.strings("allowed_hosts")
    for i, h in enumerate(allowed_hosts):
        problem = _check_host_name(h.removeprefix("*.")) if h != "*" else "'*' would allow DNS rebinding; list host names"
        if problem:
            top.error(f"allowed_hosts[{i}]", problem)
    allowed_origins = top.strings("allowed_origins")
    for i, o in enumerate(allowed_origins):
        problem = _check_origin(o) if o not in ("*", "null") else f"{o!r} would let every site act with the proxy's identity; list origins"
        if problem:
            top.error(f"allowed_origins[{i}]", problem)
    navigation = top.choice("cross_site_navigation", NAVIGATION_POLICIES, "allow")
    shutdown_timeout = top.number("shutdown_timeout", 8.0, 0)
    watch = top.boolean("watch", True)
    refresh = top.number("services_refresh", SERVICES_REFRESH, 0)
    serve_project = None
    if top.has("serve_project"):
        sp = _Section(top.raw("serve_project"), "serve_project", errors)
        serve_project = ServeProject(
            project=sp.string("project", None, check_project),
            region=sp.string("region", None, check_region),
            all_regions=sp.boolean("all_regions", False),
            functions=sp.boolean("functions", False),
        )
        if serve_project.region and serve_project.all_regions:
            sp.error("all_regions", "use region or all_regions, not both")
        sp.finish()

    routes: list[Route] = []
    raw_routes = top.raw("routes")
    if serve_project is not None:
        if raw_routes:
            top.error("routes", "serve_project serves every service of the project by itself: leave routes out, or list the services as routes instead")
    elif raw_routes is None:
        top.error("routes", "at least one route is required")
    elif not isinstance(raw_routes, list):
        top.error("routes", f"must be a list of routes, got {_kind(raw_routes)}")
    elif not raw_routes:
        top.error("routes", "at least one route is required")
    else:
        for i, item in enumerate(raw_routes):
            route = _route(item, i, errors, creds, limits.max_body_bytes)
            if route is not None:
                routes.append(route)
    top.finish()

    # Cross-route checks: names and (host, prefix) pairs must be unique.
    seen_names: dict[str, int] = {}
    seen_keys: dict[tuple[str | None, str], int] = {}
    for i, r in enumerate(routes):
        if r.name in seen_names:
            errors.append(f"routes[{i}].name: {r.name!r} is already used by routes[{seen_names[r.name]}]; set a distinct name")
        seen_names.setdefault(r.name, i)
        key = (r.host, r.prefix)
        if key in seen_keys:
            errors.append(f"routes[{i}].prefix: {r.prefix!r}{' for host ' + r.host if r.host else ''} is already routed by routes[{seen_keys[key]}]")
        seen_keys.setdefault(key, i)

    if errors:
        raise ConfigError(errors)
    return Config(
        routes=tuple(routes),
        listen=listen,
        admin=admin,
        credentials=creds,
        allowed_hosts=tuple(h.lower() for h in allowed_hosts),
        allowed_origins=tuple(normalize_origin(o) for o in allowed_origins),
        cross_site_navigation=navigation,
        limits=limits,
        log=log,
        shutdown_timeout=shutdown_timeout,
        watch=watch,
        serve_project=serve_project,
        services_refresh=refresh,
    )


def read_yaml(path: str) -> Any:
    """Decode a YAML file, turning I/O and syntax problems into a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), env)
