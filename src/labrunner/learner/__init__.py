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
uid (see :func:`factory.start_factory`); the factory runs as the learner uid, re-executes a clean
interpreter, and forks one fresh host per ``learner`` fixture, passing its socket back over
a SOCK_SEQPACKET pair (one request per message). Outside grading (``spawn``), the
verification starts hosts itself.

Modules: ``modes`` (the environment, the factory lock), ``loading`` (a learner module or a
harness imported), ``codec`` (plain data by value), ``wire`` (the connection both sides use),
``host`` (the learner's side), ``factory`` (hosts and programs forked as the learner's uid),
``programs`` (a learner's program run by the factory), ``proxy`` (the verification's side).
Only this package touches RPyC's internals.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .modes import ENV_LEARNER_HOST, ENV_SHARED_DIR, FACTORY_PREFIX, SPAWN, needs_a_host

if TYPE_CHECKING:
    from .factory import start_factory
    from .loading import (
        LearnerCodeError,
        import_learner_module,
        learner_frame,
        load_harness_module,
    )
    from .programs import LearnerProgram
    from .proxy import (
        LearnerHost,
        LearnerProcessEnded,
        RemoteModule,
        remote_connection,
        wait_for_factory,
    )

# Imported when first used (PEP 562): every labrunner command imports the runner, and
# RPyC, which only a graded or ``spawn`` run needs, costs a noticeable part of start-up.
_LAZY = {
    "start_factory": "factory",
    "LearnerCodeError": "loading", "import_learner_module": "loading",
    "learner_frame": "loading", "load_harness_module": "loading",
    "LearnerProgram": "programs",
    "LearnerHost": "proxy", "LearnerProcessEnded": "proxy", "RemoteModule": "proxy",
    "remote_connection": "proxy", "wait_for_factory": "proxy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "ENV_LEARNER_HOST",
    "ENV_SHARED_DIR",
    "FACTORY_PREFIX",
    "SPAWN",
    "LearnerCodeError",
    "LearnerHost",
    "LearnerProcessEnded",
    "LearnerProgram",
    "RemoteModule",
    "import_learner_module",
    "learner_frame",
    "load_harness_module",
    "needs_a_host",
    "remote_connection",
    "start_factory",
    "wait_for_factory",
]
