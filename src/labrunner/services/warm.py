"""Warm sets: the services a workspace keeps running between its runs.

A run leaves the services it started running for an idle time (``LABRUNNER_WARM_IDLE``
seconds, default five minutes; ``labrunner run --no-keep`` opts out), and the next run of the
same workspace reuses them. Each set belongs to one owner folder (the workspace, or the
labrunner checkout for ``--solutions``/``--starters`` runs): a second workspace gets a set of
its own. Layout, in the runtime dir::

    warm-<backend>-<key>/          key: a hash of the owner's resolved path
        state.json                 the endpoints (the run state format) + "warm": owner,
                                   idle seconds, deadline (epoch s, None when pinned)
        users/<pid>                one per live run using the set (its start time, so a
                                   reused pid is not mistaken for it): the reference count
        reaper.pid                 the detached reaper waiting for the deadline
        postgres/ kafka/ ...       the services' own folders
    warm-<backend>-<key>.lock      flock: starting into, expiring and stopping the set

Nothing outlives the deadline: the reaper (``python -m labrunner.services.reaper``, one per
set, detached) sleeps until it, waits while a live run uses the set, then stops every
service, removes the folder and exits; a set whose reaper died is expired by the next
labrunner command that looks (``run``, ``services status|down``). ``labrunner services up``
pins a set (no deadline) until ``services down``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import LabrunnerError
from .base import Endpoint, write_json_atomic
from .local.process import pid_alive, remove_tree, runtime_dir, terminate

ENV_IDLE = "LABRUNNER_WARM_IDLE"
DEFAULT_IDLE = 300.0
REAPER_MODULE = "labrunner.services.reaper"


def idle_seconds(explicit: float | None = None) -> float:
    """How long a run's services stay warm after it: ``explicit``, else $LABRUNNER_WARM_IDLE,
    else five minutes; 0 means not at all."""
    if explicit is not None:
        return max(0.0, explicit)
    raw = os.environ.get(ENV_IDLE, "").strip()
    if not raw:
        return DEFAULT_IDLE
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise LabrunnerError(f"{ENV_IDLE}={raw!r}: give the idle time in seconds "
                             "(0: do not keep services warm)") from None


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return int(stat.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_reaper(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return REAPER_MODULE.encode() in cmd and pid_alive(pid)


class WarmSet:
    """One owner's warm set on one backend (see the module's docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state_file = folder / "state.json"
        self.users_dir = folder / "users"
        self.lock_file = folder.with_name(folder.name + ".lock")

    @classmethod
    def of(cls, backend: str, owner: Path) -> WarmSet:
        key = hashlib.sha256(str(owner.resolve()).encode()).hexdigest()[:12]
        return cls(runtime_dir() / f"warm-{backend}-{key}")

    @staticmethod
    def all() -> list[WarmSet]:
        return [WarmSet(p) for p in sorted(runtime_dir().glob("warm-*-*"))
                if p.is_dir()]

    # --- state -----------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def meta(self) -> dict[str, Any]:
        meta = self.read().get("warm")
        return meta if isinstance(meta, dict) else {}

    def backend_name(self) -> str:
        return str(self.read().get("backend") or self.folder.name.split("-")[1])

    def endpoints(self) -> dict[str, Endpoint]:
        from .state import read_state

        return read_state(self.state_file)

    def write_meta(self, **changes: Any) -> None:
        data = self.read()
        if not data:
            return
        data["warm"] = {**self.meta(), **changes}
        write_json_atomic(self.state_file, data, mode=0o600)   # it holds passwords

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def acquire(self) -> Any:
        """The lock, held until :func:`release` (from any thread)."""
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a")  # noqa: SIM115 - released by release()
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    @staticmethod
    def release(handle: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # --- users (the reference count) --------------------------------------------------------

    def add_user(self, pid: int) -> None:
        self.users_dir.mkdir(parents=True, exist_ok=True)
        (self.users_dir / str(pid)).write_text(str(process_start(pid) or 0), encoding="ascii")

    def remove_user(self, pid: int) -> None:
        (self.users_dir / str(pid)).unlink(missing_ok=True)

    def live_users(self, exclude: int | None = None) -> list[int]:
        """Runs using the set now (files of runs that died are removed on the way)."""
        live = []
        for entry in sorted(self.users_dir.glob("*")) if self.users_dir.is_dir() else []:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                started = int(entry.read_text(encoding="ascii") or 0)
            except (OSError, ValueError):
                started = 0
            now = process_start(pid)
            if now is None or (started and now != started) or not pid_alive(pid):
                entry.unlink(missing_ok=True)
                continue
            if pid != exclude:
                live.append(pid)
        return live

    # --- the deadline -----------------------------------------------------------------------

    def deadline(self) -> float | None:
        value = self.meta().get("deadline")
        return float(value) if isinstance(value, (int, float)) else None

    def pinned(self) -> bool:
        return bool(self.meta().get("pinned"))

    def expired(self, now: float | None = None) -> bool:
        deadline = self.deadline()
        return (not self.pinned() and deadline is not None
                and (now or time.time()) >= deadline and not self.live_users())

    def reaper_pid(self) -> int | None:
        try:
            pid = int((self.folder / "reaper.pid").read_text(encoding="ascii"))
        except (OSError, ValueError):
            return None
        return pid if _is_reaper(pid) else None

    def ensure_reaper(self) -> None:
        """Start the detached reaper unless one is already waiting (call under the lock)."""
        if self.pinned() or self.reaper_pid() is not None:
            return
        proc = subprocess.Popen(
            [sys.executable, "-m", REAPER_MODULE, str(self.folder)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
            env={**os.environ, "LABRUNNER_RUNTIME_DIR": str(runtime_dir())},
        )
        (self.folder / "reaper.pid").write_text(str(proc.pid), encoding="ascii")
        # Not waited for here: it outlives this process, and init reaps it.
        proc.returncode = 0

    # --- stopping ---------------------------------------------------------------------------

    def stop_all(self, kill_reaper: bool = True) -> tuple[list[str], list[str]]:
        """Stop every service of the set and remove it (call under the lock); return the
        services that were running and were stopped, and those that were already gone."""
        from .state import make_backend, stop_endpoint

        stopped: list[str] = []
        gone: list[str] = []
        backend = make_backend(self.backend_name(), tied_to_parent=False)
        for name, endpoint in self.endpoints().items():
            alive = stop_endpoint(backend, endpoint)
            (stopped if alive is not False else gone).append(f"{backend.name}:{name}")
        reaper = self.reaper_pid()
        if kill_reaper and reaper is not None and reaper != os.getpid():
            terminate(reaper, timeout=5, group=False)
        remove_tree(self.folder)
        self.lock_file.unlink(missing_ok=True)
        return stopped, gone


def expire_due() -> list[str]:
    """Stop the warm sets whose idle deadline passed with no live user and no reaper left to
    do it (it was killed); return what was stopped."""
    stopped: list[str] = []
    for warm in WarmSet.all():
        if not warm.expired() or warm.reaper_pid() is not None:
            continue
        with warm.locked():
            if warm.expired():
                stopped += warm.stop_all()[0]
    return stopped

