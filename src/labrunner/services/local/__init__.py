"""The ``local`` backend: each service a child process (or a few) of the runner on loopback.

What to run comes from the service's kind (:meth:`ServiceKind.prepare` and
:meth:`ServiceKind.launches`); starting, waiting until ready, stopping by pid (from any later
process) and restarting are the same for every service and live here.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from ..base import (
    Endpoint,
    Launch,
    ServiceError,
    ServiceKind,
    StartCancelled,
    kind,
    start_cancelled,
    wait_until,
)
from .process import chown_for_service, pid_alive, remove_tree, spawn, tail, terminate

START_ATTEMPTS = 3


def _read_pid(file: Path) -> int:
    try:
        return int(file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def pids(service: ServiceKind, endpoint: Endpoint) -> list[int]:
    """The service's processes now, its own first (a lab may have restarted it: the pid
    files, not the pid recorded at start; that one when there is no pid file)."""
    found = [pid for pid in map(_read_pid, service.pid_files(endpoint)) if pid]
    return found or [int(endpoint.extra.get("pid", 0))]


def _remove_partial(service: ServiceKind, workdir: Path) -> None:
    """Kill and remove what a failed start left (its pid files name the processes)."""
    folder = workdir / service.folder
    for pidfile in folder.rglob("*.pid"):
        pid = _read_pid(pidfile)
        if pid_alive(pid):
            terminate(pid, timeout=5)
    remove_tree(folder)


def _wait_for_port(proc: subprocess.Popen[bytes], one: Launch, port: int,
                   timeout: float) -> None:
    """Until ``one``'s process accepts connections on ``port`` (or has exited)."""
    def accepts() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until(accepts, timeout=timeout, what=f"{Path(one.cmd[0]).name} on port {port}",
               failed=lambda: None if proc.poll() is None else
               f"{one.cmd[0]} exited with {proc.returncode}; last log lines:\n{tail(one.log)}",
               interval=0.01)


def launch(endpoint: Endpoint, tied_to_parent: bool) -> None:
    """Start the service's processes and return once it answers."""
    service = kind(endpoint.service)
    procs = []
    for one in service.launches(endpoint):
        proc = spawn(one.cmd, one.log, env=one.env, as_service_user=one.as_service_user,
                     tied_to_parent=tied_to_parent, cwd=one.cwd)
        if one.pidfile is not None:
            one.pidfile.write_text(str(proc.pid), encoding="ascii")
        procs.append((proc, one.log))
        if one.wait_port is not None:
            _wait_for_port(proc, one, one.wait_port, service.ready_timeout)
    main, log = procs[-1]
    endpoint.extra["pid"] = main.pid
    wait_until(
        lambda: service.ready(endpoint),
        timeout=service.ready_timeout,
        what=f"{service.name} on port {endpoint.port}",
        failed=lambda: None if main.poll() is None else
        f"{service.name} exited with {main.returncode}; last log lines:\n{tail(log)}",
        interval=service.ready_interval,
    )


def stop(endpoint: Endpoint, remove: bool = True, mode: str | None = None) -> None:
    """Stop the service (``mode``: how, for a restart); with ``remove``, its files too."""
    service = kind(endpoint.service)
    timeout = (service.discard_timeout or service.stop_timeout) if remove else service.stop_timeout
    for pid in pids(service, endpoint):
        if pid_alive(pid):
            terminate(pid, timeout=timeout, sig=service.stop_signal(mode),
                      group=service.stop_group)
    if remove:
        remove_tree(Path(endpoint.extra["dir"]))


class LocalBackend:
    name = "local"

    def __init__(self, tied_to_parent: bool = True) -> None:
        # A warm set (``labrunner services up``) outlives the command that started it.
        self.tied_to_parent = tied_to_parent

    def available(self) -> str | None:
        return None

    def missing(self, service: str) -> str | None:
        """Why ``service`` cannot run locally here, with the command that fixes it."""
        return kind(service).missing()

    def start(self, service: str, workdir: Path) -> Endpoint:
        what = kind(service)
        reason = what.missing()
        if reason:
            raise ServiceError(reason)
        for attempt in range(START_ATTEMPTS):
            if start_cancelled():
                raise StartCancelled(f"{service}: start cancelled")
            folder = workdir / what.folder
            remove_tree(folder)
            # The service's uid's alone (a graded run's services have a uid of their own);
            # a kind may open it to others for what it shares (Prometheus' target files).
            folder.mkdir(parents=True, mode=0o700)
            try:
                endpoint = what.prepare(folder)
                chown_for_service(folder)
                launch(endpoint, self.tied_to_parent)
                return endpoint
            except ServiceError as exc:
                # A free port is only free when we looked: another process may take it before
                # the service binds it. Clean up and try again on fresh ports.
                _remove_partial(what, workdir)
                if isinstance(exc, StartCancelled) or start_cancelled() or \
                        attempt == START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self, endpoint: Endpoint) -> None:
        stop(endpoint)

    def restart(self, endpoint: Endpoint, mode: str | None = None) -> Endpoint:
        """Stop and start again on the same ports with the same data; the restarted service
        outlives the process that asked (a test)."""
        service = kind(endpoint.service)
        service.check_mode(mode)
        service.before_restart(endpoint)
        stop(endpoint, remove=False, mode=mode)
        launch(endpoint, tied_to_parent=False)
        return endpoint

    def suspend(self, endpoint: Endpoint) -> None:
        stop(endpoint, remove=False)

    def resume(self, endpoint: Endpoint) -> Endpoint:
        launch(endpoint, tied_to_parent=False)
        return endpoint

    def alive(self, endpoint: Endpoint) -> bool:
        """Still there? Full readiness was proven when the service started; reusing a warm
        one only needs its process and its port, and a run should not pay for importing
        five client libraries to learn that."""
        pid = pids(kind(endpoint.service), endpoint)[0]
        if pid and not pid_alive(pid):
            return False
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=1):
                return True
        except OSError:
            return False
