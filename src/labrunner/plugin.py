"""The pytest plugin every lab's verification runs under (registered as ``labrunner``).

It gives a verification two things:

* ``learner``: the learner's code for this lab (a workspace copy, the starter or the reference
  solution), loaded so that a syntax error, an import error or a missing function fails the
  test with the file, the line and what to do, never with a traceback into labrunner;
* service fixtures, each an isolated namespace on a real service: ``postgres`` (a fresh
  database), ``redis_db`` (a logical database of its own), ``kafka`` (a topic and group
  prefix), ``rabbitmq`` (a vhost), ``prometheus`` (scrape targets and jobs of the test's own),
  one per service kind (see :mod:`labrunner.service_fixtures`).

Services come from the runner's state file (``$LABRUNNER_SERVICES``) or, when pytest is run
directly (``pytest labs/ph2``), are started here for the session and stopped at its end.

Outcomes are reported to the runner through a pipe it opened (``$LABRUNNER_REPORT_FD``), each
line signed with a key the runner sent down another pipe and that the learner's code never
sees in its environment; the runner scores only what arrives signed.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from . import failures
from .catalog import CatalogError, Lab, find_project_root, load_lab
from .channel import (
    COLLECTED,
    ENV_LEARNER_HOME,
    ENV_REPORT_FD,
    ENV_RUN_ID,
    ENV_SERVICES,
    FINISHED,
    Reporter,
)
from .learner import (
    ENV_LEARNER_HOST,
    ENV_SHARED_DIR,
    FACTORY_PREFIX,
    LearnerCodeError,
    LearnerHost,
    RemoteModule,
    import_learner_module,
    load_harness_module,
    needs_a_host,
    wait_for_factory,
)
from .parent_death import killed_with_this_thread
from .service_fixtures import SessionServices, service_fixtures
from .services.local.process import undumpable

# learner.python(..., gc=False or prelude=...): runs the script as __main__ after those.
RUN_LAUNCHER = ("import runpy, sys; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
pytest_plugins = ["labrunner.load_aware_timeouts"]   # timeouts that count time given the run

# --------------------------------------------------------------------------------------
# Options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("labrunner")
    group.addoption(
        "--lab-target", default=None,
        help="whose code to verify: 'solution' (default), 'starter', or a workspace folder",
    )
    group.addoption(
        "--lab-src", default=None,
        help="exact folder holding the learner's files for the (single) lab being run",
    )
    group.addoption(
        "--lab-backend", default=None,
        help="services backend when pytest starts them itself: auto, local, docker, external",
    )


# --------------------------------------------------------------------------------------
# Signed outcome channel to the runner

_reporter: Reporter | None = None
# The process's stderr before pytest captures it (plugins named with -p load first).
try:
    _STDERR: Any = os.fdopen(os.dup(2), "w", closefd=True)
except OSError:
    _STDERR = None
_phase_outcomes: dict[str, dict[str, Any]] = {}


if os.environ.get(ENV_REPORT_FD):
    undumpable()   # as this module is imported (-p loads it first), every lab, C or Python


def pytest_configure(config: pytest.Config) -> None:
    global _reporter
    if os.environ.get(ENV_REPORT_FD):
        undumpable()
    _reporter = Reporter()   # takes its descriptors out of the environment
    if _reporter.stream is not None and _STDERR is not None:
        # Should it hang past its budget, or linger once finished, the runner asks for every
        # thread's stack (SIGUSR1) before it kills it: they go to the real stderr, which
        # pytest's capture replaces.
        faulthandler.register(signal.SIGUSR1, file=_STDERR, all_threads=True)
    if os.environ.get(ENV_LEARNER_HOST):
        _guard_the_verification()
    config.addinivalue_line("markers", "services(*names): services a test needs")


def _guard_the_verification() -> None:
    """The learner's code runs in other processes: make sure none of them can attach to
    this one, read its memory or open its descriptors through /proc."""
    how = os.environ.get(ENV_LEARNER_HOST, "")
    fd = how.removeprefix(FACTORY_PREFIX)
    if how.startswith(FACTORY_PREFIX) and fd.isdigit():
        os.set_inheritable(int(fd), False)
    undumpable()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Sent before any learner code is imported (that happens inside the tests): the runner
    # scores every one of these ids, and one that never reports counts as failed.
    if _reporter is not None:
        _reporter.send({"kind": COLLECTED, "nodeids": [i.nodeid for i in session.items]})
    _ready_the_learner_factory(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Every test has reported and every fixture is torn down: the runner waits only a short
    # grace for this process to exit after this (a thread left running cannot hold it).
    if _reporter is None or _reporter.stream is None:
        return
    _reporter.send({"kind": FINISHED})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    state = _phase_outcomes.setdefault(item.nodeid, {"outcome": "passed", "message": "",
                                                      "duration": 0.0})
    state["duration"] += report.duration
    if report.failed and state["outcome"] != "failed":
        # A deliberate pytest.fail in a fixture (the learner's script did not apply, a
        # function is missing) is the learner's failure; any other setup crash means the
        # verification could not run.
        failed_on_purpose = call.excinfo is not None and call.excinfo.errisinstance(
            pytest.fail.Exception)
        state["outcome"] = "failed" if report.when == "call" or failed_on_purpose else "error"
        state["message"] = failures.failure_message(report)
        timed_out = state["message"].startswith("Timeout (>")
        if timed_out:
            # One stuck call would stall every later test for its whole budget too: stop
            # here, and say where the learner's code was when the time ran out.
            item.session.shouldstop = "a test timed out"
        if call.excinfo is not None and (timed_out or not call.excinfo.errisinstance(
                (AssertionError, pytest.fail.Exception))):
            frames = failures.learner_frames(item, call.excinfo)
            if frames:
                # An exception the learner's code raised: say where, on the first line too.
                first, _, rest = state["message"].partition("\n")
                innermost = frames[-1].split("\n")[0]
                state["message"] = (f"{first} (at {innermost})\n{rest}".rstrip("\n")
                                    + "\nin your code, outermost first:\n  "
                                    + "\n  ".join(frames))
        output = failures.captured_output(report)
        if output:
            state["output"] = output
        state["authored"] = failures.authored_message(item, call) if report.when == "call" else ""
    elif report.skipped and state["outcome"] == "passed":
        state["outcome"] = "skipped"
        state["message"] = failures.failure_message(report)
    if report.when == "teardown" and _reporter is not None:
        _reporter.send({"nodeid": item.nodeid, **state})


# --------------------------------------------------------------------------------------
# The learner's code


@functools.cache   # a lab's tests, its fixture and the collection hooks all ask for it
def _lab_for(path: Path) -> Lab:
    for folder in (path, *path.parents):
        if (folder / "lab.toml").is_file():
            try:
                return load_lab(folder)
            except CatalogError as exc:
                raise pytest.UsageError(str(exc)) from exc
    raise pytest.UsageError(f"{path}: not inside a lab folder (no lab.toml above it)")


def _src_dir(config: pytest.Config, lab: Lab) -> Path:
    exact = config.getoption("--lab-src")
    if exact:
        return Path(exact).resolve()
    target = config.getoption("--lab-target") or "solution"
    if target == "solution":
        return lab.solution_dir
    if target == "starter":
        return lab.starter_dir
    return (Path(target) / lab.workspace_dir).resolve()


@dataclass
class Learner:
    """The learner's files for one lab, and ways to load, run and build them."""

    lab: Lab
    dir: Path
    _loaded: list[str] = field(default_factory=list)
    _modules: dict[str, ModuleType] = field(default_factory=dict)
    _build_dir: Path | None = None
    _host: LearnerHost | None = None
    _tmp_folders: list[Path] = field(default_factory=list)
    _harness: ModuleType | None = None

    def path(self, name: str) -> Path:
        file = self.dir / name
        if not file.exists():
            raise LearnerCodeError(
                f"{file} does not exist: the lab expects the file {name!r} "
                f"(copy it from the starter: labrunner init)")
        return file

    def load(self, module: str, *, fresh: bool = False) -> ModuleType:
        """Import ``<module>.py`` from the learner's folder, fresh for this test and once
        per test (so an exception class from one call is the class the next one raises);
        ``fresh=True`` imports one more copy, sharing no module state with the others (two
        app instances: a lock or a dict of each its own). When grading, the module lives in
        a process of its own and this returns a proxy to it: see :mod:`labrunner.learner`."""
        if module in self._modules and not fresh:
            return self._modules[module]
        self.path(f"{module}.py")
        name = f"learner_{self.lab.id.replace('.', '_')}_{module}_{len(self._loaded)}"
        host = self._learner_host()
        mod: ModuleType | RemoteModule
        if host is not None:
            mod = host.load(self.dir, module, name)
        else:
            mod = import_learner_module(self.dir, module, name)
        self._loaded.append(name)
        self._modules.setdefault(module, mod)  # type: ignore[arg-type]
        return mod  # type: ignore[return-value]

    def tmp_folder(self, *, learner_writes: bool = False) -> Path:
        """A fresh folder for files the test writes and the learner's code reads: readable
        by the learner's process, which runs as another uid when grading. With
        ``learner_writes``, the learner's code may write there too (files it makes private,
        such as a key of mode 0600, the test then reads with ``run_helper(file_bytes, f)``).
        Removed after the test."""
        folder = Path(tempfile.mkdtemp(prefix="lr-shared-",
                                       dir=os.environ.get(ENV_SHARED_DIR) or None))
        os.chmod(folder, 0o777 if learner_writes else 0o755)
        self._tmp_folders.append(folder)
        return folder

    def run_helper(self, helper: Callable[..., Any], *args: Any) -> Any:
        """Run ``helper(*args)`` where the learner's code runs and return its result: one
        of labrunner's own functions, such as ``labrunner.testing.generate_stubs`` (the gRPC
        stubs the learner's module imports) or ``threads_waiting_in`` (what the learner's
        threads are doing). Plain data comes back as a copy, anything else as a proxy.
        For a C lab when grading, that is a process of the learner's uid beside its programs
        (``popen``): what they do is in a /proc the verification's uid cannot read."""
        host = self._learner_host(beside_programs=True)
        if host is not None:
            return host.run_helper(helper, args)
        return helper(*args)

    def harness(self) -> ModuleType:
        """The lab's ``harness.py``, loaded where the learner's code runs (fresh for this
        test): code of the lab's that must sit beside the learner's, such as an asyncio
        server on whose loop the learner's coroutines run. Pass it the modules ``load()``
        returned. Whatever runs there, the learner's code could tamper with: make the
        deciding observations from the test's side (the wire, the server, the client)."""
        if self._harness is not None:
            return self._harness
        file = self.lab.path / "harness.py"
        if not file.is_file():
            raise pytest.UsageError(f"{file}: the lab's tests ask for a harness, and there is "
                                    "none: write harness.py beside the tests")
        name = f"lab_harness_{self.lab.id.replace('.', '_')}_{len(self._loaded)}"
        host = self._learner_host()
        mod: Any
        if host is not None:
            mod = host.load_harness(file, name)
        else:
            mod = load_harness_module(file.read_text(), str(file), name)
        self._loaded.append(name)
        self._harness = mod
        return mod  # type: ignore[no-any-return]

    def _learner_host(self, beside_programs: bool = False) -> LearnerHost | None:
        """The process the learner's code runs in, when it is not this one; with
        ``beside_programs``, for a C lab under grading too: a host of the learner's uid, the
        uid its programs run as."""
        how = os.environ.get(ENV_LEARNER_HOST, "")
        if not needs_a_host(self.lab, how, beside_programs):
            return None
        if self._host is None:
            self._host = LearnerHost.start(how)
        return self._host

    def function(self, module: str, name: str) -> Callable[..., Any]:
        """A function the lab asks for, with a clear failure when it is missing."""
        mod = self.load(module)
        fn = getattr(mod, name, None)
        if not callable(fn):
            raise LearnerCodeError(f"{self.dir / (module + '.py')}: define a function {name}()")
        return fn  # type: ignore[no-any-return]

    def popen(self, args: Any, **popen: Any) -> subprocess.Popen[bytes]:
        """Start one of the learner's programs (a binary ``build()`` made, a script):
        ``subprocess.Popen(args, **popen)``, except that when grading it runs as the
        learner's uid, never as the verification's, so it can neither signal nor inspect
        the tests. ``wait``, ``poll``, ``kill``, ``communicate`` and pipes work as usual;
        ``shell``, ``preexec_fn``, ``pass_fds`` and ``user`` are not available.
        Started from the main thread, the program dies with the verification, even a
        SIGKILLed one (grading's sweep of the learner's uid does that when grading)."""
        how = os.environ.get(ENV_LEARNER_HOST, "")
        if how.startswith(FACTORY_PREFIX):
            from .learner import LearnerProgram

            return LearnerProgram(how, args, **popen)
        popen.setdefault("preexec_fn", killed_with_this_thread())
        return subprocess.Popen(args, **popen)

    def run(self, args: Any, *, input: Any = None, timeout: float | None = None,
            capture_output: bool = False, **popen: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` for one of the learner's programs, through ``popen`` (as the
        learner's uid when grading): on timeout it is killed and TimeoutExpired raised."""
        if capture_output:
            popen["stdout"] = popen["stderr"] = subprocess.PIPE
        if input is not None:
            popen["stdin"] = subprocess.PIPE
        with self.popen(args, **popen) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def python(self, module: str, *args: str, env: dict[str, str] | None = None,
               gc: bool = True, prelude: str = "", **popen: Any) -> subprocess.Popen[bytes]:
        """Run ``<module>.py`` as its own process (for labs that kill and restart it), as
        the learner's uid when grading (see ``popen``). With ``gc=False`` the cyclic
        garbage collector is off from the start: what the learner's code leaves in a
        reference cycle unclosed (an asyncio transport never closed) stays open, rather
        than being closed whenever the collector happens to run. ``prelude``: the test's
        Python code run first in that process (ph4.1: new threads made slow to start)."""
        file = self.path(f"{module}.py")
        home = os.environ.get(ENV_LEARNER_HOME)
        full_env = {**os.environ, "PYTHONPATH": str(self.dir),
                    **({"HOME": home, "TMPDIR": home} if home else {}), **(env or {})}
        first = [prelude] * bool(prelude) + ["import gc; gc.disable()"] * (not gc)
        launcher = ["-c", "\n".join([*first, RUN_LAUNCHER])] if first else []
        return self.popen([sys.executable, *launcher, str(file), *args], env=full_env,
                          cwd=self.dir, **popen)

    def build(self) -> Path:
        """Build the lab's C code with the c_examples Makefile (warnings are errors) into a
        folder the learner's programs can read; return that folder, which holds the
        binaries. Built once per session; run them with ``learner.popen``."""
        if self._build_dir is not None:
            return self._build_dir
        if not self.lab.build:
            raise pytest.UsageError(f"{self.lab.path / 'lab.toml'}: no 'build' target")
        cached = _BUILDS.get((self.dir, self.lab.build))
        if cached is not None and cached.is_dir():
            self._build_dir = cached
            return cached
        root = find_project_root(self.lab.path)
        makefile_dir = (root / "c_examples") if root else self.lab.path.parents[1] / "c_examples"
        out = Path(tempfile.mkdtemp(prefix=f"lrbuild-{self.lab.slug}-",
                                    dir=os.environ.get(ENV_SHARED_DIR) or None))
        os.chmod(out, 0o755)   # the learner's uid runs what is built here
        done = subprocess.run(
            ["make", "--no-print-directory", "-C", str(makefile_dir), self.lab.build,
             f"SRC={self.dir}", f"OUT={out}"],
            capture_output=True, text=True, timeout=180,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise LearnerCodeError(
                f"building {self.lab.build} from {self.dir} failed "
                f"(-Wall -Wextra -Werror):\n{output[-3000:]}")
        self._build_dir = out
        _BUILDS[(self.dir, self.lab.build)] = out
        return out

    def cleanup(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        for name in self._loaded:
            sys.modules.pop(name, None)
        if str(self.dir) in sys.path:
            sys.path.remove(str(self.dir))
        for folder in self._tmp_folders:
            shutil.rmtree(folder, ignore_errors=True)


# Builds of the learner's C code, once per session: (learner folder, target) -> folder.
_BUILDS: dict[tuple[Path, str], Path] = {}


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _BUILDS.values():
        shutil.rmtree(folder, ignore_errors=True)
    _BUILDS.clear()


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Lab:
    return _lab_for(Path(str(request.node.fspath)).parent)


@pytest.fixture
def learner(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Learner]:
    src = _src_dir(request.config, lab)
    if not src.is_dir():
        pytest.fail(f"{src}: the lab folder is missing; run 'labrunner init' to create it",
                    pytrace=False)
    who = Learner(lab, src)
    yield who
    who.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is not None and isinstance(excinfo[1], LearnerCodeError):
        outcome.force_exception(pytest.fail.Exception(str(excinfo[1]), pytrace=False))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, None]:
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is not None and isinstance(excinfo[1], LearnerCodeError):
        outcome.force_exception(pytest.fail.Exception(str(excinfo[1]), pytrace=False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each lab's ``timeout`` becomes the per-test timeout, so an infinite loop in the
    learner's code fails that test with 'timed out' instead of hanging the run."""
    cache: dict[Path, float] = {}
    for item in items:
        folder = Path(str(item.fspath)).parent
        if folder not in cache:
            try:
                cache[folder] = _lab_for(folder).timeout
            except pytest.UsageError:
                cache[folder] = 0
        if cache[folder] and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(cache[folder]))


def _ready_the_learner_factory(session: pytest.Session) -> None:
    """Where the learner's code runs in a process of its own, its factory is made ready now,
    before the first test's timer starts: a test's timeout is the learner's code's budget,
    and on a loaded machine the factory's start (its preloaded libraries) takes seconds."""
    how = os.environ.get(ENV_LEARNER_HOST, "")
    folders = {Path(str(item.fspath)).parent for item in session.items} if how else set()
    hosted = [lab for lab in (_lab_for(folder) for folder in sorted(folders)
                              if (folder / "lab.toml").is_file()) if needs_a_host(lab, how)]
    if hosted:
        wait_for_factory(how, sorted({name for lab in hosted for name in lab.learner_preload}))


# --------------------------------------------------------------------------------------
# Services


@pytest.fixture(scope="session")
def lab_services(request: pytest.FixtureRequest) -> Iterator[SessionServices]:
    services = SessionServices(request.config.getoption("--lab-backend"),
                               os.environ.get(ENV_SERVICES), os.environ.get(ENV_RUN_ID))
    yield services
    services.close()


# One fixture per service kind (postgres, redis_db, kafka, rabbitmq, prometheus), found by
# pytest among this module's names.
globals().update(service_fixtures())
