"""The factory: forked as the learner's uid before the sandbox drops to the verification's,
it forks one fresh host per request and starts the learner's programs."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys

from ..parent_death import die_with_parent
from ..services.local.process import become, undumpable
from .host import serve_host

# The field's libraries most learners' modules import, imported once here so that every
# host forked from the factory has them already: psycopg or redis take a second or two to
# import on a loaded machine, and a lab's verification starts a host for every test. Only
# imports: the factory runs no learner code, so each host still starts from the same state.
# labrunner.testing too: the helpers a verification runs beside the learner's code
# (serve_wsgi, the probes of its process) are imported by a host's first run_helper, and
# importing them (pytest, grpc and the rest with them) cost every test about 1.3 s.
PRELOADED = ("psycopg", "redis", "confluent_kafka", "labrunner.testing")


def _preload(names: tuple[str, ...] | list[str] = PRELOADED) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing library is the learner's import error
            pass


def serve_factory(sock: socket.socket) -> None:
    """Fork one host per request; reply with its socket (SCM_RIGHTS) and its pid. Start
    the learner's programs the verification asks for (``programs``)."""
    # Inherited by every host and program monitor forked from here: a learner's program runs
    # as this uid and could otherwise attach to them and forge what a host reads of its
    # /proc for the verification. The program's own exec makes it dumpable again, so a host
    # can still read its /proc.
    undumpable()
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # hosts are reaped by the kernel
    _preload()
    hosts: set[int] = set()
    while True:
        try:
            request, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 8)
        except OSError:
            return
        if not request:
            return
        if request.startswith(b"exec "):
            # A learner's program (a built binary, a script): started as this uid, by a
            # monitor that reports its exit and forwards the verification's signals.
            from .programs import start_program

            start_program(request[5:], list(fds), sock)
            continue
        for fd in fds:
            os.close(fd)
        command, _, arg = request.decode("ascii", "replace").partition(" ")
        if command == "spawn":
            mine, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:
                sock.close()
                theirs.close()
                die_with_parent(signal.SIGKILL)
                serve_host(mine)
            mine.close()
            hosts.add(pid)
            socket.send_fds(sock, [str(pid).encode()], [theirs.fileno()])
            theirs.close()
        elif command == "ready":
            # Asked before the first test's timer starts: the reply proves the preload done.
            # A lab may name more libraries its learners import (lab.toml learner_preload:
            # ph1.7's openapi_core, 2 s to import on a loaded machine, was imported again in
            # every test's host); imported here once, every host forked after has them.
            # (The catalog checked each is a module name; an import that fails is skipped.)
            _preload(arg.split())
            sock.send(b"ready")
        elif command == "kill" and arg.isdigit() and int(arg) in hosts:
            hosts.discard(int(arg))
            try:
                os.kill(int(arg), signal.SIGKILL)
            except OSError:
                pass


def start_factory(sock_fd: int, uid: int, gid: int, home: str) -> None:
    """In the sandbox's child, still root and already confined (namespaces, limits): fork
    the factory as ``uid`` and replace its image with a clean interpreter, so nothing of
    the grader's memory (the signing key among it) reaches the learner's side."""
    pid = os.fork()
    if pid != 0:
        os.close(sock_fd)
        return
    try:
        os.closerange(3, sock_fd)
        os.closerange(sock_fd + 1, 65536)
        become(uid, gid, tied_to_parent=False)
        os.set_inheritable(sock_fd, True)
        os.chdir(home)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "TMPDIR": home,
               "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1",
               # Under the sandbox's address-space limit: glibc would reserve 64 MB per
               # malloc arena, one per serving thread (the verification sets the same).
               "MALLOC_ARENA_MAX": "2"}
        os.execve(sys.executable, [sys.executable, "-I", "-m", "labrunner.learner", "factory",
                                   str(sock_fd)], env)
    finally:
        os._exit(127)
