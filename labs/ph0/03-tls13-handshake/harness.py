"""Harness for ph0.3: runs the learner's create_pki() under a permissive umask (0o000) and
notes the mode every file it creates has at the moment it is created. It runs where the
learner's code runs (a process of its own when grading: learner.harness()).

A key written first and chmod-ed to 0600 afterwards is readable by others in between, and
permissions are checked when a file is opened: a process that opened it in that window
keeps reading it after the chmod. The window of a chmod in the same Python code is too
short to be seen from outside, so the creation itself is watched here: os.open, io.open and
builtins.open are wrapped, and a call that made a new file is followed by an fstat of the
descriptor it returned; an audit hook notes the mode a file has just before os.chmod or
os.fchmod change it, however the file was made (by tee, or os.open imported by name). (A
file a program both makes and chmods - a shell's `cat > key; chmod 600 key` - the test
watches from its own process with inotify.) The test decides
from the modes reported and from the files' contents, which it reads itself. set_mode()
sets a scene for another test: an old key file, as its owner, made readable by others."""

from __future__ import annotations

import builtins
import io
import os
import stat
import sys
import threading
from typing import Any

_lock = threading.Lock()
# (dev, ino) -> (mode, how) of files a chmod found readable by others, while a call watches.
# An audit hook cannot be removed: it is added once and does nothing between calls.
_before_chmod: dict[tuple[int, int], tuple[int, str]] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Before os.chmod / os.fchmod / os.lchmod (Path.chmod too) run, the mode the file has:
    a file another program created (tee, a shell redirection) is seen as it was made."""
    seen = _before_chmod
    if seen is None or event not in ("os.chmod", "os.fchmod", "os.lchmod"):
        return
    target = args[0]
    try:
        if isinstance(target, int):
            info = os.fstat(target)
        else:
            dir_fd = args[2] if event == "os.chmod" and len(args) > 2 else None
            info = os.stat(target, dir_fd=dir_fd, follow_symlinks=event != "os.lchmod")
    except (OSError, TypeError, ValueError):
        return
    if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
        seen.setdefault((info.st_dev, info.st_ino),
                        (stat.S_IMODE(info.st_mode), f"{event}(..., {args[1]:#o})"))


def create_pki_watching_creations(tls13: Any, directory: str,
                                  hostname: str) -> dict[str, Any]:
    """Call ``tls13.create_pki(directory, hostname)`` with umask 0o000 and every file
    creation noted. Returns {"error": str or None, "created": [{"path", "mode", "how"}]}:
    each file that was created under ``directory``'s parent and still exists at the end
    (found again by its inode, so a temporary file renamed into place counts), with its
    permission bits right after creation and the call that created it."""
    from pathlib import Path

    created: dict[tuple[int, int], tuple[int, str]] = {}  # (dev, ino) -> (mode, how)

    def note(fd: int, how: str) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            created[(info.st_dev, info.st_ino)] = (stat.S_IMODE(info.st_mode), how)

    def new_path(file: Any) -> bool:
        return not isinstance(file, int) and not os.path.lexists(file)

    real_os_open, real_io_open, real_builtin_open = os.open, io.open, builtins.open

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        fresh = dir_fd is None and new_path(path)
        fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
        if fresh:
            note(fd, f"os.open(..., {flags:#o}, {mode:#o})")
        return fd

    def wrap_open(real: Any, name: str) -> Any:
        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            fresh = new_path(file)
            handle = real(file, mode, *args, **kwargs)
            if fresh:
                note(handle.fileno(), f"{name}(..., {mode!r})")
            return handle
        return open_

    global _before_chmod, _hooked
    parent = Path(directory).parent
    error = None
    with _lock:
        if not _hooked:
            sys.addaudithook(_audit)
            _hooked = True
        _before_chmod = {}
        previous = os.umask(0o000)
        os.open = os_open
        io.open = wrap_open(real_io_open, "open")
        builtins.open = wrap_open(real_builtin_open, "open")
        try:
            tls13.create_pki(Path(directory), hostname)
        except Exception as exc:  # noqa: BLE001 - reported to the test as text
            error = f"{type(exc).__name__}: {exc}"
        finally:
            os.open, io.open, builtins.open = real_os_open, real_io_open, real_builtin_open
            for key, (mode, how) in _before_chmod.items():  # made by something not wrapped
                if key not in created or not created[key][0] & 0o077:
                    created[key] = (mode, f"another program or an unwrapped call (seen "
                                          f"just before {how})")
            _before_chmod = None
            os.umask(previous)
    found = []
    for folder, _dirs, files in os.walk(parent):
        for name in sorted(files):
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) in created:
                mode, how = created[(info.st_dev, info.st_ino)]
                found.append({"path": path, "mode": mode, "how": how})
    return {"error": error, "created": found}


def set_mode(path: str, mode: int) -> None:
    """chmod a file the learner's code made, as its owner: the test's setting of a scene
    (an old key file that other users can read)."""
    os.chmod(path, mode)
