"""Config reload: noticing that the file changed, and saying what a new config changes.

The watch follows what the path resolves to, not only its mtime, because the
three ways a config file changes under a running proxy look different on disk:

- an in-place write keeps the inode and changes mtime and size;
- an editor's write-then-rename puts a new inode at the same path;
- Kubernetes updates a ConfigMap volume by swapping the ``..data`` symlink to a
  new timestamped directory, so the path's target changes while the symlink
  the path names (``config.yaml -> ..data/config.yaml``) does not.

A change is acted on once the file has looked the same for one more poll (an
editor or the kubelet may still be writing), and only when its bytes differ
from the last ones seen, so ``touch`` does not reload. Polling a small file a
few times a second costs nothing measurable and works on every filesystem,
bind mounts included, where inotify does not follow symlink swaps.

:class:`Reloader` validates the new file with the same parser as at startup and
hands it to a callback that swaps the engine's routing state; if anything is
wrong, nothing changes and the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

from .config import Config, ConfigError

log = logging.getLogger(__name__)

#: Seconds between two looks at the file: a change is applied within two polls.
POLL_INTERVAL = 0.5

Signature = tuple[str, int, int, int, int]


def file_signature(path: str) -> Signature | None:
    """What the path resolves to and that file's identity, or None while it cannot be read."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


class FileWatch:
    """Calls ``on_change`` when the file at ``path`` has new content that has settled.

    A loop timer, not a task: each poll is one ``stat`` (and one read when the
    stat changed).
    """

    def __init__(self, path: str, on_change: Callable[[], object], interval: float = POLL_INTERVAL) -> None:
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self._signature = file_signature(path)
        self._digest = file_digest(path)
        #: A signature seen once and not yet acted on (waiting for it to settle).
        self._pending: Signature | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._poll)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def seen(self) -> None:
        """Take the file as it is now as applied (after a reload that SIGHUP started)."""
        self._signature = file_signature(self.path)
        self._digest = file_digest(self.path)
        self._pending = None

    def _poll(self) -> None:
        try:
            self._check()
        except Exception:  # a watch that dies silently is worse than a logged error
            log.exception("config watch: checking %s failed", self.path)
        finally:
            if self._timer is not None:
                self._timer = asyncio.get_running_loop().call_later(self.interval, self._poll)

    def _check(self) -> None:
        sig = file_signature(self.path)
        if sig is None or sig == self._signature:
            # Gone for a moment (a rename in progress) or unchanged: nothing to do yet.
            self._pending = None
            return
        if sig != self._pending:
            self._pending = sig
            return
        # The same new signature twice in a row: the writer is done.
        self._pending = None
        self._signature = sig
        digest = file_digest(self.path)
        if digest is None or digest == self._digest:
            return
        self._digest = digest
        self.on_change()


@dataclass(frozen=True)
class ConfigDiff:
    """What a new config changes, by route name, and what it cannot change live."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    #: One line per setting that only a restart applies ("listen.port: 8080 -> 9090").
    needs_restart: tuple[str, ...]
    #: Top-level settings other than routes that changed (allowed_origins, limits, log...).
    settings: tuple[str, ...]

    def summary(self) -> str:
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed))
            if names
        ]
        if self.settings:
            parts.append(f"settings {', '.join(self.settings)}")
        return "; ".join(parts) or "no changes"


#: Sections that the listeners were opened with: a new value needs a restart.
RESTART_SECTIONS = ("listen", "admin")


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    old_routes = {r.name: r for r in old.routes}
    new_routes = {r.name: r for r in new.routes}
    needs_restart = []
    for section in RESTART_SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        for f in fields(before):
            a, b = getattr(before, f.name), getattr(after, f.name)
            if a != b:
                needs_restart.append(f"{section}.{f.name}: {a} -> {b}")
    settings = [
        f.name
        for f in fields(old)
        if f.name not in ("routes", *RESTART_SECTIONS) and getattr(old, f.name) != getattr(new, f.name)
    ]
    return ConfigDiff(
        added=tuple(n for n in new_routes if n not in old_routes),
        removed=tuple(n for n in old_routes if n not in new_routes),
        changed=tuple(n for n in new_routes if n in old_routes and old_routes[n] != new_routes[n]),
        needs_restart=tuple(needs_restart),
        settings=tuple(settings),
    )


@dataclass
class ReloadStatus:
    """What status.json, the status page and the metrics say about reloads."""

    generation: int = 1
    ok: int = 0
    errors: int = 0
    #: "ok" or "failed", with when (Unix time) and, for a failure, the reason.
    last_outcome: str | None = None
    last_at: float | None = None
    last_reason: str | None = None

    def summary(self) -> str | None:
        if self.last_outcome is None or self.last_at is None:
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_at))
        if self.last_outcome == "ok":
            return f"ok at {when}"
        return f"failed at {when}: {self.last_reason}"

    def as_json(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "last_reload": self.summary(),
            "reloads": {"ok": self.ok, "error": self.errors},
        }


class Reloader:
    """Validates a new config with the startup parser, then hands it to ``apply``.

    ``apply(new, diff)`` swaps the running state and may raise ConfigError (a
    route whose credentials cannot be built); nothing changes then. Reloads
    run one at a time, in the order they were asked for.
    """

    def __init__(
        self,
        path: str | None,
        current: Config,
        apply: Callable[[Config, ConfigDiff], Awaitable[None]],
        *,
        load: Callable[[str], Config],
        status: ReloadStatus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.current = current
        self.apply = apply
        self.load = load
        self.clock = clock
        self.status = status or ReloadStatus()
        self.watch: FileWatch | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    def start_watch(self, interval: float = POLL_INTERVAL) -> None:
        if self.path is None:
            return
        self.watch = FileWatch(self.path, lambda: self.trigger("file changed"), interval)
        self.watch.start()

    def trigger(self, why: str) -> None:
        """Reload soon (from a signal handler or the watch)."""
        task = asyncio.get_running_loop().create_task(self.reload(why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        for task in self._tasks:
            task.cancel()

    async def reload(self, why: str) -> bool:
        """Reload now; True when a new config was applied."""
        if self.path is None:
            log.info("%s: nothing to reload (no config file: the command line's routes stay)", why)
            return False
        async with self._lock:
            return await self._reload(self.path, why)

    async def _reload(self, path: str, why: str) -> bool:
        if self.watch is not None:
            self.watch.seen()
        started = time.perf_counter()
        try:
            new = self.load(path)
            diff = diff_configs(self.current, new)
            await self.apply(new, diff)
        except ConfigError as e:
            for problem in e.errors:
                log.error("config reload (%s): %s", why, problem)
            log.error("config reload failed: the previous config (generation %d) keeps serving", self.status.generation)
            self._done("failed", "; ".join(e.errors))
            return False
        for line in diff.needs_restart:
            log.warning("config reload: %s needs a restart; the rest is applied", line)
        self.current = new
        self.status.generation += 1
        self._done("ok", None)
        log.info(
            "config reloaded (%s) in %.0f ms: generation %d; %s",
            why,
            (time.perf_counter() - started) * 1000,
            self.status.generation,
            diff.summary(),
        )
        return True

    def _done(self, outcome: str, reason: str | None) -> None:
        st = self.status
        st.last_outcome, st.last_at, st.last_reason = outcome, self.clock(), reason
        if outcome == "ok":
            st.ok += 1
        else:
            st.errors += 1
