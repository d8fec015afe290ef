"""Each local service for real: starts on a free port, answers, restarts with its data,
and leaves no process or folder behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from labrunner.services import kind
from labrunner.services.kinds import kafka as kf
from labrunner.services.kinds import postgres as pg
from labrunner.services.kinds import rabbitmq as rmq
from labrunner.services.kinds import redis as rd
from labrunner.services.local import LocalBackend
from labrunner.services.local.process import pid_alive
from labrunner.services.manager import ServiceSet


def _pids(endpoint: object) -> list[int]:
    extra = endpoint.extra  # type: ignore[attr-defined]
    return [int(extra["pid"])] if "pid" in extra else []


@pytest.mark.parametrize("service", ["postgres", "redis", "kafka", "rabbitmq", "prometheus"])
def test_start_ready_stop_leaves_nothing(service: str) -> None:
    service_set = ServiceSet.ephemeral("local")
    started = time.monotonic()
    endpoint = service_set.ensure([service])[service]
    assert endpoint.host == "127.0.0.1" and endpoint.port not in (5432, 6379, 9092, 5672, 9090)
    assert kind(service).ready(endpoint)
    pids = _pids(endpoint)
    assert pids and all(pid_alive(p) for p in pids)
    workdir = service_set.workdir
    service_set.stop()
    assert not any(pid_alive(p) for p in pids), f"{service} still running"
    assert not workdir.exists(), f"{workdir} left behind"
    assert time.monotonic() - started < 90


def test_postgres_restart_keeps_committed_data(local_services: ServiceSet) -> None:
    endpoint = local_services.ensure(["postgres"])["postgres"]
    import psycopg

    dsn = pg.create_database(endpoint, "lr_restart_check")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    LocalBackend().restart(endpoint, mode="immediate")  # a crash, then WAL replay
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM t").fetchone() == (7,)
    pg.drop_database(endpoint, "lr_restart_check")


def test_redis_restart_keeps_aof_data(tmp_path: Path) -> None:
    import redis

    service_set = ServiceSet.ephemeral("local")
    try:
        endpoint = service_set.ensure(["redis"])["redis"]
        client = redis.Redis(host=endpoint.host, port=endpoint.port, db=3,
                             username=endpoint.username, password=endpoint.password)
        client.config_set("appendonly", "yes")
        client.set("kept", "yes")
        LocalBackend().restart(endpoint)
        client = redis.Redis(host=endpoint.host, port=endpoint.port, db=3,
                             username=endpoint.username, password=endpoint.password)
        assert client.get("kept") == b"yes"
    finally:
        service_set.stop()


def test_namespaces_are_isolated(local_services: ServiceSet) -> None:
    endpoints = local_services.ensure(["postgres", "redis"])
    first = rd.allocate_db(endpoints["redis"])
    second = rd.allocate_db(endpoints["redis"])
    assert first != second
    a = pg.create_database(endpoints["postgres"], "lr_iso_a")
    b = pg.create_database(endpoints["postgres"], "lr_iso_b")
    assert a != b
    for name in ("lr_iso_a", "lr_iso_b"):
        pg.drop_database(endpoints["postgres"], name)


def test_rabbitmq_vhost_per_run(local_services: ServiceSet) -> None:
    import pika

    endpoint = local_services.ensure(["rabbitmq"])["rabbitmq"]
    url = rmq.create_vhost(endpoint, "lr_test_vhost")
    pika.BlockingConnection(pika.URLParameters(url)).close()
    rmq.delete_vhost(endpoint, "lr_test_vhost")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(url))


def test_kafka_metadata_and_prefix_cleanup(local_services: ServiceSet) -> None:
    from confluent_kafka import Producer

    endpoint = local_services.ensure(["kafka"])["kafka"]
    producer = Producer({"bootstrap.servers": endpoint.url, "log_level": 0})
    producer.produce("lr_cleanup_check.t", b"v")
    assert producer.flush(20) == 0
    kf.delete_prefix(endpoint, "lr_cleanup_check")
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        topics = AdminClient({"bootstrap.servers": endpoint.url}).list_topics(timeout=5).topics
        if "lr_cleanup_check.t" not in topics:
            break
        time.sleep(0.2)
    assert "lr_cleanup_check.t" not in topics


def test_rabbitmq_node_loads_only_the_applications_it_runs(tmp_path: Path) -> None:
    """The node's plugins folder holds rabbit, the management plugin and what they need,
    not the 70 applications Debian ships: each one on the code path costs start-up time."""
    if rmq.server() is None:
        pytest.skip("rabbitmq-server is not installed")
    script = rmq.private_server(tmp_path / "server", rmq.PLUGINS)
    assert script is not None, "Debian's RabbitMQ layout was not recognised"
    plugins = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "server" / "plugins").iterdir()}
    assert {"rabbit", "rabbit_common", "rabbitmq_prelaunch", "rabbitmq_management",
            "rabbitmq_management_agent", "cowboy", "ranch", "ra"} <= plugins
    assert not plugins & {"rabbitmq_mqtt", "rabbitmq_stomp", "rabbitmq_shovel",
                          "rabbitmq_federation", "rabbitmq_auth_backend_ldap"}
    assert len(plugins) < 40
    sbin = tmp_path / "server" / "sbin"
    # Copies, not links: rabbitmq-env finds RABBITMQ_HOME (and so the plugins) from where
    # the script really is.
    assert not (sbin / "rabbitmq-server").is_symlink()
    assert (sbin / "rabbitmq-env").is_file() and (sbin / "rabbitmq-defaults").is_file()
