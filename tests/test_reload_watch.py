"""The config file watch sees each way a file changes on disk, and only real changes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from proxy.config import Config, parse_config
from proxy.reload import FileWatch, diff_configs

INTERVAL = 0.05


async def _changes(watch_path: Path, act, *, polls: int = 20) -> int:
    """Start a watch, do ``act``, poll ``polls`` times, return how many changes were reported."""
    seen: list[int] = []
    watch = FileWatch(str(watch_path), lambda: seen.append(1), interval=INTERVAL)
    watch.start()
    try:
        await asyncio.sleep(INTERVAL * 2)
        act()
        for _ in range(polls):
            await asyncio.sleep(INTERVAL)
            if seen:
                # Give it the chance to report twice, which would be a bug.
                await asyncio.sleep(INTERVAL * 4)
                break
    finally:
        watch.stop()
    return len(seen)


async def test_in_place_write(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("a: 1\n")
    assert await _changes(f, lambda: f.write_text("a: 2\n")) == 1


async def test_editor_rename(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("a: 1\n")

    def rename() -> None:
        tmp = tmp_path / ".config.yaml.swp"
        tmp.write_text("a: 1\n# same size? no: longer\n")
        os.replace(tmp, f)

    assert await _changes(f, rename) == 1


async def test_same_size_rename_is_seen(tmp_path: Path) -> None:
    # Same size, possibly the same mtime: only the inode tells.
    f = tmp_path / "config.yaml"
    f.write_text("a: 1\n")

    def rename() -> None:
        tmp = tmp_path / "new"
        tmp.write_text("a: 2\n")
        os.utime(tmp, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
        os.replace(tmp, f)

    assert await _changes(f, rename) == 1


def _configmap(root: Path, stamp: str, text: str) -> None:
    """Lay out a ConfigMap volume the way the kubelet does (atomic_writer.go)."""
    data = root / stamp
    data.mkdir()
    (data / "config.yaml").write_text(text)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, root / "..data")
    if not (root / "config.yaml").is_symlink():
        (root / "config.yaml").symlink_to("..data/config.yaml")


async def test_configmap_symlink_swap(tmp_path: Path) -> None:
    _configmap(tmp_path, "..2026_12_01_10_00_00.1", "routes: []\n")
    path = tmp_path / "config.yaml"
    # The same size and content length; only what the path resolves to changes.
    assert await _changes(path, lambda: _configmap(tmp_path, "..2026_12_01_10_05_00.2", "routes: [1]\n")) == 1


async def test_touch_is_not_a_change(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("a: 1\n")

    def touch() -> None:
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    assert await _changes(f, touch, polls=10) == 0


async def test_file_missing_for_a_while_then_back(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("a: 1\n")

    async def gone_and_back() -> int:
        seen: list[int] = []
        watch = FileWatch(str(f), lambda: seen.append(1), interval=INTERVAL)
        watch.start()
        try:
            f.unlink()
            await asyncio.sleep(INTERVAL * 6)
            assert seen == []
            f.write_text("a: 3\n")
            for _ in range(40):
                await asyncio.sleep(INTERVAL)
                if seen:
                    break
        finally:
            watch.stop()
        return len(seen)

    assert await gone_and_back() == 1


def _cfg(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "credentials": {"source": "static", "token_env": "T"},
        "routes": [
            {"name": "a", "prefix": "/a", "upstream": "http://127.0.0.1:9001"},
            {"name": "b", "prefix": "/b", "upstream": "http://127.0.0.1:9002"},
        ],
    }
    base.update(extra)
    return base


def test_diff_names_routes_and_restart_settings() -> None:
    old = parse_config(_cfg())
    new_raw = _cfg(listen={"port": 9090}, allowed_origins=["http://localhost:3000"])
    new_raw["routes"] = [
        {"name": "a", "prefix": "/a", "upstream": "http://127.0.0.1:9011"},
        {"name": "c", "prefix": "/c", "upstream": "http://127.0.0.1:9003"},
    ]
    d = diff_configs(old, parse_config(new_raw))
    assert (d.added, d.removed, d.changed) == (("c",), ("b",), ("a",))
    assert d.needs_restart == ("listen.port: 8080 -> 9090",)
    assert d.settings == ("allowed_origins",)
    assert d.summary() == "added c; removed b; changed a; settings allowed_origins"


def test_diff_of_equal_configs_is_empty() -> None:
    d = diff_configs(parse_config(_cfg()), parse_config(_cfg()))
    assert d.summary() == "no changes" and not d.needs_restart


def _write(path: Path, raw: dict[str, object]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(raw))


async def test_reloader_applies_valid_and_keeps_old_on_error(tmp_path: Path, caplog: Any) -> None:
    from proxy.config import load_config
    from proxy.reload import Reloader

    path = tmp_path / "config.yaml"
    _write(path, _cfg())
    applied: list[tuple[Config, Any]] = []

    async def apply(c: Config, d: Any) -> None:
        applied.append((c, d))

    r = Reloader(str(path), load_config(str(path), {}), apply, load=lambda p: load_config(p, {}), clock=lambda: 0.0)

    _write(path, {**_cfg(), "bogus_key": 1})
    assert await r.reload("SIGHUP") is False
    assert applied == [] and r.status.generation == 1
    assert r.status.summary() is not None and r.status.summary().startswith("failed at 1970-01-01T00:00:00Z: ")
    assert "bogus_key" in (r.status.last_reason or "")
    errors = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
    assert any("bogus_key" in m for m in errors), errors

    new = _cfg(listen={"port": 9191})
    new["routes"] = [{"name": "a", "prefix": "/a", "upstream": "http://127.0.0.1:9001"}]
    _write(path, new)
    assert await r.reload("SIGHUP") is True
    (config, diff), = applied
    assert [x.name for x in config.routes] == ["a"] and diff.removed == ("b",)
    assert r.status.generation == 2 and r.status.summary() == "ok at 1970-01-01T00:00:00Z"
    assert r.status.as_json()["reloads"] == {"ok": 1, "error": 1}
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert "config reload: listen.port: 8080 -> 9191 needs a restart; the rest is applied" in warnings


async def test_reloader_apply_refusing_keeps_generation(tmp_path: Path) -> None:
    from proxy.config import ConfigError, load_config
    from proxy.reload import Reloader

    path = tmp_path / "config.yaml"
    _write(path, _cfg())

    async def refuse(c: Config, d: Any) -> None:
        raise ConfigError(["routes[0].credentials: cannot be built"])

    r = Reloader(str(path), load_config(str(path), {}), refuse, load=lambda p: load_config(p, {}))
    assert await r.reload("file changed") is False
    assert r.status.generation == 1 and r.status.last_reason == "routes[0].credentials: cannot be built"


async def test_quick_mode_has_nothing_to_reload(caplog: Any) -> None:
    from proxy.reload import Reloader

    async def apply(c: Config, d: Any) -> None:
        raise AssertionError("nothing to apply")

    r = Reloader(None, parse_config(_cfg()), apply, load=lambda p: parse_config(_cfg()))
    assert await r.reload("SIGHUP") is False
    assert r.status.last_outcome is None
    assert any("nothing to reload" in rec.getMessage() for rec in caplog.records)
