"""The Cloud Run Admin API v2 and the Cloud Functions API v2, read-only, over REST.

    GET {run}v2/projects/P/locations/R/services/NAME          -> Service (uri, trafficStatuses, customAudiences)
    GET {run}v2/projects/P/locations/R|-/services             -> {services, nextPageToken}
    GET {functions}v2/projects/P/locations/R/functions/NAME   -> Function (url, environment, serviceConfig.uri)
    GET {functions}v2/projects/P/locations/R|-/functions      -> {functions, nextPageToken}

The base URLs are Google's unless gcloud's own override variables name others
(``CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN``, ``..._CLOUDFUNCTIONS``): private
endpoints, and the tests' fakes. Calls go through google-auth's
``AuthorizedSession`` (it refreshes the access token and retries once on a 401)
in a worker thread, one at a time per credentials object.

Every refusal becomes an ``ApiRefusal`` with the status and Google's error
``status``/``reason``; ``proxy.resolve.lookup`` words it for the user. Google's
own message is kept only after ``redact`` (it never carries a token, but the
rule is: nothing copied from a response reaches a log unredacted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from ..auth.access import who
from ..auth.tokens import _describe
from ..errors import CredentialError, redact

log = logging.getLogger(__name__)

RUN_BASE = "https://run.googleapis.com/"
FUNCTIONS_BASE = "https://cloudfunctions.googleapis.com/"
RUN_OVERRIDE = "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN"
FUNCTIONS_OVERRIDE = "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDFUNCTIONS"
#: Seconds one API call may take.
API_TIMEOUT = 15.0
#: Attempts for an answer that may pass (429, 500, 502, 503, 504), with this first pause (doubled).
ATTEMPTS = 3
RETRY_PAUSE = 0.5
_TRANSIENT = frozenset({429, 500, 502, 503, 504})
#: Pages of a listing followed at most (a project with 50,000 services is not a laptop's).
MAX_PAGES = 100


class ApiRefusal(Exception):
    """A non-200 answer: ``status``, Google's ``state`` (NOT_FOUND, ...) and ``reason`` (SERVICE_DISABLED, ...)."""

    def __init__(self, status: int, state: str, reason: str, message: str, attempts: int = 1) -> None:
        super().__init__(f"{status} {state}")
        self.status = status
        self.state = state
        self.reason = reason
        self.message = message
        self.attempts = attempts

    @property
    def disabled(self) -> bool:
        """The API is not enabled (in the project, or in the caller's quota project)."""
        text = self.message.lower()
        return self.reason in ("SERVICE_DISABLED", "API_DISABLED") or "has not been used in project" in text or "it is disabled" in text


class Unreachable(Exception):
    """No HTTP answer at all (connection refused, DNS, timeout)."""


def base_urls(env: Mapping[str, str]) -> tuple[str, str]:
    """(Cloud Run Admin base, Cloud Functions base), each ending in ``/``."""

    def base(var: str, default: str) -> str:
        value = env.get(var, "").strip() or default
        return value if value.endswith("/") else value + "/"

    return base(RUN_OVERRIDE, RUN_BASE), base(FUNCTIONS_OVERRIDE, FUNCTIONS_BASE)


class AdminApi:
    """Both APIs for one caller (one google-auth credentials object)."""

    def __init__(self, credentials: Any, caller: str, env: Mapping[str, str]) -> None:
        self.credentials = credentials
        self._caller = caller
        self.run_base, self.functions_base = base_urls(env)
        self._session: Any = None
        # AuthorizedSession (a requests.Session) is not thread-safe, and its
        # credentials must not refresh concurrently.
        self._lock = threading.Lock()
        #: Calls made, per API ("run", "functions"), for the log and the tests.
        self.calls = {"run": 0, "functions": 0}

    @property
    def caller(self) -> str:
        """Who the calls are made as, for messages (an email once the credentials are refreshed)."""
        return who(self.credentials, self._caller)

    # -- the four calls ---------------------------------------------------------

    async def get_service(self, project: str, region: str, name: str) -> dict[str, Any]:
        return await self._get("run", f"v2/projects/{_q(project)}/locations/{_q(region)}/services/{_q(name)}")

    async def get_function(self, project: str, region: str, name: str) -> dict[str, Any]:
        return await self._get("functions", f"v2/projects/{_q(project)}/locations/{_q(region)}/functions/{_q(name)}")

    async def list_services(self, project: str, region: str | None) -> list[dict[str, Any]]:
        return await self._list("run", f"v2/projects/{_q(project)}/locations/{_q(region or '-')}/services", "services")

    async def list_functions(self, project: str, region: str | None) -> list[dict[str, Any]]:
        return await self._list("functions", f"v2/projects/{_q(project)}/locations/{_q(region or '-')}/functions", "functions")

    # -- plumbing -----------------------------------------------------------------

    async def _list(self, api: str, path: str, field: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = ""
        for _ in range(MAX_PAGES):
            page = await self._get(api, path, {"pageSize": "500", **({"pageToken": token} if token else {})})
            items += [i for i in page.get(field) or () if isinstance(i, dict)]
            token = str(page.get("nextPageToken") or "")
            if not token:
                break
        return items

    async def _get(self, api: str, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        base = self.run_base if api == "run" else self.functions_base
        return await asyncio.to_thread(self._get_sync, api, base + path, params)

    def _get_sync(self, api: str, url: str, params: dict[str, str] | None) -> dict[str, Any]:
        import requests

        with self._lock:
            if self._session is None:
                from google.auth.transport.requests import AuthorizedSession, Request

                session = requests.Session()
                self._session = AuthorizedSession(self.credentials, auth_request=Request(session))
            pause = RETRY_PAUSE
            for attempt in range(1, ATTEMPTS + 1):
                self.calls[api] += 1
                try:
                    r = self._session.get(url, params=params, timeout=API_TIMEOUT)
                except requests.RequestException as e:
                    raise Unreachable(f"{type(e).__name__}") from None
                except CredentialError:
                    raise
                except Exception as e:  # noqa: BLE001 - google-auth's refresh failures, worded by the caller
                    raise AccessTokenError(_describe(e), e) from None
                if r.status_code == 200:
                    try:
                        body = r.json()
                    except ValueError:
                        raise ApiRefusal(200, "NOT_JSON", "", "the answer is not JSON") from None
                    return body if isinstance(body, dict) else {}
                refusal = _refusal(r, attempt)
                if r.status_code not in _TRANSIENT or attempt == ATTEMPTS:
                    raise refusal
                log.info("%s answered %s: asking again in %.1f s", url, r.status_code, pause)
                time.sleep(pause)
                pause *= 2
        raise AssertionError("unreachable")


class AccessTokenError(Exception):
    """The access token could not be had (google-auth's refresh failed)."""

    def __init__(self, reason: str, cause: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


def _refusal(r: Any, attempts: int) -> ApiRefusal:
    state, reason, message = "", "", ""
    try:
        error = r.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if isinstance(error, dict):
        state = str(error.get("status") or "")
        message = redact(str(error.get("message") or ""))[:300]
        for detail in error.get("details") or ():
            if isinstance(detail, dict) and detail.get("reason"):
                reason = str(detail["reason"])
    return ApiRefusal(r.status_code, state, reason, message, attempts)


def _q(part: str) -> str:
    # Names are validated by the config; quoting keeps a stray character from changing the path.
    return quote(part, safe="-")
