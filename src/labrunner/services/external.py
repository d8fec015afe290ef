"""The ``external`` backend: services someone else runs (CI service containers, a course
server), given by URLs in the environment (each kind names its variable, e.g.
``LABRUNNER_POSTGRES_URL``). Nothing is started or stopped here."""

from __future__ import annotations

import os
from pathlib import Path

from .base import Endpoint, ServiceError, kind, kinds


def _cannot(endpoint: Endpoint, what: str) -> ServiceError:
    return ServiceError(f"the external backend cannot {what} {endpoint.service}: it does not "
                        "run it (use --backend local or docker for this lab)")


class ExternalBackend:
    name = "external"

    def available(self) -> str | None:
        names = [k.external_env for k in kinds()]
        if not any(os.environ.get(var) for var in names):
            return f"set {', '.join(names)} to the services' URLs"
        return None

    def missing(self, service: str) -> str | None:
        env = kind(service).external_env
        if not os.environ.get(env):
            return f"{env} is not set (the external backend reads URLs from it)"
        return None

    def start(self, service: str, workdir: Path) -> Endpoint:
        reason = self.missing(service)
        if reason:
            raise ServiceError(reason)
        what = kind(service)
        return what.parse_external(os.environ[what.external_env])

    def stop(self, endpoint: Endpoint) -> None:
        """Not ours to stop."""

    def restart(self, endpoint: Endpoint, mode: str | None = None) -> Endpoint:
        raise _cannot(endpoint, "restart")

    def suspend(self, endpoint: Endpoint) -> None:
        raise _cannot(endpoint, "stop")

    def resume(self, endpoint: Endpoint) -> Endpoint:
        raise _cannot(endpoint, "start")

    def alive(self, endpoint: Endpoint) -> bool:
        try:
            return bool(kind(endpoint.service).ready(endpoint))
        except Exception:  # noqa: BLE001
            return False
