"""The verification's side of the process boundary: a learner host started (spawned, or
asked of the factory), the connection to it with what the learner may reach, and the
learner's module and classes as local stand-ins."""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import (
    BuiltinFunctionType,
    ClassMethodDescriptorType,
    CodeType,
    FrameType,
    FunctionType,
    GetSetDescriptorType,
    MemberDescriptorType,
    MethodDescriptorType,
    MethodType,
    MethodWrapperType,
    ModuleType,
    TracebackType,
    WrapperDescriptorType,
)
from typing import Any

import rpyc
from rpyc.core import netref
from rpyc.core.protocol import Connection
from rpyc.core.stream import SocketStream
from rpyc.utils.factory import connect_stream

from .loading import LearnerCodeError
from .modes import FACTORY_LOCK, FACTORY_PREFIX
from .wire import _PlainDataConnection, _Shared

# The verification side lets the learner use public attributes of what it was handed, and
# never sends its own tracebacks (they would show hidden tests' code).
_VERIFIER_CONFIG: dict[str, Any] = {
    "allow_public_attrs": True, "allow_setattr": False, "allow_delattr": False,
    "allow_pickle": False, "bind_threads": True, "sync_request_timeout": None,
    "include_local_traceback": False, "include_local_version": False,
    "import_custom_exceptions": False, "instantiate_custom_exceptions": False,
    "log_exceptions": False,
}

# Calls from the learner's own threads that the tests' side can serve at once.
CALLBACKS_HELD_AT_ONCE = 8

# Attributes that lead from an object to code and globals: a frame's, a generator's, a
# traceback's. Dunders are refused by RPyC already (except its list of safe operators).
_WITHHELD_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_")
_WITHHELD_TYPES = (ModuleType, FrameType, CodeType, TracebackType)
# Exception classes never instantiated from what the learner's side sends: pytest's outcomes
# (a fake skip or exit), labrunner's and the RPC's own.
_REFUSED_EXCEPTION_MODULES = ("_pytest", "pytest", "pluggy", "labrunner", "rpyc", "xdist")


class LearnerProcessEnded(EOFError):
    """The learner's process went away while the verification was using it (it exited, was
    killed, or crashed). RPyC words a broken connection by which side noticed first; this
    says what happened, the same every time."""

    MESSAGE = ("your code's process ended while the test was using it: it exited (sys.exit, "
               "os._exit) or crashed")

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class _VerifierConnection(_PlainDataConnection):
    """The verification's side: what the learner may reach of it, and what it may raise."""

    refused_modules = _REFUSED_EXCEPTION_MODULES

    def sync_request(self, handler: Any, *args: Any) -> Any:
        try:
            return super().sync_request(handler, *args)
        except EOFError as exc:
            if hasattr(exc, "remote_traceback"):
                raise   # an EOFError the learner's code raised (input() at the end): its own
            raise LearnerProcessEnded() from None

    def _handle_getattr(self, obj: Any, name: Any) -> Any:
        value = Connection._handle_getattr(self, obj, name)
        if type(value) in (list, dict, set) and not _fixed(obj) and \
                name in getattr(obj, "__dict__", {}):
            # An instance's own container goes by reference (edits in place land there);
            # a class's, a module's or labrunner's own object's goes as a copy.
            return _Shared(value)
        return value

    def _handle_setattr(self, obj: Any, name: Any, value: Any) -> None:
        """The learner may set what an instance of the field's libraries already has as a
        public data attribute or property (``conn.row_factory``, ``conn.autocommit``); never
        add an attribute or shadow a method with its own function, and never set anything
        on a class, a module, a function or an object of labrunner's or pytest's: those are
        the verification's code, shared by every test and by the tests' own connections."""
        if not isinstance(name, str) or name.startswith("_") or _fixed(obj):
            raise AttributeError(f"cannot set {name!r}")
        static = inspect.getattr_static(type(obj), name, None)
        instance_data = name in getattr(obj, "__dict__", {})
        if not (isinstance(static, property) or (instance_data and static is None)):
            raise AttributeError(f"cannot set {name!r}")
        setattr(obj, name, value)

    def _check_attr(self, obj: Any, name: str, perm: str) -> str:
        if name.startswith(_WITHHELD_PREFIXES):
            raise AttributeError(f"cannot access {name!r}")
        return super()._check_attr(obj, name, perm)

    def _box(self, obj: Any) -> Any:
        if type(obj) is RemoteModule:   # a module that lives over there goes back as itself
            obj = obj.module_ref
        elif not issubclass(type(obj), netref.BaseNetref) and isinstance(obj, _WITHHELD_TYPES):
            obj = f"<{type(obj).__name__} withheld>"
        return super()._box(obj)

_FIXED_TYPES = (type, ModuleType, FunctionType, BuiltinFunctionType, MethodType,
                MethodWrapperType, WrapperDescriptorType, MethodDescriptorType,
                ClassMethodDescriptorType, GetSetDescriptorType, MemberDescriptorType,
                staticmethod, classmethod, property, functools.partial, FrameType, CodeType,
                TracebackType)


def _fixed(obj: Any) -> bool:
    """Is ``obj`` code of the verification's side (a class, a module, a function, a
    descriptor) or an object of labrunner's or pytest's own, which the learner may read
    and call but never change?"""
    if isinstance(obj, _FIXED_TYPES):
        return True
    module = getattr(type(obj), "__module__", "") or ""
    return module.split(".")[0] in _REFUSED_EXCEPTION_MODULES



class _VerifierService(rpyc.VoidService):  # type: ignore[misc]
    _protocol = _VerifierConnection


_spawned: dict[str, Any] = {}
# Hosts' sockets shut down but kept open (see LearnerHost.close): a few per tests process.
_SHUT_DOWN: list[socket.socket] = []
_spawned_lock = threading.Lock()


def _spawn_factory() -> int:
    """The socket (its descriptor) of this process's learner factory, started on first use:
    ``python -I -m labrunner.learner factory``, a clean interpreter that forks one host per
    request (see :mod:`.factory`). Its parent-death signal follows the thread that starts
    it, so a thread of its own starts it and lives as long as this process. The hosts are
    killed, never asked to exit: what they leave in their temp folder (generated stubs, the
    learner's own files) goes with that folder when this process exits."""
    with _spawned_lock:
        if "fd" not in _spawned:
            started = threading.Event()

            def keeper() -> None:
                try:
                    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    scratch = tempfile.mkdtemp(prefix="lr-learner-")
                    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
                    # Kept: a Popen dropped while its process runs warns (ResourceWarning).
                    _spawned["process"] = subprocess.Popen(
                        [sys.executable, "-I", "-m", "labrunner.learner", "factory",
                         str(theirs.fileno())],
                        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                        env={**os.environ, "TMPDIR": scratch})
                    theirs.close()
                    _spawned["fd"] = mine.detach()
                except BaseException as exc:  # noqa: BLE001 - raised where it was asked
                    _spawned["error"] = exc
                finally:
                    started.set()
                threading.Event().wait()

            threading.Thread(target=keeper, name="learner-factory", daemon=True).start()
            started.wait()
            if "error" in _spawned:
                raise _spawned.pop("error")
        return int(_spawned["fd"])


def _factory_socket(how: str) -> socket.socket:
    """A socket of its own on the factory: grading's (``fd:N``) or this process's, started
    on first use (``spawn``)."""
    fd = int(how[len(FACTORY_PREFIX):]) if how.startswith(FACTORY_PREFIX) else (
        _spawn_factory())
    return socket.socket(fileno=os.dup(fd))


def wait_for_factory(how: str, preload: Sequence[str] = ()) -> None:
    """Start the factory (``spawn``) or wait for grading's to have preloaded its libraries
    (``fd:N``), and the modules named in ``preload`` too (the labs' ``learner_preload``).
    Asked before any test runs: on a loaded machine the preload takes seconds, and a test's
    timeout is the learner's code's budget, not the factory's start-up."""
    factory = _factory_socket(how)
    try:
        with FACTORY_LOCK:
            factory.sendall(" ".join(("ready", *preload)).encode("ascii", "replace"))
            factory.recv(16)
    except OSError:
        pass   # a factory that died is reported by the first test that needs a host
    finally:
        factory.close()


class LearnerHost:
    """One learner host process and the RPC connection to it."""

    def __init__(self, conn: _VerifierConnection, kill: Any) -> None:
        self.conn = conn
        self._kill = kill
        # A call from a thread the learner's code started (its server's, its workers') is
        # served on whichever of these threads receives it, while the test's own threads are
        # elsewhere. One alone served a second such call only once the first had returned:
        # a test that held one inside a callback of its own (a clock, a hook) could never
        # race a second. Each waits its turn to receive (woken as the one receiving leaves
        # to serve a call), not RPyC's default of polling every 0.1 s.
        #
        # A serving thread that meets the connection's end (the host died or was killed)
        # stops quietly: the call that needed the host reports it (ProcessEnded), and an
        # exception raised in a thread would only be a warning pytest prints.
        self._serving = [rpyc.BgServingThread(conn, callback=lambda: None,
                                              serve_interval=0.5, sleep_interval=0.0)
                         for _ in range(CALLBACKS_HELD_AT_ONCE)]

    @classmethod
    def start(cls, how: str) -> LearnerHost:
        """A fresh host forked by a factory: grading's (``fd:N``, as the learner's uid), or
        outside grading (``spawn``) this process's own - a fork of a clean interpreter that
        has run no learner code, not a new interpreter and its imports for every test."""
        factory = _factory_socket(how)
        with FACTORY_LOCK:   # one request and its reply at a time
            factory.sendall(b"spawn")
            data, fds, _flags, _addr = socket.recv_fds(factory, 32, 1)
        if not fds or not data.isdigit():
            factory.close()
            raise LearnerCodeError("the learner's process could not be started")
        pid = int(data)
        sock = socket.socket(fileno=fds[0])

        def kill() -> None:
            try:
                with FACTORY_LOCK:
                    factory.sendall(f"kill {pid}".encode())
            except OSError:
                pass
            factory.close()

        conn = connect_stream(SocketStream(sock), service=_VerifierService,
                              config=_VERIFIER_CONFIG)
        return cls(conn, kill)

    def run_helper(self, helper: Any, args: tuple[Any, ...]) -> Any:
        return self.conn.root.run_helper(helper.__module__, helper.__qualname__, args)

    def load(self, folder: Path, module: str, name: str) -> RemoteModule:
        status, value = self.conn.root.load(str(folder), module, name)
        if status != "ok":
            raise LearnerCodeError(str(value))
        return RemoteModule(self, value, name)

    def load_harness(self, file: Path, name: str) -> RemoteModule:
        return RemoteModule(self, self.conn.root.load_harness(file.read_text(), str(file), name),
                            name)

    def close(self) -> None:
        """Kill the host and drop the connection, without a goodbye it may never answer
        (its code may be stuck in a loop). The socket is shut down, which wakes every thread
        polling it (they read its end and stop), but its descriptor stays open until this
        process ends: closed, its number could be reused at once (the next test's host), and
        a serving thread about to poll the old number would wait on the new socket for ever,
        keeping this process from exiting."""
        for serving in self._serving:
            serving._active = False   # its loop ends at the next turn; no join
        self._kill()
        self.conn._closed = True
        try:
            sock = self.conn._channel.stream.sock
            sock.shutdown(socket.SHUT_RDWR)
            _SHUT_DOWN.append(sock)
        except Exception:  # noqa: BLE001 - the connection is gone already
            pass


class RemoteModule:
    """A learner module living in the host. Attributes are the module's; its classes come
    back as local stand-ins (so ``isinstance(module.X, type)`` holds and ``module.X(...)``
    builds the learner's object over there); its exception classes as local classes."""

    def __init__(self, host: LearnerHost, module: Any, name: str) -> None:
        self._host = host
        self.module_ref = module   # the proxy to the module over there
        self.__name__ = name
        self._classes: dict[str, type] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = getattr(self.module_ref, name)
        if not isinstance(value, netref.BaseNetref):
            return value
        kind, detail = self._host.conn.root.describe(value)
        if kind == "exception":
            return self._host.conn.exception_class(
                str(detail[0][0]), str(detail[0][1]), detail)
        if kind == "class":
            if name not in self._classes:
                self._classes[name] = _stand_in_class(name, value)
            return self._classes[name]
        return value

    def __repr__(self) -> str:
        return f"<learner module {self.__name__} (in its own process)>"


def remote_connection(obj: Any) -> Any:
    """The RPC connection ``obj`` is a proxy through, or None for a local object."""
    if issubclass(type(obj), netref.BaseNetref):
        return object.__getattribute__(obj, "____conn__")
    return None


def _stand_in_class(name: str, remote: Any) -> type:
    """A local class whose instances are the learner's objects in the host."""

    def __new__(_cls: type, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        return remote(*args, **kwargs)

    def __getattr__(_cls: Any, attr: str) -> Any:  # class attributes, static methods
        return getattr(remote, attr)

    meta = type(f"{name}Type", (type,), {"__getattr__": __getattr__})
    stand_in: type = meta(name, (), {"__new__": __new__, "__module__": "learner",
                                     "remote": remote})
    return stand_in
