"""A whole project in one command: host routes per service, name collisions, the refresh, IAP's header.

Every upstream is its own PrivateService that checks the ID token's audience is
its own URL, so a request that reached the wrong service (or carried another
service's token) fails with 401.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.fakes import PrivateService

from .test_identity_support import client, eventually  # noqa: F401
from .test_names_support import PROJECT, REGION, _cloud_apis, apis, key_env, serve_by_name  # noqa: F401

EU = "europe-west1"


@pytest.fixture
def services(fake_google) -> Iterator[dict[str, PrivateService]]:
    names = ("a-us", "a-eu", "b", "c", "fn")
    started = {n: PrivateService(certs_url=fake_google.certs_url).start() for n in names}
    try:
        yield started
    finally:
        for s in started.values():
            s.stop()


async def get(client, proxy, host: str, path: str = "/"):  # type: ignore[no-untyped-def]
    async with client.get(proxy.url + path, headers={"Host": f"{host}:{proxy.port}"}) as r:
        return r.status, await r.text()


def project_config(**extra: object) -> dict[str, object]:
    return {"serve_project": {"project": PROJECT, **extra}, "services_refresh": 0}


async def test_every_service_of_two_regions_at_its_own_host(serve_by_name, apis, key_env, services, client, caplog):
    apis.run.add_service("a", REGION, uri=services["a-us"].url)
    apis.run.add_service("a", EU, uri=services["a-eu"].url)
    apis.run.add_service("b", REGION, uri=services["b"].url)
    apis.run.add_service("elsewhere", REGION, project="other-project")
    apis.run.grant(key_env)
    apis.run.page_size = 2  # the listing comes in pages: all of them are read
    proxy = await serve_by_name(project_config(all_regions=True))
    hosts = sorted(r.route.host for r in proxy.state.router.routes)
    # "a" is in two regions: both get the region in their name; "b" keeps its own.
    assert hosts == ["a--europe-west1.localhost", "a--us-central1.localhost", "b.localhost"]
    for host, service in (("a--us-central1.localhost", "a-us"), ("a--europe-west1.localhost", "a-eu"), ("b.localhost", "b")):
        status, body = await get(client, proxy, host, "/x")
        assert status == 200, (host, body)
        assert services[service].last.claims["aud"] == services[service].url
    assert apis.run.calls["list"] == 2 and apis.run.calls["get"] == 0
    # A host no service has says where the services are.
    status, body = await get(client, proxy, "localhost")
    assert (status, body) == (
        404,
        "idtoken-proxy: 404 no service is served at localhost; the services are at "
        "a--europe-west1.localhost, a--us-central1.localhost, b.localhost\n",
    )
    log = caplog.text
    assert f"project {PROJECT} (from serve_project.project), all regions (from --all-regions): 3 services" in log
    assert f"serving http://b.localhost:{proxy.config.listen.port}/ -> service b ({REGION}) {services['b'].url}" in log


async def test_one_region_and_functions_without_duplicates(serve_by_name, apis, key_env, services, client):
    apis.run.add_service("a", REGION, uri=services["a-us"].url)
    apis.run.add_service("a", EU, uri=services["a-eu"].url)
    # A 2nd-gen function is a Cloud Run service too: served once, as the service.
    apis.run.add_service("gen2", REGION, uri=services["b"].url)
    apis.functions.add_function("gen2", REGION, generation=2, run_uri=services["b"].url)
    fn_url = services["fn"].url + "/legacy"
    services["fn"].audiences = [fn_url]
    apis.functions.add_function("legacy", REGION, generation=1, url=fn_url)
    apis.run.grant(key_env)
    apis.functions.grant(key_env)
    proxy = await serve_by_name(project_config(region=REGION, functions=True))
    routes = {r.route.host: r.route for r in proxy.state.router.routes}
    assert sorted(routes) == ["a.localhost", "gen2.localhost", "legacy.localhost"]
    assert routes["legacy.localhost"].by_name == "function legacy"
    status, body = await get(client, proxy, "legacy.localhost", "/hi")
    assert status == 200, body
    assert services["fn"].last.raw_path == "/legacy/hi"


async def test_refresh_picks_up_a_new_service_and_a_vanished_one_gets_a_clear_404(serve_by_name, apis, key_env, services, client, caplog):
    apis.run.add_service("a", REGION, uri=services["a-us"].url)
    apis.run.add_service("b", REGION, uri=services["b"].url)
    apis.run.grant(key_env)
    proxy = await serve_by_name({**project_config(region=REGION), "services_refresh": 0.2})
    assert (await get(client, proxy, "b.localhost"))[0] == 200
    status, _ = await get(client, proxy, "c.localhost")
    assert status == 404

    apis.run.add_service("c", REGION, uri=services["c"].url)
    apis.run.remove(PROJECT, REGION, "b")

    async def c_served() -> bool:
        return (await get(client, proxy, "c.localhost"))[0] == 200

    await eventually(c_served, timeout=30)
    assert services["c"].last.claims["aud"] == services["c"].url
    status, body = await get(client, proxy, "b.localhost")
    assert status == 404
    assert re.fullmatch(
        rf"idtoken-proxy: 404 service b \({REGION}\) is no longer in project {PROJECT} \(gone at \d\d:\d\d:\d\d UTC\)\n", body
    ), body
    # The token cache follows: c's audience is kept fresh, b's is no longer refreshed.
    audiences = {k.audience for k in proxy.state.tokens.keys()}
    assert services["c"].url in audiences and services["b"].url not in audiences
    async with client.get(proxy.url + "/.proxy/status.json") as r:
        doc = await r.json()
    assert sorted(route["host"] for route in doc["routes"]) == ["a.localhost", "c.localhost"]
    assert {route["name"]: route["requests"] for route in doc["routes"]}["c"] >= 1
    assert f"project {PROJECT}: serving service c ({REGION}) at http://c.localhost:" in caplog.text


async def test_a_name_that_appears_in_a_second_region_moves_both(serve_by_name, apis, key_env, services, client):
    apis.run.add_service("a", REGION, uri=services["a-us"].url)
    apis.run.grant(key_env)
    proxy = await serve_by_name({**project_config(all_regions=True), "services_refresh": 0.2})
    assert (await get(client, proxy, "a.localhost"))[0] == 200
    apis.run.add_service("a", EU, uri=services["a-eu"].url)

    async def moved() -> bool:
        return (await get(client, proxy, "a--europe-west1.localhost"))[0] == 200

    await eventually(moved, timeout=30)
    assert (await get(client, proxy, "a--us-central1.localhost"))[0] == 200
    assert await get(client, proxy, "a.localhost") == (
        404,
        "idtoken-proxy: 404 service a is now served at a--europe-west1.localhost, a--us-central1.localhost\n",
    )


async def test_refresh_off_lists_once(serve_by_name, apis, key_env, services):
    apis.run.add_service("a", REGION, uri=services["a-us"].url)
    apis.run.grant(key_env)
    proxy = await serve_by_name(project_config(region=REGION))
    assert proxy.state.background == ()
    assert apis.run.calls["list"] == 1


async def test_a_failed_refresh_keeps_the_routes(serve_by_name, apis, key_env, services, client, caplog):
    apis.run.add_service("a", REGION, uri=services["a-us"].url)
    apis.run.grant(key_env)
    proxy = await serve_by_name({**project_config(region=REGION), "services_refresh": 0.2})
    apis.run.fail(403)
    await eventually(lambda: "refreshing the services of project fake-project failed, keeping the current routes" in caplog.text, timeout=30)
    assert (await get(client, proxy, "a.localhost"))[0] == 200


# --------------------------------------------------------------------------- IAP's header


async def test_proxy_authorization_mode_for_iap(start_proxy, sa_key, fake_google, client):
    key, email = sa_key
    client_id = "123-iap.apps.googleusercontent.com"
    with PrivateService(certs_url=fake_google.certs_url, iap=True, audiences=[client_id]) as iap:
        proxy = await start_proxy(
            {
                "credentials": {"source": "service_account", "key_file": str(key)},
                "routes": [{"upstream": iap.url, "audience": client_id, "header": "proxy-authorization"}],
            }
        )
        headers = {"Authorization": "Basic YXBwOnNlY3JldA==", "Proxy-Authorization": "Bearer forged.by.client"}
        async with client.get(proxy.url + "/echo", headers=headers) as r:
            assert r.status == 200, await r.text()
        seen = iap.last
        assert seen.checked_header == "Proxy-Authorization"
        assert seen.claims["aud"] == client_id and seen.claims["email"] == email
        # The app's own Authorization passes untouched; the client's Proxy-Authorization never does.
        assert seen.header_values("Authorization") == ["Basic YXBwOnNlY3JldA=="]
        assert len(seen.header_values("Proxy-Authorization")) == 1
        assert "forged" not in seen.header("Proxy-Authorization")
