"""The ``docker`` backend: each service a container started with testcontainers.

What to run comes from the service's kind (:attr:`ServiceKind.image` and
:meth:`ServiceKind.container`). The images are the official ones by default (``postgres:15``,
``redis:7``, ``apache/kafka:4.3.1``, ``rabbitmq:3-management``, ``prom/prometheus``); each can
be replaced by an environment variable (``LABRUNNER_IMAGE_POSTGRES``, ``..._REDIS``, ...) or by
an entry in a config file (``[docker.images]`` in ``~/.config/labrunner/config.toml`` or in the
workspace's ``labrunner.toml``); the variable wins.

Every published port is bound to 127.0.0.1 on a host port chosen here and bound explicitly,
so a ``docker restart`` (durability labs restart Postgres and Redis) keeps the endpoint, and
Kafka can advertise the very port clients reach it on (Prometheus instead shares the host's
network, to reach the tests' apps on its loopback). A service is handed back only once it
answers for real (its kind's readiness check), as with the local backend.

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
import shutil
import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

# testcontainers reads these once, when it is imported.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

from .base import ContainerSpec, Endpoint, ServiceError, kind  # noqa: E402
from .local.process import pid_alive  # noqa: E402

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

LABEL = "labrunner"
LABEL_SERVICE = "labrunner.service"
LABEL_OWNER = "labrunner.owner_pid"
LABEL_HOST = "labrunner.host"
LABEL_WARM = "labrunner.warm"



def default_image(service: str) -> str:
    return kind(service).image


def image_env(service: str) -> str:
    return f"LABRUNNER_IMAGE_{service.upper()}"


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
    env = os.environ.get(image_env(service), "").strip()
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
    return default_image(service)


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
    service = kind(endpoint.service)
    return lambda: service.ready(endpoint)


def _wait_strategy(endpoint: Endpoint) -> Any:
    """A testcontainers wait strategy that waits until the service answers for real."""
    from testcontainers.core.waiting_utils import WaitStrategy

    service = endpoint.service

    class ServiceReady(WaitStrategy):
        def wait_until_ready(self, container: Any) -> None:
            _wait_ready(container.get_wrapped_container(), _ready_check(endpoint),
                        f"{service} in a container on 127.0.0.1:{endpoint.port}",
                        kind(service).container_ready_timeout, kind(service).container_poll)

    return ServiceReady()


# --- the backend -----------------------------------------------------------------------------

class DockerBackend:
    name = "docker"

    def __init__(self, tied_to_parent: bool = True) -> None:
        # False for a warm set (``labrunner services up``): its containers outlive us.
        self.tied_to_parent = tied_to_parent

    def available(self) -> str | None:
        return _daemon_problem()

    def start(self, service: str, workdir: Path) -> Endpoint:
        what = kind(service)
        problem = _daemon_problem()
        if problem:
            raise ServiceError(problem)
        reap_orphans()
        image = image_for(service)
        _ensure_image(image, service)
        spec = what.container(workdir)
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

    def restart(self, endpoint: Endpoint, mode: str | None = None) -> Endpoint:
        """Restart the container keeping its data; ports stay (bound explicitly). A mode the
        kind maps to a signal (Postgres' ``immediate``: SIGQUIT, a crash) kills the container
        with it and starts it again; otherwise ``docker restart`` (a clean shutdown)."""
        service = kind(endpoint.service)
        service.check_mode(mode)
        service.before_restart(endpoint)
        kill = service.container_kill_signal(mode)
        with _container_of(endpoint) as container:
            if kill is not None:
                container.kill(signal=kill)
                container.wait(timeout=30)
                container.start()
            else:
                container.restart(timeout=30)
            _wait_again(container, endpoint, "restarted")
        return endpoint

    def suspend(self, endpoint: Endpoint) -> None:
        """Stop the container (a clean shutdown) keeping it, its volume and its ports."""
        with _container_of(endpoint) as container:
            container.stop(timeout=30)

    def resume(self, endpoint: Endpoint) -> Endpoint:
        with _container_of(endpoint) as container:
            container.start()
            _wait_again(container, endpoint, "started again")
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


@contextlib.contextmanager
def _container_of(endpoint: Endpoint) -> Iterator[Any]:
    client = _client()
    try:
        yield client.containers.get(endpoint.extra["container_id"])
    finally:
        client.close()


def _wait_again(container: Any, endpoint: Endpoint, how: str) -> None:
    container.reload()
    service = kind(endpoint.service)
    _wait_ready(container, _ready_check(endpoint),
                f"{endpoint.service} ({how}) on 127.0.0.1:{endpoint.port}",
                service.container_ready_timeout, service.container_poll)


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
                f"{image_env(service)} or [docker.images] {service} = \"...\" in "
                "~/.config/labrunner/config.toml") from exc
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
