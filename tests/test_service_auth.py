"""Every service labrunner starts asks for a password (or, on a 0700 Unix socket, for the
account that runs labrunner), the lab's own user may do no more than a lab needs, and the
shared Postgres template is checked before every copy (issue 23). Real servers: the local
backend, as ``labrunner run`` starts them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labrunner.services.base import Endpoint, kind
from labrunner.services.kinds import postgres, rabbitmq
from labrunner.services.kinds import redis as redis_kind
from labrunner.services.manager import ServiceSet

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")


def _missing(service: str) -> str | None:
    return kind(service).missing()


@pytest.fixture
def open_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime folder of its own that the service user can pass through (pytest's
    tmp_path is root's 0700 when root), for a template made from scratch."""
    folder = Path(tempfile.mkdtemp(prefix="lr-auth-", dir="/tmp"))
    os.chmod(folder, 0o755)
    monkeypatch.setenv("LABRUNNER_RUNTIME_DIR", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _started(service: str) -> Iterator[tuple[ServiceSet, Endpoint]]:
    reason = _missing(service)
    if reason:
        pytest.skip(reason)
    service_set = ServiceSet.ephemeral("local")
    try:
        yield service_set, service_set.ensure([service])[service]
    finally:
        service_set.stop()


@pytest.fixture
def pg() -> Iterator[tuple[ServiceSet, Endpoint]]:
    yield from _started("postgres")


@pytest.fixture
def redis_server() -> Iterator[tuple[ServiceSet, Endpoint]]:
    yield from _started("redis")


@pytest.fixture
def rabbit() -> Iterator[tuple[ServiceSet, Endpoint]]:
    yield from _started("rabbitmq")


# --------------------------------------------------------------------------------------
# The Postgres template


def test_a_tampered_postgres_template_is_detected_and_rebuilt(
        open_runtime: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The template every start copies is checked against the manifest written when it was
    made: a changed file (here: a line added to postgresql.conf, and a byte changed in place
    with its mtime put back) is found, both by the quick check of a template this process
    already hashed and by a full one, and the template is made again, which says so."""
    if _missing("postgres"):
        pytest.skip(_missing("postgres") or "")
    template = postgres.template_dir()
    assert postgres.check_template(template) is None
    if os.geteuid() == 0:
        assert template.stat().st_uid == 0 and template.stat().st_mode & 0o077 == 0, (
            "the template must be root's alone")
    conf = template / "postgresql.conf"
    with open(conf, "a") as out:
        out.write("\nshared_preload_libraries = 'evil'\n")
    assert "postgresql.conf" in (postgres.check_template(template) or ""), "not detected"
    capfd.readouterr()
    rebuilt = postgres.template_dir()
    assert "is not as it was made (postgresql.conf" in capfd.readouterr().err
    assert "evil" not in (rebuilt / "postgresql.conf").read_text()
    assert postgres.check_template(rebuilt) is None

    # Same size, same mtime: only the content (and the ctime, which nobody can set) moved.
    version = rebuilt / "PG_VERSION"
    before = version.stat()
    data = version.read_bytes()
    version.write_bytes(data[:-2] + b"9\n")
    os.utime(version, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "PG_VERSION" in (postgres.check_template(rebuilt) or "")
    postgres._verified.clear()   # a new process: hashes every file
    assert "PG_VERSION" in (postgres.check_template(rebuilt) or "")
    postgres.template_dir()
    assert postgres.check_template(rebuilt) is None
    assert version.read_bytes() == data

    postgres.manifest_path(rebuilt).unlink()   # no manifest: not trusted either
    assert postgres.check_template(rebuilt) == "it has no readable manifest"


# --------------------------------------------------------------------------------------
# Postgres: SCRAM on TCP, peer on a 0700 socket


def test_postgres_asks_for_its_password(pg: tuple[ServiceSet, Endpoint]) -> None:
    import psycopg

    service_set, endpoint = pg
    with psycopg.connect(endpoint.url) as conn:
        hba = conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
    assert {m for (m,) in hba} <= {"scram-sha-256", "peer"}, hba
    for password in ("", "wrong"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=endpoint.host, port=endpoint.port, user="postgres",
                            password=password, dbname="postgres", connect_timeout=5)
    sockets = Path(endpoint.extra["sockets"])
    assert sockets.stat().st_mode & 0o077 == 0, "the socket's folder must be 0700"
    assert service_set.state_file.stat().st_mode & 0o077 == 0, "the state holds passwords"
    assert endpoint.password and endpoint.password in service_set.state_file.read_text()


@needs_root
def test_postgres_socket_lets_in_only_the_runner(pg: tuple[ServiceSet, Endpoint]) -> None:
    """The service's own account (the one a superuser's COPY ... PROGRAM runs as, and that
    can enter the socket's folder) is not let in through the socket without the password."""
    _, endpoint = pg
    psql = Path(endpoint.extra["bindir"]) / "psql"
    if not psql.is_file():
        psql = Path(shutil.which("psql") or "psql")
    done = subprocess.run([str(psql), "-h", endpoint.extra["sockets"], "-p",
                           str(endpoint.port), "-U", "postgres", "-w", "-c", "SELECT 1"],
                          user="nobody", capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"]})
    assert done.returncode != 0, done.stdout
    assert "Peer authentication failed" in done.stderr or "Permission denied" in done.stderr, (
        done.stderr)


# --------------------------------------------------------------------------------------
# Redis: no default user; the lab's user may not run dangerous commands


def test_redis_lab_user_may_not_run_dangerous_commands(
        redis_server: tuple[ServiceSet, Endpoint]) -> None:
    import redis

    _, endpoint = redis_server
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=endpoint.host, port=endpoint.port, socket_timeout=5).ping()
    lab = redis.Redis.from_url(redis_kind.db_url(endpoint, 5), socket_timeout=5)
    refused: dict[str, Any] = {}
    for command in (("DEBUG", "SLEEP", "0"), ("MODULE", "LIST"), ("CONFIG", "SET", "maxmemory",
                    "0"), ("FLUSHALL",), ("SHUTDOWN", "NOSAVE"), ("ACL", "LIST"),
                    ("MONITOR",), ("CLIENT", "KILL", "TYPE", "normal")):
        with pytest.raises(redis.ResponseError) as caught:
            lab.execute_command(*command)
        refused[command[0]] = str(caught.value)
    # What labs use still works for the lab's user.
    lab.set("k", "v")
    assert lab.keys("*") == [b"k"] and "redis_version" in lab.info()
    assert lab.config_get("appendonly") == {"appendonly": "no"}
    lab.flushdb()
    # The user of labs that teach a setting may change one (ph2.10: AOF), nothing more.
    config = redis.Redis.from_url(redis_kind.db_url(endpoint, 5, "config"), socket_timeout=5)
    assert config.config_set("appendfsync", "everysec")
    with pytest.raises(redis.ResponseError):
        config.execute_command("DEBUG", "SLEEP", "0")
    admin = redis.Redis.from_url(endpoint.url, socket_timeout=5)
    # DEBUG is off for everyone; the admin may see what the lab may not.
    with pytest.raises(redis.ResponseError, match="DEBUG command not allowed"):
        admin.execute_command("DEBUG", "SLEEP", "0")
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert int(admin.config_get("maxmemory")["maxmemory"]) > 0
    for client in (lab, config, admin):
        client.close()


# --------------------------------------------------------------------------------------
# RabbitMQ: no guest; the lab's user is no administrator


def _api_status(endpoint: Endpoint, path: str, user: str, password: str) -> int:
    import base64

    request = urllib.request.Request(
        f"http://{endpoint.host}:{endpoint.extra['management_port']}/api{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(
        f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read() or b"null")
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_rabbitmq_has_no_guest_and_the_lab_user_is_no_admin(
        rabbit: tuple[ServiceSet, Endpoint]) -> None:
    import pika

    _, endpoint = rabbit
    guest = pika.ConnectionParameters(endpoint.host, endpoint.port, "/",
                                      pika.PlainCredentials("guest", "guest"),
                                      connection_attempts=1, socket_timeout=5)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(guest)
    assert _api_status(endpoint, "/overview", "guest", "guest") == 401
    lab_user, lab_password = endpoint.extra["lab_username"], endpoint.extra["lab_password"]
    assert _api_status(endpoint, "/users", lab_user, lab_password) == 401
    assert _api_status(endpoint, "/users", endpoint.username, endpoint.password) == 200
    vhost = "lr_auth_test"
    url = rabbitmq.create_vhost(endpoint, vhost)
    try:
        assert f"{lab_user}:{lab_password}@" in url
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.queue_declare("work")
        connection.close()
    finally:
        rabbitmq.delete_vhost(endpoint, vhost)
    # The node's memory alarm is absolute (its first statistics come a few seconds in).
    from labrunner.services.base import wait_until

    wait_until(lambda: "mem_limit" in rabbitmq.api(endpoint, "GET", "/nodes")[0], 120,
               "RabbitMQ's node statistics", interval=0.5)
    node = rabbitmq.api(endpoint, "GET", "/nodes")[0]
    assert node["mem_limit"] == rabbitmq.MEMORY_HIGH_WATERMARK, node["mem_limit"]
    assert node["disk_free_limit"] == rabbitmq.DISK_FREE_LIMIT, node["disk_free_limit"]
