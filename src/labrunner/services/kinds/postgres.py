"""Postgres 15: a fresh database per test.

Locally from its server binaries:

``initdb`` runs once per machine into a template cluster; every start copies the template
(a copy costs a fraction of an initdb) and runs ``postgres`` on a free loopback port with a
private socket dir. As root, the cluster belongs to an unprivileged user, since initdb and
postgres refuse to run as root. In a container, the official ``postgres:15`` image with the
same settings.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import ContainerSpec, Endpoint, Launch, ServiceError, ServiceKind, register
from ..local.process import (
    default_service_user,
    free_port,
    remove_tree,
    runtime_dir,
    tail,
)

if TYPE_CHECKING:
    from ..base import ServiceScope

PG_MAJOR = "15"
SUPERUSER = "postgres"
# Throwaway clusters: durability against power loss is not what labs test, and fsync
# dominates start and CREATE DATABASE time on shared disks. A restart still replays the WAL,
# so crash-recovery labs stay honest.
SETTINGS = ("fsync=off", "full_page_writes=off", "max_connections=300", "shared_buffers=64MB",
            "log_min_messages=warning", "deadlock_timeout=200ms")


def bindir() -> Path | None:
    env = os.environ.get("LABRUNNER_PG_BINDIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    for folder in candidates:
        if (folder / "postgres").is_file() and (folder / "initdb").is_file():
            return folder
    return None


def _run_as_service_user(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        # The template is shared by every later start: always the default service user's,
        # never a graded run's private owner.
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              user=default_service_user())
    if done.returncode != 0:
        raise ServiceError(f"{' '.join(cmd[:2])} failed:\n{tail(log)}")


def template_dir() -> Path:
    """An initdb'd cluster, made once and copied for every start."""
    root = runtime_dir()
    template = root / f"pg{PG_MAJOR}-template"
    if (template / "PG_VERSION").is_file():
        return template
    bins = bindir()
    if bins is None:
        raise ServiceError("Postgres 15 server binaries not found (set LABRUNNER_PG_BINDIR)")
    with open(root / "pg-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first runs at once: one initdb
        if (template / "PG_VERSION").is_file():
            return template
        staging = root / f"pg{PG_MAJOR}-template.{os.getpid()}"
        remove_tree(staging)
        staging.mkdir(mode=0o700)
        user = default_service_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(staging, entry.pw_uid, entry.pw_gid)
        _run_as_service_user(
            [str(bins / "initdb"), "-D", str(staging), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            root / "initdb.log",
        )
        os.replace(staging, template)
    return template


@register
class Postgres(ServiceKind):
    name = "postgres"
    fixture = "postgres"
    # fast: a clean shutdown; immediate: a crash (the WAL is replayed at start); smart: waits
    # for clients to leave.
    restart_modes = frozenset({"fast", "immediate", "smart"})
    folder = "postgres"
    stop_timeout = 15.0
    image = f"postgres:{PG_MAJOR}"
    external_env = "LABRUNNER_POSTGRES_URL"  # postgresql://user:pass@host:5432/postgres

    def url(self, endpoint: Endpoint) -> str:
        auth = f"{endpoint.username}:{endpoint.password}@" if endpoint.username else ""
        db = endpoint.extra.get("dbname", "postgres")
        return f"postgresql://{auth}{endpoint.host}:{endpoint.port}/{db}"

    def ready(self, endpoint: Endpoint) -> bool:
        import psycopg

        with psycopg.connect(endpoint.url, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    def missing(self) -> str | None:
        if bindir() is None:
            return ("Postgres 15 server binaries not found (postgres, initdb). "
                    "Install them: sudo apt-get install postgresql-15  "
                    "(or set LABRUNNER_PG_BINDIR)")
        return None

    def prepare(self, folder: Path) -> Endpoint:
        template = template_dir()
        data = folder / "data"
        # cp -a keeps the service user's ownership and the 0700 mode postgres insists on.
        subprocess.run(["cp", "-a", str(template), str(data)], check=True)
        sockets = folder / "sock"
        sockets.mkdir()
        return Endpoint(
            service="postgres", backend="local", host="127.0.0.1", port=free_port(),
            username=SUPERUSER,
            extra={"dir": str(folder), "dbname": "postgres", "datadir": str(data),
                   "bindir": str(bindir()), "sockets": str(sockets),
                   "log": str(folder / "postgres.log")},
        )

    def launches(self, endpoint: Endpoint) -> list[Launch]:
        extra = endpoint.extra
        cmd = [str(Path(extra["bindir"]) / "postgres"), "-D", extra["datadir"],
               "-p", str(endpoint.port), "-k", extra["sockets"],
               "-c", "listen_addresses=127.0.0.1"]
        for setting in SETTINGS:
            cmd += ["-c", setting]
        return [Launch(cmd, Path(extra["log"]), as_service_user=True)]

    def pid_files(self, endpoint: Endpoint) -> list[Path]:
        return [Path(endpoint.extra["datadir"]) / "postmaster.pid"]

    def stop_signal(self, mode: str | None) -> int:
        return {"immediate": signal.SIGQUIT, "smart": signal.SIGTERM}.get(
            mode or "fast", signal.SIGINT)

    def container(self, workdir: Path) -> ContainerSpec:
        password = secrets.token_hex(12)
        port = free_port()
        endpoint = Endpoint("postgres", "docker", "127.0.0.1", port, username=SUPERUSER,
                            password=password, extra={"dbname": "postgres"})
        command = ["postgres"]
        for setting in SETTINGS:
            command += ["-c", setting]
        # --no-sync: initdb of a throwaway cluster need not wait for the disk (as locally).
        env = {"POSTGRES_PASSWORD": password, "POSTGRES_INITDB_ARGS": "--no-sync"}
        return ContainerSpec(endpoint, {5432: port}, env, command)

    def container_kill_signal(self, mode: str | None) -> str | None:
        # The image stops cleanly on SIGINT (docker restart); a crash is SIGQUIT.
        return "SIGQUIT" if mode == "immediate" else None

    def external_extra(self, url: urllib.parse.SplitResult) -> dict[str, Any]:
        return {"dbname": url.path.lstrip("/") or "postgres"}

    def open(self, endpoint: Endpoint, scope: ServiceScope) -> PostgresDB:
        name = scope.new_name()
        return PostgresDB(create_database(endpoint, name), name, endpoint, scope)

    def close(self, handle: Any, scope: ServiceScope) -> None:
        drop_database(scope.endpoint(), handle.name)


@dataclass
class PostgresDB:
    """A database of this test's own on a real Postgres server (the ``postgres`` fixture)."""

    dsn: str
    name: str
    endpoint: Endpoint
    _scope: ServiceScope

    def connect(self, **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, **kwargs)

    @property
    def admin_dsn(self) -> str:
        return self.endpoint.url

    def restart(self, mode: str = "fast") -> None:
        """Restart the server keeping its data: ``fast`` (clean) or ``immediate`` (a crash:
        the server replays its WAL at start). Connections open before are broken."""
        self._scope.restart(mode)

    def stop(self) -> None:
        """Stop the server (a clean shutdown) keeping its data and port: clients now get
        "connection refused". Labs that use it declare ``exclusive = true``."""
        self._scope.suspend()

    def start(self) -> None:
        """Start the stopped server again with its data; returns once it answers. A server
        still stopped when the test ends is started again then."""
        self._scope.resume()


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
