"""FakeRunApi and FakeFunctionsApi: the Cloud Run Admin API v2 and Cloud Functions API v2, read-only.

Each serves on its own loopback port (point ``CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN``
and ``CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDFUNCTIONS`` at :attr:`url`)::

    GET /v2/projects/P/locations/R/services/NAME     -> Service
    GET /v2/projects/P/locations/R|-/services        -> {"services": [...], "nextPageToken"}
    GET /v2/projects/P/locations/R/functions/NAME    -> Function
    GET /v2/projects/P/locations/R|-/functions       -> {"functions": [...], "nextPageToken"}

Shaped like the real v2 resources (the fields the proxy reads and a few it does
not): a Service has ``name``, ``uid``, ``uri``, ``urls``, ``customAudiences``,
``trafficStatuses`` (``tag``, ``uri``, ``percent``, ``type``); a Function has
``name``, ``environment`` (``GEN_1``/``GEN_2``), ``url``, ``state`` and
``serviceConfig`` (``service``, ``uri``).

Every call must carry ``Authorization: Bearer ACCESS_TOKEN`` issued by the
:class:`~tests.fakes.google.FakeGoogle` token endpoint for the cloud-platform
scope (else 401 UNAUTHENTICATED / 403 ACCESS_TOKEN_SCOPE_INSUFFICIENT). The
caller needs the permission (``run.services.get``, ``run.services.list``,
``cloudfunctions.functions.get``, ``cloudfunctions.functions.list``) granted
with :meth:`grant` (else 403 PERMISSION_DENIED, worded as Google does). Errors
use Google's JSON error shape; :meth:`disable` answers as for an API that is not
enabled (403 with reason SERVICE_DISABLED); :meth:`fail` injects a status.
Calls are counted per kind (``get``, ``list``) and per caller.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .google import CLOUD_PLATFORM_SCOPE, DEFAULT_PROJECT_NUMBER, FakeGoogle
from .server import BackgroundServer


@dataclass
class _Fault:
    status: int
    remaining: int | None


@dataclass
class _Resource:
    project: str
    region: str
    name: str
    body: dict[str, Any] = field(default_factory=dict)


def _error(status: int, state: str, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": state}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def run_app_url(name: str, region: str, tag: str | None = None) -> str:
    """A made-up ``https://[TAG---]NAME-HASH-XX.a.run.app`` URL, stable per (name, region)."""
    digest = hashlib.sha256(f"{name}/{region}".encode()).hexdigest()[:10]
    return f"https://{tag + '---' if tag else ''}{name}-{digest}-uc.a.run.app"


class _FakeApi:
    """The common part: auth, permissions, faults, counters, listing with pages."""

    kind = ""  # "services" or "functions"
    api_title = ""
    host = ""
    get_permission = ""
    list_permission = ""

    def __init__(self, google: FakeGoogle) -> None:
        self.google = google
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.calls_by_caller: Counter[str] = Counter()
        #: Items per page of a listing (a test sets it low to see nextPageToken followed).
        self.page_size = 500
        self.reset()
        app = web.Application()
        app.router.add_get("/v2/projects/{project}/locations/{region}/" + self.kind + "/{name}", self._get)
        app.router.add_get("/v2/projects/{project}/locations/{region}/" + self.kind, self._list)
        self._server = BackgroundServer(app)

    def reset(self) -> None:
        with self._lock:
            self._resources: dict[tuple[str, str, str], _Resource] = {}
            self._grants: dict[str, set[str]] = {}
            self._fault: _Fault | None = None
            self._disabled = False
            self.calls.clear()
            self.calls_by_caller.clear()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> _FakeApi:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/``: the value for the CLOUDSDK_API_ENDPOINT_OVERRIDES_* variable."""
        return self._server.url + "/"

    # -- controls ---------------------------------------------------------------

    def grant(self, email: str, *permissions: str) -> None:
        """Give ``email`` these permissions (default: get and list, as the viewer role does)."""
        with self._lock:
            self._grants.setdefault(email, set()).update(permissions or (self.get_permission, self.list_permission))

    def disable(self, disabled: bool = True) -> None:
        """Answer every call as an API that is not enabled in the project."""
        with self._lock:
            self._disabled = disabled

    def fail(self, status: int, count: int | None = None) -> None:
        """Answer ``status`` for the next ``count`` calls (None: until :meth:`heal`)."""
        with self._lock:
            self._fault = _Fault(status, count)

    def heal(self) -> None:
        with self._lock:
            self._fault = None

    def remove(self, project: str, region: str, name: str) -> None:
        with self._lock:
            self._resources.pop((project, region, name), None)

    def _put(self, resource: _Resource) -> dict[str, Any]:
        with self._lock:
            self._resources[(resource.project, resource.region, resource.name)] = resource
        return resource.body

    # -- serving ------------------------------------------------------------------

    def _gate(self, request: web.Request, call: str, permission: str, resource: str) -> web.Response | None:
        caller = self.google.caller(request.headers.get("Authorization", ""))
        with self._lock:
            self.calls[call] += 1
            if caller is not None:
                self.calls_by_caller[caller[0]] += 1
            fault = self._fault
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
            disabled = self._disabled
            allowed = caller is not None and permission in self._grants.get(caller[0], set())
        if fault is not None:
            state = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(fault.status, "UNKNOWN")
            return _error(fault.status, state, f"fake {self.api_title}: injected fault")
        if caller is None:
            return _error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
                "or other valid authentication credential.",
            )
        if CLOUD_PLATFORM_SCOPE not in caller[1]:
            return _error(
                403,
                "PERMISSION_DENIED",
                "Request had insufficient authentication scopes.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT"}],
            )
        if disabled:
            return _error(
                403,
                "PERMISSION_DENIED",
                f"{self.api_title} has not been used in project {DEFAULT_PROJECT_NUMBER} before or it is disabled. "
                f"Enable it by visiting https://console.developers.google.com/apis/api/{self.host}/overview"
                f"?project={DEFAULT_PROJECT_NUMBER} then retry.",
                [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED", "domain": "googleapis.com"}],
            )
        if not allowed:
            return _error(403, "PERMISSION_DENIED", f"Permission '{permission}' denied on resource '{resource}' (or resource may not exist).")
        return None

    async def _get(self, request: web.Request) -> web.Response:
        project, region, name = (request.match_info[k] for k in ("project", "region", "name"))
        path = f"projects/{project}/locations/{region}/{self.kind}/{name}"
        refused = self._gate(request, "get", self.get_permission, path)
        if refused:
            return refused
        with self._lock:
            resource = self._resources.get((project, region, name))
        if resource is None:
            return _error(404, "NOT_FOUND", self._not_found(project, region, name))
        return web.json_response(resource.body)

    async def _list(self, request: web.Request) -> web.Response:
        project, region = request.match_info["project"], request.match_info["region"]
        refused = self._gate(request, "list", self.list_permission, f"projects/{project}/locations/{region}")
        if refused:
            return refused
        with self._lock:
            items = [
                r.body
                for key, r in sorted(self._resources.items())
                if r.project == project and (region == "-" or r.region == region)
            ]
            size = min(self.page_size, int(request.query.get("pageSize") or self.page_size))
        start = int(request.query.get("pageToken") or 0)
        page: dict[str, Any] = {self.kind: items[start : start + size]}
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return web.json_response(page)

    def _not_found(self, project: str, region: str, name: str) -> str:
        raise NotImplementedError


class FakeRunApi(_FakeApi):
    """The Cloud Run Admin API v2 (services)."""

    kind = "services"
    api_title = "Cloud Run Admin API"
    host = "run.googleapis.com"
    get_permission = "run.services.get"
    list_permission = "run.services.list"

    def add_service(
        self,
        name: str,
        region: str = "us-central1",
        project: str = "fake-project",
        *,
        uri: str | None = None,
        tags: dict[str, str] | None = None,
        custom_audiences: list[str] | None = None,
    ) -> dict[str, Any]:
        """Add (or replace) a service; ``tags`` maps a revision tag to its URL."""
        uri = uri or run_app_url(name, region)
        traffic: list[dict[str, Any]] = [{"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", "percent": 100}]
        for tag, tag_uri in (tags or {}).items():
            traffic.append({"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION", "revision": f"{name}-0000{len(traffic)}-abc", "tag": tag, "uri": tag_uri})
        body = {
            "name": f"projects/{project}/locations/{region}/services/{name}",
            "uid": hashlib.sha256(f"{project}/{region}/{name}".encode()).hexdigest()[:32],
            "generation": "1",
            "uri": uri,
            "urls": [uri, f"https://{name}-{DEFAULT_PROJECT_NUMBER}.{region}.run.app"],
            "ingress": "INGRESS_TRAFFIC_ALL",
            "launchStage": "GA",
            "customAudiences": list(custom_audiences or []),
            "traffic": [{"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", "percent": 100}],
            "trafficStatuses": traffic,
            "terminalCondition": {"type": "Ready", "state": "CONDITION_SUCCEEDED"},
        }
        if not custom_audiences:
            del body["customAudiences"]  # the real API leaves empty lists out
        return self._put(_Resource(project, region, name, body))

    def _not_found(self, project: str, region: str, name: str) -> str:
        return f"Resource '{name}' of kind 'SERVICE' in region '{region}' in project '{project}' does not exist."


class FakeFunctionsApi(_FakeApi):
    """The Cloud Functions API v2 (functions of both generations)."""

    kind = "functions"
    api_title = "Cloud Functions API"
    host = "cloudfunctions.googleapis.com"
    get_permission = "cloudfunctions.functions.get"
    list_permission = "cloudfunctions.functions.list"

    def add_function(
        self,
        name: str,
        region: str = "us-central1",
        project: str = "fake-project",
        *,
        generation: int = 2,
        url: str | None = None,
        run_uri: str | None = None,
    ) -> dict[str, Any]:
        """Add a function. 1st gen: ``url`` is ``https://REGION-PROJECT.cloudfunctions.net/NAME``;
        2nd gen: ``serviceConfig.uri`` is its Cloud Run service's run.app URL."""
        url = url or f"https://{region}-{project}.cloudfunctions.net/{name}"
        body: dict[str, Any] = {
            "name": f"projects/{project}/locations/{region}/functions/{name}",
            "environment": "GEN_1" if generation == 1 else "GEN_2",
            "state": "ACTIVE",
            "url": url,
            "buildConfig": {"runtime": "python312", "entryPoint": "main"},
            "serviceConfig": {"timeoutSeconds": 60, "availableMemory": "256M"},
        }
        if generation != 1:
            body["serviceConfig"].update(
                service=f"projects/{project}/locations/{region}/services/{name.lower()}",
                uri=run_uri or run_app_url(name.lower(), region),
            )
        return self._put(_Resource(project, region, name, body))

    def _not_found(self, project: str, region: str, name: str) -> str:
        return f"Resource 'projects/{project}/locations/{region}/functions/{name}' was not found"
