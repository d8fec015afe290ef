"""The learner's programs (a C binary built from the learner's code, a learner's script) run
as the learner's uid, never as the verification's.

A program the verification started itself would run under the verification's uid: it could
signal the verification, read what that uid can read and, were the verification dumpable,
attach to it. So when grading (``$LABRUNNER_LEARNER_HOST`` is ``fd:N``, the learner factory
of :mod:`labrunner.learner`), ``learner.popen()`` asks the factory, which runs as the
learner's uid, to start the program: the factory forks a *monitor*, the monitor forks and
execs the program with the standard streams the verification passed (SCM_RIGHTS), reports
its pid and then its exit status down a status pipe, and forwards the signals the
verification writes to a control pipe. :class:`LearnerProgram` is a ``subprocess.Popen``
built on that, so ``wait``, ``poll``, ``kill``, ``communicate`` and the pipes work as usual.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from .modes import FACTORY_LOCK, FACTORY_PREFIX

_START_TIMEOUT = 60.0
# How long send_signal() waits for the monitor's receipt (a loaded machine; never reached
# when the monitor lives: it forwards a signal at once).
_SIGNAL_RECEIPT_TIMEOUT = 5.0
_SEND_LOCK = threading.Lock()


def send_exec(how: str, payload: bytes, fds: list[int]) -> None:
    """Ask the factory behind ``how`` (``fd:N``) to start a program (no reply: the monitor
    answers on the status pipe)."""
    factory = socket.socket(fileno=os.dup(int(how[len(FACTORY_PREFIX):])))
    try:
        with FACTORY_LOCK:
            socket.send_fds(factory, [b"exec " + payload], fds)
    finally:
        factory.close()


class LearnerProgram(subprocess.Popen):  # type: ignore[type-arg]
    """A ``subprocess.Popen`` whose child the learner's factory starts, as the learner's
    uid; signals and exit status go through its monitor."""

    def __init__(self, how: str, *args: Any, **kwargs: Any) -> None:
        self._how = how
        self._status_r = -1
        self._ctl_w = -1
        self._buffer = b""
        self._status_lock = threading.Lock()
        self._signals_sent = 0        # written to the monitor
        self._signals_delivered = 0   # the monitor's "sent" lines: os.kill() done
        super().__init__(*args, **kwargs)

    def _execute_child(self, args: Any, executable: Any, preexec_fn: Any, close_fds: Any,
                       pass_fds: Any, cwd: Any, env: Any, startupinfo: Any,
                       creationflags: Any, shell: Any, p2cread: int, p2cwrite: int,
                       c2pread: int, c2pwrite: int, errread: int, errwrite: int,
                       restore_signals: Any, gid: Any, gids: Any, uid: Any, umask: int,
                       start_new_session: bool, process_group: Any = None) -> None:
        try:
            if shell or preexec_fn is not None or pass_fds or uid is not None or \
                    gid is not None or gids is not None:
                raise ValueError("learner.popen: shell, preexec_fn, pass_fds, user and group "
                                 "are not available (the program runs as the learner's uid)")
            if isinstance(args, (str, bytes, os.PathLike)):
                args = [args]
            argv = [os.fsdecode(a) for a in args]
            exe = os.fsdecode(executable) if executable else argv[0]
            source = os.environ if env is None else env
            environment = {os.fsdecode(k): os.fsdecode(v) for k, v in source.items()}
            ctl_r, ctl_w = os.pipe()
            status_r, status_w = os.pipe()
            fds = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2, ctl_r, status_w]
            payload = json.dumps({
                "argv": argv, "exe": exe, "cwd": os.fsdecode(cwd) if cwd else None,
                "env": environment, "umask": umask,
                "session": bool(start_new_session or process_group == 0)}).encode()
            try:
                send_exec(self._how, payload, fds)
            except BaseException:
                for fd in (ctl_w, status_r):
                    os.close(fd)
                raise
            finally:
                os.close(ctl_r)
                os.close(status_w)
        finally:
            self._close_pipe_fds(  # type: ignore[attr-defined]
                p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        self._ctl_w, self._status_r = ctl_w, status_r
        first = self._next_line(_START_TIMEOUT)
        kind, _, value = (first or "").partition(" ")
        if kind == "pid" and value.isdigit():
            self.pid = int(value)
            self._child_created = True
            return
        self._close_status()
        if kind == "error" and value.lstrip("-").isdigit():
            number = int(value)
            raise OSError(number, os.strerror(number), exe)
        raise OSError(f"the learner's program {exe} could not be started")

    def _next_line(self, timeout: float | None) -> str | None:
        """The monitor's next line, waiting up to ``timeout`` (None: forever); None when
        none came in time. An end of file reads as 'eof'."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self._status_r == -1:
                return "eof"
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._status_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._status_r, 4096)
            if not chunk:
                self._close_status()
                return "eof" if not self._buffer else self._take()
            self._buffer += chunk
        return self._take()

    def _take(self) -> str:
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("ascii", "replace").strip()

    def _next_status(self, timeout: float | None) -> str | None:
        """The monitor's next line but its signal receipts, which are counted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            line = self._next_line(left)
            if line is None or not line.startswith("sent "):
                return line
            self._signals_delivered += 1

    def _close_status(self) -> None:
        for name in ("_status_r", "_ctl_w"):
            fd = getattr(self, name)
            if fd != -1:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _collect(self, timeout: float | None) -> bool:
        """Read the exit status if it comes within ``timeout``; True once it is known."""
        with self._status_lock:
            if self.returncode is not None:
                return True
            line = self._next_status(timeout)
            if line is None:
                return False
            kind, _, value = line.partition(" ")
            if kind == "exit" and value.lstrip("-").isdigit():
                self.returncode = os.waitstatus_to_exitcode(int(value))
            else:   # the monitor is gone (the sandbox was swept): the program is too
                self.returncode = -signal.SIGKILL
            self._close_status()
            return True

    def _internal_poll(self, _deadstate: Any = None, **_kwargs: Any) -> int | None:
        if self.returncode is None and self._status_r != -1:
            self._collect(0)
        return self.returncode

    def _wait(self, timeout: float | None) -> int:
        # In short slices, never holding the lock long: another thread may kill it meanwhile.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._collect(0.05 if deadline is None else
                                max(0.0, min(0.05, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is not None or self._ctl_w == -1:
            return
        try:
            os.write(self._ctl_w, f"{int(sig)}\n".encode())
        except OSError:
            return
        self._signals_sent += 1
        # Returns once the monitor has delivered it (its receipt), as Popen.send_signal
        # returns after kill(): a test that sends SIGTERM and then lets the program go on
        # (a lock released, a request answered) must find the signal already pending there.
        deadline = time.monotonic() + _SIGNAL_RECEIPT_TIMEOUT
        while self._signals_delivered < self._signals_sent and time.monotonic() < deadline:
            if self._collect(0.05):
                return   # it exited (a receipt before its exit status is counted on the way)


# --------------------------------------------------------------------------------------
# The learner's side: in the factory, as the learner's uid


def start_program(payload: bytes, fds: list[int], factory: socket.socket) -> None:
    """In the factory: fork a monitor that starts the program and reports on it."""
    pid = os.fork() if len(fds) == 5 else -1
    if pid != 0:
        for fd in fds:
            os.close(fd)
        return
    try:
        factory.close()   # the program must find no way to the verification's socket
        _monitor(json.loads(payload), fds)
    finally:
        os._exit(0)


def _monitor(spec: dict[str, Any], fds: list[int]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    stdin, stdout, stderr, ctl, status = fds
    env = {str(k): str(v) for k, v in dict(spec.get("env") or {}).items()}
    exe = str(spec["exe"])
    if "/" not in exe:
        exe = shutil.which(exe, path=env.get("PATH", os.defpath)) or exe
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(err_r)
            if spec.get("session"):
                os.setsid()
            for target, fd in enumerate((stdin, stdout, stderr)):
                os.dup2(fd, target)
            keep = sorted({0, 1, 2, err_w})
            for low, high in zip(keep, [*keep[1:], 65536], strict=True):
                os.closerange(low + 1, high)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            if spec.get("umask", -1) >= 0:
                os.umask(int(spec["umask"]))
            if spec.get("cwd"):
                os.chdir(str(spec["cwd"]))
            os.execve(exe, [str(a) for a in spec["argv"]], env)
        except OSError as exc:
            os.write(err_w, str(exc.errno or 0).encode())
        except BaseException:  # noqa: BLE001
            os.write(err_w, b"0")
        os._exit(127)
    os.close(err_w)
    failure = os.read(err_r, 64)   # empty: the exec closed it (it is close-on-exec)
    os.close(err_r)
    for fd in (stdin, stdout, stderr):
        os.close(fd)
    if failure:
        os.waitpid(child, 0)
        os.write(status, b"error " + failure + b"\n")
        return
    os.write(status, f"pid {child}\n".encode())
    _relay(child, ctl, status)


def _relay(child: int, ctl: int, status: int) -> None:
    """Forward the signals the verification writes to ``ctl`` to the program; report its
    exit status on ``status``."""
    pidfd = os.pidfd_open(child)
    watching = [pidfd, ctl]
    while True:
        ready, _, _ = select.select(watching, [], [])
        if ctl in ready:
            data = os.read(ctl, 256)
            if not data:   # the verification let go: the program runs on (the sweep ends it)
                watching = [pidfd]
            for line in data.split(b"\n"):
                if line.strip().isdigit():
                    try:
                        os.kill(child, int(line))
                    except OSError:
                        pass
                    try:   # the receipt send_signal() waits for
                        os.write(status, f"sent {int(line)}\n".encode())
                    except OSError:
                        pass
        if pidfd in ready:
            _, sts = os.waitpid(child, 0)
            try:
                os.write(status, f"exit {sts}\n".encode())
            except OSError:
                pass
            return
