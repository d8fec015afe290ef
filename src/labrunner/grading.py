"""Instructor grading: many submissions, each verified in a sandbox, gathered in a gradebook.

A submission is a learner's workspace (a folder, or a .zip / .tar.gz of one). For every lab
graded, only the files the lab declares as the learner's (``learner_files``) are copied out
of it, as regular files, into a private folder; nothing else in the submission (conftest.py,
pytest.ini, sitecustomize.py, .pth files, fake results, symlinks) is ever read by the
verification. The verification itself is the runner's (``runner.run_lab``): a pytest process
per lab whose outcomes arrive signed, so an early exit, a crash or a fake summary scores the
collected tests as failed.

When the grader runs as root, each worker slot (``--jobs``) runs its submissions under a uid
of its own (``SANDBOX_UID_BASE + slot``, no passwd entry needed), so two submissions graded
at once never share a uid; a slot's private folders are ``0700`` and owned by its uid, and
are removed, together with every process and every file that uid left in the folders every
user may write to, before the slot takes the next submission. Each grading command leases a
slice of the uids (:func:`lease_uids`), so two commands never share one. Where the kernel
allows it, the process also gets private mount and IPC namespaces in which the submissions,
the instructor's hidden tests and the output folder are covered by empty filesystems, every
shared writable folder is a private size-capped tmpfs, the root file system is read-only and
/proc shows only its own uid's processes (and a Python installed under an unreadable home,
e.g. pyenv in /root, is made reachable without exposing the rest of it).

With the local backend (as root, where the kernel gives threads network namespaces), each lab
run of each submission also gets services of its own, in a network namespace of its own
(:mod:`labrunner.services.private`): no submission can connect to another's database, broker
or cache, nor to anything else listening on the machine's loopback.

Results are written per student (``OUT/results/<student>.json``, atomically, as each one
finishes) with a fingerprint of what was graded, so a re-run skips what is unchanged and a
crash or a Ctrl-C loses nothing that finished.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import hashlib
import html
import io
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .catalog import Lab
from .cgroups import MemoryCgroup
from .errors import LabrunnerError
from .learner import ENV_SHARED_DIR
from .outcome import Outcome
from .roadmap_page import cohort_page
from .runner import LabResult, Sandbox, _kill_group, clean_text, run_lab
from .services.base import ServiceError

GRADES_VERSION = 1
SANDBOX_UID_BASE = int(os.environ.get("LABRUNNER_SANDBOX_UID_BASE", "61000"))
# A graded run's private services run as its sandbox uid plus this: past the uids Debian
# hands out (nobody is 65534), never one the submission has.
SERVICE_UID_OFFSET = 10000
# The learner's Python code (and nothing else) runs as the sandbox uid plus this.
LEARNER_UID_OFFSET = 20000
# A graded run's private services share a memory cgroup of this size, apart from the
# graded process's: whatever a submission makes them hold (a superuser's work_mem, a huge
# hash) is that run's, and the run beside it keeps its memory. Kafka's heap (768 MB) and a
# RabbitMQ node (256 MB watermark) fit with room.
SERVICES_MEMORY_BYTES = 2048 * 1024 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024      # unpacked, per submission
MAX_ARCHIVE_MEMBERS = 5000
MAX_LEARNER_FILE = 2 * 1024 * 1024
STATUS = {o.value: o.grade_status for o in Outcome}
HIDDEN_PREFIX = "hidden/"


class GradingError(LabrunnerError):
    """A submission set, an archive or an option is unusable; the message says which."""


# --------------------------------------------------------------------------------------
# Submissions


@dataclass
class Submission:
    student: str
    source: Path          # the folder or archive as given
    workspace: Path | None = None   # the folder to read learner files from (after unpacking)
    problem: str = ""     # why it cannot be graded (an archive refused, an id conflict)


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _strip_suffix(name: str) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _looks_like_workspace(path: Path) -> bool:
    if (path / "labrunner.toml").is_file():
        return True
    return any(re.fullmatch(r"ph\d+", p.name) and p.is_dir() and not p.is_symlink()
               for p in path.iterdir())


def safe_student_id(raw: str) -> str:
    """The student id for a folder's or an archive's name: the instructor's side names a
    student, never the submission's content. A name with nothing usable in it gets an id
    derived from it (``submission-<hash>``), so it is graded all the same."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", raw.strip()).strip("._-")
    if not cleaned:
        return "submission-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:10]
    return cleaned[:100]


def discover(paths: Sequence[Path]) -> list[Submission]:
    """Each path is a submission (a workspace folder or an archive) or a folder of them."""
    found: list[Submission] = []
    for path in paths:
        if not path.exists():
            raise GradingError(f"{path}: no such file or folder")
        if _is_archive(path):
            found.append(Submission(safe_student_id(_strip_suffix(path.name)), path.resolve()))
        elif path.is_dir() and _looks_like_workspace(path):
            found.append(Submission(safe_student_id(path.resolve().name), path.resolve()))
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_symlink():
                    continue
                if _is_archive(child):
                    found.append(Submission(safe_student_id(_strip_suffix(child.name)),
                                            child.resolve()))
                elif child.is_dir() and _looks_like_workspace(child):
                    found.append(Submission(safe_student_id(child.name), child.resolve()))
        else:
            raise GradingError(f"{path}: not a workspace folder, a .zip, a .tar.gz, "
                               "or a folder of those")
    return found


MAX_MEMBER_DEPTH = 32
MAX_MEMBER_NAME = 1024
MAX_ARCHIVE_FILE = 64 * 1024 * 1024       # the archive itself, before it is opened
MAX_TAR_HEADER = 64 * 1024                # a pax or GNU long-name header


def _member_path(dest: Path, name: str) -> Path:
    if len(name) > MAX_MEMBER_NAME:
        raise GradingError(f"archive member name longer than {MAX_MEMBER_NAME} characters")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or ".." in parts or ":" in parts[0]:
        raise GradingError(f"archive member {name[:200]!r} escapes the archive")
    if len(parts) > MAX_MEMBER_DEPTH:
        raise GradingError(f"archive member {name[:200]!r} is nested deeper than "
                           f"{MAX_MEMBER_DEPTH} folders")
    return dest.joinpath(*parts)


class _CappedTarInfo(tarfile.TarInfo):
    """A tar header whose extended (pax) or GNU long-name block is refused past a size,
    before tarfile reads it whole into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and \
                self.size > MAX_TAR_HEADER:
            raise GradingError(f"an extended tar header of {self.size} bytes (more than "
                               f"{MAX_TAR_HEADER})")
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


def remove_tree(path: Path) -> None:
    """Remove a folder a submission could have filled (any depth, any names): GNU rm walks
    it without recursion, where shutil.rmtree would overflow Python's stack."""
    if not os.path.lexists(path):
        return
    try:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600, check=False)
    except (OSError, subprocess.SubprocessError):
        pass


def _copy_capped(src: Any, target: Path, budget: list[int]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while chunk := src.read(65536):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise GradingError(f"unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
            out.write(chunk)


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` safely: regular files and folders only (symlinks,
    devices and links are skipped), no member outside ``dest``, size and count capped.
    Returns the workspace folder inside (the archive's single top folder if it has one)."""
    budget = [MAX_ARCHIVE_BYTES]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        size = archive.stat().st_size
    except OSError as exc:
        raise GradingError(f"{archive.name}: not readable ({exc})") from exc
    if size > MAX_ARCHIVE_FILE:
        raise GradingError(f"{archive.name}: {size} bytes, more than {MAX_ARCHIVE_FILE}")
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise GradingError(f"more than {MAX_ARCHIVE_MEMBERS} entries")
                for zinfo in members:
                    mode = zinfo.external_attr >> 16
                    kind = stat.S_IFMT(mode)
                    if zinfo.is_dir() or (kind and kind != stat.S_IFREG):
                        continue  # folders come with their files; symlinks are dropped
                    target = _member_path(dest, zinfo.filename)
                    with zf.open(zinfo) as zsrc:
                        _copy_capped(zsrc, target, budget)
        else:
            with tarfile.open(archive, "r:gz", tarinfo=_CappedTarInfo) as tf:
                count = 0
                for tinfo in tf:
                    count += 1
                    if count > MAX_ARCHIVE_MEMBERS:
                        raise GradingError(f"more than {MAX_ARCHIVE_MEMBERS} entries")
                    if not tinfo.isreg():
                        continue
                    target = _member_path(dest, tinfo.name)
                    tsrc = tf.extractfile(tinfo)
                    if tsrc is not None:
                        _copy_capped(tsrc, target, budget)
    except GradingError as exc:
        raise GradingError(f"{archive.name}: {exc}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError,
            RecursionError) as exc:
        raise GradingError(f"{archive.name}: not a readable archive ({exc})") from exc
    root = dest
    entries = [p for p in root.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and not _looks_like_workspace(root):
        root = entries[0]
    return root


def read_learner_file(workspace: Path, lab: Lab, name: str) -> bytes | None:
    """The learner's ``name`` for ``lab``, if it is a regular file inside the workspace
    reached through no symlink; None otherwise."""
    rel = Path(lab.workspace_dir) / name
    current = workspace
    for part in rel.parts:
        current = current / part
        try:
            info = os.lstat(current)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            return None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LEARNER_FILE:
        return None
    fd = os.open(current, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(MAX_LEARNER_FILE + 1)[:MAX_LEARNER_FILE]


# --------------------------------------------------------------------------------------
# Fingerprints and shards


def _sha(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "big"))
        digest.update(chunk)
    return digest.hexdigest()


def lab_version(lab: Lab) -> str:
    files = [lab.path / "lab.toml", *lab.test_files]
    return _sha(*[f.name.encode() + b"\0" + f.read_bytes() for f in files])


def hidden_tests_for(hidden: Path | None, lab: Lab) -> list[Path]:
    """The instructor's extra tests for ``lab``: HIDDEN/<id>/, HIDDEN/<slug>/ or
    HIDDEN/<phase folder>/<lab folder>/, each ``test_*.py``."""
    if hidden is None:
        return []
    for folder in (hidden / lab.id, hidden / lab.slug, hidden / lab.workspace_dir):
        if folder.is_dir():
            return sorted(p for p in folder.glob("test_*.py") if p.is_file())
    return []


def shard_of(student: str, count: int) -> int:
    """The shard (1..count) that grades ``student``: stable on every machine."""
    return int(hashlib.sha256(student.encode()).hexdigest()[:12], 16) % count + 1


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise GradingError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/4")
    return int(match[1]), int(match[2])


# --------------------------------------------------------------------------------------
# The sandbox


@dataclass
class Limits:
    timeout: float | None = None          # wall clock per lab (default: from the lab)
    memory_mb: int = 1024
    cpu_seconds: int = 120
    # Threads count too: a test with a pool of workers needs room (a fork storm does not).
    processes: int = 256
    output_bytes: int = 256 * 1024
    # The largest file a graded process may write (RLIMIT_FSIZE): no run fills the disk.
    file_mb: int = 256


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18
MS_REMOUNT, MS_NOEXEC = 32, 8
# The folders every user may write to on a usual Linux: in a graded process's namespace each
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
    from .services.kinds import kafka

    libs = kafka.libs_dir()
    return [libs] if libs is not None else []


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


# --------------------------------------------------------------------------------------
# Grading one submission


@dataclass
class GradeConfig:
    labs: list[Lab]
    out: Path
    backend: str = "local"
    jobs: int = 1
    limits: Limits = field(default_factory=Limits)
    hidden: Path | None = None
    force: bool = False
    shard: tuple[int, int] | None = None
    feedback_format: str = "md"
    selectors: tuple[str, ...] = ()


def use_private_services(config: GradeConfig) -> bool:
    """Private services need the local backend, root (for the sandbox uids) and a kernel
    that lets a thread have a network namespace of its own."""
    if config.backend != "local" or os.geteuid() != 0:
        return False
    from .services.private import private_networks_available

    return private_networks_available()


def _hidden_hash(config: GradeConfig, lab: Lab) -> str:
    return _sha(*[p.name.encode() + b"\0" + p.read_bytes()
                  for p in hidden_tests_for(config.hidden, lab)])


def fingerprint(config: GradeConfig, workspace: Path, student: str) -> str:
    parts: list[bytes] = [student.encode(), __version__.encode(),
                          json.dumps(config.limits.__dict__, sort_keys=True).encode()]
    for lab in config.labs:
        parts += [lab.id.encode(), lab_version(lab).encode(),
                  _hidden_hash(config, lab).encode()]
        for name in lab.learner_files:
            data = read_learner_file(workspace, lab, name)
            parts.append(name.encode() + b"\0" + (b"<missing>" if data is None else data))
    return _sha(*parts)


def _test_name(nodeid: str, hidden_dir: Path | None) -> tuple[str, bool]:
    return nodeid, hidden_dir is not None and nodeid.startswith(HIDDEN_PREFIX)


def concept_record(lab: Lab, result: LabResult, hidden_dir: Path | None) -> dict[str, Any]:
    status = STATUS.get(result.outcome, "error")
    tests = []
    for test in result.tests:
        name, hidden = _test_name(test.nodeid, hidden_dir)
        tests.append({"name": name, "hidden": hidden, "status": STATUS.get(test.outcome,
                                                                           "error"),
                      "message": test.message, "authored": test.authored,
                      "duration": round(test.duration, 3)})
    first = next((t for t in tests if t["status"] != "pass"), None)
    message = result.message
    return {
        "id": lab.id, "slug": lab.slug, "title": lab.title,
        "status": status,
        "points": lab.points if status == "pass" else 0,
        "max_points": lab.points,
        "message": "" if status == "pass" else (message.splitlines() or [""])[0],
        "failed_test": first["name"] if first else None,
        "failed_hidden": bool(first and first["hidden"]),
        "authored": first["authored"] if first else "",
        "duration": round(result.duration, 3),
        # False: the learner's Python code shared the verification's interpreter (the lab
        # does not support a process of its own yet), so this outcome is not tamper-proof.
        "learner_code_apart": lab.learner_code_apart,
        "tests": tests,
    }


def _scrub(result: LabResult, replace: dict[str, str]) -> None:
    """Private paths out of the messages: they differ on every run and mean nothing."""

    def clean(text: str) -> str:
        for old, new in sorted(replace.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(old, new)
        return text

    result.message = clean(result.message)
    for test in result.tests:
        test.message = clean(test.message)


_uid_counter = iter(range(1 << 62))
_uid_lock = threading.Lock()
SANDBOX_UID_COUNT = 4000
# The sandbox uids are split in leases: each grading command on the machine holds one (an
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


PURGE_PLUGIN = "labrunner.grading_purge"


class Grader:
    """Grades submissions against one set of running services."""

    def __init__(self, config: GradeConfig, state_file: Path | None,
                 hide: Sequence[Path] = ()) -> None:
        self.config = config
        self.state_file = state_file
        self.sandboxed = os.geteuid() == 0
        self.private_services = use_private_services(config)
        self.base = Path(tempfile.mkdtemp(prefix="lr-grade-"))
        os.chmod(self.base, 0o755)   # pytest lists the parents of the tests it collects
        self.mounts: MountPlan | None = None
        self.service_mounts: MountPlan | None = None
        self.notes: list[str] = []
        self.running: dict[int, Any] = {}
        self.lock = threading.Lock()
        if self.sandboxed and not self.private_services and any(
                lab.services for lab in config.labs):
            self.notes.append(
                "services shared by all submissions (one database, vhost, prefix each): "
                "a hostile submission graded at the same time as another could reach its "
                "data; grade untrusted code as root with the local backend for private "
                "services, or with --jobs 1")
        shared = [lab.id for lab in config.labs if not lab.learner_code_apart]
        if shared:
            self.notes.append(
                f"{', '.join(shared)}: the learner's code runs in the verification's own "
                "process for these labs (they share objects that cannot cross processes "
                "yet), so a submission that attacks labrunner itself could forge their "
                "outcomes; every other lab runs it in a process of its own, under a uid of "
                "its own")
        if self.sandboxed:
            lease_uids()
            self._plan_mounts(hide)
        else:
            self.notes.append("not running as root: submissions run as this user, without a "
                              "uid of their own (do not grade untrusted code like this)")

    def _plan_mounts(self, hide: Sequence[Path]) -> None:
        import labrunner

        needed = [Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix),
                  Path(labrunner.__file__).parent, *[lab.path for lab in self.config.labs]]
        if self.state_file is not None:
            needed.append(self.state_file.parent)
        if not namespaces_available():
            blocked = _blocked_ancestors(needed)
            if blocked:
                raise GradingError(
                    f"the sandbox uid cannot reach {', '.join(map(str, blocked))} (Python or "
                    "labrunner lives there) and this kernel gives no private mount namespace "
                    "to work around it: install Python where every user can read it")
            self.notes.append("no private mount namespace: submissions, hidden tests and the "
                              "output folder are protected by their permissions only")
            return
        plan = MountPlan(reexpose=_blocked_ancestors(needed))
        plan.holder = _private_dir(self.base / "park", None)
        plan.empty_file = self.base / "empty"
        plan.empty_file.touch()
        os.chmod(plan.empty_file, 0)
        # Every shared writable folder becomes private; what the run needs inside one (the
        # grader's run folders, the services' state) is bound back in.
        plan.private_tmp = _private_tmp([self.base, *needed], plan.reexpose)
        for path in hide:
            if any(_inside(path, folder) for folder in plan.reexpose):
                continue  # under a folder the namespace already covers
            if any(_inside(path, folder) and not any(_inside(path, k) for k in keep)
                   for folder, keep in plan.private_tmp.items()):
                continue  # under a private tmpfs: out of sight already
            if any(_inside(n, path) for n in [*needed, self.base]):
                self.notes.append(f"{path} holds what the verification needs: not hidden")
                continue
            (plan.hide_dirs if path.is_dir() else plan.hide_files).append(path.resolve())
        self.mounts = plan
        # The run's private services see the same, and their own folders under the
        # services' runtime folder (the graded process, which reaches them over its private
        # loopback, does not: no other service's socket is in its sight).
        from .services.local.process import runtime_dir

        # They run unprivileged (a uid of their own), so what they execute must be in
        # their sight too: the Kafka jars may live in root's cache.
        service_needed = [*needed, *_service_programs()]
        reexpose = _blocked_ancestors(service_needed)
        self.service_mounts = dataclasses.replace(
            plan, reexpose=reexpose,
            private_tmp=_private_tmp([self.base, *service_needed, runtime_dir()], reexpose))

    def close(self) -> None:
        remove_tree(self.base)

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            _kill_group(proc)

    def grade(self, submission: Submission, slot: _Slot,
              cancelled: threading.Event) -> dict[str, Any] | None:
        assert submission.workspace is not None
        config = self.config
        concepts = []
        for lab in config.labs:
            if cancelled.is_set():
                return None
            result, hidden_dir = self._run_one(submission, lab, slot)
            retried = False
            if infrastructure_error(result) and not cancelled.is_set():
                # Load must not change a grade: the machine's failure (a service not ready
                # in time, the sandbox or the runner failing) is graded once more before it
                # is recorded. A timeout is the learner's and is not.
                retried = True
                result, hidden_dir = self._run_one(submission, lab, slot)
            if cancelled.is_set():
                return None
            record = concept_record(lab, result, hidden_dir)
            record["retried"] = retried
            record["infrastructure_error"] = infrastructure_error(result)
            concepts.append(record)
        total = sum(c["points"] for c in concepts)
        machine_failed = any(c["infrastructure_error"] for c in concepts)
        return {
            "version": GRADES_VERSION,
            "student": submission.student,
            "source": submission.source.name,
            # An infrastructure error is never kept as a result: a re-run grades it again.
            "fingerprint": "" if machine_failed else fingerprint(
                config, submission.workspace, submission.student),
            "graded_at": time.time(),
            "concepts": concepts,
            "total": total,
            "max_total": sum(c["max_points"] for c in concepts),
        }

    def _run_one(self, submission: Submission, lab: Lab,
                 slot: _Slot) -> tuple[LabResult, Path | None]:
        assert submission.workspace is not None
        uid = _next_uid() if slot.sandboxed else None
        if uid is not None:
            _sweep_uid(uid)
        run_dir = _private_dir(slot.base / secrets.token_hex(4), uid)
        cgroup: MemoryCgroup | None = None
        try:
            src = _private_dir(run_dir / "src", uid)
            home = _private_dir(run_dir / "home", uid)
            for name in lab.learner_files:
                data = read_learner_file(submission.workspace, lab, name)
                if data is None:
                    continue
                target = src / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            # The verification runs from a private copy of the lab (its tests, lab.toml and data;
            # never its solution), so the hidden tests sit beside the lab's own, get the same
            # fixtures, and every test id is relative to the lab: test_x.py::t, hidden/...
            copy = run_dir / "lab"
            shutil.copytree(lab.path, copy, ignore=shutil.ignore_patterns(
                "solution", "starter", "__pycache__", ".*"))
            run_as = dataclasses.replace(lab, path=copy)
            hidden_dir: Path | None = None
            extra: tuple[Path, ...] = ()
            hidden_files = hidden_tests_for(self.config.hidden, lab)
            if hidden_files:
                hidden_dir = copy / "hidden"
                hidden_dir.mkdir()
                for file in hidden_files:
                    shutil.copyfile(file, hidden_dir / file.name)
                extra = (hidden_dir,)
            _give(run_dir, uid)
            learner_uid = uid + LEARNER_UID_OFFSET if uid is not None else None
            learner_home = _private_dir(run_dir / "learner", learner_uid)
            shared = _private_dir(run_dir / "shared", uid)
            os.chmod(shared, 0o755)   # learner.tmp_folder(): the test writes, the learner reads
            if learner_uid is not None and uid is not None:
                # The learner's processes pass through the run folder to their code and home,
                # and see nothing else in it: the lab copy (hidden tests) stays the
                # verification's alone. Nobody else (a neighbour's uids) may enter it: the
                # run folder's group is the learner's, the code's the verification's.
                os.chown(run_dir, uid, learner_uid)
                os.chmod(run_dir, 0o710)
                for private in (copy, home):
                    os.chmod(private, 0o700)
                os.chown(shared, uid, learner_uid)
                os.chmod(shared, 0o750)
                for folder, _dirs, files in os.walk(src):
                    os.chown(folder, learner_uid, uid)
                    os.chmod(folder, 0o750)
                    for name in files:
                        os.chown(os.path.join(folder, name), learner_uid, uid)
                        os.chmod(os.path.join(folder, name), 0o640)
            limits = self.config.limits
            from .catalog import find_project_root

            project = find_project_root()
            env = {"HOME": str(home), "USER": "sandbox", "LOGNAME": "sandbox",
                   **({"LABRUNNER_HOME": str(project)} if project else {}),
                   "TMPDIR": str(home), "LABRUNNER_PURGE": str(hidden_dir or ""),
                   ENV_SHARED_DIR: str(shared), "LABRUNNER_LEARNER_HOME": str(learner_home)}
            memory = limits.memory_mb * 1024 * 1024
            address_space: int | None = memory
            # Every lab's process tree is in a memory cgroup where one can be made: it counts
            # what an address-space limit misses (tmpfs and /dev/shm pages, memfd).
            cgroup = MemoryCgroup.create(memory) if uid is not None else None
            if lab.language == "c":
                # Sanitizer builds reserve terabytes of address space they never touch: no
                # address-space limit lets them start, so their memory cap is the cgroup's.
                address_space = None
                if cgroup is None:
                    self._note("no memory cgroup could be made here: C labs (built with "
                               "sanitizers) ran without a memory limit")
            steps = [step for step in (self.mounts.apply if self.mounts else None,
                                       cgroup.enter if cgroup else None) if step is not None]
            sandbox = Sandbox(
                memory_bytes=address_space,
                cpu_seconds=limits.cpu_seconds,
                max_output=limits.output_bytes,
                max_processes=limits.processes if uid is not None else None,
                file_size_bytes=limits.file_mb * 1024 * 1024,
                workdir_root=run_dir,
                extra_test_paths=extra,
                env=env,
                uid=uid, gid=uid,
                prepare=_in_order(steps) if steps else None,
                minimal_env=True,
                learner_process=True,
                learner_uid=learner_uid,
                learner_home=str(learner_home),
                tb="line",
                pytest_args=("-p", PURGE_PLUGIN),
            )

            def track(proc: Any) -> None:
                with self.lock:
                    if proc is None:
                        self.running.pop(slot.index, None)
                    else:
                        self.running[slot.index] = proc

            from .services.isolation import new_run_id

            def verify(state_file: Path | None) -> LabResult:
                return run_lab(run_as, src, state_file, new_run_id(), sandbox,
                               timeout=limits.timeout, on_process=track)

            try:
                if self.private_services and uid is not None:
                    result = self._with_private_services(lab, uid, run_dir, sandbox, verify)
                else:
                    result = verify(self.state_file)
            except (OSError, subprocess.SubprocessError) as exc:
                result = LabResult(lab, "error", 0.0, f"the sandbox could not start: {exc}")
            except ServiceError as exc:
                result = LabResult(lab, "error", 0.0, f"the services could not start: {exc}")
            result.lab = lab
            _scrub(result, {str(src): lab.workspace_dir, str(copy): lab.workspace_dir,
                            str(run_dir): "<sandbox>"})
            return result, hidden_dir
        finally:
            if uid is not None:
                _sweep_uid(uid)
                _sweep_uid(uid + SERVICE_UID_OFFSET)
                _sweep_uid(uid + LEARNER_UID_OFFSET)
            if cgroup is not None:
                cgroup.remove()
            remove_tree(run_dir)

    def _note(self, text: str) -> None:
        with self.lock:
            if text not in self.notes:
                self.notes.append(text)

    def _with_private_services(self, lab: Lab, uid: int, run_dir: Path, sandbox: Sandbox,
                               verify: Callable[[Path | None], LabResult]) -> LabResult:
        """Run ``verify`` in a network namespace of its own, with the lab's services started
        there for this run alone (their uid: the sandbox's plus an offset)."""
        from .services.local.process import ServiceOwner
        from .services.private import ENV_CONTROL, in_private_network, private_services

        cgroup = MemoryCgroup.create(SERVICES_MEMORY_BYTES) if lab.services else None
        steps = [step for step in (self.service_mounts.apply if self.service_mounts else None,
                                   cgroup.enter if cgroup else None) if step is not None]
        owner = ServiceOwner(uid + SERVICE_UID_OFFSET,
                             prepare=_in_order(steps) if steps else None)

        def body() -> LabResult:
            if not lab.services:
                return verify(None)
            with private_services(lab.services, owner, uid, run_dir) as (state, control):
                sandbox.env[ENV_CONTROL] = str(control)
                return verify(state)

        try:
            return in_private_network(body)
        finally:
            if cgroup is not None:
                _sweep_uid(uid + SERVICE_UID_OFFSET)
                cgroup.remove()


# Messages of a run that could not happen for the machine's reasons, not the learner's.
_INFRASTRUCTURE = ("the sandbox could not start", "the services could not start",
                   "the verification could not start", "the test process was killed by signal")


def infrastructure_error(result: LabResult) -> bool:
    """Did this run fail for the machine's reasons (a service not ready, the sandbox or the
    runner failing, a setup that crashed), not for the learner's code? Timeouts are the
    learner's."""
    if result.outcome != "error":
        return False
    if result.message.startswith(_INFRASTRUCTURE) or not result.tests:
        return True
    return any(t.outcome == "error" for t in result.tests)


def problem_document(labs: Sequence[Lab], sub: Submission) -> dict[str, Any]:
    """The result of a submission that could not be graded at all: every concept an error
    that names why (never cached: no fingerprint)."""
    message = clean_text(sub.problem or "could not be graded", 1000)
    concepts: list[dict[str, Any]] = [{
        "id": lab.id, "slug": lab.slug, "title": lab.title, "status": "error", "points": 0,
        "max_points": lab.points, "message": message, "failed_test": None,
        "failed_hidden": False, "duration": 0.0, "learner_code_apart": lab.learner_code_apart,
        "tests": [], "retried": False, "infrastructure_error": False} for lab in labs]
    return {"version": GRADES_VERSION, "student": sub.student, "source": sub.source.name,
            "fingerprint": "", "graded_at": time.time(), "concepts": concepts, "total": 0,
            "max_total": sum(lab.points for lab in labs), "problem": message}


# --------------------------------------------------------------------------------------
# The cohort


@dataclass
class CohortOutcome:
    graded: list[str]
    skipped: list[str]
    students: list[dict[str, Any]]
    notes: list[str]
    duration: float


def results_dir(out: Path) -> Path:
    return out / "results"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == GRADES_VERSION else None


def prepare_submissions(submissions: list[Submission], staging: Path) -> list[Submission]:
    """Unpack archives (into root-only staging). The student id is the folder's or the
    archive's name (a ``student`` field in the submission is not trusted). A submission
    that cannot be unpacked, or whose id another one has too, keeps a ``problem``: it is
    recorded as an error, and the cohort goes on."""
    seen: dict[str, Submission] = {}
    unique: list[Submission] = []
    for sub in submissions:
        if sub.source.is_dir():
            sub.workspace = sub.source
        else:
            try:
                sub.workspace = unpack(sub.source, staging / secrets.token_hex(6))
            except GradingError as exc:
                message = str(exc)
                if sub.source.name not in message:
                    message = f"{sub.source.name}: {message}"
                sub.problem = message
            except (OSError, ValueError, RecursionError, MemoryError) as exc:
                sub.problem = f"{sub.source.name}: could not be unpacked ({exc})"
        if sub.student in seen:
            # Two submissions named alike (alice/ and alice.zip): neither is graded as
            # alice's, and nobody else is affected.
            first = seen[sub.student]
            conflict = (f"student id {sub.student!r} is the name of both {first.source.name} "
                        f"and {sub.source.name}: rename one and grade again")
            first.problem = sub.problem = conflict
            continue
        seen[sub.student] = sub
        unique.append(sub)
    return unique


def grade_cohort(
    config: GradeConfig,
    paths: Sequence[Path],
    state_file: Path | None,
    on_start: Callable[[str], None] | None = None,
    on_done: Callable[[dict[str, Any], bool], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CohortOutcome:
    started = time.time()
    staging = Path(tempfile.mkdtemp(prefix="lr-unpack-"))  # 0700, root's
    config.out.mkdir(parents=True, exist_ok=True)
    results = results_dir(config.out)
    results.mkdir(exist_ok=True)
    os.chmod(results, 0o700)
    grader: Grader | None = None
    try:
        submissions = prepare_submissions(discover(paths), staging)
        if config.shard:
            index, count = config.shard
            submissions = [s for s in submissions if shard_of(s.student, count) == index]
        if on_total:
            on_total(len(submissions))
        todo: list[tuple[Submission, str]] = []
        skipped: list[str] = []
        for sub in submissions:
            if sub.problem or sub.workspace is None:
                doc = problem_document(config.labs, sub)
                write_atomic(results / f"{sub.student}.json", json.dumps(doc, indent=2))
                if on_done:
                    on_done(doc, False)
                continue
            try:
                mark = fingerprint(config, sub.workspace, sub.student)
            except (OSError, RecursionError) as exc:
                sub.problem = f"{sub.source.name}: could not be read ({exc})"
                doc = problem_document(config.labs, sub)
                write_atomic(results / f"{sub.student}.json", json.dumps(doc, indent=2))
                continue
            old = read_result(results / f"{sub.student}.json")
            if not config.force and old is not None and old.get("fingerprint") == mark:
                skipped.append(sub.student)
                if on_done:
                    on_done(old, True)
                continue
            todo.append((sub, mark))
        graded: list[str] = []
        hide = [*(s.source for s in submissions), config.out, staging]
        if config.hidden:
            hide.append(config.hidden)
        hide += [Path(p) for p in paths if Path(p).is_dir()]
        grader = Grader(config, state_file, _dedupe(hide))
        cancelled = threading.Event()
        slots: list[_Slot] = [_Slot(i, grader.base, grader.sandboxed)
                              for i in range(max(1, config.jobs))]
        free = list(slots)
        free_lock = threading.Lock()

        def one(sub: Submission) -> None:
            if cancelled.is_set():
                return
            with free_lock:
                slot = free.pop()
            try:
                if on_start:
                    on_start(sub.student)
                doc = grader.grade(sub, slot, cancelled)
                if doc is None or cancelled.is_set():
                    return
                write_atomic(results / f"{sub.student}.json", json.dumps(doc, indent=2))
                graded.append(sub.student)
                if on_done:
                    on_done(doc, False)
            finally:
                with free_lock:
                    free.append(slot)

        pool = ThreadPoolExecutor(max_workers=len(slots))
        futures = [pool.submit(one, sub) for sub, _ in todo]
        try:
            for future in futures:
                future.result()
        except BaseException:
            cancelled.set()
            grader.kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        students = [doc for doc in (read_result(results / f"{s.student}.json")
                                    for s in submissions) if doc is not None]
        write_gradebook(config.out, config.labs, students, config.feedback_format)
        return CohortOutcome(graded, skipped, students, grader.notes, time.time() - started)
    finally:
        if grader is not None:
            grader.close()
        remove_tree(staging)


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    """Distinct paths, none inside another (covering the outer one covers it)."""
    resolved = sorted({p.resolve() for p in paths}, key=lambda p: len(p.parts))
    out: list[Path] = []
    for path in resolved:
        if not any(_inside(path, kept) for kept in out):
            out.append(path)
    return out


# --------------------------------------------------------------------------------------
# Gradebook, feedback, merge


def lab_columns(labs: Sequence[Lab], students: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    columns: dict[str, dict[str, Any]] = {}
    for lab in labs:
        columns[lab.id] = {"id": lab.id, "slug": lab.slug, "title": lab.title,
                           "points": lab.points}
    for doc in students:
        for concept in doc.get("concepts", []):
            columns.setdefault(concept["id"], {"id": concept["id"], "slug": concept["slug"],
                                               "title": concept["title"],
                                               "points": concept["max_points"]})
    return list(columns.values())


def gradebook_document(labs: Sequence[Lab], students: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(students, key=lambda d: d["student"])
    counts: dict[str, int] = {"pass": 0, "fail": 0, "error": 0, "timeout": 0}
    for doc in ordered:
        for concept in doc["concepts"]:
            counts[concept["status"]] = counts.get(concept["status"], 0) + 1
    retried = [f"{doc['student']} {c['id']}" for doc in ordered for c in doc["concepts"]
               if c.get("retried")]
    return {
        "version": GRADES_VERSION,
        "tool": {"name": "labrunner", "version": __version__,
                 "sandbox_uids": leased_uid_ranges()},
        "concepts": lab_columns(labs, ordered),
        # Runs graded twice because the first ended in an infrastructure error.
        "summary": {"students": len(ordered), **counts, "retried": retried},
        "students": ordered,
    }


def grades_csv(document: dict[str, Any]) -> str:
    ids = [c["id"] for c in document["concepts"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", *ids, "total", "max_total", *[f"{i} status" for i in ids]])
    for doc in document["students"]:
        by_id = {c["id"]: c for c in doc["concepts"]}
        writer.writerow([
            doc["student"], *[by_id[i]["points"] if i in by_id else "" for i in ids],
            doc["total"], doc["max_total"],
            *[by_id[i]["status"] if i in by_id else "" for i in ids]])
    return buffer.getvalue()


def _shown_message(test_or_concept: dict[str, Any], hidden: bool) -> str:
    message = clean_text(test_or_concept.get("message") or "")
    if not hidden:
        return message.strip()
    # A hidden test shows only what its own code wrote (the assert's message, recorded by
    # the verification as "authored"), never what the learner's code can raise (any class,
    # any text), an assert's expression, a traceback or source code.
    authored = clean_text(test_or_concept.get("authored") or "", 500).strip()
    return authored.splitlines()[0] if authored else "a hidden check failed"


def feedback_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Feedback for {doc['student']}", "",
             f"**Total: {doc['total']} / {doc['max_total']} points**", "",
             "| Concept | Result | Points |", "| --- | --- | --- |"]
    for c in doc["concepts"]:
        lines.append(f"| {c['id']} {c['title']} | {c['status']} | "
                     f"{c['points']} / {c['max_points']} |")
    lines.append("")
    for c in doc["concepts"]:
        if c["status"] == "pass":
            continue
        lines += [f"## {c['id']} {c['slug']}: {c['status']}", ""]
        bad = [t for t in c["tests"] if t["status"] != "pass"]
        if not bad:
            first, _, rest = _shown_message(c, c.get("failed_hidden", False)).partition("\n")
            lines += [f"- {html.escape(first, quote=False)}", ""]
            continue
        for test in bad:
            label = ("a hidden test" if test["hidden"]
                     else f"`{test['name'].split('::', 1)[-1]}`")
            shown = _shown_message(test, test["hidden"]) or test["status"]
            lines += _md_item(f"{label} ({test['status']})", shown)
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_item(label: str, text: str) -> list[str]:
    """A list item whose text (perhaps the learner's) cannot add markup: its first line
    with HTML escaped, the rest in a fenced block no backtick run in it can close."""
    first, _, rest = text.partition("\n")
    item = [f"- {label}: {html.escape(first, quote=False)}"]
    if rest.strip():
        longest = max((len(m) for m in re.findall(r"`+", rest)), default=0)
        fence = "`" * max(3, longest + 1)
        item += [f"  {fence}text", *(f"  {line}" for line in rest.splitlines()), f"  {fence}"]
    return item


def feedback_html(doc: dict[str, Any]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(c['id'])} {esc(c['title'])}</td><td>{esc(c['status'])}</td>"
                   f"<td>{c['points']} / {c['max_points']}</td></tr>" for c in doc["concepts"])
    details = []
    for c in doc["concepts"]:
        if c["status"] == "pass":
            continue
        items = []
        bad = [t for t in c["tests"] if t["status"] != "pass"]
        for test in bad:
            label = ("a hidden test" if test["hidden"]
                     else f"<code>{esc(test['name'].split('::', 1)[-1])}</code>")
            items.append(f"<li>{label} ({esc(test['status'])}): "
                         f"<pre>{esc(_shown_message(test, test['hidden']))}</pre></li>")
        if not bad:
            items.append(f"<li>{esc(_shown_message(c, c.get('failed_hidden', False)))}</li>")
        details.append(f"<h2>{esc(c['id'])} {esc(c['slug'])}: {esc(c['status'])}</h2>"
                       f"<ul>{''.join(items)}</ul>")
    return (f"<!doctype html><meta charset=utf-8><title>Feedback for {esc(doc['student'])}"
            f"</title><h1>Feedback for {esc(doc['student'])}</h1>"
            f"<p><b>Total: {doc['total']} / {doc['max_total']} points</b></p>"
            f"<table><tr><th>Concept</th><th>Result</th><th>Points</th></tr>{rows}</table>"
            + "".join(details) + "\n")


def write_gradebook(out: Path, labs: Sequence[Lab], students: Sequence[dict[str, Any]],
                    feedback_format: str = "md") -> dict[str, Any]:
    document = gradebook_document(labs, students)
    write_atomic(out / "grades.json", json.dumps(document, indent=2) + "\n")
    write_atomic(out / "grades.csv", grades_csv(document))
    write_atomic(out / "cohort.html", cohort_page(document))
    feedback = out / "feedback"
    feedback.mkdir(exist_ok=True)
    for doc in document["students"]:
        if feedback_format == "html":
            write_atomic(feedback / f"{doc['student']}.html", feedback_html(doc))
        else:
            write_atomic(feedback / f"{doc['student']}.md", feedback_markdown(doc))
    return document


def merge(dirs: Sequence[Path], out: Path, feedback_format: str = "md") -> dict[str, Any]:
    """Gather the per-student results of shard outputs into one gradebook in ``out``."""
    students: dict[str, dict[str, Any]] = {}
    for folder in dirs:
        found = results_dir(folder)
        if not found.is_dir():
            raise GradingError(f"{folder}: no results/ folder (not a 'labrunner grade' output)")
        for file in sorted(found.glob("*.json")):
            doc = read_result(file)
            if doc is None:
                continue
            current = students.get(doc["student"])
            if current is None or doc.get("graded_at", 0) > current.get("graded_at", 0):
                students[doc["student"]] = doc
    for doc in students.values():
        write_atomic(results_dir(out) / f"{doc['student']}.json", json.dumps(doc, indent=2))
    return write_gradebook(out, [], list(students.values()), feedback_format)


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """A gradebook without what differs between two equal gradings (times, durations, the
    sandbox uids the grading command happened to lease)."""
    students = []
    for doc in document["students"]:
        concepts = [{**{k: v for k, v in c.items() if k != "duration"},
                     "tests": [{k: v for k, v in t.items() if k != "duration"}
                               for t in c["tests"]]}
                    for c in doc["concepts"]]
        students.append({**{k: v for k, v in doc.items() if k not in ("graded_at",)},
                         "concepts": concepts})
    tool = {k: v for k, v in document.get("tool", {}).items() if k != "sandbox_uids"}
    return {**document, "tool": tool, "students": students}


# --------------------------------------------------------------------------------------
# With services, a progress bar and a summary (what the CLI calls)


def grade_with_services(config: GradeConfig, paths: Sequence[Path],
                        show_progress: bool = True) -> CohortOutcome:
    """Bring up the services the labs need once for the cohort, then grade it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .report import err_console
    from .session import services_for

    shared = [] if use_private_services(config) else config.labs
    with services_for(shared, config.backend, quiet=not show_progress) as service_set:
        state = service_set.state_file if service_set.endpoints else None
        if state is not None:
            # Shared services: every sandboxed run reads their admin credentials (stated in
            # docs/GRADING.md); private services hand each run its own state instead.
            service_set.state_mode = 0o644
            os.chmod(state, 0o644)
        progress = Progress(
            TextColumn("[bold]grading"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[current]}"),
            console=err_console, transient=True, disable=not show_progress)
        with progress:
            task = progress.add_task("grading", total=None, current="")
            return grade_cohort(
                config, paths, state,
                on_start=lambda student: progress.update(task, current=student),
                on_done=lambda doc, kept: progress.advance(task),
                on_total=lambda n: progress.update(task, total=n))


def print_summary(outcome: CohortOutcome, labs: Sequence[Lab]) -> None:
    """A row per student: a column per concept, or per phase when the concepts would not
    fit the terminal (grades.csv always has them all)."""
    from rich.table import Table

    from .report import console, err_console

    colours = {"pass": "green", "fail": "red", "error": "yellow", "timeout": "magenta"}
    ids = [lab.id for lab in labs]
    per_concept = len(ids) * 10 + 30 <= console.width
    phases = list(dict.fromkeys(lab.id.split(".")[0] for lab in labs))
    table = Table(title="Gradebook")
    table.add_column("student")
    for column in ids if per_concept else phases:
        table.add_column(column, justify="left" if per_concept else "right")
    table.add_column("total", justify="right")
    for doc in sorted(outcome.students, key=lambda d: d["student"]):
        by_id = {c["id"]: c for c in doc["concepts"]}
        cells = []
        if per_concept:
            for lab_id in ids:
                c = by_id.get(lab_id)
                cells.append("" if c is None else
                             f"[{colours.get(c['status'], 'white')}]{c['status']}[/] "
                             f"{c['points']}")
        else:
            for phase in phases:
                mine = [c for c in doc["concepts"] if c["id"].split(".")[0] == phase]
                passed = sum(c["status"] == "pass" for c in mine)
                colour = "green" if passed == len(mine) else "red" if not passed else "yellow"
                cells.append(f"[{colour}]{passed}/{len(mine)}[/]")
        table.add_row(doc["student"], *cells, f"{doc['total']}/{doc['max_total']}")
    console.print(table)
    for note in outcome.notes:
        err_console.print(f"[yellow]note:[/] {note}")
