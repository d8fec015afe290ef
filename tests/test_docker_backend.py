"""The docker backend for real, against whatever Docker daemon DOCKER_HOST names (docker/
ci-docker.sh starts a private one and builds local stand-ins of the official images).

Skipped, with the reason, when no daemon answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from labrunner.services.base import Endpoint, ServiceError
from labrunner.services.kinds import kafka as kf
from labrunner.services.kinds import postgres as pg
from labrunner.services.kinds import rabbitmq as rmq
from labrunner.services.kinds import redis as rd
from labrunner.services.manager import ServiceSet, make_backend

docker_backend = pytest.importorskip("labrunner.services.docker")
DockerBackend = docker_backend.DockerBackend

_REASON = DockerBackend().available()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"docker backend unavailable: {_REASON}"),
    pytest.mark.slow,
]

SERVICES = ("postgres", "redis", "kafka", "rabbitmq")


def _client() -> object:
    return docker_backend._client()


def _containers(**labels: str) -> list[object]:
    client = _client()
    filters = ["labrunner"] + [f"{k}={v}" for k, v in labels.items()]
    try:
        return list(client.containers.list(all=True,  # type: ignore[attr-defined]
                                           filters={"label": filters}))
    finally:
        client.close()  # type: ignore[attr-defined]


def _container(endpoint: Endpoint) -> object:
    client = _client()
    try:
        return client.containers.get(endpoint.extra["container_id"])  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def docker_services() -> Iterator[ServiceSet]:
    service_set = ServiceSet.ephemeral("docker")
    yield service_set
    service_set.stop()


def test_make_backend_gives_the_docker_backend() -> None:
    backend = make_backend("docker")
    assert backend.name == "docker" and backend.available() is None


@pytest.mark.parametrize("service", SERVICES)
def test_start_ready_stop_leaves_nothing(service: str) -> None:
    service_set = ServiceSet.ephemeral("docker")
    started = time.monotonic()
    try:
        endpoint = service_set.ensure([service])[service]
        assert endpoint.backend == "docker"
        assert endpoint.host == "127.0.0.1"
        assert endpoint.port not in (5432, 6379, 9092, 5672)
        assert DockerBackend().alive(endpoint)
        container = _container(endpoint)
        labels = container.labels  # type: ignore[attr-defined]
        assert labels["labrunner"] == "1" and labels["labrunner.service"] == service
        assert labels["labrunner.owner_pid"] == str(os.getpid())
        # Published on loopback only.
        ports = container.attrs["NetworkSettings"]["Ports"]  # type: ignore[attr-defined]
        bound = [b for bindings in ports.values() if bindings for b in bindings]
        assert bound and all(b["HostIp"] == "127.0.0.1" for b in bound), bound
        if service == "redis":
            assert endpoint.extra["databases"] == 1024
        if service == "kafka":
            assert endpoint.extra["bootstrap"] == f"127.0.0.1:{endpoint.port}"
        if service == "rabbitmq":
            assert endpoint.extra["management_url"].startswith("http://127.0.0.1:")
    finally:
        service_set.stop()
    assert not _containers(**{"labrunner.workdir": str(service_set.workdir)})
    assert time.monotonic() - started < 150


def test_namespaces_work_on_docker_services(docker_services: ServiceSet) -> None:
    """What the plugin hands each test: a database, a Redis db, a vhost, a Kafka prefix."""
    import pika
    import psycopg
    import redis
    from confluent_kafka import Consumer, Producer

    eps = docker_services.ensure(SERVICES)

    dsn = pg.create_database(eps["postgres"], "lr_docker_ns")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lr_docker_ns",)
    pg.drop_database(eps["postgres"], "lr_docker_ns")

    db = rd.allocate_db(eps["redis"])
    assert 1 <= db < 1024
    client = redis.Redis.from_url(rd.db_url(eps["redis"], db))
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    rd.release_db(eps["redis"], db)

    url = rmq.create_vhost(eps["rabbitmq"], "lr_docker_vhost")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare("q")
    channel.basic_publish("", "q", b"hello")
    method, _, body = channel.basic_get("q", auto_ack=True)
    assert body == b"hello"
    connection.close()
    rmq.delete_vhost(eps["rabbitmq"], "lr_docker_vhost")

    topic = f"lr_docker_{uuid.uuid4().hex[:6]}_t"
    producer = Producer({"bootstrap.servers": eps["kafka"].url, "log_level": 0})
    producer.produce(topic, b"m1")
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": eps["kafka"].url, "group.id": topic + "_g",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(1)
        if msg is not None and not msg.error():
            got = msg.value()
    consumer.close()
    assert got == b"m1"
    kf.delete_prefix(eps["kafka"], topic[:16])


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_keeps_committed_data(docker_services: ServiceSet, mode: str) -> None:
    import psycopg

    endpoint = docker_services.ensure(["postgres"])["postgres"]
    name = f"lr_restart_{mode}"
    dsn = pg.create_database(endpoint, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
    port = endpoint.port
    again = DockerBackend().restart(endpoint, mode=mode)
    assert again.port == port and again.extra["container_id"] == endpoint.extra["container_id"]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM t").fetchone() == (7,)
    pg.drop_database(endpoint, name)


def test_redis_restart_keeps_aof_data(docker_services: ServiceSet) -> None:
    """ph2.10's case: AOF switched on at run time, then a restart: the data is back."""
    import redis

    endpoint = docker_services.ensure(["redis"])["redis"]
    client = redis.Redis(host=endpoint.host, port=endpoint.port, db=3,
                         username=endpoint.username, password=endpoint.password)
    client.config_set("appendonly", "yes")
    client.set("kept", "yes")
    client.close()
    DockerBackend().restart(endpoint)
    client = redis.Redis(host=endpoint.host, port=endpoint.port, db=3,
                         username=endpoint.username, password=endpoint.password)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.get("kept") == b"yes"
    client.config_set("appendonly", "no")
    client.flushdb()
    client.close()


def test_image_override_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABRUNNER_IMAGE_REDIS", "labrunner/no-such-image:never")
    assert docker_backend.image_for("redis") == "labrunner/no-such-image:never"
    with pytest.raises(ServiceError, match="LABRUNNER_IMAGE_REDIS"):
        DockerBackend().start("redis", Path("/tmp"))
    assert not _containers(**{"labrunner.service": "redis", "labrunner.workdir": "/tmp"})


def test_image_override_by_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[docker.images]\nkafka = "example/kafka:9"\n', encoding="utf-8")
    monkeypatch.setenv("LABRUNNER_CONFIG", str(config))
    monkeypatch.delenv("LABRUNNER_IMAGE_KAFKA", raising=False)
    assert docker_backend.image_for("kafka") == "example/kafka:9"
    monkeypatch.setenv("LABRUNNER_IMAGE_KAFKA", "from/env:1")
    assert docker_backend.image_for("kafka") == "from/env:1"
    monkeypatch.delenv("LABRUNNER_CONFIG")
    monkeypatch.delenv("LABRUNNER_IMAGE_KAFKA")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    assert docker_backend.image_for("kafka") == "apache/kafka:4.3.1"


def test_interrupted_start_leaves_no_container(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while waiting for readiness: the container is removed before the interrupt
    goes on."""
    calls = {"n": 0}

    def interrupt() -> bool:
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(docker_backend, "_ready_check", lambda endpoint: interrupt)
    workdir = Path(f"/tmp/lr-interrupt-{os.getpid()}")
    with pytest.raises(KeyboardInterrupt):
        DockerBackend().start("redis", workdir)
    assert calls["n"] == 1
    assert not _containers(**{"labrunner.workdir": str(workdir)})


def test_ctrl_c_on_a_run_removes_its_containers(tmp_path: Path) -> None:
    """A process that started services and gets SIGINT removes them on its way out."""
    script = tmp_path / "run.py"
    script.write_text(
        "import signal, sys, time\n"
        "from labrunner.services.manager import ServiceSet\n"
        # A CI shell may start us with SIGINT ignored (background jobs): take it back.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "s = ServiceSet.ephemeral('docker')\n"
        "try:\n"
        "    s.ensure(['redis'])\n"
        "    print(s.workdir, flush=True)\n"
        "    time.sleep(120)\n"
        "except KeyboardInterrupt:\n"
        "    s.stop()\n"
        "    sys.exit(130)\n",
        encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    workdir = proc.stdout.readline().strip()
    assert workdir and _containers(**{"labrunner.workdir": workdir})
    proc.send_signal(2)
    assert proc.wait(timeout=60) == 130
    assert not _containers(**{"labrunner.workdir": workdir})


def test_orphans_and_services_down(tmp_path: Path) -> None:
    """A run killed outright leaves its container: the next start removes it (its owner is
    gone), and remove_labelled (``labrunner services down``) removes everything else."""
    script = tmp_path / "killed.py"
    script.write_text(
        "import time\n"
        "from pathlib import Path\n"
        "from labrunner.services.docker import DockerBackend\n"
        f"DockerBackend().start('redis', Path({str(tmp_path)!r}))\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n",
        encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    proc.kill()
    proc.wait()
    assert _containers(**{"labrunner.workdir": str(tmp_path)})
    removed = docker_backend.reap_orphans()
    assert any("redis" in r for r in removed)
    assert not _containers(**{"labrunner.workdir": str(tmp_path)})

    warm = DockerBackend(tied_to_parent=False).start("redis", tmp_path / "warm-docker")
    # Its owner (this process) lives, but warm services are never reaped anyway.
    assert all(warm.extra["container_id"][:12] not in r for r in docker_backend.reap_orphans())
    removed = docker_backend.remove_labelled()
    assert any(warm.extra["container_id"][:12] in r for r in removed)
    assert not _containers(**{"labrunner.workdir": str(tmp_path / "warm-docker")})


def test_postgres_stop_and_start_keep_data(tmp_path: Path) -> None:
    """postgres.stop()/start(): the container stops (clients refused) and starts again with
    its data and port. A container of its own: test_orphans_and_services_down removes every
    labelled container, the session's too."""
    import psycopg

    backend = DockerBackend()
    endpoint = backend.start("postgres", tmp_path)
    try:
        dsn = pg.create_database(endpoint, "lr_suspend")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (9)")
        backend.suspend(endpoint)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=3).close()
        backend.resume(endpoint)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (9,)
    finally:
        backend.stop(endpoint)


def test_prometheus_container_scrapes_the_hosts_loopback() -> None:
    """The container shares the host's network (listening on 127.0.0.1 only) and reads the
    target files the tests write into a host folder."""
    import json
    import urllib.parse
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    Counter("lr_docker_demo", "d", registry=registry).inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    service_set = ServiceSet.ephemeral("docker")
    try:
        endpoint = service_set.ensure(["prometheus"])["prometheus"]
        assert endpoint.backend == "docker" and endpoint.host == "127.0.0.1"
        container = _container(endpoint)
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"  # type: ignore[attr-defined]
        folder = Path(endpoint.extra["targets_dir"])
        (folder / "t.json").write_text(json.dumps(
            [{"targets": [f"127.0.0.1:{server.server_port}"], "labels": {"job": "lr_dock"}}]))
        query = urllib.parse.quote('lr_docker_demo_total{job="lr_dock"}')
        deadline = time.monotonic() + 60
        result: list[object] = []
        while not result and time.monotonic() < deadline:
            with urllib.request.urlopen(f"{endpoint.url}/api/v1/query?query={query}") as resp:
                result = json.load(resp)["data"]["result"]
            time.sleep(0.2)
        assert result, "the container's Prometheus never scraped the app on the host's loopback"
    finally:
        service_set.stop()
        server.shutdown()
        thread.join(timeout=5)
    assert not _containers(**{"labrunner.workdir": str(service_set.workdir)})
    assert not service_set.workdir.exists()
