"""Services and functions by name, resolved at startup (and, for a whole project, at run time).

``resolve_config`` turns every ``service:``/``function:`` route into one with
its URL, and a ``serve_project`` config into one host route per service. It
runs before the listener opens; a failure is a ``ResolveError`` (exit 3) whose
message says what to do. Modules:

- ``defaults``: project and region, where gcloud finds them;
- ``api``: the Cloud Run Admin and Cloud Functions REST calls;
- ``lookup``: one name to one URL, and the wording of every refusal;
- ``project``: a whole project's listing, host names and the refresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from ..auth.access import access_credentials
from ..auth.choose import build_identity
from ..auth.identity import Identity
from ..config import Config, Credentials
from .api import AdminApi
from .defaults import PROJECT_HINT, Defaults
from .lookup import ResolveError, place_of, resolve_route
from .project import ProjectWatch, describe_routes, list_project, project_routes

log = logging.getLogger(__name__)

Job = Callable[[Any], Coroutine[Any, Any, None]]

__all__ = ["Defaults", "ResolveError", "needs_resolving", "resolve_config"]


def needs_resolving(config: Config) -> bool:
    return config.serve_project is not None or any(not r.resolved for r in config.routes)


class _Apis:
    """One AdminApi per identity: its access-token credentials are made once."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self._apis: dict[str, AdminApi] = {}

    def get(self, identity: Identity) -> AdminApi:
        api = self._apis.get(identity.key)
        if api is None:
            credentials, caller = access_credentials(identity)
            api = self._apis[identity.key] = AdminApi(credentials, caller, self.env)
        return api


async def resolve_config(
    config: Config,
    identities: dict[Credentials, Identity],
    *,
    quick: bool = False,
    env: Mapping[str, str] | None = None,
    defaults: Defaults | None = None,
) -> tuple[Config, tuple[Job, ...]]:
    """``config`` with every route resolved, and the background jobs to run while serving.

    ``identities`` gains the top-level credentials' identity in ``serve_project`` mode.
    """
    import os

    env = os.environ if env is None else env
    defaults = defaults or Defaults(env)
    apis = _Apis(env)
    for ident in {id(i): i for i in identities.values()}.values():
        if ident.source == "metadata":
            await ident.resolve()  # its email, for the messages
    routes = []
    for i, route in enumerate(config.routes):
        if route.resolved:
            routes.append(route)
            continue
        where = "--" if quick else f"routes[{i}]."
        # Defaults may come from the metadata server (a blocking call): off the loop.
        place = await asyncio.to_thread(place_of, route, where, defaults)
        resolved = await resolve_route(route, apis.get(identities[route.credentials]), place, defaults)
        log.info(
            "route %s: %s%s in project %s (from %s), region %s (from %s) is %s",
            route.name,
            route.by_name,
            f" tag {route.tag}" if route.tag else "",
            place.project,
            place.project_from,
            place.region,
            place.region_from,
            resolved.upstream,
        )
        if resolved.custom_audiences:
            log.info("route %s: the service's customAudiences: %s", route.name, ", ".join(resolved.custom_audiences))
        routes.append(resolved)
    jobs: tuple[Job, ...] = ()
    sp = config.serve_project
    if sp is not None:
        if config.credentials not in identities:
            identities[config.credentials] = build_identity(config.credentials)
        ident = identities[config.credentials]
        found = await asyncio.to_thread(defaults.project, sp.project, "--project" if quick else "serve_project.project")
        if found is None:
            raise ResolveError("serve_project: no project given or configured", PROJECT_HINT)
        region = None
        region_from = "--all-regions"
        if not sp.all_regions:
            r = defaults.region(sp.region, "--region" if quick else "serve_project.region")
            if r is None:
                raise ResolveError(
                    f"serving project {found.value}: no region given or configured",
                    "pass --region REGION, or --all-regions to serve every region; or set CLOUDSDK_RUN_REGION",
                )
            region, region_from = r.value, r.source
        api = apis.get(ident)
        listed = await list_project(api, found.value, region, sp.functions)
        config = dataclasses.replace(config, serve_project=dataclasses.replace(sp, project=found.value, region=region))
        project_list = project_routes(listed, config)
        what = "services and functions" if sp.functions else "services"
        log.info(
            "project %s (from %s), %s (from %s): %d %s",
            found.value,
            found.source,
            f"region {region}" if region else "all regions",
            region_from,
            len(project_list),
            what,
        )
        for line in describe_routes(project_list, config.listen.port):
            log.info("serving %s", line)
        if not project_list:
            if config.services_refresh <= 0:
                raise ResolveError(
                    f"project {found.value} has no {what} in {f'region {region}' if region else 'any region'}",
                    "check the project and region (`gcloud run services list`), or pass --all-regions",
                )
            log.warning("project %s has no %s yet: looking again every %g s", found.value, what, config.services_refresh)
        routes += project_list
        if config.services_refresh > 0:
            watch = ProjectWatch(config, api, found.value, region, project_list, config.services_refresh)
            jobs = (watch.run,)
    return dataclasses.replace(config, routes=tuple(routes)), jobs
