"""Postgres 15 from its server binaries.

``initdb`` runs once per machine into a template cluster; every start copies the template
(a copy costs a fraction of an initdb) and runs ``postgres`` on a free loopback port with a
private socket dir. As root, the cluster belongs to an unprivileged user, since initdb and
postgres refuse to run as root.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from ..base import Endpoint, ServiceError, free_port, tail, wait_until
from .process import (
    chown_for_service,
    default_service_user,
    pid_alive,
    remove_tree,
    runtime_dir,
    service_owner,
    spawn,
    terminate,
)

PG_MAJOR = "15"
SUPERUSER = "postgres"


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


def missing() -> str | None:
    if bindir() is None:
        return ("Postgres 15 server binaries not found (postgres, initdb). "
                "Install them: sudo apt-get install postgresql-15  "
                "(or set LABRUNNER_PG_BINDIR)")
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
        raise ServiceError(missing() or "postgres missing")
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


def start(workdir: Path, tied_to_parent: bool = True) -> Endpoint:
    bins = bindir()
    if bins is None:
        raise ServiceError(missing() or "postgres missing")
    template = template_dir()
    data = workdir / "pgdata"
    remove_tree(data)
    workdir.mkdir(parents=True, exist_ok=True)
    # cp -a keeps the service user's ownership and the 0700 mode postgres insists on.
    subprocess.run(["cp", "-a", str(template), str(data)], check=True)
    if service_owner() is not None:
        chown_for_service(data)  # a graded run's private cluster belongs to its own uid
    sockets = workdir / "pgsock"
    sockets.mkdir(exist_ok=True)
    chown_for_service(sockets)
    endpoint = Endpoint(
        service="postgres",
        backend="local",
        host="127.0.0.1",
        port=free_port(),
        username=SUPERUSER,
        extra={"dbname": "postgres", "datadir": str(data), "bindir": str(bins),
               "sockets": str(sockets), "log": str(workdir / "postgres.log")},
    )
    _launch(endpoint, tied_to_parent)
    return endpoint


def _launch(endpoint: Endpoint, tied_to_parent: bool) -> None:
    extra = endpoint.extra
    log = Path(extra["log"])
    proc = spawn(
        [
            str(Path(extra["bindir"]) / "postgres"),
            "-D", extra["datadir"],
            "-p", str(endpoint.port),
            "-k", extra["sockets"],
            "-c", "listen_addresses=127.0.0.1",
            # Throwaway clusters: durability against power loss is not what labs test,
            # and fsync dominates start and CREATE DATABASE time on shared disks.
            # A restart still replays the WAL, so crash-recovery labs stay honest.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=300",
            "-c", "shared_buffers=64MB",
            "-c", "log_min_messages=warning",
            "-c", "deadlock_timeout=200ms",
        ],
        log,
        as_service_user=True,
        tied_to_parent=tied_to_parent,
    )
    extra["pid"] = proc.pid
    wait_until(
        lambda: ready(endpoint),
        timeout=30,
        what=f"postgres on port {endpoint.port}",
        failed=lambda: None if proc.poll() is None else
        f"postgres exited with {proc.returncode}; last log lines:\n{tail(log)}",
    )


def ready(endpoint: Endpoint) -> bool:
    import psycopg

    with psycopg.connect(endpoint.url, connect_timeout=2) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def current_pid(endpoint: Endpoint) -> int:
    try:
        first = (Path(endpoint.extra["datadir"]) / "postmaster.pid").read_text().split("\n")[0]
        return int(first)
    except (OSError, ValueError):
        return int(endpoint.extra.get("pid", 0))


def stop(endpoint: Endpoint, remove: bool = True, mode: str = "fast") -> None:
    sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "smart": signal.SIGTERM}[mode]
    pid = current_pid(endpoint)
    if pid and pid_alive(pid):
        terminate(pid, timeout=15, sig=sig, group=False)
    if remove:
        remove_tree(Path(endpoint.extra["datadir"]).parent / "pgdata")
        remove_tree(Path(endpoint.extra["sockets"]))


def restart(endpoint: Endpoint, mode: str = "fast") -> Endpoint:
    """Stop (``fast``: clean shutdown; ``immediate``: a crash, WAL replayed at start) and
    start again on the same port with the same data."""
    stop(endpoint, remove=False, mode=mode)
    # The restarted server must outlive the process that asked for the restart (a test).
    _launch(endpoint, tied_to_parent=False)
    return endpoint
