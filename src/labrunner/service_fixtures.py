"""The service side of the pytest plugin: the session's services and one fixture per service
kind (``postgres``, ``redis_db``, ``kafka``, ``rabbitmq``, ``prometheus``: each kind's
:attr:`ServiceKind.fixture`), each yielding the test's own namespace on a real service.

Services come from the runner's state file or, when pytest is run directly
(``pytest labs/ph2``), are started here for the session and stopped at its end. A test's
restart, stop and start of a service go to the backend that runs it, or, in a graded run whose
services belong to another uid, to the runner over its control socket.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .services.base import Endpoint, ServiceError, ServiceKind, kinds
from .services.isolation import namespace, new_run_id


class SessionServices:
    """The session's services: read from the runner's state file, or started here."""

    def __init__(self, backend_option: str | None, state_path: str | None,
                 run_id: str | None) -> None:
        self.backend_option = backend_option
        # Every pytest process of a run (one a lab, one a variant under `dev check`) counts
        # its names from 1: a part of its own keeps a test's names from meeting those of
        # the same test in the process before, whose topics may still be being deleted.
        self.run_id = (run_id or new_run_id()) + secrets.token_hex(2)
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        self.state_path = state_path
        self.own: Any = None  # a ServiceSet we started, stopped at session end
        self.backend_name = "local"
        self.endpoints: dict[str, Endpoint] = {}
        self.suspended: set[str] = set()  # stopped by a test, to be started at its end
        if self.state_path:
            from .services.manager import read_state, read_state_backend

            self.endpoints = read_state(Path(self.state_path))
            self.backend_name = read_state_backend(Path(self.state_path))

    def endpoint(self, name: str) -> Endpoint:
        with self.lock:
            if name in self.endpoints:
                return self.endpoints[name]
            if self.state_path:
                raise ServiceError(f"the runner did not start {name}: add it to the lab's "
                                   "'services' in lab.toml")
            from .services.manager import ServiceSet, resolve_backend_name

            if self.own is None:
                self.backend_name = resolve_backend_name(self.backend_option)
                self.own = ServiceSet.ephemeral(self.backend_name)
            self.endpoints.update(self.own.ensure([name]))
            return self.endpoints[name]

    def act(self, name: str, action: str, mode: str | None = None) -> None:
        """``restart`` (in ``mode``), ``suspend`` or ``resume`` the service ``name``."""
        endpoint = self.endpoint(name)
        from .services.private import ENV_CONTROL

        control = os.environ.get(ENV_CONTROL)
        if control:
            # A graded run's private services belong to another uid: the runner acts for us.
            from .services.private import request_restart

            options = {"mode": mode} if mode is not None else {}
            self.endpoints[name] = request_restart(control, name, action=action, **options)
        elif self.backend_name == "external" and action == "restart":
            pytest.skip(f"not verifiable on the external backend: {name} cannot be restarted")
        else:
            from .services.manager import make_backend

            backend = make_backend(self.backend_name, tied_to_parent=False)
            try:
                if action == "restart":
                    backend.restart(endpoint, mode)
                else:
                    getattr(backend, action)(endpoint)
            except ServiceError as exc:
                if self.backend_name != "external":
                    raise
                verb = "stop" if action == "suspend" else "start"
                pytest.fail(f"this lab needs to {verb} {name} mid-test, which the external "
                            f"backend cannot do: {exc}", pytrace=False)
        if action == "suspend":
            self.suspended.add(name)
        elif action == "resume":
            self.suspended.discard(name)

    def next_name(self, label: str) -> str:
        with self.lock:
            return namespace(self.run_id, next(self.counter), label)

    def close(self) -> None:
        if self.own is not None:
            self.own.stop()


class _Scope:
    """One test's view of one service (what :class:`ServiceScope` promises the kinds)."""

    def __init__(self, services: SessionServices, name: str, label: str) -> None:
        self.services = services
        self.name = name
        self.label = label

    def new_name(self) -> str:
        return self.services.next_name(self.label)

    def endpoint(self) -> Endpoint:
        return self.services.endpoint(self.name)

    def restart(self, mode: str | None = None) -> None:
        self.services.act(self.name, "restart", mode)

    def suspend(self) -> None:
        self.services.act(self.name, "suspend")

    def resume(self) -> None:
        self.services.act(self.name, "resume")


def _fixture_for(service: ServiceKind) -> Callable[..., Iterator[Any]]:
    def fixture(lab_services: SessionServices,
                request: pytest.FixtureRequest) -> Iterator[Any]:
        try:
            endpoint = lab_services.endpoint(service.name)
        except ServiceError as exc:
            pytest.fail(f"{service.name} is not available: {exc}", pytrace=False)
        scope = _Scope(lab_services, service.name, request.node.name[:12])
        handle = service.open(endpoint, scope)
        yield handle
        if service.name in lab_services.suspended:  # a test left it stopped
            scope.resume()
        try:
            service.close(handle, scope)
        except Exception:  # noqa: BLE001 - cleanup is best effort (the server may be gone)
            pass

    fixture.__name__ = service.fixture
    fixture.__doc__ = f"The test's own namespace on {service.name}."
    return pytest.fixture(name=service.fixture)(fixture)


def service_fixtures() -> dict[str, Callable[..., Iterator[Any]]]:
    """One fixture per registered service kind, by fixture name."""
    return {service.fixture: _fixture_for(service) for service in kinds()}
