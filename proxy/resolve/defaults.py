"""Project and region defaults, found where gcloud finds them.

The order, first hit wins:

1. the flag or the route's key;
2. the environment: ``CLOUDSDK_CORE_PROJECT``, ``GOOGLE_CLOUD_PROJECT``;
   ``CLOUDSDK_RUN_REGION`` (services) or ``CLOUDSDK_FUNCTIONS_REGION`` (functions);
3. the active gcloud configuration: ``$CLOUDSDK_CONFIG/active_config`` (or
   ``CLOUDSDK_ACTIVE_CONFIG_NAME``) names ``configurations/config_NAME``, an INI
   file with ``[core] project``, ``[run] region`` and ``[functions] region``;
4. the metadata server's project (and its numeric id, for the deterministic URL).

Each value comes with where it came from, for the startup log. Read without
running gcloud: a subprocess per value would cost a second each.
"""

from __future__ import annotations

import configparser
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds the metadata server gets to answer a project lookup.
METADATA_TIMEOUT = 1.0


@dataclass(frozen=True)
class Found:
    value: str
    #: Where it came from: ``--region``, ``CLOUDSDK_RUN_REGION``, ``gcloud configuration default``...
    source: str


class Defaults:
    """Looks defaults up once per process (the gcloud files and the metadata server)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env
        self._gcloud: tuple[configparser.ConfigParser, str] | None = None
        self._metadata: dict[str, str | None] = {}

    # -- gcloud's configuration ---------------------------------------------

    def gcloud_dir(self) -> Path:
        configured = self.env.get("CLOUDSDK_CONFIG")
        if configured:
            return Path(configured)
        if os.name == "nt":
            return Path(self.env.get("APPDATA", str(Path.home()))) / "gcloud"
        return Path(self.env.get("HOME", str(Path.home()))) / ".config" / "gcloud"

    def gcloud_config(self) -> tuple[configparser.ConfigParser, str]:
        """The active configuration's properties, and how to name it in the log."""
        if self._gcloud is None:
            root = self.gcloud_dir()
            name = self.env.get("CLOUDSDK_ACTIVE_CONFIG_NAME", "").strip()
            if not name:
                try:
                    name = (root / "active_config").read_text(encoding="utf-8").strip()
                except OSError:
                    name = ""
            name = name or "default"
            path = root / "configurations" / f"config_{name}"
            parser = configparser.ConfigParser(interpolation=None)
            try:
                parser.read(path, encoding="utf-8")
            except configparser.Error as e:
                log.warning("gcloud configuration %s is not readable (%s): ignored", path, type(e).__name__)
                parser = configparser.ConfigParser(interpolation=None)
            self._gcloud = (parser, f"gcloud configuration {name} ({path})")
        return self._gcloud

    def _gcloud_value(self, section: str, key: str) -> Found | None:
        parser, where = self.gcloud_config()
        value = parser.get(section, key, fallback="").strip()
        return Found(value, f"{where} [{section}] {key}") if value else None

    # -- the metadata server ----------------------------------------------------

    def metadata(self, path: str) -> str | None:
        """``computeMetadata/v1/PATH`` from the metadata server, or None when there is none."""
        if path not in self._metadata:
            import requests

            host = self.env.get("GCE_METADATA_HOST") or self.env.get("GCE_METADATA_ROOT") or "metadata.google.internal"
            try:
                r = requests.get(
                    f"http://{host}/computeMetadata/v1/{path}",
                    headers={"Metadata-Flavor": "Google"},
                    timeout=METADATA_TIMEOUT,
                )
                value = r.text.strip() if r.status_code == 200 and r.headers.get("Metadata-Flavor") == "Google" else None
            except requests.RequestException:
                value = None
            self._metadata[path] = value or None
        return self._metadata[path]

    # -- the values -------------------------------------------------------------

    def project(self, given: str | None, given_by: str) -> Found | None:
        if given:
            return Found(given, given_by)
        for var in ("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT"):
            value = self.env.get(var, "").strip()
            if value:
                return Found(value, var)
        found = self._gcloud_value("core", "project")
        if found is not None:
            return found
        metadata = self.metadata("project/project-id")
        return Found(metadata, "the metadata server") if metadata else None

    def region(self, given: str | None, given_by: str, kind: str = "service") -> Found | None:
        if given:
            return Found(given, given_by)
        var, section = ("CLOUDSDK_FUNCTIONS_REGION", "functions") if kind == "function" else ("CLOUDSDK_RUN_REGION", "run")
        from_env = self.env.get(var, "").strip()
        if from_env:
            return Found(from_env, var)
        return self._gcloud_value(section, "region")

    def project_number(self, project: str, given: str | None) -> str | None:
        """The project number for ``project``: the config's, or the metadata server's if it is that project."""
        if given:
            return given
        if self.metadata("project/project-id") == project:
            return self.metadata("project/numeric-project-id")
        return None


def region_hint(kind: str) -> str:
    if kind == "function":
        return "pass --region, set CLOUDSDK_FUNCTIONS_REGION, or run `gcloud config set functions/region REGION`"
    return "pass --region, set CLOUDSDK_RUN_REGION, or run `gcloud config set run/region REGION`"


PROJECT_HINT = "pass --project, set CLOUDSDK_CORE_PROJECT, or run `gcloud config set project PROJECT`"
