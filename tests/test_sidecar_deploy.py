"""deploy/: the Kubernetes and Cloud Run examples match what the program serves.

Each example's proxy container is turned into a real Config with the program's
own argument and environment handling (the image's ENV, then the container's
env, then its args, as the container runtime would combine them); the probe
paths are then asked of a real admin application.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
import aiohttp

from proxy.__main__ import ENV_PREFIX, _env_default, build_config, serve_parser
from proxy.app import STATE, make_admin_app, make_app
from proxy.config import Config, is_loopback_host
from proxy.engine.http1 import ServerState
from proxy.engine.listen import Listener
from proxy.ops.health import HEALTHZ_PATH, READYZ_PATH
from proxy.auth.static import StaticIdentity
from proxy.ops.metrics import METRICS_PATH

from .test_sidecar_image import env_of, exec_form, parse_dockerfile
from .test_sidecar_support import REPO, mint_jwt

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
FINAL = parse_dockerfile((REPO / "Dockerfile").read_text())[-1]
IMAGE_USER = int([a for i, a in FINAL.instructions if i == "USER"][-1].split(":")[0])


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((REPO / "deploy" / name).read_text()) if d]


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "valueFrom" not in item or "value" not in item
        env[item["name"]] = str(item["value"])
    return env


def effective_config(container: dict[str, Any], tmp_path: Path, files: dict[str, str]) -> Config:
    """The Config the program builds in this container (image ENV < container env < args)."""
    env = {**env_of(FINAL), **_container_env(container)}
    args = list(exec_form(FINAL, "CMD")) if "args" not in container else [str(a) for a in container["args"]]
    assert "command" not in container, "keep the image's ENTRYPOINT"
    # Files mounted into the container are written to tmp_path at the same relative path.
    def local(path: str) -> str:
        if path in files:
            target = tmp_path / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[path])
            return str(target)
        return path

    args = [local(a) for a in args]
    if ENV_PREFIX + "CONFIG" in env:
        env[ENV_PREFIX + "CONFIG"] = local(env[ENV_PREFIX + "CONFIG"])
    parser = serve_parser()
    _env_default(parser, env)
    ns = parser.parse_args(args)
    if not ns.config and env.get(ENV_PREFIX + "CONFIG") and not ns.upstream:
        ns.config = env[ENV_PREFIX + "CONFIG"]
    return build_config(ns, env)


async def _probe_statuses(config: Config, paths: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Ask a real admin app (of this config) for each path."""
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", mint_jwt())
    ident = StaticIdentity(token_env="SIDECAR_TEST_TOKEN")
    app = make_app(config, identities={r.credentials: ident for r in config.routes})
    # The admin listener's own service, on a free loopback port, asked by a real client.
    server = ServerState(make_admin_app(app[STATE]), config.limits, asyncio.get_running_loop())
    listener = Listener.open(server, "127.0.0.1", 0, backlog=16)
    try:
        base = f"http://127.0.0.1:{listener.addresses[0][1]}"
        out = {}
        async with aiohttp.ClientSession() as client:
            for path in paths:
                async with client.get(base + path) as resp:
                    out[path] = resp.status
        return out
    finally:
        listener.close()
        server.stop_accepting()
        await server.drain(1.0)


def _probe_port(probe: dict[str, Any], container: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        assert port in named, f"probe port {port!r} is not a named port of the container"
        port = named[port]
    return int(port)


def _check_probes(container: dict[str, Any], config: Config, expected: dict[str, str]) -> list[str]:
    paths = []
    for kind, path in expected.items():
        probe = container[kind]
        assert probe["httpGet"]["path"] == path, f"{kind} should ask {path}"
        assert _probe_port(probe, container) == config.admin.port, f"{kind} port is not the admin port"
        paths.append(path)
    return paths


def _app_urls(container: dict[str, Any]) -> list[str]:
    return [v for v in _container_env(container).values() if v.startswith("http://")]


async def test_kubernetes_native_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs("kubernetes/deployment.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "ConfigMap", "Deployment"}
    pod = by_kind["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    (proxy,) = [c for c in spec["initContainers"] if c["name"] == "idtoken-proxy"]
    (app,) = spec["containers"]

    # A native sidecar: an init container that keeps running.
    assert proxy["restartPolicy"] == "Always"
    assert proxy["image"].endswith(f"/idtoken-proxy:{VERSION}")
    assert spec["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]

    # The ConfigMap, mounted where the args say.
    (mount,) = proxy["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    files = {f"{mount['mountPath']}/{name}": text for name, text in by_kind["ConfigMap"]["data"].items()}
    config = effective_config(proxy, tmp_path, files)

    # The main listener stays on loopback; the admin one is reachable by the kubelet.
    assert is_loopback_host(config.listen.host)
    assert not is_loopback_host(config.admin.host)
    assert config.listen.port != app["ports"][0]["containerPort"]
    paths = _check_probes(
        proxy, config, {"startupProbe": READYZ_PATH, "readinessProbe": READYZ_PATH, "livenessProbe": HEALTHZ_PATH}
    )
    statuses = await _probe_statuses(config, [*paths, METRICS_PATH], monkeypatch)
    assert statuses[HEALTHZ_PATH] == 200 and statuses[METRICS_PATH] == 200
    assert statuses[READYZ_PATH] in (200, 503)  # served (503 until tokens: no token fetch here)

    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.admin.port
    assert annotations["prometheus.io/path"] == METRICS_PATH

    # The app reaches each route through the sidecar's loopback port.
    urls = _app_urls(app)
    assert urls
    prefixes = {r.prefix for r in config.routes}
    for url in urls:
        u = urlsplit(url)
        assert is_loopback_host(u.hostname or "") and u.port == config.listen.port
        assert u.path in prefixes

    # Shutdown fits in the grace period; the container is locked down.
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_timeout
    sc = proxy["securityContext"]
    assert sc["runAsUser"] == IMAGE_USER
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]["memory"]


async def test_cloud_run_multi_container_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (service,) = _docs("cloudrun/service.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    template = service["spec"]["template"]
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    proxy, app = containers["idtoken-proxy"], containers["app"]
    assert proxy["image"].endswith(f"/idtoken-proxy:{VERSION}")

    # The app starts only after the proxy (whose startup probe is readiness).
    deps = json.loads(template["metadata"]["annotations"]["run.googleapis.com/container-dependencies"])
    assert deps == {"app": ["idtoken-proxy"]}
    # Only the ingress container declares a port.
    assert "ports" not in proxy and app["ports"][0]["containerPort"] == 8080

    config = effective_config(proxy, tmp_path, {})
    assert is_loopback_host(config.listen.host) and config.listen.port != 8080
    paths = _check_probes(proxy, config, {"startupProbe": READYZ_PATH, "livenessProbe": HEALTHZ_PATH})
    statuses = await _probe_statuses(config, paths, monkeypatch)
    assert statuses[HEALTHZ_PATH] == 200 and statuses[READYZ_PATH] in (200, 503)
    # Cloud Run waits 10 s after SIGTERM.
    assert config.shutdown_timeout < 10

    for url in _app_urls(app):
        u = urlsplit(url)
        assert is_loopback_host(u.hostname or "") and u.port == config.listen.port
    assert config.routes[0].upstream.startswith("https://")
