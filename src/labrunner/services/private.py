"""A graded run's own local services, out of every other run's reach.

Shared services with one namespace per run are fine for a learner, not for untrusted code:
whoever can connect as the services' admin can open a neighbour's database. So when grading
as root, each lab run of each submission gets:

- a network namespace of its own (Linux namespaces are per thread: the thread that runs the
  lab enters a new one, and every process it starts - the services and the graded pytest -
  inherits it), so nothing outside the run can reach its services and it reaches no other;
- Postgres and Redis running as a uid of their own (not the submission's, whose process
  limit they would eat; not a shared account, whose files hold every other run's data),
  Postgres inside the sandbox's view of the file system, so a superuser's ``COPY ... PROGRAM``
  sees no more than the submission;
- a control socket through which the graded process asks for the restarts some labs need
  (it may not signal services it does not own): the runner does them and answers.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import fcntl
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .base import Endpoint, ServiceError, write_json_atomic
from .local.process import ServiceOwner, services_owned_by
from .manager import STATE_VERSION, ServiceSet, Startup

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
PF_EXITING = 0x4
ENV_CONTROL = "LABRUNNER_SERVICE_CONTROL"
# A folder where each private set writes who its processes run as, once started and again
# before it is stopped (the tests read it to prove no service of a graded run is root's).
ENV_AUDIT = "LABRUNNER_SERVICE_AUDIT"
# What the graded process may ask for: a restart, or a stop now and a start later.
ACTIONS = ("restart", "suspend", "resume")

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _enter_new_network() -> None:
    """Move the calling thread into a fresh network namespace with its loopback up."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def in_private_network(work: Callable[[], T]) -> T:
    """Run ``work`` in a new thread inside a network namespace of its own; return its result
    or raise what it raised. The namespace goes when its last process does."""
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()

    def body() -> None:
        try:
            _enter_new_network()
            outcome["value"] = context.run(work)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=body, name="private-network")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


_probe: bool | None = None


def private_networks_available() -> bool:
    """Can this process give a thread a network namespace of its own (root, Linux, allowed
    by the container it runs in)?"""
    global _probe
    if _probe is None:
        if os.geteuid() != 0:
            _probe = False
        else:
            try:
                _probe = in_private_network(lambda: True)
            except OSError:
                _probe = False
    return _probe


class ControlServer:
    """Serves restart requests from the graded process over a Unix socket it alone can
    open: one JSON line in (``{"restart": "postgres", "mode": "immediate"}``), one out."""

    def __init__(self, path: Path, service_set: ServiceSet, owner_uid: int) -> None:
        self.path = path
        self.service_set = service_set
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chown(path, owner_uid, owner_uid)
        os.chmod(path, 0o600)
        self.sock.listen(4)
        self.lock = threading.Lock()
        # The context carries the services' owner (restarted servers keep their uid); the
        # thread inherits the network namespace of the thread that creates it.
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._serve,),
                                       name="service-control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(120)
                try:
                    request = json.loads(conn.makefile("r", encoding="utf-8").readline())
                    answer = self.handle(request)
                except Exception as exc:  # noqa: BLE001 - the caller gets the reason
                    answer = {"error": str(exc) or type(exc).__name__}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(answer).encode() + b"\n")

    def handle(self, request: Any) -> dict[str, Any]:
        action = next((a for a in ACTIONS if isinstance(request, dict)
                       and isinstance(request.get(a), str)), None)
        if action is None:
            return {"error": "expected {\"restart\" | \"suspend\" | \"resume\": SERVICE}"}
        name = request[action]
        mode = request.get("mode")
        endpoint = self.service_set.endpoints.get(name)
        if endpoint is None:
            return {"error": f"{name} is not running for this lab"}
        backend = self.service_set.backend
        with self.lock:
            if action == "suspend":
                backend.suspend(endpoint)
            elif action == "resume":
                backend.resume(endpoint)
            else:
                backend.restart(endpoint, mode)
            self.service_set.save()
        return {"ok": True, "endpoint": endpoint.to_json()}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def request_restart(control: str, service: str, action: str = "restart",
                    **options: Any) -> Endpoint:
    """The graded process's side: ask the runner to restart (or suspend, or resume)
    ``service``; wait until it has."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(180)
        sock.connect(control)
        sock.sendall(json.dumps({action: service, **options}).encode() + b"\n")
        answer = json.loads(sock.makefile("r", encoding="utf-8").readline() or "{}")
    if "error" in answer or "endpoint" not in answer:
        raise ServiceError(f"the runner could not {action} {service}: "
                           f"{answer.get('error', 'no answer')}")
    return Endpoint.from_json(answer["endpoint"])


def processes_in_this_network() -> list[dict[str, Any]]:
    """Every process in the calling thread's network namespace but this one: pid, command
    name, real uid, state, whether it is on its way out, and its memory cgroup (read from
    /proc as root)."""
    mine = os.readlink("/proc/thread-self/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "ns" / "net") != mine:
                continue
            comm = (entry / "comm").read_text(encoding="utf-8", errors="replace").strip()
            uid = next(int(line.split()[1]) for line in
                       (entry / "status").read_text(encoding="ascii", errors="replace")
                       .splitlines() if line.startswith("Uid:"))
            # The cgroup before the flags: a process leaves its cgroup on its way out only
            # after PF_EXITING is set, so one that read "/" for that reason reads exiting
            # next. The other order let a backend that began to exit between the two reads
            # pass as a live process outside the run's cgroup (CI 46a).
            groups = (entry / "cgroup").read_text(encoding="utf-8", errors="replace")
            # /proc/<pid>/stat after the command: the state first, the flags 7th.
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
            fields = stat.rsplit(")", 1)[1].split()
            state, exiting = fields[0], bool(int(fields[6]) & PF_EXITING)
        except (OSError, StopIteration, ValueError, IndexError):
            continue  # gone meanwhile
        # The memory cgroup (v1 "N:memory:/path", or v2's single "0::/path"). A process on
        # its way out (exiting, or a zombie not yet reaped) reads "/" on cgroup v1: the
        # kernel has let go of it before it is gone.
        memory = next((line.split(":", 2)[2] for line in groups.splitlines()
                       if line.split(":", 2)[1:2] in (["memory"], [""])), "")
        found.append({"pid": int(entry.name), "comm": comm, "uid": uid, "state": state,
                      "exiting": exiting or state in ("Z", "X"), "cgroup": memory})
    return found


def _audit(when: str, owner: ServiceOwner, visible_to: int) -> None:
    folder = os.environ.get(ENV_AUDIT)
    if not folder:
        return
    path = Path(folder) / f"{visible_to}-{when}-{os.getpid()}-{threading.get_ident()}.json"
    write_json_atomic(path, {"when": when, "service_uid": owner.uid, "sandbox_uid": visible_to,
                             "processes": processes_in_this_network()})


@contextlib.contextmanager
def private_services(services: Iterable[str], owner: ServiceOwner, visible_to: int,
                     run_dir: Path) -> Iterator[tuple[Path, Path]]:
    """Start ``services`` for one graded run (call it inside :func:`in_private_network`);
    yield the state file and control socket the graded process (uid ``visible_to``) reads,
    both in ``run_dir``. Everything is stopped and removed at the end."""
    with services_owned_by(owner):
        service_set = ServiceSet.ephemeral("local")
        # The services' folder belongs to their uid; each service's own folder in it is
        # that uid's alone (0700; the Kafka and RabbitMQ nodes, root's, do not care), so the
        # graded code cannot read the data files behind its services' backs. It may pass
        # through to what a service shares with the tests: Prometheus' target files.
        os.chown(service_set.workdir, owner.uid, owner.uid)
        os.chmod(service_set.workdir, 0o711)
        control: ControlServer | None = None
        # All at once, a thread each (they inherit this thread's network namespace and, by
        # the context, the services' owner): a lab that needs RabbitMQ and Kafka waits for
        # the slower of the two, not for both in turn. Each thread outlives its start (the
        # parent-death signal follows the thread that spawned a service) until the stop.
        startup = Startup(service_set, list(services)).begin()
        try:
            startup.wait()
            problem = startup.problem(startup.names)
            if problem:
                raise ServiceError(problem)
            state = run_dir / "services.json"
            write_json_atomic(state, {
                "version": STATE_VERSION, "backend": "local", "owner_pid": os.getpid(),
                "workdir": "", "services": {n: ep.to_json()
                                            for n, ep in service_set.endpoints.items()}},
                              mode=0o600)
            os.chown(state, visible_to, visible_to)
            control = ControlServer(run_dir / "control.sock", service_set, visible_to)
            _audit("started", owner, visible_to)
            yield state, control.path
            _audit("finished", owner, visible_to)
        finally:
            if control is not None:
                control.close()
            startup.cancel()   # a start still waiting (after another failed) gives up
            startup.join()
            service_set.stop()
            startup.release()
