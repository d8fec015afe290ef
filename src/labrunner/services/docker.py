"""The ``docker`` backend: each service a container started with testcontainers.

The images are the official ones by default (``postgres:15``, ``redis:7``,
``apache/kafka:4.3.1``, ``rabbitmq:3-management``); each can be replaced by an environment
variable (``LABRUNNER_IMAGE_POSTGRES``, ``..._REDIS``, ``..._KAFKA``, ``..._RABBITMQ``) or by
an entry in a config file (``[docker.images]`` in ``~/.config/labrunner/config.toml`` or in the
workspace's ``labrunner.toml``); the variable wins.

Every published port is bound to 127.0.0.1 on a host port chosen here and bound explicitly,
so a ``docker restart`` (durability labs restart Postgres and Redis) keeps the endpoint, and
Kafka can advertise the very port clients reach it on. A service is handed back only once it
answers for real, as with the local backend: a query for Postgres, PING for Redis, metadata
naming the broker for Kafka, an AMQP connection plus the management API for RabbitMQ.

Containers carry the label ``labrunner=1`` (and the owner's pid and host):
``labrunner services down`` removes them all (:func:`remove_labelled`), a run removes its own
when it ends (on Ctrl-C too), and a container whose owner died without cleaning up is removed
by the next start on the same machine.

testcontainers' reaper (Ryuk) is off: its image may not be pullable (no registry), and warm
services must outlive the process that started them; the labels do its job. Its connection
mode defaults to ``docker_host``: the machine may look like the inside of a container to it
(``/.dockerenv``), while the ports are published on this host's loopback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import shutil
import socket
import time
import tomllib
from base64 import urlsafe_b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# testcontainers reads these once, when it is imported.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

from .base import Endpoint, ServiceError, free_port  # noqa: E402
from .local import kafka as local_kafka  # noqa: E402
from .local import postgres as local_pg  # noqa: E402
from .local import prometheus as local_prometheus  # noqa: E402
from .local import rabbitmq as local_rabbitmq  # noqa: E402
from .local import redis as local_redis  # noqa: E402
from .local.process import pid_alive  # noqa: E402

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

def _cluster_id() -> str:
    """A KRaft cluster id as Kafka's ``random-uuid`` makes them: base64 of 16 random bytes,
    never starting with "-" (a command line would read it as an option)."""
    while True:
        candidate = urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


LABEL = "labrunner"
LABEL_SERVICE = "labrunner.service"
LABEL_OWNER = "labrunner.owner_pid"
LABEL_HOST = "labrunner.host"
LABEL_WARM = "labrunner.warm"

DEFAULT_IMAGES = {
    "postgres": "postgres:15",
    "redis": "redis:7",
    "kafka": f"apache/kafka:{local_kafka.KAFKA_VERSION}",
    "rabbitmq": "rabbitmq:3-management",
    "prometheus": "prom/prometheus:v2.42.0",
}
IMAGE_ENV = {name: f"LABRUNNER_IMAGE_{name.upper()}" for name in DEFAULT_IMAGES}

# Seconds to wait for a service to answer after its container started (the first start of
# an image may also pull it; that is not counted here).
READY_TIMEOUT = {"postgres": 60.0, "redis": 30.0, "kafka": 120.0, "rabbitmq": 120.0,
                 "prometheus": 60.0}
POLL = {"postgres": 0.1, "redis": 0.05, "kafka": 0.2, "rabbitmq": 0.25, "prometheus": 0.05}

REDIS_DATABASES = local_redis.DATABASES
KAFKA_LOG_DIR = "/tmp/kraft-combined-logs"  # the official image's default
PG_SETTINGS = (
    # As the local backend: throwaway clusters, fast starts; a restart still replays the WAL.
    "fsync=off", "full_page_writes=off", "max_connections=300", "shared_buffers=64MB",
    "log_min_messages=warning", "deadlock_timeout=200ms",
)


# --- configuration ---------------------------------------------------------------------------

def _config_files() -> list[Path]:
    files = []
    explicit = os.environ.get("LABRUNNER_CONFIG")
    if explicit:
        files.append(Path(explicit))
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    files.append(Path(base) / "labrunner" / "config.toml")
    # The workspace's marker file, here or above (a workspace setting beats the user's).
    here = Path.cwd()
    for folder in (here, *here.parents):
        marker = folder / "labrunner.toml"
        if marker.is_file():
            files.insert(0, marker)
            break
    return files


def image_for(service: str) -> str:
    """The image for ``service``: $LABRUNNER_IMAGE_<SERVICE>, else ``[docker.images]`` in a
    config file, else the official image."""
    env = os.environ.get(IMAGE_ENV[service], "").strip()
    if env:
        return env
    for path in _config_files():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        images = data.get("docker", {}).get("images", {})
        if isinstance(images, dict) and isinstance(images.get(service), str):
            return str(images[service])
    return DEFAULT_IMAGES[service]


# --- the daemon ------------------------------------------------------------------------------

def _client(timeout: int = 60) -> Any:
    # By name: a checkout's docker/ folder must not pass for the SDK in type checks.
    sdk: Any = importlib.import_module("docker")
    return sdk.from_env(timeout=timeout)


def _daemon_problem() -> str | None:
    try:
        importlib.import_module("docker")
        importlib.import_module("testcontainers")
    except ImportError as exc:
        return (f"the docker backend needs the Python packages docker and testcontainers "
                f"({exc}): pip install 'testcontainers>=4.8' docker")
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = _client(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "no daemon for us"
        text = str(exc)
        if "Permission denied" in text or "PermissionError" in text:
            return (f"the Docker daemon at {where} refuses this user: "
                    "sudo usermod -aG docker $USER, then log in again "
                    "(or use --backend local)")
        return (f"no Docker daemon answers at {where}: start Docker "
                "(sudo systemctl start docker, or Docker Desktop), set DOCKER_HOST to "
                "where it listens, or use --backend local")
    return None


# --- readiness -------------------------------------------------------------------------------

def _logs_tail(container: Any, lines: int = 25) -> str:
    try:
        raw = container.logs(tail=lines)
        return bytes(raw).decode("utf-8", errors="replace").rstrip() or "(no output)"
    except Exception:  # noqa: BLE001
        return "(no logs)"


def _wait_ready(container: Any, check: Callable[[], bool], what: str, timeout: float,
                interval: float) -> None:
    """Poll ``check`` until true; give up early (with the container's last log lines) if the
    container stops."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + 1.0
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - any error just means "not ready yet"
            pass
        now = time.monotonic()
        if now >= next_status:
            next_status = now + 1.0
            container.reload()
            if container.status in ("exited", "dead"):
                raise ServiceError(f"{what} failed to start: the container exited; "
                                   f"last log lines:\n{_logs_tail(container)}")
        if now > deadline:
            raise ServiceError(f"{what} was not ready after {timeout:.0f} s; last log lines:\n"
                               f"{_logs_tail(container)}")
        time.sleep(interval)


def _ready_check(endpoint: Endpoint) -> Callable[[], bool]:
    service = endpoint.service
    if service == "postgres":
        return lambda: local_pg.ready(endpoint)
    if service == "redis":
        return lambda: local_redis.ready(endpoint)
    if service == "kafka":
        return lambda: local_kafka.ready(endpoint)
    if service == "rabbitmq":
        return lambda: local_rabbitmq.ready(endpoint)
    if service == "prometheus":
        return lambda: local_prometheus.ready(endpoint)
    raise ServiceError(f"unknown service {service!r}")


def _wait_strategy(endpoint: Endpoint) -> Any:
    """A testcontainers wait strategy that waits until the service answers for real."""
    from testcontainers.core.waiting_utils import WaitStrategy

    service = endpoint.service

    class ServiceReady(WaitStrategy):
        def wait_until_ready(self, container: Any) -> None:
            _wait_ready(container.get_wrapped_container(), _ready_check(endpoint),
                        f"{service} in a container on 127.0.0.1:{endpoint.port}",
                        READY_TIMEOUT[service], POLL[service])

    return ServiceReady()


# --- per-service container specs -------------------------------------------------------------

def _kafka_env(port: int) -> dict[str, str]:
    """The local backend's broker settings as the official image's KAFKA_* variables, with
    the listener inside the container on the same port the host publishes, so the address
    it advertises (127.0.0.1:port) is the one clients use."""
    lines = local_kafka._properties(Path(KAFKA_LOG_DIR), port, 9093).splitlines()
    settings = dict(line.split("=", 1) for line in lines if "=" in line)
    settings.update({
        "listeners": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.quorum.voters": "1@localhost:9093",
        "log.dirs": KAFKA_LOG_DIR,
    })
    env = {
        "KAFKA_" + key.replace("_", "___").replace("-", "__").replace(".", "_").upper(): value
        for key, value in settings.items()
    }
    env.update({
        "CLUSTER_ID": _cluster_id(),
        "KAFKA_HEAP_OPTS": "-Xms128m -Xmx768m",
        "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 "
                                      "-Djava.awt.headless=true",
    })
    return env


def _redis_command() -> list[str]:
    """Redis reads a config file in its data volume, written at first start: CONFIG REWRITE
    then records settings changed at run time (a lab turning AOF on), so they survive a
    ``docker restart``. Through the image's own entrypoint (user, permissions)."""
    conf = "\n".join([
        "port 6379",
        "bind 0.0.0.0",
        "protected-mode no",
        "dir /data",
        f"databases {REDIS_DATABASES}",
        'save ""',
        "appendonly no",
        "enable-debug-command yes",
    ])
    # The config travels as the script's $0 and is printed into the file at first start.
    script = ('test -f /data/redis.conf || printf "%s\\n" "$0" > /data/redis.conf; '
              'exec docker-entrypoint.sh redis-server /data/redis.conf')
    return ["sh", "-c", script, conf]


@dataclass
class ContainerSpec:
    """How to run one service's container: the endpoint to be, container port -> host port,
    environment, command (None: the image's), host folders mounted at the same path, and
    whether it shares the host's network (to reach targets on the host's loopback)."""

    endpoint: Endpoint
    ports: dict[int, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    volumes: list[str] = field(default_factory=list)
    host_network: bool = False


def _prometheus_spec(workdir: Path) -> ContainerSpec:
    """Prometheus scrapes the tests' apps on the host's loopback: it runs on the host's
    network, listening on 127.0.0.1 only, and reads its config and target files from a host
    folder mounted at the same path (the tests write the target files there)."""
    root = workdir / "prometheus"
    targets = root / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    os.chmod(targets, 0o777)
    config = root / "prometheus.yml"
    config.write_text(local_prometheus.config_text(str(targets)), encoding="utf-8")
    port = free_port()
    endpoint = Endpoint("prometheus", "docker", "127.0.0.1", port,
                        extra={"targets_dir": str(targets), "dir": str(root)})
    # The image's entrypoint is the server: the command is its flags.
    command = local_prometheus.command("", str(config), "/prometheus", port)[1:]
    return ContainerSpec(endpoint, command=command, volumes=[str(root)], host_network=True)


def _spec(service: str, workdir: Path) -> ContainerSpec:
    """How to run ``service``."""
    if service == "prometheus":
        return _prometheus_spec(workdir)
    if service == "postgres":
        password = secrets.token_hex(12)
        port = free_port()
        endpoint = Endpoint("postgres", "docker", "127.0.0.1", port, username="postgres",
                            password=password, extra={"dbname": "postgres"})
        command = ["postgres"]
        for setting in PG_SETTINGS:
            command += ["-c", setting]
        # --no-sync: initdb of a throwaway cluster need not wait for the disk (as locally).
        env = {"POSTGRES_PASSWORD": password, "POSTGRES_INITDB_ARGS": "--no-sync"}
        return ContainerSpec(endpoint, {5432: port}, env, command)
    if service == "redis":
        port = free_port()
        endpoint = Endpoint("redis", "docker", "127.0.0.1", port,
                            extra={"databases": REDIS_DATABASES})
        return ContainerSpec(endpoint, {6379: port}, {}, _redis_command())
    if service == "kafka":
        port = free_port()
        endpoint = Endpoint("kafka", "docker", "127.0.0.1", port,
                            extra={"bootstrap": f"127.0.0.1:{port}"})
        return ContainerSpec(endpoint, {port: port}, _kafka_env(port))
    if service == "rabbitmq":
        port, mgmt = free_port(), free_port()
        password = secrets.token_hex(12)
        endpoint = Endpoint("rabbitmq", "docker", "127.0.0.1", port, username="labrunner",
                            password=password,
                            extra={"management_port": mgmt,
                                   "management_url": f"http://127.0.0.1:{mgmt}/api"})
        env = {"RABBITMQ_DEFAULT_USER": "labrunner", "RABBITMQ_DEFAULT_PASS": password}
        return ContainerSpec(endpoint, {5672: port, 15672: mgmt}, env)
    raise ServiceError(f"unknown service {service!r}")


# --- the backend -----------------------------------------------------------------------------

class DockerBackend:
    name = "docker"

    def __init__(self, tied_to_parent: bool = True) -> None:
        # False for a warm set (``labrunner services up``): its containers outlive us.
        self.tied_to_parent = tied_to_parent

    def available(self) -> str | None:
        return _daemon_problem()

    def start(self, service: str, workdir: Path) -> Endpoint:
        if service not in DEFAULT_IMAGES:
            raise ServiceError(f"unknown service {service!r}")
        problem = _daemon_problem()
        if problem:
            raise ServiceError(problem)
        reap_orphans()
        image = image_for(service)
        _ensure_image(image, service)
        spec = _spec(service, workdir)
        endpoint = spec.endpoint
        warm = not self.tied_to_parent or workdir.name.startswith("warm-")
        labels = {
            LABEL: "1",
            LABEL_SERVICE: service,
            LABEL_OWNER: str(os.getpid()),
            LABEL_HOST: socket.gethostname(),
            LABEL_WARM: "1" if warm else "0",
            "labrunner.workdir": str(workdir),
        }
        container = _container(image, spec, labels)
        started = time.monotonic()
        try:
            container.start()
        except BaseException as exc:  # Ctrl-C included: never leave a container behind
            _remove_quietly(container)
            if isinstance(exc, ServiceError):
                raise
            if isinstance(exc, Exception):
                raise ServiceError(f"{service} container ({image}) failed to start: "
                                   f"{exc}") from exc
            raise
        wrapped = container.get_wrapped_container()
        endpoint.extra.update({
            "container_id": wrapped.id,
            "container_name": wrapped.name,
            "image": image,
            "ready_seconds": round(time.monotonic() - started, 2),
        })
        return endpoint

    def stop(self, endpoint: Endpoint) -> None:
        from docker.errors import NotFound

        client = _client()
        try:
            container = client.containers.get(endpoint.extra["container_id"])
            container.remove(force=True, v=True)
        except NotFound:
            pass
        finally:
            client.close()
        if endpoint.extra.get("dir"):  # host folders mounted into the container
            shutil.rmtree(endpoint.extra["dir"], ignore_errors=True)

    def restart(self, endpoint: Endpoint, mode: str = "fast") -> Endpoint:
        """Restart the container keeping its data; ports stay (bound explicitly).

        Postgres: ``fast`` is a clean shutdown (the image's SIGINT), ``immediate`` a crash
        (SIGQUIT: the WAL is replayed at start). Redis: settings changed at run time (AOF)
        are written to its config file first, and an AOF being written is waited for."""
        if endpoint.service == "redis":
            _redis_prepare_restart(endpoint)
        client = _client()
        try:
            container = client.containers.get(endpoint.extra["container_id"])
            if endpoint.service == "postgres" and mode == "immediate":
                container.kill(signal="SIGQUIT")
                container.wait(timeout=30)
                container.start()
            else:
                container.restart(timeout=30)
            container.reload()
            _wait_ready(container, _ready_check(endpoint),
                        f"{endpoint.service} (restarted) on 127.0.0.1:{endpoint.port}",
                        READY_TIMEOUT[endpoint.service], POLL[endpoint.service])
        finally:
            client.close()
        return endpoint

    def suspend(self, endpoint: Endpoint) -> None:
        """Stop the container (a clean shutdown) keeping it, its volume and its ports."""
        client = _client()
        try:
            client.containers.get(endpoint.extra["container_id"]).stop(timeout=30)
        finally:
            client.close()

    def resume(self, endpoint: Endpoint) -> Endpoint:
        client = _client()
        try:
            container = client.containers.get(endpoint.extra["container_id"])
            container.start()
            container.reload()
            _wait_ready(container, _ready_check(endpoint),
                        f"{endpoint.service} (started again) on 127.0.0.1:{endpoint.port}",
                        READY_TIMEOUT[endpoint.service], POLL[endpoint.service])
        finally:
            client.close()
        return endpoint

    def alive(self, endpoint: Endpoint) -> bool:
        try:
            client = _client(timeout=5)
            try:
                container = client.containers.get(endpoint.extra["container_id"])
                if container.status != "running":
                    return False
            finally:
                client.close()
            return bool(_ready_check(endpoint)())
        except Exception:  # noqa: BLE001
            return False


def _container(image: str, spec: ContainerSpec, labels: dict[str, str]) -> DockerContainer:
    from testcontainers.core.config import ConnectionMode, testcontainers_config
    from testcontainers.core.container import DockerContainer

    # See the module's docstring. Ryuk stays off whatever the environment says: it would
    # remove a warm set's containers when the process that started them exits.
    testcontainers_config.ryuk_disabled = True
    if testcontainers_config.connection_mode_override is None:  # imported before us
        testcontainers_config.connection_mode_override = ConnectionMode(
            os.environ.get("TESTCONTAINERS_CONNECTION_MODE") or "docker_host")
    kwargs: dict[str, Any] = {"labels": labels}
    if spec.host_network:
        kwargs["network_mode"] = "host"
    elif not os.environ.get("DOCKER_HOST"):
        # Skip testcontainers' guess of a "host network" to join when it believes it runs
        # inside a container: the default bridge is what publishes ports on this host.
        kwargs["network"] = "bridge"
    container = DockerContainer(image, **kwargs)
    for inside, outside in spec.ports.items():
        # with_bind_ports takes no host address: set the mapping docker-py understands.
        container.ports[f"{inside}/tcp"] = ("127.0.0.1", outside)  # type: ignore[assignment]
    for folder in spec.volumes:
        container.with_volume_mapping(folder, folder, "ro")
    container.with_envs(**spec.env)
    if spec.command is not None:
        container.with_command(spec.command)
    container.waiting_for(_wait_strategy(spec.endpoint))
    return container


def _remove_quietly(container: DockerContainer) -> None:
    with contextlib.suppress(Exception):
        container.stop(force=True, delete_volume=True)


def _ensure_image(image: str, service: str) -> None:
    """Use the image if the daemon has it; pull it otherwise, saying what to do if that fails."""
    from docker.errors import ImageNotFound

    client = _client(timeout=600)
    try:
        try:
            client.images.get(image)
            return
        except ImageNotFound:
            pass
        try:
            client.images.pull(image)
        except Exception as exc:  # noqa: BLE001
            raise ServiceError(
                f"image {image} is not on this Docker host and could not be pulled ({exc}). "
                f"Pull it (docker pull {image}), or name an image you have in "
                f"{IMAGE_ENV[service]} or [docker.images] {service} = \"...\" in "
                "~/.config/labrunner/config.toml") from exc
    finally:
        client.close()


def _redis_prepare_restart(endpoint: Endpoint) -> None:
    import redis

    client = redis.Redis(host=endpoint.host, port=endpoint.port, socket_timeout=5)
    try:
        # An AOF switched on at run time exists only once its first rewrite is done.
        deadline = time.monotonic() + 30
        while True:
            info = client.info("persistence")
            if not (info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled")):
                break
            if time.monotonic() > deadline:
                raise ServiceError("redis AOF rewrite still running after 30 s")
            time.sleep(0.05)
        client.config_rewrite()
    finally:
        client.close()


# --- clean-up --------------------------------------------------------------------------------

def _describe(container: Any) -> str:
    labels = container.labels or {}
    return f"docker:{labels.get(LABEL_SERVICE, '?')} ({container.short_id})"


def remove_labelled() -> list[str]:
    """Remove every container (and network) labelled by labrunner; return what was removed."""
    removed: list[str] = []
    client = _client()
    try:
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            try:
                container.remove(force=True, v=True)
                removed.append(_describe(container))
            except Exception:  # noqa: BLE001 - gone already, or being removed
                continue
        for network in client.networks.list(filters={"label": LABEL}):
            try:
                network.remove()
                removed.append(f"docker:network {network.name}")
            except Exception:  # noqa: BLE001
                continue
    finally:
        client.close()
    return removed


def reap_orphans() -> list[str]:
    """Remove the containers of runs on this machine whose process is gone (killed, crashed)
    without removing them; warm ones (``labrunner services up``) are kept."""
    removed: list[str] = []
    try:
        client = _client(timeout=10)
    except Exception:  # noqa: BLE001
        return removed
    try:
        me = socket.gethostname()
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            labels = container.labels or {}
            owner = labels.get(LABEL_OWNER, "")
            if labels.get(LABEL_WARM) == "1" or labels.get(LABEL_HOST) != me:
                continue
            if owner.isdigit() and not pid_alive(int(owner)):
                try:
                    container.remove(force=True, v=True)
                    removed.append(_describe(container))
                except Exception:  # noqa: BLE001
                    continue
    finally:
        client.close()
    return removed
