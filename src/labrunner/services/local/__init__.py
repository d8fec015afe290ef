"""The ``local`` backend: each service a child process of the runner on loopback."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..base import Endpoint, ServiceError
from . import kafka, postgres, rabbitmq, redis

MODULES: dict[str, ModuleType] = {
    "postgres": postgres,
    "redis": redis,
    "kafka": kafka,
    "rabbitmq": rabbitmq,
}


class LocalBackend:
    name = "local"

    def __init__(self, tied_to_parent: bool = True) -> None:
        # A warm set (``labrunner services up``) outlives the command that started it.
        self.tied_to_parent = tied_to_parent

    def available(self) -> str | None:
        return None

    def missing(self, service: str) -> str | None:
        """Why ``service`` cannot run locally here, with the command that fixes it."""
        reason: str | None = MODULES[service].missing()
        return reason

    def start(self, service: str, workdir: Path) -> Endpoint:
        reason = self.missing(service)
        if reason:
            raise ServiceError(reason)
        endpoint: Endpoint = MODULES[service].start(workdir, tied_to_parent=self.tied_to_parent)
        return endpoint

    def stop(self, endpoint: Endpoint) -> None:
        MODULES[endpoint.service].stop(endpoint)

    def restart(self, endpoint: Endpoint) -> Endpoint:
        restarted: Endpoint = MODULES[endpoint.service].restart(endpoint)
        return restarted

    def alive(self, endpoint: Endpoint) -> bool:
        return bool(MODULES[endpoint.service].alive(endpoint))
