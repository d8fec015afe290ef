"""What every service backend offers, whatever runs the service (a child process, a container
or a URL someone else manages), and what makes a service a service here.

A backend starts a service and hands back an :class:`Endpoint`: plain data that is written to
the run's state file, read by the pytest plugin in another process, and handed back to the
backend to stop or restart the service. Nothing here holds a live process object, so a
``labrunner services down`` from another shell can stop what a crashed run left behind.

Each service is one :class:`ServiceKind`, registered by name, holding everything about it
that the three backends and the pytest plugin need: its URL form, readiness check, how to run
it as a local process or a container, how to read it from an external URL, the restart modes
it offers, and the namespace each test gets on it. The backends and the plugin hold no
per-service code: they ask the kind. A new service is one file under ``services/kinds/`` (a
subclass of :class:`ServiceKind` decorated with :func:`register`) and its import in
``services/kinds/__init__.py``.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..errors import LabrunnerError


class ServiceError(LabrunnerError):
    """A service could not be started or reached; the message says why and what to do."""


class StartCancelled(ServiceError):
    """The run that was starting the service stopped (Ctrl-C): give up, leave nothing."""


# Set by the thread that starts a service for a run (``manager.Startup``): a Ctrl-C sets the
# event and every wait for readiness gives up at its next poll, so nothing keeps starting
# (and printing) after the run was interrupted.
start_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "labrunner_start_cancel", default=None)


def start_cancelled() -> bool:
    event = start_cancel.get()
    return event is not None and event.is_set()


@dataclass
class Endpoint:
    """Where a running service answers, and what its backend needs to manage it later."""

    service: str
    backend: str
    host: str
    port: int
    username: str = ""
    password: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoint:
        return cls(**data)

    @property
    def url(self) -> str:
        """A client URL for the service's server-wide admin connection."""
        return kind(self.service).url(self)


class Backend(Protocol):
    """One way of running services: ``local``, ``docker`` or ``external``."""

    name: str

    def available(self) -> str | None:
        """None when this backend can run here, else why not and how to fix it."""

    def start(self, service: str, workdir: Path) -> Endpoint:
        """Start ``service`` (its state under ``workdir``) and return once it is ready."""

    def stop(self, endpoint: Endpoint) -> None:
        """Stop the service and remove what it left on disk."""

    def restart(self, endpoint: Endpoint, mode: str | None = None) -> Endpoint:
        """Stop and start the service keeping its data (for durability labs); ``mode`` is
        one of the kind's ``restart_modes`` (Postgres: a clean or a crash restart)."""

    def suspend(self, endpoint: Endpoint) -> None:
        """Stop the service keeping its data and port, until :meth:`resume` (for labs that
        watch a dependency go down and come back)."""

    def resume(self, endpoint: Endpoint) -> Endpoint:
        """Start a suspended service again with its data; return once it is ready."""

    def alive(self, endpoint: Endpoint) -> bool:
        """Whether the service still answers."""


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    failed: Callable[[], str | None] = lambda: None,
    interval: float = 0.05,
) -> None:
    """Poll ``check`` until it is true; ``failed`` may report that waiting is pointless
    (the process exited) with the reason to show."""
    deadline = time.monotonic() + timeout
    while True:
        if start_cancelled():
            raise StartCancelled(f"{what}: start cancelled")
        reason = failed()
        if reason:
            raise ServiceError(f"{what} failed to start: {reason}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - any error just means "not ready yet"
            pass
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(interval)


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    """Write JSON so that a reader never sees half a file, even if we are killed mid-write;
    ``mode`` is set before it appears (0600 for what holds the services' passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w",
              encoding="utf-8") as out:
        os.fchmod(out.fileno(), mode)
        out.write(json.dumps(data, indent=2))
    os.replace(tmp, path)


# --- service kinds ------------------------------------------------------------------------


@dataclass
class Launch:
    """One process the local backend starts for a service (most need one; RabbitMQ starts
    its own epmd first). ``pidfile``, when given, is written with the child's pid so a
    later process can stop it; services that write their own pid file leave it None."""

    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    as_service_user: bool = False
    pidfile: Path | None = None
    # A port this process must accept connections on before the next one is started
    # (RabbitMQ's node registers with its epmd as it boots).
    wait_port: int | None = None


@dataclass
class ContainerSpec:
    """How the docker backend runs a service: the endpoint to be, container port -> host
    port, environment, command (None: the image's), host folders mounted at the same path,
    and whether it shares the host's network (to reach the tests' apps on its loopback)."""

    endpoint: Endpoint
    ports: dict[int, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    volumes: list[str] = field(default_factory=list)
    host_network: bool = False


class ServiceScope(Protocol):
    """What a test's handle on a service may ask of the session (given by the plugin)."""

    def new_name(self) -> str:
        """A fresh name unique to this test: database, prefix, vhost, job."""

    def endpoint(self) -> Endpoint:
        """The service's endpoint now (a restart through the runner may hand a new one)."""

    def restart(self, mode: str | None = None) -> None:
        """Restart the service keeping its data."""

    def suspend(self) -> None:
        """Stop the service keeping its data, until :meth:`resume` or the test's end."""

    def resume(self) -> None:
        """Start the suspended service again."""


class ServiceKind:
    """One service. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    fixture: ClassVar[str]                   # the pytest fixture a test asks for
    restart_modes: ClassVar[frozenset[str]] = frozenset()

    # Local backend: the folder under the run's workdir, how long to wait and poll for
    # readiness, how to stop it.
    folder: ClassVar[str]
    ready_timeout: ClassVar[float] = 30.0
    ready_interval: ClassVar[float] = 0.05
    stop_timeout: ClassVar[float] = 10.0
    discard_timeout: ClassVar[float] = 0.0   # when its data goes too (0: stop_timeout)
    stop_group: ClassVar[bool] = False       # signal the process's whole session group

    # Docker backend.
    image: ClassVar[str]
    container_ready_timeout: ClassVar[float] = 60.0
    container_poll: ClassVar[float] = 0.1

    # External backend: the environment variable naming the service's URL.
    external_env: ClassVar[str]

    # --- where it answers ---------------------------------------------------------------

    def url(self, endpoint: Endpoint) -> str:
        """A client URL for the service's server-wide admin connection."""
        raise NotImplementedError

    def ready(self, endpoint: Endpoint) -> bool:
        """Whether the service answers for real (any exception means "not yet")."""
        raise NotImplementedError

    # --- local processes ----------------------------------------------------------------

    def missing(self) -> str | None:
        """Why it cannot run locally here, with the command that fixes it; None if it can."""
        return None

    def prepare(self, folder: Path) -> Endpoint:
        """Fill ``folder`` (the service's own, fresh and empty: config, data) and pick its
        ports: the endpoint to be, with ``extra["dir"]`` = ``folder``. No process yet: the
        local backend then gives the folder to the service's uid and starts
        :meth:`launches`. Called only when :meth:`missing` is None."""
        raise NotImplementedError

    def launches(self, endpoint: Endpoint) -> list[Launch]:
        """The processes to start, in order; the last one is the service."""
        raise NotImplementedError

    def pid_files(self, endpoint: Endpoint) -> list[Path]:
        """Where the pids of its running processes are, the service's own first."""
        return [launch.pidfile for launch in reversed(self.launches(endpoint))
                if launch.pidfile is not None]

    def stop_signal(self, mode: str | None) -> int:
        """The signal that stops it (``mode``: a restart mode, None for a plain stop)."""
        return signal.SIGTERM

    def before_restart(self, endpoint: Endpoint) -> None:
        """Anything to do while it still runs, before a restart (on every backend)."""

    # --- containers ---------------------------------------------------------------------

    def container(self, workdir: Path) -> ContainerSpec:
        raise NotImplementedError

    def container_kill_signal(self, mode: str | None) -> str | None:
        """A signal that stops the container for this restart mode instead of a clean
        ``docker restart`` (then it is started again), or None."""
        return None

    # --- external -----------------------------------------------------------------------

    def parse_external(self, value: str) -> Endpoint:
        """The endpoint for the URL in :attr:`external_env`: host, port, user, password."""
        url = urllib.parse.urlsplit(value)
        if not url.hostname or not url.port:
            raise ServiceError(f"{self.external_env}={value!r}: give a full URL with host "
                               "and port")
        return Endpoint(
            self.name, "external", url.hostname, url.port,
            username=urllib.parse.unquote(url.username or ""),
            password=urllib.parse.unquote(url.password or ""),
            extra=self.external_extra(url),
        )

    def external_extra(self, url: urllib.parse.SplitResult) -> dict[str, Any]:
        return {}

    # --- a test's namespace -------------------------------------------------------------

    def open(self, endpoint: Endpoint, scope: ServiceScope) -> Any:
        """Make the test's own namespace on the service; return what the fixture yields."""
        raise NotImplementedError

    def close(self, handle: Any, scope: ServiceScope) -> None:
        """Remove the namespace (best effort: the caller ignores errors)."""

    # --- shared ---------------------------------------------------------------------------

    def check_mode(self, mode: str | None) -> None:
        if mode is not None and mode not in self.restart_modes:
            offered = ", ".join(sorted(self.restart_modes)) or "none"
            raise ServiceError(f"{self.name} cannot be restarted in mode {mode!r} "
                               f"(modes: {offered})")


_KINDS: dict[str, ServiceKind] = {}


def register(kind_class: type[ServiceKind]) -> type[ServiceKind]:
    """Class decorator: make the service known to every backend, the catalog and the plugin
    (in registration order, which is the order a run starts them)."""
    _KINDS[kind_class.name] = kind_class()
    return kind_class


def kind(name: str) -> ServiceKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ServiceError(f"unknown service {name!r}; known: {', '.join(_KINDS)}") from None


def kinds() -> list[ServiceKind]:
    """Every registered service, in the order a run starts them."""
    return list(_KINDS.values())


def service_names() -> tuple[str, ...]:
    return tuple(_KINDS)

