"""Routes by name: from ``service: hello`` to the URL and audience, with a way forward on every refusal.

- A service's upstream is its ``uri``; with a tag, the ``uri`` of the
  ``trafficStatuses`` entry carrying that tag.
- A function's upstream is the Functions API's ``url`` for a 1st-gen function
  (``https://REGION-PROJECT.cloudfunctions.net/NAME``, which is also its
  audience), and the Cloud Run ``serviceConfig.uri`` for a 2nd-gen one (it is a
  Cloud Run service, and its run.app URL is always an accepted audience).
- The audience is that URL unless the route sets one.
- When the caller may not read the service (403) and the project number is
  known, the deterministic URL ``https://[TAG---]NAME-NUMBER.REGION.run.app``
  is used with a warning: invokers often lack viewer rights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from ..config import Route, validate_upstream
from ..errors import CredentialError
from .api import AccessTokenError, AdminApi, ApiRefusal, Unreachable
from .defaults import PROJECT_HINT, Defaults, region_hint

log = logging.getLogger(__name__)


SCOPE_HINT = (
    "on Compute Engine, give the VM's service account the cloud-platform access scope "
    "(gcloud compute instances set-service-account ... --scopes=cloud-platform), or use a key file or impersonation"
)


class ResolveError(CredentialError):
    """A name that could not be turned into a URL: a startup error (exit 3) with a hint."""


@dataclass(frozen=True)
class Place:
    """Where a route's service lives, and where each part came from."""

    project: str
    region: str
    project_from: str
    region_from: str


def place_of(route: Route, where: str, defaults: Defaults, *, project_flag: str = "project", region_flag: str = "region") -> Place:
    """The project and region of a route by name; ResolveError when one cannot be found."""
    kind = "function" if route.function else "service"
    what = route.by_name or kind
    project = defaults.project(route.project, f"{where}{project_flag}")
    if project is None:
        raise ResolveError(f"{what}: no project given or configured", PROJECT_HINT)
    region = defaults.region(route.region, f"{where}{region_flag}", kind)
    if region is None:
        raise ResolveError(f"{what}: no region given or configured", region_hint(kind))
    return Place(project.value, region.value, project.source, region.source)


def deterministic_url(name: str, number: str, region: str, tag: str | None = None) -> str:
    return f"https://{tag + '---' if tag else ''}{name}-{number}.{region}.run.app"


def _member(caller: str) -> str:
    if "@" not in caller:
        return "MEMBER"
    return ("serviceAccount:" if caller.endswith(".gserviceaccount.com") else "user:") + caller


async def resolve_route(route: Route, api: AdminApi, place: Place, defaults: Defaults) -> Route:
    """``route`` with ``upstream``, ``audience`` and ``custom_audiences`` filled in."""
    kind = "function" if route.function else "service"
    name = route.function or route.service or ""
    where = f"in project {place.project}, region {place.region}"
    try:
        if kind == "service":
            body = await api.get_service(place.project, place.region, name)
        else:
            body = await api.get_function(place.project, place.region, name)
    except ApiRefusal as refusal:
        if refusal.status == 403 and kind == "service":
            # The metadata server may be asked: a blocking call, off the loop.
            number = await asyncio.to_thread(defaults.project_number, place.project, route.project_number)
            if number:
                url = deterministic_url(name, number, place.region, route.tag)
                why = "the API is not enabled" if refusal.disabled else f"{api.caller} lacks run.services.get"
                log.warning(
                    "service %s %s: cannot look it up (%s): using the deterministic URL %s (project number %s); "
                    "grant roles/run.viewer to have the URL looked up",
                    name,
                    where,
                    why,
                    url,
                    number,
                )
                return _filled(route, url, ())
        raise _refused(refusal, kind, name, place, api) from None
    except Unreachable as e:
        base = api.run_base if kind == "service" else api.functions_base
        raise ResolveError(
            f"cannot reach the {_api_name(kind)} at {base} to look up {kind} {name} ({e})",
            "check the network (and HTTPS_PROXY), or the "
            + ("CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN" if kind == "service" else "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDFUNCTIONS")
            + " variable; or give the URL itself (upstream, --upstream)",
        ) from None
    except AccessTokenError as e:
        raise ResolveError(f"cannot get an access token as {api.caller} to look up {kind} {name}: {e.reason}", _token_hint(e)) from None
    if kind == "service":
        url, audiences = service_url(body, route.tag, name, place)
    else:
        url, audiences = function_url(body), ()
        if not url:
            raise ResolveError(f"function {name} {where} has no URL (is it an HTTP function, and deployed?)", f"run `gcloud functions describe {name} --region {place.region} --project {place.project}`")
    return _filled(route, url, audiences)


def service_url(body: dict[str, Any], tag: str | None, name: str, place: Place) -> tuple[str, tuple[str, ...]]:
    audiences = tuple(a for a in body.get("customAudiences") or () if isinstance(a, str))
    if tag is None:
        uri = str(body.get("uri") or "")
        if not uri:
            raise ResolveError(
                f"service {name} in project {place.project}, region {place.region} has no URL yet (is it still deploying?)",
                f"run `gcloud run services describe {name} --region {place.region} --project {place.project}`",
            )
        return uri, audiences
    tags = [t for t in body.get("trafficStatuses") or () if isinstance(t, dict) and t.get("tag")]
    for t in tags:
        if t.get("tag") == tag and t.get("uri"):
            return str(t["uri"]), audiences
    have = ", ".join(sorted(str(t["tag"]) for t in tags)) or "none"
    raise ResolveError(
        f"service {name} in project {place.project}, region {place.region} has no revision tag {tag} (its tags: {have})",
        f"run `gcloud run services update-traffic {name} --region {place.region} --project {place.project} --set-tags {tag}=REVISION`",
    )


def function_url(body: dict[str, Any]) -> str:
    config = body.get("serviceConfig") if isinstance(body.get("serviceConfig"), dict) else {}
    run_uri = str((config or {}).get("uri") or "")
    if body.get("environment") == "GEN_2" and run_uri:
        return run_uri
    return str(body.get("url") or run_uri)


def _filled(route: Route, url: str, audiences: tuple[str, ...]) -> Route:
    url = checked_url(url, route.by_name or "route", route.allow_insecure_http)
    return dataclasses.replace(route, upstream=url, audience=route.audience or url, custom_audiences=audiences)


def checked_url(url: str, what: str, allow_http: bool = False) -> str:
    """An upstream URL an API reported, held to the rules a configured one follows (config.check_upstream)."""
    checked, errors = validate_upstream(url, allow_http)
    if checked is None:
        raise ResolveError(
            f"{what}: the API reported an unusable URL: " + "; ".join(errors),
            "give the URL itself (upstream, --upstream)",
        )
    return checked


def _api_name(kind: str) -> str:
    return "Cloud Run Admin API (run.googleapis.com)" if kind == "service" else "Cloud Functions API (cloudfunctions.googleapis.com)"


def _token_hint(e: AccessTokenError) -> str:
    text = e.reason
    if "invalid_grant" in text or "invalid_client" in text:
        return "the credential was refused: run `gcloud auth application-default login`, or create a new key"
    if "TransportError" in text or "Connection" in text:
        return "the token endpoint did not answer: check the network (and HTTPS_PROXY)"
    return "check the credentials (`idtoken-proxy check FILE --resolve`)"


def _refused(refusal: ApiRefusal, kind: str, name: str, place: Place, api: AdminApi) -> ResolveError:
    project, region = place.project, place.region
    where = f"in project {project}, region {region}"
    if refusal.status == 404:
        if kind == "service":
            return ResolveError(
                f"service {name} not found {where}",
                f"run `gcloud run services list --project {project} --region {region}` to see the services there",
            )
        return ResolveError(
            f"function {name} not found {where}",
            f"run `gcloud functions list --project {project} --regions {region}` to see the functions there",
        )
    if refusal.status == 403 and refusal.disabled:
        host = "run.googleapis.com" if kind == "service" else "cloudfunctions.googleapis.com"
        return ResolveError(
            f"the {_api_name(kind)} is not enabled in project {project}",
            f"run `gcloud services enable {host} --project {project}`, or give the URL itself (upstream, --upstream)",
        )
    if refusal.status == 403 and refusal.reason == "ACCESS_TOKEN_SCOPE_INSUFFICIENT":
        return ResolveError(f"the access token of {api.caller} lacks the cloud-platform scope", SCOPE_HINT)
    if refusal.status == 403:
        if kind == "service":
            return ResolveError(
                f"{api.caller} lacks permission run.services.get on service {name} {where}",
                f"grant it roles/run.viewer (`gcloud run services add-iam-policy-binding {name} --region {region} "
                f"--project {project} --member={_member(api.caller)} --role=roles/run.viewer`), "
                "or give the project number (project_number, --project-number) to use the deterministic URL, "
                "or the URL itself (upstream, --upstream)",
            )
        return ResolveError(
            f"{api.caller} lacks permission cloudfunctions.functions.get on function {name} {where}",
            f"grant it roles/cloudfunctions.viewer on project {project}, or give the URL itself (upstream, --upstream)",
        )
    if refusal.status == 401:
        return ResolveError(
            f"the {_api_name(kind)} refused the access token of {api.caller} (401)",
            "run `gcloud auth application-default login` again, or check the key file",
        )
    tries = f", {refusal.attempts} attempts" if refusal.attempts > 1 else ""
    detail = f": {refusal.message}" if refusal.message else ""
    return ResolveError(
        f"the {_api_name(kind)} answered {refusal.status} {refusal.state}{tries} for {kind} {name} {where}{detail}".replace("  ", " "),
        "try again in a minute (Google Cloud status: https://status.cloud.google.com), or give the URL itself (upstream, --upstream)",
    )


def list_refused(refusal: ApiRefusal, kind: str, project: str, region: str | None, api: AdminApi) -> ResolveError:
    """A refused listing of a whole project's services or functions."""
    where = f"in project {project}" + (f", region {region}" if region else "")
    if refusal.status == 403 and refusal.disabled:
        host = "run.googleapis.com" if kind == "service" else "cloudfunctions.googleapis.com"
        return ResolveError(
            f"the {_api_name(kind)} is not enabled in project {project}", f"run `gcloud services enable {host} --project {project}`"
        )
    if refusal.status == 403 and refusal.reason == "ACCESS_TOKEN_SCOPE_INSUFFICIENT":
        return ResolveError(f"the access token of {api.caller} lacks the cloud-platform scope", SCOPE_HINT)
    if refusal.status == 403:
        permission, role = ("run.services.list", "roles/run.viewer") if kind == "service" else ("cloudfunctions.functions.list", "roles/cloudfunctions.viewer")
        return ResolveError(
            f"{api.caller} lacks permission {permission} {where}",
            f"grant it {role} on project {project}, or name the services one by one "
            "(--service NAME, or routes[].service in a config file)",
        )
    if refusal.status == 404:
        return ResolveError(f"project {project} not found, or no such region ({where})", "run `gcloud projects list` to see your projects")
    tries = f", {refusal.attempts} attempts" if refusal.attempts > 1 else ""
    return ResolveError(
        f"the {_api_name(kind)} answered {refusal.status} {refusal.state}{tries} listing the {kind}s {where}".replace("  ", " "),
        "try again in a minute (Google Cloud status: https://status.cloud.google.com)",
    )
