"""Services and functions by name: the lookup through the Cloud Run Admin and Functions APIs.

The fake APIs (tests/fakes/cloud_apis.py) check the access token each call
carries (issued by the fake token endpoint, cloud-platform scope) and the
caller's permission; the upstream is a PrivateService that verifies the ID
token's signature and audience, so a wrong URL or audience fails for real.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import pytest

from proxy.config import ConfigError, parse_config
from proxy.resolve import ResolveError, resolve_config
from proxy.resolve.defaults import Defaults
from proxy.app import build_identities
from tests.fakes import ADC_CLIENT_ID, DEFAULT_USER_EMAIL, GCLOUD_CLIENT_ID
from tests.fakes.google import DEFAULT_PROJECT_NUMBER

from .test_identity_support import client, no_metadata, user_token_endpoint  # noqa: F401
from .test_names_support import (  # noqa: F401
    PROJECT,
    REGION,
    _cloud_apis,
    apis,
    iam_access,
    key_env,
    serve_by_name,
    write_gcloud_config,
    write_user_adc,
)


def by_name(**route: object) -> dict[str, object]:
    return {"routes": [{"region": REGION, "project": PROJECT, **route}]}


# --------------------------------------------------------------------------- each identity source's access token


async def test_service_by_name_with_a_key_file(serve_by_name, apis, key_env, private_service, client, google, caplog):
    apis.run.add_service("hello", uri=private_service.url)
    apis.run.grant(key_env, "run.services.get")
    proxy = await serve_by_name(by_name(service="hello"))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["aud"] == private_service.url
    assert private_service.last.claims["email"] == key_env
    # One lookup, made as the key's service account with its own access token.
    assert apis.run.calls["get"] == 1 and apis.run.calls_by_caller[key_env] == 1
    route = proxy.config.routes[0]
    assert (route.name, route.upstream, route.audience) == ("hello", private_service.url, private_service.url)
    assert (
        f"route hello: service hello in project {PROJECT} (from routes[0].project), region {REGION} "
        f"(from routes[0].region) is {private_service.url}" in caplog.text
    )


async def test_service_by_name_with_the_metadata_server(serve_by_name, apis, private_service, client, google, clean_env):
    apis.run.add_service("hello", uri=private_service.url)
    apis.run.grant(google.metadata_email, "run.services.get")
    proxy = await serve_by_name({"credentials": {"source": "metadata"}, **by_name(service="hello")})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()
    assert apis.run.calls_by_caller[google.metadata_email] == 1
    assert private_service.last.claims["email"] == google.metadata_email


async def test_service_by_name_with_a_user_login(serve_by_name, apis, private_service, client, google, user_token_endpoint, clean_env, no_metadata):
    write_user_adc(google, clean_env.cloudsdk_config)
    private_service.accept_client_id(ADC_CLIENT_ID)
    apis.run.add_service("hello", uri=private_service.url)
    apis.run.grant(DEFAULT_USER_EMAIL, "run.services.get")
    proxy = await serve_by_name({"credentials": {"source": "user"}, **by_name(service="hello")})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()
    assert apis.run.calls_by_caller[DEFAULT_USER_EMAIL] == 1


async def test_service_by_name_with_impersonation(serve_by_name, apis, key_env, private_service, client, iam_access):
    target = "invoker@fake-project.iam.gserviceaccount.com"
    iam_access.allow_impersonation(target, key_env)
    apis.run.add_service("hello", uri=private_service.url)
    # The lookup runs as the impersonated account (IAM generateAccessToken), not as the caller.
    apis.run.grant(target, "run.services.get")
    proxy = await serve_by_name({"credentials": {"source": "impersonate", "service_account": target}, **by_name(service="hello")})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()
    assert apis.run.calls_by_caller == {target: 1}
    assert private_service.last.claims["email"] == target


async def test_service_by_name_with_the_gcloud_cli(serve_by_name, apis, private_service, client, gcloud_stub, no_metadata):
    private_service.accept_client_id(GCLOUD_CLIENT_ID)
    apis.run.add_service("hello", uri=private_service.url)
    apis.run.grant(DEFAULT_USER_EMAIL, "run.services.get")
    proxy = await serve_by_name({"credentials": {"source": "gcloud"}, **by_name(service="hello")})
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()
    assert apis.run.calls_by_caller[DEFAULT_USER_EMAIL] == 1
    assert ["auth", "print-access-token"] in gcloud_stub.invocations()


async def test_an_access_token_without_the_cloud_platform_scope_is_refused(apis, google, clean_env):
    # The fake API really checks the scope: a VM whose account lacks it cannot look services up.
    google.metadata_scopes = ["https://www.googleapis.com/auth/userinfo.email"]
    apis.run.add_service("hello", project="other-project")
    apis.run.grant(google.metadata_email)
    config = parse_config({"credentials": {"source": "metadata"}, "routes": [{"service": "hello", "region": REGION, "project": "other-project"}]})
    with pytest.raises(ResolveError) as e:
        await resolve_config(config, build_identities(config))
    assert str(e.value).splitlines()[0] == f"the access token of {google.metadata_email} lacks the cloud-platform scope"


# --------------------------------------------------------------------------- tags, functions, fallback


async def test_a_tag_is_the_uri_of_its_traffic_status(serve_by_name, apis, key_env, private_service, client):
    apis.run.add_service("hello", tags={"green": private_service.url})
    apis.run.grant(key_env)
    proxy = await serve_by_name(by_name(service="hello", tag="green"))
    assert proxy.config.routes[0].upstream == private_service.url
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()


async def test_a_missing_tag_names_the_tags_there_are(apis, key_env):
    apis.run.add_service("hello", tags={"green": "https://green---hello-x-uc.a.run.app", "blue": "https://blue---hello-x-uc.a.run.app"})
    apis.run.grant(key_env)
    config = parse_config(by_name(service="hello", tag="red"))
    with pytest.raises(ResolveError) as e:
        await resolve_config(config, build_identities(config))
    assert str(e.value) == (
        f"service hello in project {PROJECT}, region {REGION} has no revision tag red (its tags: blue, green)\n"
        f"  hint: run `gcloud run services update-traffic hello --region {REGION} --project {PROJECT} --set-tags red=REVISION`"
    )


async def test_a_first_gen_function_is_its_full_url(serve_by_name, apis, key_env, private_service, client):
    url = private_service.url + "/fn1"
    private_service.audiences = [url]
    apis.functions.add_function("fn1", generation=1, url=url)
    apis.functions.grant(key_env)
    proxy = await serve_by_name(by_name(function="fn1"))
    route = proxy.config.routes[0]
    assert (route.upstream, route.audience) == (url, url)
    async with client.get(proxy.url + "/x?y=1") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.raw_path == "/fn1/x?y=1"
    assert private_service.last.claims["aud"] == url
    assert apis.functions.calls["get"] == 1 and apis.run.calls["get"] == 0


async def test_a_second_gen_function_is_its_cloud_run_uri(serve_by_name, apis, key_env, private_service, client):
    apis.functions.add_function("fn2", generation=2, run_uri=private_service.url)
    apis.functions.grant(key_env)
    proxy = await serve_by_name(by_name(function="fn2"))
    assert proxy.config.routes[0].upstream == private_service.url
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["aud"] == private_service.url


async def test_custom_audiences_are_reported_and_an_explicit_audience_wins(serve_by_name, apis, key_env, private_service, client, caplog):
    apis.run.add_service("hello", uri=private_service.url, custom_audiences=["https://hello.example.com"])
    apis.run.grant(key_env)
    private_service.audiences = ["https://hello.example.com"]
    proxy = await serve_by_name(by_name(service="hello", audience="https://hello.example.com"))
    async with client.get(proxy.url + "/") as r:
        assert r.status == 200, await r.text()
    assert private_service.last.claims["aud"] == "https://hello.example.com"
    async with client.get(proxy.url + "/.proxy/status.json") as r:
        (route,) = (await r.json())["routes"]
    assert route["custom_audiences"] == ["https://hello.example.com"]
    assert route["by_name"] == "service hello" and route["region"] == REGION
    async with client.get(proxy.url + "/.proxy/") as r:
        assert "customAudiences: https://hello.example.com" in await r.text()
    assert "route hello: the service's customAudiences: https://hello.example.com" in caplog.text


@pytest.mark.parametrize("disabled", [False, True], ids=["no-viewer-rights", "api-not-enabled"])
async def test_403_with_a_project_number_falls_back_to_the_deterministic_url(apis, key_env, caplog, disabled):
    apis.run.add_service("hello")
    apis.run.disable(disabled)
    config = parse_config(by_name(service="hello", tag="green", project_number="987654321098"))
    resolved, _ = await resolve_config(config, build_identities(config))
    url = f"https://green---hello-987654321098.{REGION}.run.app"
    assert (resolved.routes[0].upstream, resolved.routes[0].audience) == (url, url)
    why = "the API is not enabled" if disabled else f"{key_env} lacks run.services.get"
    assert (
        f"service hello in project {PROJECT}, region {REGION}: cannot look it up ({why}): using the deterministic URL "
        f"{url} (project number 987654321098); grant roles/run.viewer to have the URL looked up"
    ) in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_the_metadata_servers_project_number_serves_the_fallback_for_its_own_project(apis, key_env):
    apis.run.add_service("hello")
    # fake-project is the metadata server's project: its numeric-project-id applies.
    config = parse_config(by_name(service="hello"))
    resolved, _ = await resolve_config(config, build_identities(config))
    assert resolved.routes[0].upstream == f"https://hello-{DEFAULT_PROJECT_NUMBER}.{REGION}.run.app"
    # Another project's number is not the metadata server's to give: the 403 stands.
    config = parse_config({"routes": [{"service": "hello", "region": REGION, "project": "other-project"}]})
    with pytest.raises(ResolveError, match="lacks permission run.services.get"):
        await resolve_config(config, build_identities(config))


async def test_transient_api_errors_are_retried(apis, key_env):
    apis.run.add_service("hello")
    apis.run.grant(key_env)
    apis.run.fail(503, count=2)
    config = parse_config(by_name(service="hello"))
    resolved, _ = await resolve_config(config, build_identities(config))
    assert resolved.routes[0].upstream.endswith(".a.run.app")
    assert apis.run.calls["get"] == 3


# --------------------------------------------------------------------------- project and region defaults


def _resolve_place(env: dict[str, str], route: dict[str, object] | None = None) -> tuple[object, object]:
    defaults = Defaults(env)
    r = parse_config({"routes": [route or {"service": "hello"}]}, env={}).routes[0]
    return defaults.project(r.project, "routes[0].project"), defaults.region(r.region, "routes[0].region", "function" if r.function else "service")


def test_project_and_region_come_from_the_key_first(tmp_path):
    project, region = _resolve_place({"CLOUDSDK_CORE_PROJECT": "env-project", "CLOUDSDK_CONFIG": str(tmp_path)}, {"service": "s", "project": "key-project", "region": "europe-west1"})
    assert (project.value, project.source, region.value, region.source) == ("key-project", "routes[0].project", "europe-west1", "routes[0].region")


@pytest.mark.parametrize("var", ["CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT"])
def test_project_from_the_environment(tmp_path, var):
    write_gcloud_config(tmp_path, "default", {"core": {"project": "gcloud-project"}})
    project, _ = _resolve_place({var: "env-project", "CLOUDSDK_CONFIG": str(tmp_path)})
    assert (project.value, project.source) == ("env-project", var)


def test_region_from_the_environment_by_kind(tmp_path):
    env = {"CLOUDSDK_RUN_REGION": "asia-east1", "CLOUDSDK_FUNCTIONS_REGION": "europe-west3", "CLOUDSDK_CONFIG": str(tmp_path)}
    _, region = _resolve_place(env)
    assert (region.value, region.source) == ("asia-east1", "CLOUDSDK_RUN_REGION")
    _, region = _resolve_place(env, {"function": "f"})
    assert (region.value, region.source) == ("europe-west3", "CLOUDSDK_FUNCTIONS_REGION")


def test_project_and_region_from_the_active_gcloud_configuration(tmp_path):
    write_gcloud_config(tmp_path, "default", {"core": {"project": "not-this-one"}}, activate=False)
    path = write_gcloud_config(tmp_path, "work", {"core": {"project": "work-project", "account": "me@example.com"}, "run": {"region": "europe-west1"}, "functions": {"region": "us-east1"}})
    project, region = _resolve_place({"CLOUDSDK_CONFIG": str(tmp_path)})
    assert (project.value, project.source) == ("work-project", f"gcloud configuration work ({path}) [core] project")
    assert (region.value, region.source) == ("europe-west1", f"gcloud configuration work ({path}) [run] region")
    _, region = _resolve_place({"CLOUDSDK_CONFIG": str(tmp_path)}, {"function": "f"})
    assert region.value == "us-east1"
    # CLOUDSDK_ACTIVE_CONFIG_NAME picks another configuration, as it does for gcloud.
    project, _ = _resolve_place({"CLOUDSDK_CONFIG": str(tmp_path), "CLOUDSDK_ACTIVE_CONFIG_NAME": "default"})
    assert project.value == "not-this-one"


def test_a_configuration_written_by_the_real_gcloud_cli(tmp_path):
    gcloud = shutil.which("gcloud") or ("/usr/bin/gcloud" if os.path.exists("/usr/bin/gcloud") else None)
    if gcloud is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the gcloud CLI is needed for this test in CI")
        pytest.skip("the gcloud CLI is not installed")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    for prop, value in (("project", "cli-project"), ("run/region", "southamerica-east1"), ("functions/region", "asia-south1")):
        subprocess.run([gcloud, "config", "set", prop, value], env=env, check=True, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    project, region = _resolve_place({"CLOUDSDK_CONFIG": str(tmp_path / "gcloud")})
    assert (project.value, region.value) == ("cli-project", "southamerica-east1")
    assert project.source.startswith("gcloud configuration default (")
    _, region = _resolve_place({"CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}, {"function": "f"})
    assert region.value == "asia-south1"


def test_project_from_the_metadata_server(tmp_path, google):
    env = {"CLOUDSDK_CONFIG": str(tmp_path), "GCE_METADATA_HOST": google.metadata_host}
    project, region = _resolve_place(env)
    assert (project.value, project.source) == (PROJECT, "the metadata server")
    assert region is None  # no region default here: the error says where to set one
    assert Defaults(env).project_number(PROJECT, None) == DEFAULT_PROJECT_NUMBER
    assert Defaults(env).project_number("other-project", None) is None


async def test_startup_log_says_where_project_and_region_came_from(serve_by_name, apis, key_env, private_service, monkeypatch, clean_env, caplog):
    path = write_gcloud_config(clean_env.cloudsdk_config, "default", {"run": {"region": "europe-west1"}})
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    apis.run.add_service("hello", region="europe-west1", uri=private_service.url)
    apis.run.grant(key_env)
    await serve_by_name({"routes": [{"service": "hello"}]}, quick=True)
    assert (
        f"route hello: service hello in project {PROJECT} (from GOOGLE_CLOUD_PROJECT), region europe-west1 "
        f"(from gcloud configuration default ({path}) [run] region) is {private_service.url}"
    ) in caplog.text


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"service": "a", "upstream": "https://a.run.app"}, "routes[0].service: a route names exactly one of upstream, service and function; this one names upstream and service"),
        ({"service": "a", "function": "b"}, "routes[0].function: a route names exactly one of upstream, service and function; this one names service and function"),
        ({"upstream": "https://a.run.app", "region": "us-central1"}, "routes[0].region: applies only to a route by name (service: or function:)"),
        ({"function": "f", "tag": "green"}, "routes[0].tag: applies only to a route with service: (revision tags are a Cloud Run feature)"),
        ({"service": "Hello_World"}, "routes[0].service: must be a service name (lower-case letters, digits and -, starting with a letter), got 'Hello_World'"),
        ({"service": "a", "region": "Central"}, "routes[0].region: must be a region like us-central1, got 'Central'"),
        ({"service": "a", "project_number": "12ab"}, "routes[0].project_number: must be the numeric project number, got '12ab'"),
        ({}, "routes[0].upstream: is required (the service URL, e.g. https://hello-abc123-uc.a.run.app), or name the service instead: service: NAME or function: NAME"),
    ],
)
def test_route_by_name_config_errors_name_the_field(route, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"routes": [route]}, env={})
    assert e.value.errors == [message]


def test_serve_project_config():
    config = parse_config({"serve_project": {"project": "my-project", "all_regions": True, "functions": True}, "services_refresh": 0}, env={})
    assert config.serve_project is not None and config.serve_project.all_regions and config.services_refresh == 0
    with pytest.raises(ConfigError) as e:
        parse_config({"serve_project": {"region": "us-central1", "all_regions": True}, "routes": [{"upstream": "https://a.run.app"}]}, env={})
    assert e.value.errors == [
        "serve_project.all_regions: use region or all_regions, not both",
        "routes: serve_project serves every service of the project by itself: leave routes out, or list the services as routes instead",
    ]
