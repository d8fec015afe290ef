"""The service-set state file (what the tests and later commands read) and the backend a
state names: below both the manager and the warm sets, which each use them."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Backend, Endpoint, ServiceError

STATE_VERSION = 2  # 2: services as kinds (every local endpoint has extra["dir"])


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


def stop_endpoint(backend: Backend, endpoint: Endpoint) -> bool | None:
    """Stop one service; whether it was running (True) or already gone (False), or None
    when stopping it failed. Never raises: clean-ups go on to the next service."""
    try:
        alive = backend.alive(endpoint)
    except Exception:  # noqa: BLE001 - cannot tell: stop it anyway
        alive = True
    try:
        backend.stop(endpoint)
    except Exception:  # noqa: BLE001 - keep stopping the others
        return None
    return alive
