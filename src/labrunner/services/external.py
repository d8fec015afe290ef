"""The ``external`` backend: services someone else runs (CI service containers, a course
server), given by URLs in the environment. Nothing is started or stopped here."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from .base import Endpoint, ServiceError

ENV = {
    "postgres": "LABRUNNER_POSTGRES_URL",     # postgresql://user:pass@host:5432/postgres
    "redis": "LABRUNNER_REDIS_URL",           # redis://[:pass@]host:6379/0
    "kafka": "LABRUNNER_KAFKA_BOOTSTRAP",     # host:9092
    "rabbitmq": "LABRUNNER_RABBITMQ_URL",     # amqp://user:pass@host:5672/
    "prometheus": "LABRUNNER_PROMETHEUS_URL",  # http://host:9090
}
RABBITMQ_MANAGEMENT_ENV = "LABRUNNER_RABBITMQ_MANAGEMENT_URL"  # http://host:15672/api
REDIS_DATABASES_ENV = "LABRUNNER_REDIS_DATABASES"
# A folder the external Prometheus reads targets from (file_sd_configs over '<folder>/*.json',
# with the target files' labels kept): without it, tests cannot register their own targets.
PROMETHEUS_TARGETS_ENV = "LABRUNNER_PROMETHEUS_TARGETS_DIR"


def _parse(service: str, value: str) -> Endpoint:
    if service == "kafka":
        host, _, port = value.split(",")[0].rpartition(":")
        return Endpoint(service, "external", host or "127.0.0.1", int(port),
                        extra={"bootstrap": value})
    url = urllib.parse.urlsplit(value)
    if not url.hostname or not url.port:
        raise ServiceError(f"{ENV[service]}={value!r}: give a full URL with host and port")
    extra: dict[str, object] = {}
    if service == "postgres":
        extra["dbname"] = url.path.lstrip("/") or "postgres"
    if service == "redis":
        extra["databases"] = int(os.environ.get(REDIS_DATABASES_ENV, "16"))
    if service == "prometheus":
        extra["url"] = value.rstrip("/")
        targets = os.environ.get(PROMETHEUS_TARGETS_ENV)
        if targets:
            extra["targets_dir"] = targets
    if service == "rabbitmq":
        mgmt = os.environ.get(RABBITMQ_MANAGEMENT_ENV)
        if not mgmt:
            raise ServiceError(
                f"{RABBITMQ_MANAGEMENT_ENV} is not set: the external RabbitMQ needs its "
                "management API (http://host:15672/api) so each run gets its own vhost")
        extra["management_url"] = mgmt.rstrip("/")
    return Endpoint(
        service, "external", url.hostname, url.port,
        username=urllib.parse.unquote(url.username or ""),
        password=urllib.parse.unquote(url.password or ""),
        extra=extra,
    )


class ExternalBackend:
    name = "external"

    def available(self) -> str | None:
        if not any(os.environ.get(var) for var in ENV.values()):
            return f"set {', '.join(ENV.values())} to the services' URLs"
        return None

    def missing(self, service: str) -> str | None:
        if not os.environ.get(ENV[service]):
            return f"{ENV[service]} is not set (the external backend reads URLs from it)"
        return None

    def start(self, service: str, workdir: Path) -> Endpoint:
        reason = self.missing(service)
        if reason:
            raise ServiceError(reason)
        return _parse(service, os.environ[ENV[service]])

    def stop(self, endpoint: Endpoint) -> None:
        """Not ours to stop."""

    def restart(self, endpoint: Endpoint) -> Endpoint:
        raise ServiceError("the external backend cannot restart a service it does not run")

    def suspend(self, endpoint: Endpoint) -> None:
        raise ServiceError(f"the external backend cannot stop {endpoint.service}: it does not "
                           "run it (use --backend local or docker for this lab)")

    def resume(self, endpoint: Endpoint) -> Endpoint:
        raise ServiceError(f"the external backend cannot start {endpoint.service}: it does not "
                           "run it (use --backend local or docker for this lab)")

    def alive(self, endpoint: Endpoint) -> bool:
        from .local import MODULES

        try:
            return bool(MODULES[endpoint.service].ready(endpoint))
        except Exception:  # noqa: BLE001
            return False
