"""The learner's Python code in a process of its own, behind an RPC proxy.

When labrunner grades untrusted code, the verification (the lab's tests, the instructor's
hidden tests and the key that signs outcomes) must not share an interpreter with the
submission: code in the same process can patch pytest, walk the heap for the key or read the
hidden tests' source. So the grader asks for this mode (``$LABRUNNER_LEARNER_HOST``) and
``learner.load()`` then imports the learner's module in a *learner host*: a separate Python
process, run under a uid of its own when the grader is root. The verification talks to it
through RPyC, which proxies objects both ways: the verification calls the learner's functions
and methods, the learner's code calls back into the connections and callbacks the tests hand
it, and exceptions cross as exceptions.

What crosses, and how:

* plain data (``None``, bools, numbers, strings, bytes, and lists, tuples, dicts and sets made
  only of those) is copied, so a result is a real ``dict`` the verification can compare and
  serialise, never an object whose ``__eq__`` the learner wrote;
* anything else goes by reference. The learner may use the public attributes of what it is
  given (a psycopg connection's ``execute``), never private ones, never a module, a frame, a
  function's globals or a traceback: nothing leads from a handed-over object to labrunner;
* the learner's exceptions arrive as local classes of the same name and module (one class per
  learner class, with the builtin bases it had), so ``pytest.raises(module.Error)`` works;
  exceptions of the field's libraries (psycopg, redis, ...) arrive as themselves when the
  verification has that library loaded; pytest's and labrunner's own never do.

Processes: in grading, the sandbox starts a *factory* before it drops to the verification's
uid (see :func:`start_factory`); the factory runs as the learner uid, re-executes a clean
interpreter, and forks one fresh host per ``learner`` fixture, passing its socket back over
a SOCK_SEQPACKET pair (one request per message). Outside grading (``spawn``), the
verification starts hosts itself.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import datetime
import decimal
import functools
import importlib
import importlib.util
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from pathlib import Path, PurePath, PurePosixPath
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
from rpyc.core import brine, consts, netref
from rpyc.core.protocol import Connection
from rpyc.core.stream import SocketStream
from rpyc.utils.factory import connect_stream

from .services.local.process import become

ENV_LEARNER_HOST = "LABRUNNER_LEARNER_HOST"
# Grading: a folder the verification fills for the learner's process (another uid) to read.
ENV_SHARED_DIR = "LABRUNNER_SHARED_DIR"
SPAWN = "spawn"
FACTORY_PREFIX = "fd:"

# The learner side lets the verification do anything with the learner's objects.
_HOST_CONFIG: dict[str, Any] = {
    "allow_all_attrs": True, "allow_setattr": True, "allow_delattr": True,
    "allow_pickle": False, "bind_threads": True, "sync_request_timeout": None,
    "include_local_version": False, "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False, "log_exceptions": False,
}
# The verification side lets the learner use public attributes of what it was handed, and
# never sends its own tracebacks (they would show hidden tests' code).
_VERIFIER_CONFIG: dict[str, Any] = {
    "allow_public_attrs": True, "allow_setattr": False, "allow_delattr": False,
    "allow_pickle": False, "bind_threads": True, "sync_request_timeout": None,
    "include_local_traceback": False, "include_local_version": False,
    "import_custom_exceptions": False, "instantiate_custom_exceptions": False,
    "log_exceptions": False,
}

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_PLAIN_MARK = "\x00labrunner-plain\x00"
_MAX_PLAIN_ITEMS = 200_000
# Attributes that lead from an object to code and globals: a frame's, a generator's, a
# traceback's. Dunders are refused by RPyC already (except its list of safe operators).
_WITHHELD_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_")
_WITHHELD_TYPES = (ModuleType, FrameType, CodeType, TracebackType)
# Exception classes never instantiated from what the learner's side sends: pytest's outcomes
# (a fake skip or exit), labrunner's and the RPC's own.
_REFUSED_EXCEPTION_MODULES = ("_pytest", "pytest", "pluggy", "labrunner", "rpyc", "xdist")
_REFUSED_BUILTINS = {"KeyboardInterrupt", "SystemExit", "GeneratorExit"}


class LearnerCodeError(Exception):
    """The learner's code could not be loaded or built; the message says where and why."""


# --------------------------------------------------------------------------------------
# Loading a learner module (in whichever process runs it)


def learner_frame(exc: BaseException, folder: Path) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if frame.filename.startswith(str(folder)):
            return f"{frame.filename}:{frame.lineno}"
    return str(folder)


def import_learner_module(folder: Path, module: str, name: str) -> ModuleType:
    """Import ``folder/<module>.py`` as a fresh module called ``name``."""
    file = folder / f"{module}.py"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as exc:
        raise LearnerCodeError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any error in the learner's module
        frame = learner_frame(exc, folder)
        raise LearnerCodeError(
            f"{frame}: importing {file.name} raised {type(exc).__name__}: {exc}") from None
    return mod


def load_harness_module(source: str, filename: str, name: str) -> ModuleType:
    """A lab's harness (code the verification runs beside the learner's) as a fresh module
    called ``name``; ``filename`` names it in tracebacks."""
    mod = ModuleType(name)
    mod.__file__ = filename
    sys.modules[name] = mod
    exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - the lab's own code
    return mod


# --------------------------------------------------------------------------------------
# Plain data crosses by value


def _encode_plain(obj: Any, budget: list[int], depth: int = 0) -> Any:
    """``obj`` as nested tuples brine can carry, or raise ValueError if it is not plain."""
    kind = type(obj)
    if kind in _PLAIN_SCALARS:
        return obj
    if issubclass(kind, netref.BaseNetref):
        # Never look into a proxy here: any question to it is a request to the other side,
        # made while this side is composing a message.
        raise ValueError("a proxy is not plain data")
    budget[0] -= 1
    if depth > 60 or budget[0] < 0:
        raise ValueError("too deep or too big to copy")
    if kind is tuple:
        return (_PLAIN_MARK, "t", tuple(_encode_plain(x, budget, depth + 1) for x in obj))
    if kind is list:
        return (_PLAIN_MARK, "l", tuple(_encode_plain(x, budget, depth + 1) for x in obj))
    if kind is dict:
        return (_PLAIN_MARK, "d", tuple(
            (_encode_plain(k, budget, depth + 1), _encode_plain(v, budget, depth + 1))
            for k, v in obj.items()))
    if kind is set or kind is frozenset:
        return (_PLAIN_MARK, "s" if kind is set else "f",
                tuple(_encode_plain(x, budget, depth + 1) for x in obj))
    value = _encode_value(obj, lambda x: _encode_plain(x, budget, depth + 1))
    if value is None:
        raise ValueError("not plain data")
    return (_PLAIN_MARK, value[0], value[1:])


def _encode_value(obj: Any, inner: Any) -> tuple[Any, ...] | None:
    """Value types the field passes around as data (query parameters, paths, JSON
    wrappers, SQL compositions): copied, so each side gets one its own libraries accept."""
    kind = type(obj)
    if issubclass(kind, PurePath):
        return ("path", str(obj), isinstance(obj, Path))
    if kind in (datetime.datetime, datetime.date, datetime.time, datetime.timedelta):
        return ("dt", kind.__name__, tuple(inner(a) for a in obj.__reduce__()[1]))
    if kind is datetime.timezone:
        return ("tz", tuple(inner(a) for a in obj.__getinitargs__()))
    if kind.__module__ == "zoneinfo" and kind.__name__ == "ZoneInfo":
        return ("zi", str(obj.key))
    if kind is decimal.Decimal:
        return ("dec", str(obj))
    if kind is uuid.UUID:
        return ("uuid", obj.hex)
    if kind is bytearray or kind is memoryview:
        return ("bytes", bytes(obj))
    if kind.__module__ == "psycopg.types.json" and kind.__name__ in ("Json", "Jsonb"):
        if getattr(obj, "dumps", None) is not None:
            return None
        return ("json", kind.__name__, inner(obj.obj))
    if kind.__module__ == "psycopg.sql":
        return _encode_sql(obj, inner)
    message = sys.modules.get("google.protobuf.message")
    if message is not None and isinstance(obj, message.Message):
        # gRPC serialises with the message class of its own process: send the bytes.
        return ("pb", obj.DESCRIPTOR.full_name, obj.SerializeToString())
    if callable(obj) and getattr(obj, "__module__", None) == "psycopg.rows" and getattr(
            obj, "__name__", "") in _ROW_FACTORIES:
        return ("rows", obj.__name__)
    return None


_ROW_FACTORIES = ("tuple_row", "dict_row", "namedtuple_row", "scalar_row")


def _encode_sql(obj: Any, inner: Any) -> tuple[Any, ...] | None:
    name = type(obj).__name__
    payload = obj._obj
    if name == "SQL":
        return ("sql", "SQL", str(payload))
    if name == "Identifier":
        return ("sql", "Identifier", tuple(str(p) for p in payload))
    if name == "Literal":
        return ("sql", "Literal", inner(payload))
    if name == "Placeholder":
        return ("sql", "Placeholder", str(payload), str(obj._format.value))
    if name == "Composed":
        parts = []
        for part in payload:
            encoded = _encode_sql(part, inner)
            if encoded is None:
                return None
            parts.append((_PLAIN_MARK, encoded[0], encoded[1:]))
        return ("sql", "Composed", tuple(parts))
    return None


def _decode_value(tag: str, items: tuple[Any, ...]) -> Any:
    if tag == "path":
        return Path(items[0]) if items[1] else PurePosixPath(items[0])
    if tag == "dt":
        kinds = {"datetime": datetime.datetime, "date": datetime.date,
                 "time": datetime.time, "timedelta": datetime.timedelta}
        return kinds[items[0]](*[_decode_plain(a) for a in items[1]])
    if tag == "tz":
        return datetime.timezone(*[_decode_plain(a) for a in items[0]])
    if tag == "zi":
        import zoneinfo

        return zoneinfo.ZoneInfo(items[0])
    if tag == "dec":
        return decimal.Decimal(items[0])
    if tag == "uuid":
        return uuid.UUID(hex=items[0])
    if tag == "bytes":
        return bytearray(items[0])
    if tag == "json":
        from psycopg.types import json as pg_json

        return getattr(pg_json, "Jsonb" if items[0] == "Jsonb" else "Json")(
            _decode_plain(items[1]))
    if tag == "pb":
        from google.protobuf import message_factory
        from google.protobuf.descriptor_pool import Default

        descriptor = Default().FindMessageTypeByName(items[0])
        return message_factory.GetMessageClass(descriptor).FromString(items[1])
    if tag == "rows" and items[0] in _ROW_FACTORIES:
        from psycopg import rows

        return getattr(rows, items[0])
    if tag == "sql":
        from psycopg import sql

        kind, rest = items[0], items[1:]
        if kind == "SQL":
            return sql.SQL(rest[0])
        if kind == "Identifier":
            return sql.Identifier(*rest[0])
        if kind == "Literal":
            return sql.Literal(_decode_plain(rest[0]))
        if kind == "Placeholder":
            from psycopg.adapt import PyFormat

            return sql.Placeholder(rest[0], PyFormat(rest[1]))
        if kind == "Composed":
            return sql.Composed([_decode_plain(p) for p in rest[0]])
    raise ValueError(f"unknown value tag {tag!r}")


def _decode_plain(value: Any) -> Any:
    if type(value) is not tuple:
        return value
    if len(value) == 3 and value[0] == _PLAIN_MARK and type(value[2]) is tuple:
        kind, items = value[1], value[2]
        if kind == "d":
            return {_decode_plain(k): _decode_plain(v) for k, v in items}
        if kind in ("l", "s", "f", "t"):
            decoded = [_decode_plain(x) for x in items]
            if kind == "l":
                return decoded
            if kind == "s":
                return set(decoded)
            if kind == "f":
                return frozenset(decoded)
            return tuple(decoded)
        return _decode_value(str(kind), items)
    return tuple(_decode_plain(x) for x in value)


class _Shared:
    """A container read as an object's attribute: it goes by reference, so an edit in place
    on the other side (``response.headers[k] = v``) edits this one, as in one process."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _PlainDataConnection(Connection):  # type: ignore[misc]
    """A connection that copies plain data instead of proxying it, and maps exceptions."""

    refused_modules: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stand_in_exceptions: dict[tuple[str, str], type[BaseException]] = {}
        self._exceptions_lock = threading.RLock()

    def _handle_getattr(self, obj: Any, name: Any) -> Any:
        value = super()._handle_getattr(obj, name)
        if type(value) in (list, dict, set) and not isinstance(obj, ModuleType):
            return _Shared(value)
        return value

    def _box(self, obj: Any) -> Any:
        if type(obj) is _Shared:
            return super()._box(obj.value)
        if type(obj) not in _PLAIN_SCALARS and not issubclass(type(obj), netref.BaseNetref) and (
                type(obj) is not tuple or not brine.dumpable(obj)):
            try:
                return consts.LABEL_VALUE, _encode_plain(obj, [_MAX_PLAIN_ITEMS])
            except (ValueError, RecursionError, AttributeError, TypeError):
                pass
        return super()._box(obj)

    def _unbox(self, package: Any) -> Any:
        label, value = package
        if label == consts.LABEL_VALUE and type(value) is tuple:
            return _decode_plain(value)
        return super()._unbox(package)

    def _unbox_exc(self, raw: Any) -> BaseException | type[BaseException]:
        if raw == consts.EXC_STOP_ITERATION:
            return StopIteration
        try:
            (modname, clsname), args, attrs, tbtext = raw
            args = tuple(args)
            extra = dict(attrs)
        except (TypeError, ValueError):
            return RuntimeError("the other process sent an unreadable exception")
        mro = extra.pop("_lr_mro", ())
        cause = extra.pop("_lr_cause", None)
        cls = self.exception_class(str(modname), str(clsname), mro)
        try:
            exc = cls(*args)
        except Exception:  # noqa: BLE001 - a library class whose __init__ wants other args
            exc = cls.__new__(cls)
            exc.args = args
        for name, value in extra.items():
            if isinstance(name, str) and not name.startswith("_"):
                try:
                    setattr(exc, name, value)
                except (AttributeError, TypeError):
                    pass
        exc.remote_traceback = str(tbtext)  # type: ignore[attr-defined]
        if cause is not None:
            exc.__cause__ = self._unbox_exc(cause)  # type: ignore[assignment]
        return exc

    def exception_class(self, modname: str, clsname: str,
                        mro: Any = ()) -> type[BaseException]:
        """The local class for the other side's exception class ``modname.clsname``: the
        class itself when this side has it (a builtin, a loaded library's, one this side
        sent), else a class of that name made once, under its nearest known ancestor."""
        local = _existing_exception(modname, clsname, self.refused_modules)
        if local is not None:
            return local
        key = (modname, clsname)
        with self._exceptions_lock:
            if key not in self.stand_in_exceptions:
                ancestry = [(str(entry[0]), str(entry[1])) for entry in mro
                            if isinstance(entry, tuple) and len(entry) == 2]
                base: type[BaseException] = Exception
                for n, (mod, name) in enumerate(ancestry[1:], 1):
                    found = _existing_exception(mod, name, self.refused_modules)
                    if found is not None:
                        base = found
                        break
                    if mod != "builtins" and mod.split(".")[0] not in self.refused_modules:
                        # The learner's own base class: made first, with its own ancestry,
                        # so ``except module.Base`` catches the subclass too.
                        base = self.exception_class(mod, name, ancestry[n:])
                        break
                self.stand_in_exceptions[key] = type(clsname, (base,), {
                    "__module__": modname, "__qualname__": clsname})
            return self.stand_in_exceptions[key]


class _HostConnection(_PlainDataConnection):
    """The learner's side: it may be sent any exception class (it protects nothing)."""


class _VerifierConnection(_PlainDataConnection):
    """The verification's side: what the learner may reach of it, and what it may raise."""

    refused_modules = _REFUSED_EXCEPTION_MODULES

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
        return super()._check_attr(obj, name, perm)  # type: ignore[no-any-return]

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


def _existing_exception(modname: str, clsname: str,
                        refused: tuple[str, ...]) -> type[BaseException] | None:
    """A builtin exception, one this process sent, or one of a module it already imported
    (never imported on the other side's say-so, never one of ``refused``)."""
    sent = _SENT_EXCEPTIONS.get((modname, clsname))
    if sent is not None:
        return sent
    if modname == "builtins":
        found = None if clsname in _REFUSED_BUILTINS else getattr(builtins, clsname, None)
    elif modname.split(".")[0] in refused or modname not in sys.modules:
        return None
    else:
        found = getattr(sys.modules[modname], clsname, None)
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return None


# --------------------------------------------------------------------------------------
# The host (learner side)


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


_SENT_EXCEPTIONS: dict[tuple[str, str], type[BaseException]] = {}


def _dump_with_ancestry() -> None:
    """Each exception crosses with its class's ancestry, so the other side can give its
    stand-in the same builtin bases; and each side remembers the classes it sent, so an
    exception that goes over and comes back is its own class again."""
    from rpyc.core import vinegar

    if getattr(vinegar.dump, "labrunner", False):
        return
    dump = vinegar.dump

    def dump_with_mro(typ: Any, val: Any, tb: Any, *args: Any, depth: int = 0,
                      **kwargs: Any) -> Any:
        dumped = dump(typ, val, tb, *args, **kwargs)
        if isinstance(dumped, tuple) and len(dumped) == 4 and isinstance(typ, type):
            names, exc_args, attrs, tbtext = dumped
            _SENT_EXCEPTIONS.setdefault((typ.__module__, typ.__name__), typ)
            mro = tuple((c.__module__, c.__name__) for c in typ.__mro__)
            extra: tuple[tuple[str, Any], ...] = (("_lr_mro", mro),)
            cause = getattr(val, "__cause__", None)
            if isinstance(cause, BaseException) and depth < 4:
                # "raise X from exc": the cause crosses too (labs check it).
                extra += (("_lr_cause", dump_with_mro(type(cause), cause, None, *args,
                                                      depth=depth + 1, **kwargs)),)
            return names, exc_args, (*attrs, *extra), tbtext
        return dumped

    dump_with_mro.labrunner = True  # type: ignore[attr-defined]
    vinegar.dump = dump_with_mro


_dump_with_ancestry()


# Threads serving the verification's requests in a host: an idle one takes over reading while
# another runs a call, so up to this many calls (a test's concurrent requests, each perhaps
# blocked on a lock) run at once instead of one after another.
HOST_SERVING_THREADS = 16


def _serve_until_closed(conn: Connection) -> None:
    try:
        while not conn.closed:
            conn.serve(1)
    except (EOFError, OSError, ValueError, AttributeError):
        return   # the verification is gone (AttributeError: a connection torn down meanwhile)


def serve_host(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # learner code may wait for its children
    conn = connect_stream(SocketStream(sock), service=_HostService, config=_HOST_CONFIG)
    threading.stack_size(1 << 20)
    for _ in range(HOST_SERVING_THREADS - 1):
        threading.Thread(target=_serve_until_closed, args=(conn,), daemon=True).start()
    threading.stack_size(0)   # the learner's own threads get the default
    try:
        _serve_until_closed(conn)
    finally:
        try:
            atexit._run_exitfuncs()   # helpers' clean-ups (generated stubs' folders)
        finally:
            os._exit(0)   # learner threads still running must not keep the process alive


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve_factory(sock: socket.socket) -> None:
    """Fork one host per request; reply with its socket (SCM_RIGHTS) and its pid. Start
    the learner's programs the verification asks for (``learner_programs``)."""
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # hosts are reaped by the kernel
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
            from .learner_programs import start_program

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
                _die_with_parent()
                serve_host(mine)
            mine.close()
            hosts.add(pid)
            socket.send_fds(sock, [str(pid).encode()], [theirs.fileno()])
            theirs.close()
        elif command == "kill" and arg.isdigit() and int(arg) in hosts:
            hosts.discard(int(arg))
            try:
                os.kill(int(arg), signal.SIGKILL)
            except OSError:
                pass


# --------------------------------------------------------------------------------------
# The verification's side


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
        os.execve(sys.executable, [sys.executable, "-I", "-m", __name__, "factory",
                                   str(sock_fd)], env)
    finally:
        os._exit(127)


_FACTORY_LOCK = threading.Lock()


class _VerifierService(rpyc.VoidService):  # type: ignore[misc]
    _protocol = _VerifierConnection


class LearnerHost:
    """One learner host process and the RPC connection to it."""

    def __init__(self, conn: _VerifierConnection, kill: Any) -> None:
        self.conn = conn
        self._kill = kill
        self._serving = rpyc.BgServingThread(conn)

    @classmethod
    def start(cls, how: str) -> LearnerHost:
        if how.startswith(FACTORY_PREFIX):
            factory = socket.socket(fileno=os.dup(int(how[len(FACTORY_PREFIX):])))
            with _FACTORY_LOCK:   # one request and its reply at a time
                factory.sendall(b"spawn")
                data, fds, _flags, _addr = socket.recv_fds(factory, 32, 1)
            if not fds or not data.isdigit():
                factory.close()
                raise LearnerCodeError("the learner's process could not be started")
            pid = int(data)
            sock = socket.socket(fileno=fds[0])

            def kill() -> None:
                try:
                    with _FACTORY_LOCK:
                        factory.sendall(f"kill {pid}".encode())
                except OSError:
                    pass
                factory.close()
        else:
            mine, theirs = socket.socketpair()
            # The host is killed, never asked to exit: what it leaves in its temp folder
            # (generated stubs, the learner's own files) goes with this folder.
            scratch = tempfile.mkdtemp(prefix="lr-learner-")
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", __name__, "host", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                env={**os.environ, "TMPDIR": scratch})
            theirs.close()
            sock = mine

            def kill() -> None:
                proc.kill()
                proc.wait()
                shutil.rmtree(scratch, ignore_errors=True)
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
        (its code may be stuck in a loop)."""
        self._kill()
        self._serving._active = False   # its loop ends at the next turn; no join
        try:
            self.conn._closed = True
            self.conn._channel.close()
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


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("host", "factory") or not argv[1].isdigit():
        print("usage: python -m labrunner.learner_process host|factory FD", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    if argv[0] == "factory":
        serve_factory(sock)
    else:
        _die_with_parent()
        serve_host(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
