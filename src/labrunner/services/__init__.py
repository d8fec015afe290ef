"""Real Postgres, Redis, Kafka and RabbitMQ for the labs, run by one of three backends."""

from .base import SERVICE_NAMES, Backend, Endpoint, ServiceError
from .manager import ServiceSet, make_backend, resolve_backend_name

__all__ = ["SERVICE_NAMES", "Backend", "Endpoint", "ServiceError", "ServiceSet",
           "make_backend", "resolve_backend_name"]
