"""Redis: a logical database per test.

Locally Debian's redis-server on a free loopback port with its own config and data dir; in a
container the official ``redis:7`` image with the same settings. Many logical databases are
configured so that every test gets one of its own: a counter in database 0 hands them out.

Nobody connects without a password: the default user is off. The runner and the tests use
an admin user (the endpoint's); what a test hands the learner (``redis_db.url``) is a lab
user's, generated per start like the others, that may run no dangerous command (no DEBUG,
MODULE, CONFIG SET, SHUTDOWN, MONITOR, FLUSHALL, ACL...: ``-@dangerous``), save the few
harmless ones labs use (INFO, KEYS, FLUSHDB of its own database, CONFIG GET). A lab that
teaches a setting (ph2.10's AOF) hands ``redis_db.config_url`` instead: the same plus CONFIG
SET. The server refuses DEBUG and MODULE to everyone, and writes past ``maxmemory`` fail
(``noeviction``) rather than take memory from the run beside it."""

from __future__ import annotations

import os
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import ContainerSpec, Endpoint, Launch, ServiceError, ServiceKind, register
from ..local.process import free_port, service_owner, which

if TYPE_CHECKING:
    from ..base import ServiceScope

DATABASES = 1024
DATABASES_ENV = "LABRUNNER_REDIS_DATABASES"  # how many an external server has (default 16)
MAXMEMORY = "128mb"
ADMIN_USER, LAB_USER, CONFIG_USER = "labrunner", "lab", "lab-config"
# What a lab's own connections may do: everything but the dangerous commands, save these.
LAB_RULES = ("~* &* +@all -@dangerous +info +keys +flushdb +sort +sort_ro +config|get "
             "+lastsave +role")
CONFIG_RULES = LAB_RULES + " +config|set +bgrewriteaof +bgsave +save"  # persistence lessons


def passwords() -> dict[str, str]:
    """A password per user, made for this start."""
    return {user: secrets.token_hex(16) for user in (ADMIN_USER, LAB_USER, CONFIG_USER)}


def binary() -> str | None:
    return os.environ.get("LABRUNNER_REDIS_SERVER") or which("redis-server", "/usr/sbin")


def config(port: int, data: str, local: bool, secrets_: dict[str, str]) -> str:
    """The server's config. Labs enable AOF at run time (CONFIG SET appendonly yes) and
    restart the server: the restart must read the same dir, which CONFIG REWRITE records."""
    lines = [
        "user default off",
        f"user {ADMIN_USER} on >{secrets_[ADMIN_USER]} ~* &* +@all",
        f"user {LAB_USER} on >{secrets_[LAB_USER]} {LAB_RULES}",
        f"user {CONFIG_USER} on >{secrets_[CONFIG_USER]} {CONFIG_RULES}",
        f"maxmemory {MAXMEMORY}",
        "maxmemory-policy noeviction",
        "client-output-buffer-limit normal 64mb 16mb 60",
        "enable-debug-command no",
        "enable-module-command no",
        f"bind {'127.0.0.1' if local else '0.0.0.0'}",
        f"port {port}",
        f"protected-mode {'yes' if local else 'no'}",
        f"dir {data}",
        f"databases {DATABASES}",
        'save ""',
        "appendonly no",
    ]
    if local:
        lines += [f"pidfile {data}/redis.pid", f"logfile {data}/redis.log", "daemonize no"]
    return "\n".join(lines) + "\n"


def _users(secrets_: dict[str, str]) -> dict[str, str]:
    return {"lab_username": LAB_USER, "lab_password": secrets_[LAB_USER],
            "config_username": CONFIG_USER, "config_password": secrets_[CONFIG_USER]}


def _admin(endpoint: Endpoint, **kwargs: Any) -> Any:
    import redis

    return redis.Redis(host=endpoint.host, port=endpoint.port,
                       username=endpoint.username or None, password=endpoint.password or None,
                       **kwargs)


@register
class Redis(ServiceKind):
    name = "redis"
    fixture = "redis_db"
    folder = "redis"
    ready_timeout = 15.0
    ready_interval = 0.01
    image = "redis:7"
    container_ready_timeout = 30.0
    container_poll = 0.05
    external_env = "LABRUNNER_REDIS_URL"  # redis://[:pass@]host:6379/0

    def url(self, endpoint: Endpoint) -> str:
        auth = ""
        if endpoint.password:
            auth = f"{endpoint.username}:{urllib.parse.quote(endpoint.password, safe='')}@"
        return f"redis://{auth}{endpoint.host}:{endpoint.port}/0"

    def ready(self, endpoint: Endpoint) -> bool:
        client = _admin(endpoint, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def missing(self) -> str | None:
        if binary() is None:
            return "redis-server not found. Install it: sudo apt-get install redis-server"
        return None

    def prepare(self, folder: Path) -> Endpoint:
        data = folder
        port = free_port()
        conf = data / "redis.conf"
        users = passwords()
        conf.write_text(config(port, str(data), local=True, secrets_=users), encoding="utf-8")
        os.chmod(conf, 0o600)
        return Endpoint(
            service="redis", backend="local", host="127.0.0.1", port=port,
            username=ADMIN_USER, password=users[ADMIN_USER],
            extra={"dir": str(data), "conf": str(conf), "binary": binary(),
                   "log": str(data / "redis.log"), **_users(users)},
        )

    def launches(self, endpoint: Endpoint) -> list[Launch]:
        extra = endpoint.extra
        return [Launch([extra["binary"], extra["conf"]], Path(extra["dir"]) / "stdout.log",
                       cwd=Path(extra["dir"]), as_service_user=service_owner() is not None)]

    def pid_files(self, endpoint: Endpoint) -> list[Path]:
        return [Path(endpoint.extra["dir"]) / "redis.pid"]

    def before_restart(self, endpoint: Endpoint) -> None:
        """Settings changed with CONFIG SET are written back to the config file, so a lab
        that turned AOF on gets it loaded at start; an AOF switched on at run time only
        exists once its first rewrite is done, which is waited for."""
        client = _admin(endpoint, socket_timeout=5)
        try:
            deadline = time.monotonic() + 30
            while True:
                info = client.info("persistence")
                if not (info.get("aof_rewrite_in_progress")
                        or info.get("aof_rewrite_scheduled")):
                    break
                if time.monotonic() > deadline:
                    raise ServiceError("redis AOF rewrite still running after 30 s")
                time.sleep(0.05)
            client.config_rewrite()
        finally:
            client.close()

    def container(self, workdir: Path) -> ContainerSpec:
        """Redis reads a config file in its data volume, written at first start: CONFIG
        REWRITE then records settings changed at run time (a lab turning AOF on), so they
        survive a ``docker restart``. Through the image's own entrypoint."""
        port = free_port()
        users = passwords()
        endpoint = Endpoint("redis", "docker", "127.0.0.1", port, username=ADMIN_USER,
                            password=users[ADMIN_USER],
                            extra={"databases": DATABASES, **_users(users)})
        # The config travels as the script's $0 and is printed into the file at first start.
        script = ('test -f /data/redis.conf || printf "%s" "$0" > /data/redis.conf; '
                  'exec docker-entrypoint.sh redis-server /data/redis.conf')
        command = ["sh", "-c", script, config(6379, "/data", local=False, secrets_=users)]
        return ContainerSpec(endpoint, {6379: port}, {}, command)

    def external_extra(self, url: urllib.parse.SplitResult) -> dict[str, Any]:
        return {"databases": int(os.environ.get(DATABASES_ENV, "16"))}

    def open(self, endpoint: Endpoint, scope: ServiceScope) -> RedisDB:
        db = allocate_db(endpoint)
        return RedisDB(db_url(endpoint, db), db, endpoint, scope)

    def close(self, handle: Any, scope: ServiceScope) -> None:
        release_db(handle.endpoint, handle.db)


@dataclass
class RedisDB:
    """A Redis logical database of this test's own (the ``redis_db`` fixture)."""

    url: str
    db: int
    endpoint: Endpoint
    _scope: ServiceScope

    @property
    def config_url(self) -> str:
        """Like :attr:`url`, for a user that may also change settings (CONFIG SET), for the
        labs that teach one."""
        return db_url(self.endpoint, self.db, "config")

    def client(self, **kwargs: Any) -> Any:
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def admin_client(self, **kwargs: Any) -> Any:
        """The test's own connection as the server's admin (MONITOR, INFO of the server),
        on this test's database. Never hand it to the learner."""
        return _admin(self.endpoint, db=self.db, **kwargs)

    def restart(self) -> None:
        """Restart the server with its data dir (settings made with CONFIG SET are kept)."""
        self._scope.restart()


def databases(endpoint: Endpoint) -> int:
    return int(endpoint.extra.get("databases", 1024 if endpoint.backend != "external" else 16))


def allocate_db(endpoint: Endpoint) -> int:
    """A logical database nobody else is using: a counter in database 0 hands them out
    round-robin over 1..N-1, and the one handed out is flushed before use."""
    import redis

    admin = redis.Redis.from_url(endpoint.url, socket_timeout=5)
    try:
        count = databases(endpoint)
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


def db_url(endpoint: Endpoint, db: int, role: str = "lab") -> str:
    """The URL of database ``db`` for the lab's user (``role`` "lab" or "config"; the
    endpoint's own user where the server has no lab users: an external one)."""
    user = endpoint.extra.get(f"{role}_username") or endpoint.username
    password = endpoint.extra.get(f"{role}_password") or endpoint.password
    auth = ""
    if password:
        auth = f"{user}:{urllib.parse.quote(password, safe='')}@"
    return f"redis://{auth}{endpoint.host}:{endpoint.port}/{db}"


def release_db(endpoint: Endpoint, db: int) -> None:
    client = _admin(endpoint, db=db, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()
