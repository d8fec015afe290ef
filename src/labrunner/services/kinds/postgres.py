"""Postgres 15: a fresh database per test.

Locally from its server binaries:

``initdb`` runs once per machine into a template cluster; every start copies the template
(a copy costs a fraction of an initdb) and runs ``postgres`` on a free loopback port with a
private socket dir. As root, the cluster belongs to an unprivileged user, since initdb and
postgres refuse to run as root. In a container, the official ``postgres:15`` image with the
same settings.

Authentication is never ``trust``: TCP asks for a password (SCRAM), generated for each start
and kept in the service's state; the Unix socket, in a ``0700`` folder, lets in only the
account that runs labrunner (peer), which sets that password as the server comes up. The
template belongs to root (when labrunner runs as root), so no service, and no graded
process through one, can change it; a manifest written when it was made is checked before
every copy, and a template that differs is made again (and the run says so).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
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
            "log_min_messages=warning", "deadlock_timeout=200ms",
            # One run's server must not take the memory or the disk of the run beside it: a
            # sort or hash spills to disk past work_mem, and the temporary files a session
            # may hold are capped (the query fails with "temporary file size exceeds
            # temp_file_limit").
            "work_mem=4MB", "maintenance_work_mem=64MB", "temp_file_limit=256MB",
            "password_encryption=scram-sha-256", "unix_socket_permissions=0700")


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
        # The template is shared by every later start: made by the default service user
        # (initdb refuses root), never by a graded run's private owner, then given to root.
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              user=default_service_user())
    if done.returncode != 0:
        raise ServiceError(f"{' '.join(cmd[:2])} failed:\n{tail(log)}")


# What a template file must still be: its content, and the inode metadata any change to it
# updates (a write, a chmod or chown, a rename into place all move ctime).
_Entry = dict[str, Any]


def _describe(template: Path, with_hashes: bool) -> dict[str, _Entry]:
    found: dict[str, _Entry] = {}
    for folder, dirs, files in os.walk(template):
        dirs.sort()
        for name in [".", *sorted(files), *dirs]:
            path = Path(folder) if name == "." else Path(folder) / name
            rel = str(path.relative_to(template))
            if rel in found:
                continue
            info = path.lstat()
            entry: _Entry = {"mode": info.st_mode, "uid": info.st_uid, "size": info.st_size,
                             "ino": info.st_ino, "mtime": info.st_mtime_ns,
                             "ctime": info.st_ctime_ns}
            if with_hashes and stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as data:
                    for chunk in iter(lambda: data.read(1 << 20), b""):
                        digest.update(chunk)
                entry["sha256"] = digest.hexdigest()
            found[rel] = entry
    return found


def _difference(recorded: dict[str, _Entry], now: dict[str, _Entry],
                fields: tuple[str, ...]) -> str | None:
    """The first way the template differs from its manifest, or None."""
    for rel in sorted(set(recorded) | set(now)):
        if rel not in now:
            return f"{rel} is missing"
        if rel not in recorded:
            return f"{rel} was added"
        for name in fields:
            if recorded[rel].get(name) != now[rel].get(name):
                return f"{rel}: its {name} changed"
    return None


_STAT_FIELDS = ("mode", "uid", "size", "ino", "mtime", "ctime")
# Templates whose content this process has hashed against their manifest (path -> the
# manifest's own digest): later copies compare inode metadata only, which any change moves.
_verified: dict[str, str] = {}


def manifest_path(template: Path) -> Path:
    return template.with_name(template.name + ".manifest")


def check_template(template: Path) -> str | None:
    """None when ``template`` is what its manifest says it was when made; else the first
    difference (a missing manifest is one)."""
    try:
        text = manifest_path(template).read_text(encoding="utf-8")
        recorded = json.loads(text)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no readable manifest"
    digest = hashlib.sha256(text.encode()).hexdigest()
    if _verified.get(str(template)) == digest:
        return _difference(recorded, _describe(template, with_hashes=False), _STAT_FIELDS)
    reason = _difference(recorded, _describe(template, with_hashes=True),
                         (*_STAT_FIELDS, "sha256"))
    if reason is None:
        _verified[str(template)] = digest
    return reason


def _write_manifest(template: Path) -> None:
    manifest = manifest_path(template)
    staging = manifest.with_name(f".{manifest.name}.{os.getpid()}")
    staging.write_text(json.dumps({"files": _describe(template, with_hashes=True)}),
                       encoding="utf-8")
    os.chmod(staging, 0o600)
    os.replace(staging, manifest)


def template_path(root: Path) -> Path:
    # Named for its access rules: a template of an older labrunner (trust, no manifest) in
    # the same runtime folder is never mistaken for it, nor it for one.
    return root / f"pg{PG_MAJOR}-template-scram"


def template_dir() -> Path:
    """An initdb'd cluster, made once and copied for every start, checked against its
    manifest before each copy (and made again when it differs)."""
    root = runtime_dir()
    template = template_path(root)
    if (template / "PG_VERSION").is_file() and check_template(template) is None:
        return template
    bins = bindir()
    if bins is None:
        raise ServiceError("Postgres 15 server binaries not found (set LABRUNNER_PG_BINDIR)")
    with open(root / "pg-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first runs at once: one initdb
        if (template / "PG_VERSION").is_file():
            reason = check_template(template)
            if reason is None:
                return template
            print(f"labrunner: the Postgres template {template} is not as it was made "
                  f"({reason}): making it again", file=sys.stderr, flush=True)
        _verified.pop(str(template), None)
        manifest_path(template).unlink(missing_ok=True)
        remove_tree(template)
        staging = root / f"pg{PG_MAJOR}-template.{os.getpid()}"
        remove_tree(staging)
        staging.mkdir(mode=0o700)
        user = default_service_user()
        entry = pwd.getpwnam(user) if user is not None else None
        if entry is not None:
            os.chown(staging, entry.pw_uid, entry.pw_gid)
        # Never trust: a password nobody keeps (each start sets its own).
        pwfile = root / f"pg-initdb-pw.{os.getpid()}"
        pwfile.write_text(secrets.token_hex(16) + "\n", encoding="ascii")
        os.chmod(pwfile, 0o600)
        if entry is not None:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            _run_as_service_user(
                [str(bins / "initdb"), "-D", str(staging), "-U", SUPERUSER,
                 "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                 f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C", "--no-sync"],
                root / "initdb.log",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if entry is not None:
            # Root's: no service user (a warm set's, a graded run's) can write to it.
            for folder, dirs, files in os.walk(staging):
                os.chown(folder, 0, 0)
                for name in dirs + files:
                    os.lchown(os.path.join(folder, name), 0, 0)
        os.replace(staging, template)
        _write_manifest(template)
    return template


def _runner_account() -> str:
    """The OS account this process runs as: the one the socket's peer rule lets in."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def write_access_rules(data: Path) -> None:
    """Password (SCRAM) over TCP; on the Unix socket, only the account running labrunner,
    as the superuser (peer)."""
    (data / "pg_hba.conf").write_text(
        "# labrunner: never trust\n"
        "local all postgres peer map=runner\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
        "host all all ::1/128 scram-sha-256\n", encoding="utf-8")
    (data / "pg_ident.conf").write_text(f"runner {_runner_account()} {SUPERUSER}\n",
                                        encoding="utf-8")


def set_password(endpoint: Endpoint) -> None:
    """Through the socket (peer), give the superuser this start's password; only its SCRAM
    verifier reaches the server."""
    import psycopg

    with psycopg.connect(host=endpoint.extra["sockets"], port=endpoint.port, user=SUPERUSER,
                         dbname="postgres", autocommit=True, connect_timeout=2) as conn:
        verifier = conn.pgconn.encrypt_password(endpoint.password.encode(),
                                                SUPERUSER.encode(), b"scram-sha-256")
        conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD '{verifier.decode()}'")


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
        auth = ""
        if endpoint.username:
            auth = f"{endpoint.username}:{urllib.parse.quote(endpoint.password, safe='')}@"
        db = endpoint.extra.get("dbname", "postgres")
        return f"postgresql://{auth}{endpoint.host}:{endpoint.port}/{db}"

    def ready(self, endpoint: Endpoint) -> bool:
        import psycopg

        if endpoint.backend == "local" and endpoint.extra.get("sockets"):
            set_password(endpoint)
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
        write_access_rules(data)
        sockets = folder / "sock"
        sockets.mkdir(mode=0o700)
        return Endpoint(
            service="postgres", backend="local", host="127.0.0.1", port=free_port(),
            username=SUPERUSER, password=secrets.token_hex(16),
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
