"""Real Postgres, Redis, Kafka, RabbitMQ and Prometheus for the labs, run by one of three
backends (local processes, docker containers, external URLs); each service one registered
:class:`ServiceKind` under ``kinds/``."""

from . import kinds as _kinds  # noqa: F401 - registers every service kind
from .base import Backend, Endpoint, ServiceError, ServiceKind, kind, kinds, service_names
from .manager import ServiceSet, make_backend, resolve_backend_name

SERVICE_NAMES = service_names()

__all__ = ["SERVICE_NAMES", "Backend", "Endpoint", "ServiceError", "ServiceKind", "ServiceSet",
           "kind", "kinds", "make_backend", "resolve_backend_name"]
