"""The connection both sides use: plain data copied (see codec), containers read as
attributes shared, exceptions mapped to local classes (with their ancestry)."""

from __future__ import annotations

import builtins
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from rpyc.core import brine, consts, netref
from rpyc.core.protocol import Connection
from rpyc.lib import get_methods

from .codec import _MAX_PLAIN_ITEMS, _PLAIN_SCALARS, _decode_plain, _encode_plain
from .modes import OWN_THREAD_PREFIX

_REFUSED_BUILTINS = {"KeyboardInterrupt", "SystemExit", "GeneratorExit"}
# Calls from threads the other side made, served at once, each on a thread of its own.
CALLS_SERVED_AT_ONCE = 64


def _dump_str(obj: str, stream: Any) -> None:
    stream.append(brine.TAG_UNICODE)
    brine._dump_bytes(obj.encode("utf-8", "surrogatepass"), stream)


def _load_str(stream: Any) -> str:
    return bytes(brine._load(stream)).decode("utf-8", "surrogatepass")


# RPyC's brine carries a str as UTF-8, which refuses a lone surrogate ("\ud800": Python
# allows it, json.loads('"\\ud800"') makes one, so any client can send it). Refused, the
# message was never sent: a learner's function returning one, or raising an error that
# quotes one (UnicodeEncodeError does), left the test waiting for a reply for ever. Both
# sides import this module, so both carry such a string as it is.
brine._dump_registry[str] = _dump_str
brine._load_registry[brine.TAG_UNICODE] = _load_str


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
        pool = self.__dict__.get("_thread_pool_executor")   # RPyC's, with bind_threads
        if pool is not None:
            # RPyC serves a call from a thread this side does not know (one the learner's
            # code started; a test's own client threads) on a pool sized for the CPUs: 6 on
            # a 2-core machine. A test that holds 8 of the learner's threads in a callback
            # until all 8 are in, or fires 10 calls at once at a limiter, would see at most
            # 6 served: a deadlock, or a race that never runs. Idle, the pool costs nothing
            # (its threads start on demand).
            pool.shutdown(wait=False)
            self.__dict__["_thread_pool_executor"] = ThreadPoolExecutor(
                max_workers=CALLS_SERVED_AT_ONCE,
                thread_name_prefix=f"{OWN_THREAD_PREFIX}rpc-calls")
        self.stand_in_exceptions: dict[tuple[str, str], type[BaseException]] = {}
        self._exceptions_lock = threading.RLock()

    def _handle_getattr(self, obj: Any, name: Any) -> Any:
        value = super()._handle_getattr(obj, name)
        if type(value) in (list, dict, set) and not isinstance(obj, ModuleType):
            return _Shared(value)
        return value

    def _check_attr(self, obj: Any, name: str, perm: str) -> str:
        try:
            return str(super()._check_attr(obj, name, perm))
        except AttributeError:
            raise
        except Exception:
            if not self._config["allow_all_attrs"]:
                raise
            # RPyC asks hasattr(obj, "exposed_" + name) before every attribute: an object
            # whose __getattr__ raises for a name it lacks (see _box) answered that probe,
            # not the name asked for, which in one process it has. Asked for the name itself.
            return name

    def _handle_inspect(self, id_pack: Any) -> Any:
        obj = self._local_objects[id_pack]
        if isinstance(obj, netref.BaseNetref):
            return super()._handle_inspect(id_pack)
        # RPyC asks hasattr(obj, "____conn__") first, for RPyC over RPyC, which only a
        # proxy has (above); an object whose __getattr__ raises for it (see _box) is asked
        # nothing: its methods are read from its type, as RPyC does for every other.
        return tuple(get_methods(netref.LOCAL_ATTRS, obj))

    def _box(self, obj: Any) -> Any:
        if type(obj) is _Shared:
            return super()._box(obj.value)
        if type(obj) not in _PLAIN_SCALARS and not issubclass(type(obj), netref.BaseNetref) and (
                type(obj) is not tuple or not brine.dumpable(obj)):
            try:
                return consts.LABEL_VALUE, _encode_plain(obj, [_MAX_PLAIN_ITEMS])
            except Exception:  # noqa: BLE001 - not plain data, whatever it raised: by reference
                pass
        try:
            return super()._box(obj)
        except Exception:
            if type(obj) is tuple or isinstance(obj, (type, ModuleType, netref.BaseNetref)):
                raise
            # RPyC names an object by asking it: getattr(obj, "____id_pack__", default) and
            # obj.__class__, which reach a class's own __getattr__ and catch AttributeError
            # only. A learner's object that raises anything else for a name it lacks (a
            # pool's lease once given back) stopped the reply: the test waited for ever.
            # In one process nothing asks it that, so here it is named by its type alone,
            # as RPyC names any plain instance.
            id_pack = _id_pack_by_type(obj)
            self._local_objects.add(id_pack, obj)
            return consts.LABEL_REMOTE_REF, id_pack

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



def _id_pack_by_type(obj: Any) -> tuple[str, int, int]:
    """RPyC's name for a plain instance (rpyc.lib.get_id_pack), read from its type only."""
    kind = type(obj)
    return f"{kind.__module__}.{kind.__name__}", id(kind), id(obj)


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
