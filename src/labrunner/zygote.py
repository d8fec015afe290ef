"""A pre-forked pytest: one process that has imported pytest and the client libraries the labs
use, and forks each lab's tests process from itself.

A lab's tests process spent about 0.45 CPU-seconds before its first test: the interpreter,
pytest and its plugins, psycopg, redis... imported afresh each time (about 1.8 s of wall time
on a loaded 2-core machine). The zygote pays it once. Each fork then becomes what
``python -m labrunner.tests_main`` (pytest's main) started in that folder with that
environment would be: a session and process group of its own, its working folder, its
environment, exactly the descriptors it was given, and a fresh import of labrunner's own
modules (the plugin holds per-process state and reads its environment as it loads).

Used by ``dev check``, and so by CI's checks of every lab, which paid that start-up about
2,000 times a run. A learner's ``run`` starts its tests process itself, with its pytest
command line in ``ps``; grading starts each one as another uid and under limits.

The zygote is not tied to a thread (PR_SET_PDEATHSIG follows the thread that forked): it
ends when the process that started it closes its end of the control socket, which the
kernel does when that process dies, however it dies, and its children die with it.

The parent's side is ``start``; ``python -m labrunner.zygote FD`` is the zygote's."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .tests_main import end_process

# Imported once in the zygote: what most tests processes import, and costly to import
# (psycopg and redis about 0.25 CPU-s each). Never a module that starts threads or opens
# anything as it is imported (grpc has fork handlers of its own; it stays out), none of
# labrunner's own, and no pytest plugin named with -p (pytest would warn in every fork that
# it cannot rewrite its asserts: pytest_timeout stays out).
PRELOAD = (
    "pytest", "psycopg", "psycopg_pool", "redis",
    "confluent_kafka", "pika", "rpyc", "requests", "jwt", "prometheus_client", "hypothesis",
    "cryptography.x509", "h2.connection", "yaml", "asyncio", "ssl", "http.client",
    "http.server", "urllib.request", "concurrent.futures", "dataclasses", "json",
)
ENV_OFF = "LABRUNNER_NO_ZYGOTE"   # "1": start every tests process with subprocess
# Read again in each fork (see _as_a_fresh_interpreter); any other PYTHON* variable shapes
# the interpreter as it starts, so a request that changes one is not forked.
REREAD = ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONPYCACHEPREFIX")
MAX_MESSAGE = 1 << 20


class ForkedProcess:
    """A tests process forked by the zygote, with the part of ``subprocess.Popen`` the
    runner uses: ``pid``, ``stdout``, ``returncode``, ``wait``, ``poll``; ``exit_fd`` is
    readable once it has exited (its exit status is then on the way)."""

    def __init__(self, pid: int, stdout: IO[bytes], status: socket.socket) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._status = status
        self._lock = threading.Lock()

    @property
    def exit_fd(self) -> int:
        return self._status.fileno()

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.wait(timeout=0)
        return None

    def wait(self, timeout: float | None = None) -> int:
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(["pytest"], timeout or 0)
        try:
            if self.returncode is None:
                self._status.settimeout(timeout)
                try:
                    reply = self._status.recv(4096)
                except (TimeoutError, BlockingIOError):
                    raise subprocess.TimeoutExpired(["pytest"], timeout or 0) from None
                # No reply: the zygote itself is gone, and took its children with it.
                self.returncode = int(json.loads(reply)["exit"]) if reply else -signal.SIGKILL
                self._status.close()
            return self.returncode
        finally:
            self._lock.release()


class _Zygote:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labrunner.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd="/", start_new_session=True)
        theirs.close()
        self.control = ours
        self.lock = threading.Lock()
        self.interpreter_env = _interpreter_env(os.environ)

    def fork(self, args: Sequence[str], cwd: Path, env: dict[str, str],
             pass_fds: Sequence[int]) -> ForkedProcess:
        out_r, out_w = os.pipe()
        status, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = json.dumps({"args": list(args), "cwd": str(cwd), "env": env,
                              "targets": list(pass_fds)}).encode()
        try:
            with self.lock:
                socket.send_fds(self.control, [request],
                                [status_theirs.fileno(), out_w, *pass_fds])
        finally:
            status_theirs.close()
            os.close(out_w)
        status.settimeout(30)
        try:
            reply = json.loads(status.recv(4096) or b"{}")
        except (OSError, ValueError):
            reply = {}
        if "pid" not in reply:
            os.close(out_r)
            status.close()
            raise OSError(f"the pytest zygote did not fork: {reply.get('error', 'no reply')}")
        return ForkedProcess(int(reply["pid"]), os.fdopen(out_r, "rb"), status)


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def start(args: Sequence[str], cwd: Path, env: dict[str, str],
          pass_fds: Sequence[int]) -> ForkedProcess | None:
    """``python -m labrunner.tests_main *args`` in ``cwd`` with ``env`` and ``pass_fds``,
    forked from the zygote (started on first use, again if it died); None when it cannot be
    (the caller then starts the process itself)."""
    global _zygote
    if os.environ.get(ENV_OFF) == "1" or not hasattr(socket, "send_fds"):
        return None
    for _attempt in range(2):
        with _zygote_lock:
            if _zygote is not None and _zygote.proc.poll() is not None:
                _stop(_zygote)   # died: its control socket goes too
                _zygote = None
            if _zygote is None:
                _zygote = _Zygote()
            zygote = _zygote
        if _interpreter_env(env) != zygote.interpreter_env:
            return None
        try:
            return zygote.fork(args, cwd, env, pass_fds)
        except OSError:
            with _zygote_lock:
                if _zygote is zygote:
                    _stop(zygote)
                    _zygote = None
    return None


def _interpreter_env(env: Any) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON") and k not in REREAD}


@atexit.register
def stop() -> None:
    """Stop the zygote, if one runs (the next ``start`` makes another). Also at exit: gone
    when the runner is (it would be within milliseconds anyway, but a check that nothing is
    left behind must not see it)."""
    global _zygote
    with _zygote_lock:
        if _zygote is not None:
            _stop(_zygote)
            _zygote = None


def _stop(zygote: _Zygote) -> None:
    zygote.control.close()   # it ends on end of file
    with contextlib.suppress(subprocess.TimeoutExpired):
        zygote.proc.wait(timeout=5)


# --------------------------------------------------------------------------------------
# The zygote's side


def _preload() -> None:
    import _pytest.config

    for name in (*PRELOAD, *(f"_pytest.{p}" for p in _pytest.config.default_plugins)):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    # Out of the collector's sight: a collection in a fork would otherwise write to every
    # object the zygote made, and so copy the pages they share (0.19 CPU-s a fork, 0.09
    # with the freeze, 0.33 for a new interpreter, measured on an empty test file).
    gc.collect()
    gc.freeze()


def serve(control: socket.socket) -> None:
    """Fork a tests process per request; send each one's exit status on its status socket."""
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the runner's Ctrl-C is the runner's
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: dict[int, socket.socket] = {}
    while True:
        ready = select.select([control.fileno(), wake_r], [], [])[0]
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(children)
        if control.fileno() in ready:
            message, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 64)
            if not message:
                return   # the runner is gone: our children follow us (PDEATHSIG)
            _fork_one(json.loads(message), fds, children, control, [wake_r, wake_w])


def _fork_one(request: dict[str, Any], fds: list[int], children: dict[int, socket.socket],
              control: socket.socket, pipes: list[int]) -> None:
    status = socket.socket(fileno=fds[0])
    given = fds[1:]
    try:
        pid = os.fork()
    except OSError as exc:
        with contextlib.suppress(OSError):
            status.send(json.dumps({"error": str(exc)}).encode())
        status.close()
        for fd in given:
            os.close(fd)
        return
    if pid == 0:
        try:
            # Detached, not closed: a socket object closes its number when it is freed,
            # which in the fork would be whatever reused that number by then.
            for sock in (control, status, *children.values()):
                os.close(sock.detach())
            for fd in pipes:
                os.close(fd)
            _become_tests_process(request, given)
        except SystemExit:
            raise
        except BaseException:   # noqa: BLE001 - never back into the zygote's loop
            os._exit(70)
    for fd in given:
        os.close(fd)
    children[pid] = status
    with contextlib.suppress(OSError):
        status.send(json.dumps({"pid": pid}).encode())


def _reap(children: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, how = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = children.pop(pid, None)
        if status is not None:
            with contextlib.suppress(OSError):
                status.send(json.dumps({"exit": os.waitstatus_to_exitcode(how)}).encode())
            status.close()


def _become_tests_process(request: dict[str, Any], given: list[int]) -> None:
    """In the fork: what ``Popen(python -m labrunner.tests_main ...)`` would have made."""
    import resource

    from .parent_death import die_with_parent

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()
    die_with_parent()   # the zygote's end is the runner's
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _place_descriptors(given[0], given[1:], request["targets"])
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _as_a_fresh_interpreter(request["cwd"])
    import pytest

    sys.argv = [str(Path(pytest.__file__).parent / "__main__.py"), *request["args"]]

    code = pytest.main(request["args"])
    end_process(int(code))   # the objects are left to the exit (see tests_main): in a
    # fork, freeing them would also write to, and so copy, every page shared with the zygote


def _place_descriptors(output: int, given: list[int], targets: list[int]) -> None:
    """stdin from /dev/null, stdout and stderr to ``output``, each given descriptor at the
    number it had in the runner (the environment names them), and nothing else open."""
    base = max([*targets, *given, output, 2]) + 1
    high = [os.dup2(fd, base + i) for i, fd in enumerate([output, *given])]
    for fd in [output, *given]:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(high[0], 1)
    os.dup2(high[0], 2)
    for fd, target in zip(high[1:], targets, strict=True):
        os.dup2(fd, target)
    keep = sorted({0, 1, 2, *targets})
    start = 3
    for fd in [*keep[3:], 1 << 20]:
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1


def _as_a_fresh_interpreter(cwd: str) -> None:
    """What a new interpreter reads from its environment as it starts, read again."""
    import tempfile

    env = os.environ
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    sys.pycache_prefix = env.get("PYTHONPYCACHEPREFIX") or None
    sys.path[0] = cwd   # python -m puts its working folder first
    tempfile.tempdir = None   # TMPDIR is read again on first use
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):
        raw = io.FileIO(fd, "w", closefd=False)
        binary: Any = raw if unbuffered else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(binary, encoding="utf-8", errors=errors,
                                  line_buffering=not unbuffered and name == "stderr",
                                  write_through=unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.__stdin__ = sys.stdin  # type: ignore[misc]
    for name in [m for m in sys.modules if m.startswith("labrunner.") and m != __name__]:
        del sys.modules[name]


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    _preload()
    serve(control)


if __name__ == "__main__":
    main()
