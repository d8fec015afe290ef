"""Which backend runs the services, and the set of services a run uses.

A :class:`ServiceSet` starts only the services asked for, records them in a state file (read
by the pytest plugin in the test process), and stops them at the end, on Ctrl-C too.
:class:`Startup` starts several at once, one thread each, and tells who waits which are
ready. Warm sets (a workspace's services kept for the next run, ``labrunner services up``)
are in :mod:`labrunner.services.warm`; ``labrunner services down`` stops them (unless a live
run uses one) and whatever a crashed run left behind.
"""

from __future__ import annotations

import contextvars
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Backend, Endpoint, ServiceError, StartCancelled, start_cancel, write_json_atomic
from .local.process import pid_alive, remove_tree, runtime_dir
from .state import STATE_VERSION, make_backend, read_state, read_state_backend, stop_endpoint

__all__ = ["STATE_VERSION", "make_backend", "read_state", "read_state_backend"]

BACKENDS = ("auto", "local", "docker", "external")


def docker_answers() -> bool:
    # No socket and no DOCKER_HOST: nothing can answer, and importing the Docker SDK to
    # find that out costs every `labrunner run` on the default backend about 0.1 s.
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        from .docker import DockerBackend
    except ImportError:
        return False
    return DockerBackend().available() is None


def resolve_backend_name(requested: str | None) -> str:
    requested = (requested or os.environ.get("LABRUNNER_BACKEND") or "auto").lower()
    if requested not in BACKENDS:
        raise ServiceError(
            f"unknown backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "auto":
        return "docker" if docker_answers() else "local"
    return requested


def warm_state_file(backend: str) -> Path:
    return runtime_dir() / f"warm-{backend}.json"


@dataclass
class ServiceSet:
    backend: Backend
    workdir: Path
    state_file: Path
    warm: bool = False
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    started_here: set[str] = field(default_factory=set)
    # The state file names the services' passwords: its owner's alone, unless a grader
    # shares the set with sandboxed runs (a stated limit of shared services).
    state_mode: int = 0o600
    meta: dict[str, Any] = field(default_factory=dict)   # more keys for the state file
    startup: Any = None   # the Startup filling this set, when a run starts services at once

    @classmethod
    def ephemeral(cls, backend_name: str) -> ServiceSet:
        workdir = runtime_dir() / f"run-{os.getpid()}-{secrets.token_hex(3)}"
        workdir.mkdir(parents=True)
        # Its services' users pass through to their own folders; the state file (with the
        # services' passwords) is this user's alone.
        os.chmod(workdir, 0o711)
        return cls(make_backend(backend_name), workdir, workdir / "state.json")

    @classmethod
    def warm_set(cls, backend_name: str, owner: Path) -> ServiceSet:
        """``owner``'s long-lived set: services started here outlive this process (see
        :mod:`labrunner.services.warm`); its live endpoints."""
        from .warm import WarmSet

        warm = WarmSet.of(backend_name, owner)
        warm.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(warm.folder, 0o711)
        service_set = cls(make_backend(backend_name, tied_to_parent=False), warm.folder,
                          warm.state_file, warm=True)
        meta = warm.meta() or {"owner": str(owner.resolve()), "deadline": None,
                               "pinned": False, "idle": 0}
        service_set.meta = {"warm": meta}
        service_set.endpoints = {
            name: ep for name, ep in read_state(warm.state_file).items()
            if service_set.backend.alive(ep)
        }
        return service_set

    def ensure(self, services: Iterable[str], on_start: Any = None) -> dict[str, Endpoint]:
        """Start whichever of ``services`` is not running yet; return all endpoints."""
        for name in services:
            if name in self.endpoints:
                continue
            if on_start is not None:
                on_start(name)
            endpoint = self.backend.start(name, self.workdir)
            self.endpoints[name] = endpoint
            self.started_here.add(name)
            self.save()
        self.save()  # also when every service was reused: the test process reads this file
        return dict(self.endpoints)

    def save(self, **more: Any) -> None:
        write_json_atomic(self.state_file, {
            "version": STATE_VERSION,
            "backend": self.backend.name,
            "owner_pid": None if self.warm else os.getpid(),
            "workdir": str(self.workdir),
            "services": {name: ep.to_json() for name, ep in self.endpoints.items()},
            # What this set started itself and must stop (the rest is a warm set's, reused).
            "own": sorted(self.started_here),
            **self.meta,
            **more,
        }, mode=self.state_mode)

    def stop(self, names: Iterable[str] | None = None) -> None:
        """Stop the given services (all by default) and forget them."""
        targets = list(names) if names is not None else list(self.endpoints)
        errors: list[str] = []
        for name in targets:
            endpoint = self.endpoints.pop(name, None)
            if endpoint is None:
                continue
            try:
                self.backend.stop(endpoint)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(f"{name}: {exc}")
        if self.endpoints:
            self.save()
        else:
            self.state_file.unlink(missing_ok=True)
            if not self.warm or not any(self.workdir.iterdir()):
                remove_tree(self.workdir)
        if errors:
            raise ServiceError("could not stop: " + "; ".join(errors))


class Startup:
    """Start services at once, one thread each (a start is mostly waiting on a child
    process), into ``target``; whoever needs some of them waits for those alone.

    A thread that started services tied to this process stays alive until :meth:`release`:
    the kernel's parent-death signal follows the thread that spawned a child, not the
    process. :meth:`cancel` (Ctrl-C) makes every start still waiting give up and remove what
    it began, and no more "starting ..." is announced.
    """

    def __init__(self, target: ServiceSet, names: Sequence[str],
                 on_start: Callable[[str], None] | None = None,
                 on_ready: Callable[[str, Endpoint, float], None] | None = None,
                 on_failed: Callable[[str, str], None] | None = None,
                 keep_threads: bool = True) -> None:
        self.target = target
        self.names = [n for n in names if n not in target.endpoints]
        self.on_start, self.on_ready, self.on_failed = on_start, on_ready, on_failed
        self.keep_threads = keep_threads
        self.cancelled = threading.Event()
        self.released = threading.Event()
        self.changed = threading.Condition()
        self.done: dict[str, threading.Event] = {n: threading.Event() for n in self.names}
        self.errors: dict[str, str] = {}
        self.durations: dict[str, float] = {}
        self.order: list[str] = []   # services in the order they became ready
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def begin(self) -> Startup:
        for name in self.names:
            # Each thread in a copy of the caller's context: whose uid runs the services
            # (grading) is a context variable.
            context = contextvars.copy_context()
            thread = threading.Thread(target=context.run, args=(self._one, name),
                                      name=f"start-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _one(self, name: str) -> None:
        start_cancel.set(self.cancelled)
        try:
            if self.cancelled.is_set():
                raise StartCancelled(f"{name}: start cancelled")
            if self.on_start is not None:
                self.on_start(name)
            began = time.monotonic()
            endpoint = self.target.backend.start(name, self.target.workdir)
            took = time.monotonic() - began
            with self._lock:
                if self.cancelled.is_set():
                    self.target.backend.stop(endpoint)
                    raise StartCancelled(f"{name}: start cancelled")
                self.target.endpoints[name] = endpoint
                self.target.started_here.add(name)
                self.target.save()
                self.durations[name] = took
                self.order.append(name)
            if self.on_ready is not None:
                self.on_ready(name, endpoint, took)
        except StartCancelled:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the labs that need it
            self.errors[name] = str(exc) or type(exc).__name__
            if self.on_failed is not None and not self.cancelled.is_set():
                self.on_failed(name, self.errors[name])
        finally:
            self.done[name].set()
            with self.changed:
                self.changed.notify_all()
        if self.keep_threads:
            self.released.wait()

    # --- who waits ------------------------------------------------------------------------

    def settled(self, names: Iterable[str]) -> bool:
        """Whether each of ``names`` is ready or has failed (others are not ours: ready)."""
        return all(self.done[n].is_set() for n in names if n in self.done)

    def problem(self, names: Iterable[str]) -> str | None:
        """Why one of ``names`` cannot be used (it failed to start), else None."""
        for name in names:
            if name in self.errors:
                return f"{name} could not start: {self.errors[name]}"
        return None

    def wait_change(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait(timeout)

    def wait(self, names: Iterable[str] | None = None) -> None:
        """Block until every one of ``names`` (default: all) is ready or failed."""
        for name in list(names) if names is not None else self.names:
            event = self.done.get(name)
            while event is not None and not event.wait(0.2):
                pass

    def cancel(self) -> None:
        """Stop starting: waits give up at their next poll and remove what they began."""
        self.cancelled.set()
        with self.changed:
            self.changed.notify_all()

    def join(self, timeout: float = 60.0) -> None:
        """Wait for the start threads to finish starting (not for :meth:`release`)."""
        deadline = time.monotonic() + timeout
        for name in self.names:
            self.done[name].wait(max(0.0, deadline - time.monotonic()))

    def release(self) -> None:
        """The services this startup spawned tied to us were stopped: let the threads go."""
        self.released.set()


def _owner(state: Path) -> int | None:
    try:
        owner = json.loads(state.read_text(encoding="utf-8")).get("owner_pid")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, int) else None


def _own_services(state: Path) -> dict[str, Endpoint]:
    """The services a run's state file names as its own (not a warm set's it reused)."""
    try:
        own = json.loads(state.read_text(encoding="utf-8")).get("own")
    except (OSError, ValueError):
        own = None
    endpoints = read_state(state)
    if isinstance(own, list):
        return {name: ep for name, ep in endpoints.items() if name in own}
    return endpoints  # written before "own" existed: all its own


def leftovers() -> list[Path]:
    """State files of runs whose owner is gone (crashed, killed), the old global warm sets,
    and every workspace's warm set (``warm-<backend>-<key>/state.json``)."""
    root = runtime_dir()
    found = sorted(root.glob("warm-*.json"))
    found += [p / "state.json" for p in sorted(root.glob("warm-*-*"))
              if (p / "state.json").is_file()]
    for state in sorted(root.glob("run-*/state.json")):
        owner = _owner(state)
        if not (owner is not None and owner != os.getpid() and pid_alive(owner)):
            found.append(state)
    return found


def live_runs() -> list[tuple[int, Path]]:
    """Runs going on now (their pid and state file): their own services are theirs."""
    runs = []
    for state in sorted(runtime_dir().glob("run-*/state.json")):
        owner = _owner(state)
        if owner is not None and owner != os.getpid() and pid_alive(owner):
            runs.append((owner, state))
    return runs


@dataclass
class CleanReport:
    stopped: list[str] = field(default_factory=list)   # were running, now stopped
    cleared: list[str] = field(default_factory=list)   # were recorded, already gone
    kept: list[str] = field(default_factory=list)      # in use: why each was kept


def clean_leftovers() -> list[str]:
    """Stop what :func:`clean` stops; return the services that were running and stopped."""
    return clean().stopped


def clean(docker: bool = True) -> CleanReport:
    """Stop every warm set no live run uses and everything crashed runs left; keep what a
    live run uses (and say why). Only services that were running count as stopped: the
    entries of services that had already died are cleared and reported apart."""
    from .warm import WarmSet

    report = CleanReport()
    me = os.getpid()
    for warm in WarmSet.all():
        with warm.locked():
            users = warm.live_users(exclude=me)
            names = ", ".join(warm.endpoints()) or "no services"
            if users:
                report.kept.append(
                    f"the warm set of {warm.meta().get('owner', warm.folder.name)} ({names}): "
                    f"in use by labrunner run pid {', '.join(map(str, users))}")
                continue
            stopped, gone = warm.stop_all()
            report.stopped += stopped
            report.cleared += gone
    for state in leftovers():
        if state.parent.name.startswith("warm-") and state.parent.parent == runtime_dir():
            continue  # a workspace's warm set: done above
        backend = make_backend(read_state_backend(state), tied_to_parent=False)
        own = (read_state(state) if state.parent == runtime_dir()
               else _own_services(state))
        for name, endpoint in own.items():
            alive = stop_endpoint(backend, endpoint)
            if alive is None:
                continue  # keep going; report what we could stop
            (report.stopped if alive else report.cleared).append(f"{backend.name}:{name}")
        state.unlink(missing_ok=True)
        if state.parent != runtime_dir():
            remove_tree(state.parent)
        else:
            remove_tree(runtime_dir() / state.stem)
    for run_pid, run_state in live_runs():
        mine = ", ".join(_own_services(run_state)) or "no services of its own"
        report.kept.append(f"labrunner run pid {run_pid} ({mine}): still running; it stops "
                           "them when it ends")
    # Folders of runs that died before writing any state.
    for folder in runtime_dir().glob("run-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)) and not (folder / "state.json").exists():
            remove_tree(folder)
    if docker and docker_answers():
        from .docker import remove_labelled

        report.stopped += remove_labelled()
    return report
