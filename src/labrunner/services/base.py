"""What every service backend offers, whatever runs the service (a child process, a container
or a URL someone else manages).

A backend starts a service and hands back an :class:`Endpoint`: plain data that is written to
the run's state file, read by the pytest plugin in another process, and handed back to the
backend to stop or restart the service. Nothing here holds a live process object, so a
``labrunner services down`` from another shell can stop what a crashed run left behind.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

# In the order a run starts them.
SERVICE_NAMES = ("postgres", "redis", "kafka", "rabbitmq", "prometheus")


class ServiceError(Exception):
    """A service could not be started or reached; the message says why and what to do."""


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
        auth = f"{self.username}:{self.password}@" if self.username else ""
        if self.service == "postgres":
            db = self.extra.get("dbname", "postgres")
            return f"postgresql://{auth}{self.host}:{self.port}/{db}"
        if self.service == "redis":
            return f"redis://{auth}{self.host}:{self.port}/0"
        if self.service == "kafka":
            return f"{self.host}:{self.port}"
        if self.service == "rabbitmq":
            return f"amqp://{auth}{self.host}:{self.port}/"
        if self.service == "prometheus":
            return str(self.extra.get("url") or f"http://{self.host}:{self.port}").rstrip("/")
        raise ValueError(self.service)


class Backend(Protocol):
    """One way of running services: ``local``, ``docker`` or ``external``."""

    name: str

    def available(self) -> str | None:
        """None when this backend can run here, else why not and how to fix it."""

    def start(self, service: str, workdir: Path) -> Endpoint:
        """Start ``service`` (its state under ``workdir``) and return once it is ready."""

    def stop(self, endpoint: Endpoint) -> None:
        """Stop the service and remove what it left on disk."""

    def restart(self, endpoint: Endpoint) -> Endpoint:
        """Stop and start the service keeping its data (for durability labs)."""

    def suspend(self, endpoint: Endpoint) -> None:
        """Stop the service keeping its data and port, until :meth:`resume` (for labs that
        watch a dependency go down and come back)."""

    def resume(self, endpoint: Endpoint) -> Endpoint:
        """Start a suspended service again with its data; return once it is ready."""

    def alive(self, endpoint: Endpoint) -> bool:
        """Whether the service still answers."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, to show when a service fails."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file, even if we are killed mid-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)
