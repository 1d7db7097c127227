"""A whole project in one command: every service (and function) at ``http://NAME.localhost:PORT``.

Each service gets a host route, so browsers (one origin per service: cookies,
absolute paths and CORS all work) and absolute paths reach it. A name found in
two regions is served as ``NAME--REGION.localhost``, in every region it is in.
2nd-gen functions are Cloud Run services too: listed once, as services.

With ``services_refresh`` (seconds, default 300; 0 switches it off) the list is
read again in the background: a new service appears without a restart, and one
that is gone answers 404 saying so. The route table is swapped in one step
(``Router.replace``); new audiences are registered with the token cache.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..auth.identity import Identity
from ..config import Config, Route
from ..errors import redact
from ..policy.router import compile_route
from .api import AccessTokenError, AdminApi, ApiRefusal, Unreachable
from .lookup import ResolveError, checked_url, function_url, list_refused

log = logging.getLogger(__name__)

HOST_SUFFIX = ".localhost"


@dataclass(frozen=True)
class Listed:
    kind: str  # "service" or "function"
    name: str
    region: str
    url: str
    custom_audiences: tuple[str, ...] = ()


def _parts(resource_name: str) -> tuple[str, str]:
    """(region, short name) of ``projects/P/locations/R/services/NAME``."""
    parts = resource_name.split("/")
    return (parts[3], parts[5]) if len(parts) >= 6 else ("", parts[-1])


async def list_project(api: AdminApi, project: str, region: str | None, functions: bool) -> list[Listed]:
    """Every service (and function) of ``project`` in ``region`` (None: all regions)."""
    listed: list[Listed] = []
    kind = "service"
    try:
        services = await api.list_services(project, region)
        run_names = set()
        for s in services:
            where, name = _parts(str(s.get("name") or ""))
            run_names.add(str(s.get("name")))
            if s.get("uri"):
                audiences = tuple(a for a in s.get("customAudiences") or () if isinstance(a, str))
                listed.append(Listed("service", name, where, str(s["uri"]), audiences))
        if functions:
            kind = "function"
            for f in await api.list_functions(project, region):
                where, name = _parts(str(f.get("name") or ""))
                config = f.get("serviceConfig") if isinstance(f.get("serviceConfig"), dict) else {}
                if f.get("environment") == "GEN_2" and str((config or {}).get("service")) in run_names:
                    continue  # already served as the Cloud Run service it is
                url = function_url(f)
                if url:
                    listed.append(Listed("function", name, where, url))
    except ApiRefusal as refusal:
        raise list_refused(refusal, kind, project, region, api) from None
    except Unreachable as e:
        raise ResolveError(f"cannot reach the API at {api.run_base if kind == 'service' else api.functions_base} to list the {kind}s of project {project} ({e})", "check the network (and HTTPS_PROXY)") from None
    except AccessTokenError as e:
        raise ResolveError(f"cannot get an access token as {api.caller} to list project {project}: {e.reason}", "check the credentials") from None
    return listed


def label(name: str) -> str:
    """A DNS label for a service or function name (functions may use _ and capitals)."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "x"


def project_routes(listed: list[Listed], config: Config) -> list[Route]:
    """One host route per service; a name in two regions (or kinds) gets ``--REGION`` (and ``--function``)."""
    by_label: dict[str, list[Listed]] = {}
    for item in listed:
        by_label.setdefault(label(item.name), []).append(item)
    routes: list[Route] = []
    for base, items in sorted(by_label.items()):
        for item in sorted(items, key=lambda i: (i.region, i.kind)):
            host_label = base
            if len(items) > 1:
                host_label = f"{base}--{item.region}"
                if sum(1 for i in items if i.region == item.region) > 1 and item.kind == "function":
                    host_label += "--function"
            try:
                url = checked_url(item.url, f"{item.kind} {item.name}")
            except ResolveError as e:
                log.warning("not serving %s", str(e).splitlines()[0])
                continue
            routes.append(
                Route(
                    name=host_label,
                    prefix="/",
                    upstream=url,
                    audience=url,
                    host=host_label + HOST_SUFFIX,
                    credentials=config.credentials,
                    max_body_bytes=config.limits.max_body_bytes,
                    region=item.region,
                    project=config.serve_project.project if config.serve_project else None,
                    custom_audiences=item.custom_audiences,
                    service=item.name if item.kind == "service" else None,
                    function=item.name if item.kind == "function" else None,
                )
            )
    return routes


def describe_routes(routes: list[Route], port: int) -> list[str]:
    return [f"http://{r.host}:{port}/ -> {r.by_name} ({r.region}) {r.upstream}" for r in routes]


class ProjectWatch:
    """Re-lists the project every ``interval`` seconds and swaps the route table when it changed.

    ``run`` is the background task; ``swap_routes`` puts a new table in place.
    """

    def __init__(
        self,
        config: Config,
        api: AdminApi,
        project: str,
        region: str | None,
        routes: list[Route],
        interval: float,
    ) -> None:
        self.config = config
        self.api = api
        self.project = project
        self.region = region
        self.interval = interval
        self.routes = {r.host or "": r for r in routes}
        #: Host -> why it no longer answers (a vanished service).
        self.gone: dict[str, str] = {}
        self.refreshes = 0

    async def refresh(self) -> tuple[list[Route], list[Route]] | None:
        """List once; (added, removed) routes if the table changed, else None."""
        sp = self.config.serve_project
        functions = bool(sp and sp.functions)
        try:
            listed = await list_project(self.api, self.project, self.region, functions)
        except Exception as e:  # noqa: BLE001 - whatever failed, the routes being served stay
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("refreshing the services of project %s failed, keeping the current routes: %s", self.project, redact(reason))
            return None
        self.refreshes += 1
        new = {r.host or "": r for r in project_routes(listed, self.config)}
        added = [r for h, r in new.items() if h not in self.routes or self.routes[h].upstream != r.upstream]
        removed = [r for h, r in self.routes.items() if h not in new or new[h].upstream != r.upstream]
        if not added and not removed:
            return None
        now = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S UTC")
        for r in removed:
            if r.host and r.host not in new:
                elsewhere = [h for h, n in new.items() if n.by_name == r.by_name]
                self.gone[r.host] = (
                    f"{r.by_name} is now served at {', '.join(sorted(elsewhere))}" if elsewhere
                    else f"{r.by_name} ({r.region}) is no longer in project {self.project} (gone at {now})"
                )
                log.warning("%s: %s", r.host, self.gone[r.host])
        for r in added:
            self.gone.pop(r.host or "", None)
            log.info("project %s: serving %s (%s) at http://%s:%s/ -> %s", self.project, r.by_name, r.region, r.host, self.config.listen.port, r.upstream)
        self.routes = new
        return added, removed

    async def run(self, state: Any) -> None:
        """The background task (app.ProxyState.background): refresh every ``interval`` seconds."""
        while True:
            await asyncio.sleep(self.interval)
            if await self.refresh() is not None:
                swap_routes(state, list(self.routes.values()), dict(self.gone))


def swap_routes(state: Any, routes: list[Route], gone: dict[str, str]) -> None:
    """Compile ``routes`` against ``state`` (an app.ProxyState) and make them the route table.

    Tokens for new audiences are registered (and fetched at once); those no route
    uses any more are dropped, so no refresh timer runs for a vanished service.
    """
    identity: Identity = state.identities[state.config.credentials]
    before = {r.token_key for r in state.router.routes}
    compiled = [compile_route(r, state.tokens.add(identity, r.audience)) for r in routes]
    state.router.replace(compiled, gone)
    for key in before - {r.token_key for r in compiled}:
        state.tokens.discard(key)
