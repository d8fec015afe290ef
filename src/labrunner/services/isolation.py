"""Namespaces inside a shared service, one per test: a database, a Redis logical database,
a Kafka topic and group prefix, a RabbitMQ vhost. Labs and graded submissions running side by
side on one set of services never see each other's data."""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .base import Endpoint, ServiceError


def namespace(run_id: str, counter: int, label: str = "") -> str:
    """A short unique name usable as database, prefix and vhost: ``lr_3fa2c1_7``."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in label.lower())[:20]
    return f"lr_{run_id}_{counter}" + (f"_{safe}" if safe else "")


def new_run_id() -> str:
    return secrets.token_hex(4)


# --- Postgres -------------------------------------------------------------------------

def create_database(endpoint: Endpoint, name: str) -> str:
    """Create an empty database and return its DSN."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(endpoint.url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(endpoint, name)


def database_url(endpoint: Endpoint, name: str) -> str:
    auth = endpoint.username
    if endpoint.password:
        auth += ":" + urllib.parse.quote(endpoint.password, safe="")
    return f"postgresql://{auth}@{endpoint.host}:{endpoint.port}/{name}"


def drop_database(endpoint: Endpoint, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(endpoint.url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


# --- Redis ----------------------------------------------------------------------------

def redis_databases(endpoint: Endpoint) -> int:
    return int(endpoint.extra.get("databases", 1024 if endpoint.backend != "external" else 16))


def allocate_redis_db(endpoint: Endpoint) -> int:
    """A logical database nobody else is using: a counter in database 0 hands them out
    round-robin over 1..N-1, and the one handed out is flushed before use."""
    import redis

    admin = redis.Redis.from_url(endpoint.url, socket_timeout=5)
    try:
        count = redis_databases(endpoint)
        number = int(admin.incr("labrunner:next-db"))
        index = 1 + (number % (count - 1))
        scoped = redis.Redis(host=endpoint.host, port=endpoint.port, db=index,
                             username=endpoint.username or None,
                             password=endpoint.password or None)
        scoped.flushdb()
        scoped.close()
        return index
    finally:
        admin.close()


def redis_url(endpoint: Endpoint, db: int) -> str:
    auth = ""
    if endpoint.password:
        auth = f"{endpoint.username}:{urllib.parse.quote(endpoint.password, safe='')}@"
    return f"redis://{auth}{endpoint.host}:{endpoint.port}/{db}"


def release_redis_db(endpoint: Endpoint, db: int) -> None:
    import redis

    client = redis.Redis.from_url(redis_url(endpoint, db), socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


# --- Kafka ----------------------------------------------------------------------------

def delete_kafka_prefix(endpoint: Endpoint, prefix: str) -> None:
    """Delete the topics and consumer groups a test made under its prefix."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": endpoint.url, "log_level": 0})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=10).values():
            try:
                future.result(timeout=15)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
    try:
        groups = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
        mine = [g.group_id for g in groups.valid if g.group_id.startswith(prefix)]
        if mine:
            for future in admin.delete_consumer_groups(mine, request_timeout=10).values():
                try:
                    future.result(timeout=15)
                except Exception:  # noqa: BLE001 - a group with members left is skipped
                    pass
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass


# --- RabbitMQ -------------------------------------------------------------------------

def rabbitmq_api(endpoint: Endpoint, method: str, path: str,
                 body: dict[str, Any] | None = None) -> Any:
    base = endpoint.extra.get("management_url") or (
        f"http://{endpoint.host}:{endpoint.extra['management_port']}/api")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    token = base64.b64encode(f"{endpoint.username}:{endpoint.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        if method == "DELETE" and exc.code == 404:
            return None
        raise ServiceError(f"RabbitMQ management API {method} {path}: {exc}") from exc
    return json.loads(payload) if payload else None


def create_vhost(endpoint: Endpoint, vhost: str) -> str:
    """Create a vhost the service's user may use fully; return its AMQP URL."""
    quoted = urllib.parse.quote(vhost, safe="")
    rabbitmq_api(endpoint, "PUT", f"/vhosts/{quoted}")
    user = urllib.parse.quote(endpoint.username, safe="")
    rabbitmq_api(endpoint, "PUT", f"/permissions/{quoted}/{user}",
                 {"configure": ".*", "write": ".*", "read": ".*"})
    return vhost_url(endpoint, vhost)


def vhost_url(endpoint: Endpoint, vhost: str) -> str:
    password = urllib.parse.quote(endpoint.password, safe="")
    return (f"amqp://{endpoint.username}:{password}@{endpoint.host}:{endpoint.port}/"
            f"{urllib.parse.quote(vhost, safe='')}")


def delete_vhost(endpoint: Endpoint, vhost: str) -> None:
    rabbitmq_api(endpoint, "DELETE", f"/vhosts/{urllib.parse.quote(vhost, safe='')}")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
