"""The sandbox: mounts and namespaces, the sandbox uids (leases, the next uid, the sweep of
what a uid left behind), private folders."""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GradingError
from .submissions import remove_tree

SANDBOX_UID_BASE = int(os.environ.get("LABRUNNER_SANDBOX_UID_BASE", "61000"))


# A graded run's private services run as its sandbox uid plus this: past the uids Debian
# hands out (nobody is 65534), never one the submission has.
SERVICE_UID_OFFSET = 10000


LEARNER_UID_OFFSET = 20000
# A graded run's private services share a memory cgroup of this size, apart from the
# graded process's: whatever a submission makes them hold (a superuser's work_mem, a huge
# hash) is that run's, and the run beside it keeps its memory. Kafka's heap (768 MB) and a
# RabbitMQ node (256 MB watermark) fit with room.
SERVICES_MEMORY_BYTES = 2048 * 1024 * 1024


_libc = ctypes.CDLL(None, use_errno=True)


CLONE_NEWNS = 0x00020000


CLONE_NEWIPC = 0x08000000


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18


MS_REMOUNT, MS_NOEXEC = 32, 8


# is a private tmpfs of a capped size (whatever is written there is gone with the run), and
# the root file system is read-only, so nothing it writes outlives it but in its run folder.
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue")


PRIVATE_TMP_BYTES = 256 * 1024 * 1024


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                   flags, data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _blocked_ancestors(needed: Iterable[Path]) -> dict[Path, set[str]]:
    """Folders others cannot traverse on the way to ``needed`` paths, each with the names
    of the entries inside it that must stay reachable."""
    blocked: dict[Path, set[str]] = {}
    for path in needed:
        path = path.resolve()
        chain = [*reversed(path.parents), path]
        for parent, child in zip(chain, chain[1:], strict=False):
            try:
                mode = os.stat(parent).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH:
                blocked.setdefault(parent, set()).add(child.name)
                break
    return blocked


@dataclass
class MountPlan:
    """What the private mount namespace of a graded process hides and re-exposes."""

    hide_dirs: list[Path] = field(default_factory=list)
    hide_files: list[Path] = field(default_factory=list)
    reexpose: dict[Path, set[str]] = field(default_factory=dict)
    holder: Path | None = None   # an empty root-owned folder to park bind mounts on
    empty_file: Path | None = None
    # Shared writable folders made private (a tmpfs each), with the paths inside them the
    # run needs (its run folder, the services' state) bound back in.
    private_tmp: dict[Path, list[Path]] = field(default_factory=dict)
    tmp_bytes: int = PRIVATE_TMP_BYTES
    read_only_root: bool = True
    hide_processes: bool = True

    def apply(self) -> None:
        """Runs in the child, as root, before the switch to the sandbox uid."""
        # A mount namespace, and an IPC namespace: System V segments and POSIX queues it
        # makes are its own and go with it.
        if _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare: {os.strerror(err)}")
        _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
        for n, (folder, names) in enumerate(sorted(self.reexpose.items())):
            assert self.holder is not None
            parked = []
            for m, name in enumerate(sorted(names)):
                park = self.holder / f"{n}-{m}"
                park.mkdir(exist_ok=True)
                _mount(str(folder / name), str(park), None, MS_BIND | MS_REC, None)
                parked.append((name, park, (folder / name).is_dir()))
            _mount("tmpfs", str(folder), "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
            for name, park, is_dir in parked:
                target = folder / name
                if is_dir:
                    target.mkdir()
                else:
                    target.touch()
                _mount(str(park), str(target), None, MS_BIND | MS_REC, None)
        for folder in self.hide_dirs:
            _mount("tmpfs", str(folder), "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY,
                   "size=4k,mode=0000")
        for file in self.hide_files:
            assert self.empty_file is not None
            _mount(str(self.empty_file), str(file), None, MS_BIND, None)
        for folder, keep in sorted(self.private_tmp.items()):
            handles = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in keep]
            _mount("tmpfs", str(folder), "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={self.tmp_bytes},mode=1777")
            for path, handle in handles:
                os.makedirs(path, mode=0o755, exist_ok=True)
                _mount(f"/proc/self/fd/{handle}", str(path), None, MS_BIND | MS_REC, None)
                os.close(handle)
        if self.hide_processes:
            # A /proc of its own showing only its uid's processes: no other verification's
            # command line (run folders, hidden test names), no neighbour to signal.
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       "hidepid=invisible")
            except OSError:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
        if self.read_only_root:
            _mount("none", "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)


def _private_tmp(keep_candidates: Sequence[Path],
                 covered: dict[Path, set[str]]) -> dict[Path, list[Path]]:
    """Each shared writable folder (a private tmpfs in the namespace), with the paths in it
    to bind back in."""
    private: dict[Path, list[Path]] = {}
    for name in SHARED_WRITABLE:
        folder = Path(name)
        if folder.is_symlink() or not folder.is_dir() or \
                any(_inside(folder, f) for f in covered):
            continue
        keep = _dedupe([p for p in keep_candidates if p.exists() and _inside(p, folder) and
                        p.resolve() != folder.resolve()])
        private[folder.resolve()] = [p.resolve() for p in keep]
    return private


def _service_programs() -> list[Path]:
    """What the private services run from, when it is not where every user can read."""
    from ..services.kinds import kafka

    libs = kafka.libs_dir()
    archive = kafka.cds_archive()   # the broker's class-data archive, next to its jars
    return [p for p in (libs, archive if archive.is_file() else None) if p is not None]


def namespaces_available() -> bool:
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    try:
        done = subprocess.run(["true"], preexec_fn=lambda: _unshare_or_fail(), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _unshare_or_fail() -> None:
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC) != 0:
        os._exit(1)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def process_uid(pid: str) -> int | None:
    """A process's real uid, from its status (its /proc folder belongs to root when it made
    itself undumpable, as the verification does)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sweep_uid(uid: int) -> None:
    """Kill every process of ``uid`` and remove what it left in the shared temp folders."""
    for _ in range(3):
        found = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if process_uid(entry.name) != uid:
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                found = True
            except (OSError, ProcessLookupError):
                continue
        if not found:
            break
        time.sleep(0.05)
    for shared in map(Path, SHARED_WRITABLE):
        try:
            entries = list(shared.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.lstat().st_uid != uid:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    remove_tree(entry)
                else:
                    entry.unlink()
            except OSError:
                continue


_uid_counter = iter(range(1 << 62))


_uid_lock = threading.Lock()


SANDBOX_UID_COUNT = 4000


# exclusive lock on a file of LEASE_DIR while it runs), so two commands never share a uid,
# and one's sweep never kills the other's runs.
UID_LEASES = 8


LEASE_DIR = Path(os.environ.get("LABRUNNER_LEASE_DIR", "/run/labrunner-uids"))


_lease: dict[str, Any] = {"base": SANDBOX_UID_BASE, "count": SANDBOX_UID_COUNT, "fd": None}


def lease_uids() -> tuple[int, int]:
    """Take a free uid lease for this command (kept until it exits); its first uid and
    size. Raises GradingError when every lease is taken."""
    import fcntl

    with _uid_lock:
        if _lease["fd"] is not None:
            return _lease["base"], _lease["count"]
        LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        size = SANDBOX_UID_COUNT // UID_LEASES
        # From the top: a grader of an older version counts up from the base.
        for index in reversed(range(UID_LEASES)):
            fd = os.open(LEASE_DIR / f"lease-{index}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            os.set_inheritable(fd, False)
            _lease.update(base=SANDBOX_UID_BASE + index * size, count=size, fd=fd)
            return _lease["base"], size
    raise GradingError(f"all {UID_LEASES} sandbox uid leases in {LEASE_DIR} are taken: "
                       "that many grading commands run on this machine already")


def leased_uid_ranges() -> list[list[int]]:
    """The uid ranges this command's graded processes and learner code run under, as
    ``[first, end)`` pairs; empty when nothing was leased (no sandbox). Written into
    grades.json so that a check of what a run left behind looks at this command's uids only,
    not at another grading command's beside it."""
    with _uid_lock:
        if _lease["fd"] is None:
            return []
        base, count = int(_lease["base"]), int(_lease["count"])
    return [[base, base + count], [base + LEARNER_UID_OFFSET, base + count + LEARNER_UID_OFFSET]]


def _next_uid() -> int:
    """A uid for one graded run: never the same as a run going on (in this command or
    another: see lease_uids), and rotated so that processes a run left as zombies (under an
    init that does not reap) never count against the process limit of the next one."""
    with _uid_lock:
        return int(_lease["base"]) + next(_uid_counter) % int(_lease["count"])


class _Slot:
    """One worker slot: its private base folder; each run in it gets a uid of its own."""

    def __init__(self, index: int, base: Path, sandboxed: bool) -> None:
        self.index = index
        self.sandboxed = sandboxed
        self.base = base / f"slot{index}"
        self.base.mkdir(mode=0o755, exist_ok=True)


def _private_dir(path: Path, uid: int | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def _in_order(steps: Sequence[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for step in steps:
            step()

    return run


def _give(tree: Path, uid: int | None) -> None:
    if uid is None:
        return
    for folder, _dirs, files in os.walk(tree):
        os.chown(folder, uid, uid)
        for name in files:
            os.chown(os.path.join(folder, name), uid, uid)


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    """Distinct paths, none inside another (covering the outer one covers it)."""
    resolved = sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts))
    out: list[Path] = []
    for path in resolved:
        if not any(_inside(path, kept) for kept in out):
            out.append(path)
    return out
