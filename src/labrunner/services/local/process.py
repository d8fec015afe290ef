"""Child processes for the local backend: started in their own session (so a Ctrl-C at the
terminal reaches the runner, which stops them in order, and not the services half-way),
optionally tied to the runner's life, and stopped by pid from any later process."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...parent_death import die_with_parent
from ..base import ServiceError


def undumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process (and what it forks, until an exec): no process of
    its uid may attach to it, read its memory or take its descriptors (ptrace, /proc/<pid>/mem,
    pidfd_getfd). The verification does it before it reads its key; the learner factory, so
    that a learner's program cannot reach the factory, a host or its own monitor."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def default_service_user() -> str | None:
    """The unprivileged account services run as when we are root (initdb refuses root):
    ``labrunner`` if the set-up created it, else ``nobody``. None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("labrunner", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root but neither user 'labrunner' nor 'nobody' exists")


@dataclass(frozen=True)
class ServiceOwner:
    """Who runs the services started from this thread, instead of the default user: a graded
    run's private services belong to a uid of their own (no passwd entry needed), and may
    first enter the sandbox's private view of the file system (``prepare``, run as root in
    the child), so a database superuser's COPY ... PROGRAM sees no more than the submission."""

    uid: int
    prepare: Callable[[], None] | None = None


# A context variable, not a global: grading starts several private sets at once, one per
# worker thread, each for its own uid.
_owner: contextvars.ContextVar[ServiceOwner | None] = contextvars.ContextVar(
    "labrunner_service_owner", default=None)


@contextlib.contextmanager
def services_owned_by(owner: ServiceOwner) -> Iterator[None]:
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


def service_owner() -> ServiceOwner | None:
    return _owner.get()


def service_user() -> str | int | None:
    """The user (name or uid) services that refuse root run as, here and now."""
    owner = _owner.get()
    return owner.uid if owner is not None else default_service_user()


def chown_for_service(path: Path) -> None:
    """Give a directory tree to the service user (no-op when not root)."""
    user = service_user()
    if user is None:
        return
    if isinstance(user, int):
        uid = gid = user
    else:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


# A RAM-backed folder is used for throwaway state only with this much room left in it (a
# container's /dev/shm is often 64 MB: too small for Kafka's logs).
FAST_TEMP_MIN_BYTES = 2 << 30


def fast_temp_root() -> Path:
    """Where throwaway state goes: /dev/shm when it is a tmpfs with room, else the system
    temp dir. Creating a service's data folder is mostly metadata (a Postgres cluster is a
    thousand files): 1.1 s on this machine's ext4, 0.08 s on tmpfs, for every start."""
    shm = Path("/dev/shm")
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
        tmpfs = any(line.split()[1:3] == [str(shm), "tmpfs"] for line in mounts
                    if len(line.split()) > 2)
        room = os.statvfs(shm)
        if (tmpfs and room.f_bavail * room.f_frsize >= FAST_TEMP_MIN_BYTES
                and os.access(shm, os.W_OK | os.X_OK)):
            return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def runtime_dir() -> Path:
    """Where local services keep their throwaway state: one folder per user, under
    :func:`fast_temp_root` (not $HOME, which the unprivileged service user cannot enter)."""
    chosen = os.environ.get("LABRUNNER_RUNTIME_DIR")
    base = Path(chosen or fast_temp_root() / f"labrunner-{os.geteuid()}")
    try:
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
    except OSError as exc:
        where = f"LABRUNNER_RUNTIME_DIR={chosen}" if chosen else str(base)
        raise ServiceError(
            f"{where}: cannot be used as the folder for local services' state "
            f"({exc.strerror or exc}): point LABRUNNER_RUNTIME_DIR at a folder you can "
            "write to (it is created if missing), or unset it") from exc
    return base


def spawn(
    cmd: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    as_service_user: bool = False,
    tied_to_parent: bool = True,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner.get() if as_service_user else None
    user = None if owner is not None else (service_user() if as_service_user else None)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            user=user,
            preexec_fn=_become(owner, tied_to_parent),
        )


def _become(owner: ServiceOwner | None,
            tied_to_parent: bool) -> Callable[[], None] | None:
    """What the child does before exec: enter the owner's view and switch to its uid (in
    that order: the view needs root), and arrange to die with the starting thread."""
    if owner is None:
        return die_with_parent if tied_to_parent else None

    def apply() -> None:
        if owner.prepare is not None:
            owner.prepare()
        become(owner.uid, owner.uid, tied_to_parent)

    return apply


def become(uid: int, gid: int, tied_to_parent: bool) -> None:
    """In a child still root: drop to ``uid``/``gid`` for good (no supplementary groups)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if tied_to_parent:
        die_with_parent()  # after the switch: a change of credentials clears it


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists": reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM,
              group: bool = True) -> None:
    """Ask a process (and its session's group) to stop, then kill it after ``timeout``."""
    if not pid_alive(pid):
        return

    def send(s: int) -> None:
        try:
            if group:
                os.killpg(pid, s)
            else:
                os.kill(pid, s)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                pass

    send(sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            send(signal.SIGKILL)
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            return
        time.sleep(0.02)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def which(name: str, *extra_dirs: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in extra_dirs:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, to show when a service fails."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
