"""The ``local`` backend: each service a child process of the runner on loopback."""

from __future__ import annotations

import socket
from pathlib import Path
from types import ModuleType

from ..base import Endpoint, ServiceError
from . import kafka, postgres, prometheus, rabbitmq, redis

MODULES: dict[str, ModuleType] = {
    "postgres": postgres,
    "redis": redis,
    "kafka": kafka,
    "rabbitmq": rabbitmq,
    "prometheus": prometheus,
}


START_ATTEMPTS = 3


def _remove_partial(service: str, workdir: Path) -> None:
    """Kill and remove what a failed start left (its pid files name the processes)."""
    from .process import pid_alive, remove_tree, terminate

    folder = {"postgres": "pgdata", "redis": "redis", "kafka": "kafka",
              "rabbitmq": "rabbitmq", "prometheus": "prometheus"}[service]
    for pidfile in (workdir / folder).glob("*.pid"):
        try:
            first = pidfile.read_text().split()[0]
            pid = int(first)
        except (OSError, ValueError, IndexError):
            continue
        if pid_alive(pid):
            terminate(pid, timeout=5)
    remove_tree(workdir / folder)


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
        module = MODULES[service]
        for attempt in range(START_ATTEMPTS):
            try:
                endpoint: Endpoint = module.start(workdir, tied_to_parent=self.tied_to_parent)
                return endpoint
            except ServiceError:
                # A free port is only free when we looked: another process may take it before
                # the service binds it. Clean up and try again on fresh ports.
                if attempt == START_ATTEMPTS - 1:
                    raise
                _remove_partial(service, workdir)
        raise AssertionError("unreachable")

    def stop(self, endpoint: Endpoint) -> None:
        MODULES[endpoint.service].stop(endpoint)

    def restart(self, endpoint: Endpoint) -> Endpoint:
        restarted: Endpoint = MODULES[endpoint.service].restart(endpoint)
        return restarted

    def suspend(self, endpoint: Endpoint) -> None:
        MODULES[endpoint.service].stop(endpoint, remove=False)

    def resume(self, endpoint: Endpoint) -> Endpoint:
        # Started again by a test: it must outlive the process that asked.
        MODULES[endpoint.service]._launch(endpoint, tied_to_parent=False)
        return endpoint

    def alive(self, endpoint: Endpoint) -> bool:
        """Still there? Full readiness was proven when the service started; reusing a warm
        one only needs its process and its port, and a run should not pay for importing
        four client libraries to learn that."""
        from .process import pid_alive

        # The pid files, not the pid recorded at start: a lab may have restarted the service.
        pid = int(MODULES[endpoint.service].current_pid(endpoint))
        if pid and not pid_alive(pid):
            return False
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=1):
                return True
        except OSError:
            return False
