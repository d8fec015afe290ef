"""Submissions: finding them, unpacking archives within bounds, reading only the learner's
files; what identifies a graded submission (fingerprints) and which shard grades it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..catalog import Lab
from .config import GradeConfig, GradingError

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


MAX_ARCHIVE_BYTES = 64 * 1024 * 1024      # unpacked, per submission


MAX_ARCHIVE_MEMBERS = 5000


MAX_LEARNER_FILE = 2 * 1024 * 1024


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


def not_attempted(workspace: Path, lab: Lab) -> str | None:
    """Why the submission holds nothing to grade for ``lab`` (each of its files missing or
    still the starter's, byte for byte), or None when it holds work of its own (or the lab
    declares no file to tell by: it is run)."""
    if not lab.learner_files:
        return None
    for name in lab.learner_files:
        data = read_learner_file(workspace, lab, name)
        starter = lab.starter_dir / name
        if data is not None and (not starter.is_file() or data != starter.read_bytes()):
            return None
    files = ", ".join(lab.learner_files)
    return (f"not attempted: {files} {'is' if len(lab.learner_files) == 1 else 'are'} missing "
            f"from the submission or still the starter's, unchanged - nothing to grade, so "
            f"{lab.id} was not run")


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
