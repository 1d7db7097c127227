"""Config validation: every error names its field, all errors are reported at once."""

from __future__ import annotations

import pytest
import yaml

from proxy.config import ConfigError, Credentials, load_config, parse_config


def parse(text: str, env: dict[str, str] | None = None):
    return parse_config(yaml.safe_load(text), env or {})


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value.errors


def test_minimal_route_defaults():
    c = parse("routes: [{upstream: 'https://hello-abc123-uc.a.run.app/'}]")
    (r,) = c.routes
    assert r.upstream == "https://hello-abc123-uc.a.run.app"
    assert r.audience == "https://hello-abc123-uc.a.run.app"
    assert (r.prefix, r.header, r.timeout, r.name) == ("/", "authorization", 300.0, "hello-abc123-uc")
    assert (c.listen.host, c.listen.port) == ("127.0.0.1", 8080)
    assert r.credentials == Credentials(source="auto")


def test_function_upstream_keeps_its_path_in_the_audience():
    c = parse(
        """
routes:
  - prefix: /fn/
    upstream: https://europe-west1-proj.cloudfunctions.net/fn
"""
    )
    (r,) = c.routes
    assert r.prefix == "/fn"
    assert r.audience == "https://europe-west1-proj.cloudfunctions.net/fn"
    assert r.upstream_parts == ("https", "europe-west1-proj.cloudfunctions.net", 443, "/fn")
    assert r.name == "europe-west1-proj/fn"


def test_explicit_keys_are_kept():
    c = parse(
        """
listen: {host: localhost, port: 9000}
routes:
  - name: api
    prefix: /api
    upstream: https://api.example.com:8443/v1
    audience: https://custom-audience
    header: X-Serverless-Authorization
    timeout: 2.5
"""
    )
    (r,) = c.routes
    assert (r.name, r.audience, r.header, r.timeout) == ("api", "https://custom-audience", "x-serverless-authorization", 2.5)
    assert r.upstream_parts == ("https", "api.example.com", 8443, "/v1")
    assert c.listen.port == 9000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("routes: []", "routes: at least one route is required"),
        ("listen: {port: 8080}", "routes: at least one route is required"),
        ("routes: {upstream: x}", "routes: must be a list of routes, got a mapping"),
        ("routes: [{prefix: /a}]", "routes[0].upstream: is required"),
        ("routes: [{upstream: 'ftp://x'}]", "routes[0].upstream: must start with https://"),
        ("routes: [{upstream: 'https://'}]", "routes[0].upstream: has no host"),
        ("routes: [{upstream: 'https://u:p@x.run.app'}]", "routes[0].upstream: must not contain a user name"),
        ("routes: [{upstream: 'https://x.run.app/?a=1'}]", "routes[0].upstream: must not contain a query or fragment"),
        ("routes: [{upstream: 'http://x.run.app'}]", "routes[0].upstream: plain http:// to a remote host"),
        ("routes: [{upstream: 'https://x.run.app', prefix: a}]", "routes[0].prefix: must start with '/'"),
        ("routes: [{upstream: 'https://x.run.app', prefix: /a/../b}]", "routes[0].prefix: must not contain . or .."),
        ("routes: [{upstream: 'https://x.run.app', prefix: /.proxy}]", "routes[0].prefix: /.proxy/ is reserved"),
        ("routes: [{upstream: 'https://x.run.app', header: bearer}]", "routes[0].header: must be one of authorization, x-serverless-authorization"),
        ("routes: [{upstream: 'https://x.run.app', timeout: 0}]", "routes[0].timeout: must be at least 0.001"),
        ("routes: [{upstream: 'https://x.run.app', timeout: true}]", "routes[0].timeout: must be a number, got a boolean"),
        ("routes: [{upstream: 'https://x.run.app', upstrem: y}]", "routes[0].upstrem: unknown key (did you mean 'upstream'?)"),
        ("routes: [{upstream: 'https://x.run.app'}]\nlisten: {port: 70000}", "listen.port: must be between 0 and 65535"),
        ("routes: [{upstream: 'https://x.run.app'}]\nlisten: {host: 0.0.0.0}", "listen.host: 0.0.0.0 is not a loopback address"),
        ("routes: [{upstream: 'https://x.run.app'}]\nlisen: {}", "lisen: unknown key (did you mean 'listen'?)"),
        ("routes: [{upstream: 'https://x.run.app'}]\ncredentials: {source: magic}", "credentials.source: must be one of auto"),
        ("routes: [{upstream: 'https://x.run.app'}]\ncredentials: {source: service_account}", "credentials.key_file: is required for source service_account"),
        ("routes: [{upstream: 'https://x.run.app'}]\ncredentials: {source: metadata, key_file: k.json}", "credentials.key_file: does not apply to source metadata"),
        ("routes: [{upstream: 'https://x.run.app'}]\ncredentials: {source: static}", "credentials: source static needs exactly one of token_env or token_file"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['*']", "allowed_origins[0]: '*' would let every site"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://a/x']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://a?x=1']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://a?']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://a#top']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['ftp://a']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['localhost:3000']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://u:p@a']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://a:99999']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://a:port']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['http://[zz]']", "allowed_origins[0]: must be an origin"),
        ("routes: [{upstream: 'https://x.run.app'}]\nallowed_origins: ['null']", "allowed_origins[0]: 'null' would let every site"),
        ("- a\n- b", "config: must be a mapping, got a list"),
    ],
)
def test_errors_name_the_field(text, expected):
    errs = errors_of(text)
    assert any(e.startswith(expected) for e in errs), errs


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("http://localhost:3000", "http://localhost:3000"),
        # Browsers never send the scheme's default port (nor a path, nor upper case).
        ("http://example.test:80", "http://example.test"),
        ("https://example.test:443", "https://example.test"),
        ("https://example.test:443/", "https://example.test"),
        ("HTTP://Example.TEST:80/", "http://example.test"),
        ("http://example.test:", "http://example.test"),
        ("http://example.test:0080", "http://example.test"),
        # Another scheme's default is a port like any other.
        ("https://example.test:80", "https://example.test:80"),
        ("http://example.test:443", "http://example.test:443"),
        ("http://[::1]:80", "http://[::1]"),
        ("http://[0:0::1]:8080", "http://[::1]:8080"),
        ("http://B\u00fccher.test", "http://xn--bcher-kva.test"),
    ],
)
def test_allowed_origins_are_normalised_as_browsers_send_origin(entry, expected):
    c = parse_config({"routes": [{"upstream": "https://x.run.app"}], "allowed_origins": [entry]}, {})
    assert c.allowed_origins == (expected,)


def test_every_error_is_reported_at_once():
    errs = errors_of(
        """
listen: {port: -1, hots: x}
routes:
  - upstream: http://remote.example
  - prefix: nope
    upstream: https://ok.run.app
    header: nope
"""
    )
    assert len(errs) == 5, errs
    assert [e.split(":")[0] for e in errs] == [
        "listen.port",
        "listen.hots",
        "routes[0].upstream",
        "routes[1].prefix",
        "routes[1].header",
    ]


def test_http_allowed_for_loopback_or_with_opt_in():
    c = parse(
        """
routes:
  - {upstream: 'http://127.0.0.1:9000', prefix: /a}
  - {upstream: 'http://localhost:9000', prefix: /b}
  - {upstream: 'http://[::1]:9000', prefix: /c}
  - {upstream: 'http://svc.internal', prefix: /d, allow_insecure_http: true}
"""
    )
    assert [r.upstream for r in c.routes] == [
        "http://127.0.0.1:9000",
        "http://localhost:9000",
        "http://[::1]:9000",
        "http://svc.internal",
    ]


def test_duplicate_prefix_and_name_are_refused():
    errs = errors_of(
        """
routes:
  - {upstream: 'https://a.run.app', prefix: /x}
  - {upstream: 'https://b.run.app', prefix: /x/}
  - {upstream: 'https://c.run.app', name: a/x, prefix: /y}
"""
    )
    assert "routes[1].prefix: '/x' is already routed by routes[0]" in errs
    assert any(e.startswith("routes[2].name: 'a/x'") for e in errs), errs


def test_env_expansion_and_undefined_variable():
    c = parse("routes: [{upstream: '${URL}', audience: '${AUD:-https://default}'}]", {"URL": "https://x.run.app"})
    assert c.routes[0].upstream == "https://x.run.app"
    assert c.routes[0].audience == "https://default"
    errs = errors_of("routes: [{upstream: '${MISSING_URL}'}]")
    assert "routes[0].upstream: environment variable MISSING_URL is not set" in errs


def test_route_credentials_override_the_top_level():
    c = parse(
        """
credentials: {source: metadata}
routes:
  - {upstream: 'https://a.run.app', prefix: /a}
  - {upstream: 'https://b.run.app', prefix: /b, credentials: {source: static, token_env: TOKEN}}
"""
    )
    assert c.routes[0].credentials == Credentials(source="metadata")
    assert c.routes[1].credentials == Credentials(source="static", token_env="TOKEN")


def test_load_config_reports_file_problems(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.yaml"))
    assert "cannot read" in info.value.errors[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [\n  - upstream: x\n  oops")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    assert "not valid YAML (line" in info.value.errors[0]


def test_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "config.example.yaml"
    config = load_config(str(example), env={"HOME": "/nonexistent"})
    assert config.routes
