"""The learner's side: one host process serving the verification's requests on its
socket."""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import socket
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import rpyc
from rpyc.core.protocol import Connection
from rpyc.core.stream import SocketStream
from rpyc.utils.factory import connect_stream

from .loading import LearnerCodeError, import_learner_module, load_harness_module
from .modes import OWN_THREAD_PREFIX
from .wire import _PlainDataConnection

# The learner side lets the verification do anything with the learner's objects.
_HOST_CONFIG: dict[str, Any] = {
    "allow_all_attrs": True, "allow_setattr": True, "allow_delattr": True,
    "allow_pickle": False, "bind_threads": True, "sync_request_timeout": None,
    "include_local_version": False, "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False, "log_exceptions": False,
}


class _HostConnection(_PlainDataConnection):
    """The learner's side: it may be sent any exception class (it protects nothing)."""



class _HostService(rpyc.Service):  # type: ignore[misc]
    _protocol = _HostConnection

    def exposed_load(self, folder: str, module: str, name: str) -> tuple[str, Any]:
        try:
            return "ok", import_learner_module(Path(folder), module, name)
        except LearnerCodeError as exc:
            return "error", str(exc)

    def exposed_run_helper(self, module: str, name: str, args: tuple[Any, ...]) -> Any:
        """Run one of labrunner's helpers here (never anything else); return its result."""
        if not module.startswith("labrunner."):
            raise ValueError(f"{module}.{name}: only labrunner's helpers run here")
        helper = getattr(importlib.import_module(module), name)
        return helper(*args)

    def exposed_load_harness(self, source: str, filename: str, name: str) -> ModuleType:
        """Load a lab's harness (its source sent by the verification: the lab's folder is
        the verification's alone) as the module ``name``."""
        return load_harness_module(str(source), str(filename), str(name))

    def exposed_describe(self, obj: Any) -> tuple[str, Any]:
        """What kind of attribute the verification got: a class (and whether an exception
        class, with its ancestors' names) or something else."""
        if isinstance(obj, type):
            if issubclass(obj, BaseException):
                return "exception", tuple((c.__module__, c.__name__) for c in obj.__mro__)
            return "class", None
        return "other", None



# Threads serving the verification's requests in a host: an idle one takes over reading while
# another runs a call, so up to this many calls (a test's concurrent requests, each perhaps
# blocked on a lock) run at once instead of one after another.
HOST_SERVING_THREADS = 16


def _serve_until_closed(conn: Connection, all_started: threading.Event) -> None:
    # None serves before all have started: a request served by the first while the others
    # were still starting (seconds apart on a loaded machine) saw threads appear later, as
    # if the learner's code had started them.
    all_started.wait()
    try:
        while not conn.closed:
            conn.serve(1)
    except (EOFError, OSError, ValueError, AttributeError):
        return   # the verification is gone (AttributeError: a connection torn down meanwhile)


def serve_host(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # learner code may wait for its children
    conn = connect_stream(SocketStream(sock), service=_HostService, config=_HOST_CONFIG)
    all_started = threading.Event()
    threading.stack_size(1 << 20)
    for n in range(1, HOST_SERVING_THREADS):
        threading.Thread(target=_serve_until_closed, args=(conn, all_started), daemon=True,
                         name=f"{OWN_THREAD_PREFIX}serving-{n}").start()
    threading.stack_size(0)   # the learner's own threads get the default
    all_started.set()
    try:
        _serve_until_closed(conn, all_started)
    finally:
        try:
            atexit._run_exitfuncs()   # helpers' clean-ups (generated stubs' folders)
        finally:
            os._exit(0)   # learner threads still running must not keep the process alive


