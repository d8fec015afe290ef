"""Which backend runs the services, and the set of services a run uses.

A :class:`ServiceSet` starts only the services asked for, records them in a state file (read
by the pytest plugin in the test process), and stops them at the end, on Ctrl-C too. A warm
set (``labrunner services up``) lives in a well-known state file and is reused by later runs;
``labrunner services down`` stops it and whatever a crashed run left behind.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Backend, Endpoint, ServiceError, write_json_atomic
from .local.process import pid_alive, remove_tree, runtime_dir

STATE_VERSION = 2  # 2: services as kinds (every local endpoint has extra["dir"])
BACKENDS = ("auto", "local", "docker", "external")


def docker_answers() -> bool:
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


def make_backend(name: str, tied_to_parent: bool = True) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(tied_to_parent=tied_to_parent)
    if name == "external":
        from .external import ExternalBackend

        return ExternalBackend()
    if name == "docker":
        from .docker import DockerBackend

        return DockerBackend(tied_to_parent=tied_to_parent)
    raise ServiceError(f"unknown backend {name!r}")


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

    @classmethod
    def ephemeral(cls, backend_name: str) -> ServiceSet:
        workdir = runtime_dir() / f"run-{os.getpid()}-{secrets.token_hex(3)}"
        workdir.mkdir(parents=True)
        # Its services' users pass through to their own folders; the state file (with the
        # services' passwords) is this user's alone.
        os.chmod(workdir, 0o711)
        return cls(make_backend(backend_name), workdir, workdir / "state.json")

    @classmethod
    def warm_set(cls, backend_name: str) -> ServiceSet:
        """The long-lived set: services started here outlive this process."""
        workdir = runtime_dir() / f"warm-{backend_name}"
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o711)
        state = warm_state_file(backend_name)
        service_set = cls(make_backend(backend_name, tied_to_parent=False), workdir, state,
                          warm=True)
        service_set.endpoints = {
            name: ep for name, ep in read_state(state).items()
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

    def save(self) -> None:
        write_json_atomic(self.state_file, {
            "version": STATE_VERSION,
            "backend": self.backend.name,
            "owner_pid": None if self.warm else os.getpid(),
            "workdir": str(self.workdir),
            "services": {name: ep.to_json() for name, ep in self.endpoints.items()},
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


def read_state(path: Path) -> dict[str, Endpoint]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if data.get("version") != STATE_VERSION:
        return {}
    return {name: Endpoint.from_json(ep) for name, ep in data.get("services", {}).items()}


def read_state_backend(path: Path) -> str:
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("backend", "local"))
    except (OSError, ValueError):
        return "local"


def leftovers() -> list[Path]:
    """State files of runs whose owner is gone (crashed, killed) plus warm sets."""
    root = runtime_dir()
    found = sorted(root.glob("warm-*.json"))
    for state in sorted(root.glob("run-*/state.json")):
        try:
            owner = json.loads(state.read_text(encoding="utf-8")).get("owner_pid")
        except (OSError, ValueError):
            owner = None
        if not (isinstance(owner, int) and owner != os.getpid() and pid_alive(owner)):
            found.append(state)
    return found


def clean_leftovers() -> list[str]:
    """Stop every warm service and everything crashed runs left; return what was stopped."""
    stopped: list[str] = []
    for state in leftovers():
        backend = make_backend(read_state_backend(state), tied_to_parent=False)
        for name, endpoint in read_state(state).items():
            try:
                backend.stop(endpoint)
                stopped.append(f"{backend.name}:{name}")
            except Exception:  # noqa: BLE001 - keep going; report what we could stop
                continue
        state.unlink(missing_ok=True)
        if state.parent != runtime_dir():
            remove_tree(state.parent)
        else:
            remove_tree(runtime_dir() / state.stem)
    # Folders of runs that died before writing any state.
    for folder in runtime_dir().glob("run-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)) and not (folder / "state.json").exists():
            remove_tree(folder)
    if docker_answers():
        from .docker import remove_labelled

        stopped += remove_labelled()
    return stopped
