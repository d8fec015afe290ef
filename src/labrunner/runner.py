"""Running verifications: one pytest process per lab, outcomes read from a signed channel.

Each lab runs in its own pytest process, so a learner's infinite loop, ``sys.exit`` or crash
costs that lab alone. The process reports each test's outcome through a pipe, every line
signed with a key sent down a second pipe; before any learner code runs it reports the test
ids it collected. A collected test with no signed outcome scored as failed: a process that
exits early, is killed or prints a fake summary gains nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import zygote
from .catalog import Lab
from .channel import (
    ENV_KEY_FD,
    ENV_REPORT_FD,
    ENV_RUN_ID,
    ENV_SERVICES,
    read_signed,
)
from .cpu_wait import CpuWait
from .lab_exit import TestsProcess, kill_group, wait_for_exit
from .learner import ENV_LEARNER_HOST, FACTORY_PREFIX, SPAWN
from .parent_death import die_with_parent
from .scoring import Ended, LabResult, TestResult, clean_text, score
from .services.local.process import become

__all__ = ["LabResult", "RunPlan", "Sandbox", "TestResult", "clean_text", "run_all", "run_lab"]

THREAD_STACK_BYTES = 2 * 1024 * 1024


@dataclass
class Sandbox:
    """How to confine a lab's process (grading uses all of it; learners none)."""

    user: str | None = None            # run as this user (when we are root)
    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    max_output: int = 1_000_000        # bytes of output kept; the rest is dropped
    max_processes: int | None = None
    file_size_bytes: int | None = None   # RLIMIT_FSIZE: the largest file it may write
    # Where the run's pytest folder is made: the run's own folder under the runtime dir,
    # which ``services down`` sweeps when a killed run could not (default: the temp dir).
    workdir_root: Path | None = None
    extra_test_paths: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Grading: a numeric uid/gid to switch to (no passwd entry needed), after ``prepare``
    # ran as root in the child (e.g. a private mount namespace); the pytest options below.
    uid: int | None = None
    gid: int | None = None
    prepare: Callable[[], None] | None = None
    minimal_env: bool = False          # start from an empty environment, not the runner's
    # Grading: the learner's Python code runs in processes of its own (see learner_process),
    # as ``learner_uid`` with ``learner_home`` when we are root, else as this user.
    learner_process: bool = False
    learner_uid: int | None = None
    learner_home: str | None = None
    tb: str = "short"
    pytest_args: tuple[str, ...] = ()
    # Fork the tests process from the pre-imported pytest (see zygote): dev check's checks.
    forked: bool = False


def _limits(sandbox: Sandbox, factory_fd: int | None = None) -> Callable[[], None]:
    # Imported here, before the fork (an import in the forked child could wait forever on a
    # lock another thread held), and only for a graded run: it loads RPyC.
    if factory_fd is not None and sandbox.learner_uid is not None:
        from .learner import start_factory

    def apply() -> None:
        import resource

        die_with_parent()
        if sandbox.prepare is not None:
            sandbox.prepare()
        if sandbox.memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (sandbox.memory_bytes, sandbox.memory_bytes))
            # Under an address-space limit every thread's stack reservation counts (8 MB by
            # default): a test with a hundred workers would not start. 2 MB is plenty.
            resource.setrlimit(resource.RLIMIT_STACK, (THREAD_STACK_BYTES, THREAD_STACK_BYTES))
        if sandbox.cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU, (sandbox.cpu_seconds, sandbox.cpu_seconds + 5))
        if sandbox.max_processes:
            resource.setrlimit(resource.RLIMIT_NPROC,
                               (sandbox.max_processes, sandbox.max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sandbox.file_size_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE,
                               (sandbox.file_size_bytes, sandbox.file_size_bytes))
        if factory_fd is not None and sandbox.learner_uid is not None:
            # Forked here: confined like the verification (namespaces, limits, cgroup) but
            # as another uid, and in its process group (a timeout kills it with the rest).
            start_factory(factory_fd, sandbox.learner_uid, sandbox.learner_uid,
                          sandbox.learner_home or "/")
        if sandbox.uid is not None:
            gid = sandbox.gid if sandbox.gid is not None else sandbox.uid
            become(sandbox.uid, gid, tied_to_parent=True)

    return apply


def _unconfined(sandbox: Sandbox) -> bool:
    """Nothing for the tests process but its own session: it may be forked by the zygote."""
    return (sandbox.user is None and sandbox.uid is None and sandbox.prepare is None
            and not sandbox.minimal_env and not sandbox.memory_bytes
            and not sandbox.cpu_seconds and not sandbox.max_processes
            and not sandbox.file_size_bytes and sandbox.learner_uid is None)


def _read_capped(stream: Any, cap: int, sink: list[bytes]) -> None:
    kept = 0
    for chunk in iter(lambda: stream.read(65536), b""):
        if kept < cap:
            sink.append(chunk[: cap - kept])
            kept += len(chunk)


def pytest_command(lab: Lab, src: Path, sandbox: Sandbox, ini: Path) -> list[str]:
    tests = [str(p) for p in lab.test_files]
    for extra in sandbox.extra_test_paths:
        tests += [str(p) for p in sorted(extra.glob("test_*.py"))]
    return [
        sys.executable, "-m", "labrunner.tests_main", *tests,   # pytest, ended without
        # tearing the interpreter down (see tests_main)
        "-c", str(ini),             # our config only: no pytest.ini/pyproject from elsewhere
        "--rootdir", str(lab.path),
        "-p", "labrunner.plugin",
        "-p", "pytest_timeout",
        "-p", "no:cacheprovider",
        "--import-mode=importlib",
        "-q", "--no-header", "-rN", f"--tb={sandbox.tb}",
        *sandbox.pytest_args,
        "--lab-src", str(src),
    ]


class _SharedOrAlone:
    """Labs run side by side (shared) unless one restarts a service every other lab uses:
    that one waits for the others to finish and runs alone (writers first, so it is not
    starved by a stream of ordinary labs)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        with self._cond:
            if alone:
                self._waiting_alone += 1
                self._cond.wait_for(lambda: self._running == 0 and not self._alone)
                self._waiting_alone -= 1
                self._alone = True
            else:
                self._cond.wait_for(lambda: not self._alone and not self._waiting_alone)
                self._running += 1
        try:
            yield
        finally:
            with self._cond:
                if alone:
                    self._alone = False
                else:
                    self._running -= 1
                self._cond.notify_all()


_gate = _SharedOrAlone()


def run_lab(
    lab: Lab,
    src: Path,
    state_file: Path | None,
    run_id: str,
    sandbox: Sandbox | None = None,
    timeout: float | None = None,
    on_process: Callable[[TestsProcess | None], None] | None = None,
) -> LabResult:
    """Verify ``src`` (the learner's folder for ``lab``) and return what happened. A lab
    marked ``exclusive`` (it restarts a shared service) never runs beside another."""
    with _gate.hold(lab.exclusive):
        return _run_lab(lab, src, state_file, run_id, sandbox, timeout, on_process)


def _read_both(proc: TestsProcess, report_r: int, key: bytes, cap: int
               ) -> tuple[list[dict[str, Any]], list[bytes], list[threading.Thread]]:
    """Threads reading the signed records and the process's output (capped) as they come."""
    records: list[dict[str, Any]] = []
    output: list[bytes] = []
    assert proc.stdout is not None
    readers = [threading.Thread(target=read_signed, args=(report_r, key, records), daemon=True),
               threading.Thread(target=_read_capped, args=(proc.stdout, cap, output),
                                daemon=True)]
    for reader in readers:
        reader.start()
    return records, output, readers


def _channel_pipes(key: bytes) -> tuple[int, int, int]:
    """The records' pipe (both ends) and the key's read end, the key already in it."""
    report_r, report_w = os.pipe()
    key_r, key_w = os.pipe()
    os.write(key_w, key)
    os.close(key_w)
    return report_r, report_w, key_r


def _workdir(lab: Lab, sandbox: Sandbox) -> tuple[Path, Path]:
    """The tests process's working folder and its empty pytest.ini (no rootdir config of
    anyone else's applies). It also holds the process's temp folder (``tmp``, see
    :func:`_environment`): what the verification or the learner's code leaves there goes
    with it, even when the run is killed before it can clean up."""
    workdir = Path(tempfile.mkdtemp(prefix=f"lr-{lab.slug}-", dir=sandbox.workdir_root))
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n", encoding="utf-8")
    (workdir / "tmp").mkdir()
    if sandbox.uid is not None:  # the unprivileged process reads its config from here
        os.chmod(workdir, 0o755)
        os.chmod(ini, 0o644)
        os.chown(workdir / "tmp", sandbox.uid, sandbox.gid if sandbox.gid is not None
                 else sandbox.uid)
    return workdir, ini


def _environment(sandbox: Sandbox, workdir: Path, state_file: Path | None, run_id: str,
                 report_w: int, key_r: int) -> dict[str, str]:
    """The tests process's environment: the channel's ends (see channel), the services'
    state file, a temp folder of its own, and nothing that would load a plugin we did not
    name."""
    if sandbox.minimal_env:
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")}
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({
        ENV_REPORT_FD: str(report_w),
        ENV_KEY_FD: str(key_r),
        ENV_RUN_ID: run_id,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        # Build folders, pytest's tmp_path, the learner's own temp files: in the working
        # folder (grading names the learner's home instead, in ``sandbox.env``).
        "TMPDIR": str(workdir / "tmp"),
        # Only the plugins we name: nothing installed or planted auto-loads into the run.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        # glibc reserves up to 64 MB of address space per malloc arena, one per thread by
        # default: under a memory limit a handful of threads would use it all up.
        **({"MALLOC_ARENA_MAX": "2"} if sandbox.memory_bytes else {}),
        **sandbox.env,
    })
    if state_file is not None:
        env[ENV_SERVICES] = str(state_file)
    if sandbox.forked and sandbox.workdir_root is not None:
        # dev check's tests processes (CI's thousands of checks) share one bytecode cache,
        # in the run's own folder: pytest rewrites the asserts of the plugin and of the
        # lab's tests (about 0.05 CPU-s a file) and, with none written, did so in every
        # one of them. A learner's or a graded run writes none.
        del env["PYTHONDONTWRITEBYTECODE"]
        env["PYTHONPYCACHEPREFIX"] = str(sandbox.workdir_root / "pycache")
    return env


def _learner_host(lab: Lab, sandbox: Sandbox, env: dict[str, str], pass_fds: list[int]
                  ) -> tuple[socket.socket | None, socket.socket | None]:
    """Where the learner's code runs, said in ``env``: the factory's socket pair when
    grading as another uid, ``spawn`` for a lab that keeps it apart, else nowhere else."""
    apart = sandbox.learner_process and lab.learner_code_in_own_process
    if sandbox.learner_process and sandbox.learner_uid is not None:
        # The learner's factory, as the learner's uid: it hosts the learner's Python code
        # (labs that keep it apart) and starts the learner's programs (learner.popen: C
        # binaries, scripts) in every lab.
        verifier_end, factory_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pass_fds.append(verifier_end.fileno())
        env[ENV_LEARNER_HOST] = f"{FACTORY_PREFIX}{verifier_end.fileno()}"
        return factory_end, verifier_end
    if apart:
        env[ENV_LEARNER_HOST] = SPAWN
    return None, None


def _run_lab(
    lab: Lab,
    src: Path,
    state_file: Path | None,
    run_id: str,
    sandbox: Sandbox | None = None,
    timeout: float | None = None,
    on_process: Callable[[TestsProcess | None], None] | None = None,
) -> LabResult:
    sandbox = sandbox or Sandbox()
    started = time.time()
    if not src.is_dir():
        return LabResult(lab, "error", 0.0, f"{src}: folder missing; run 'labrunner init'",
                         started_at=started)
    key = secrets.token_bytes(32)
    report_r, report_w, key_r = _channel_pipes(key)
    workdir, ini = _workdir(lab, sandbox)
    env = _environment(sandbox, workdir, state_file, run_id, report_w, key_r)
    pass_fds = [report_w, key_r]
    factory_end, verifier_end = _learner_host(lab, sandbox, env, pass_fds)
    budget = timeout or lab.timeout * max(2, len(lab.test_files) * 3) + 30
    command = pytest_command(lab, src, sandbox, ini)
    proc: TestsProcess | None = None
    if sandbox.forked and _unconfined(sandbox):   # (so no learner factory either)
        proc = zygote.start(command[3:], workdir, env, pass_fds)   # after "python -m X"
    if proc is None:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=tuple(pass_fds),
            start_new_session=True,   # its own process group: killed whole on timeout
            user=sandbox.user,
            preexec_fn=_limits(sandbox, factory_end.fileno() if factory_end else None),
        )
    for end in (report_w, key_r, factory_end, verifier_end):   # the child's ends
        if isinstance(end, int):
            os.close(end)
        elif end is not None:
            end.close()
    if on_process:
        on_process(proc)
    records, output, readers = _read_both(proc, report_r, key, sandbox.max_output)
    lingered, cpu_wait = [False], CpuWait(proc.pid)
    try:
        timed_out = wait_for_exit(proc, budget, records, lingered, cpu_wait)
    finally:
        kill_group(proc)
        if on_process:
            on_process(None)
        shutil.rmtree(workdir, ignore_errors=True)   # on Ctrl-C too
    for reader in readers:
        reader.join(timeout=5)
    text = b"".join(output).decode("utf-8", errors="replace")
    return score(lab, records, Ended(proc.returncode, timed_out, budget, text, started,
                                     on_its_own=not timed_out and not lingered[0],
                                     waited_for_cpu=cpu_wait.allowance))


class Readiness(Protocol):
    """Which services are ready (``services.manager.Startup``): a lab starts when its own
    are, not when every service of the run is."""

    def settled(self, names: Iterable[str]) -> bool:
        """Each of ``names`` is ready or failed."""

    def problem(self, names: Iterable[str]) -> str | None:
        """Why one of ``names`` cannot be used, else None."""

    def wait_change(self, timeout: float) -> None:
        """Block until some service settles (or ``timeout``)."""


@dataclass
class RunPlan:
    labs: Sequence[Lab]
    sources: dict[str, Path]
    state_file: Path | None
    run_id: str
    jobs: int = 1
    sandbox: Sandbox | None = None
    readiness: Readiness | None = None


class _Scheduler:
    """The labs of one plan, handed to ``jobs`` workers: each takes the first lab in the
    plan's order whose services are ready (or failed: that lab is an error of its own)."""

    def __init__(self, plan: RunPlan, on_result: Callable[[LabResult], None],
                 on_start: Callable[[Lab], None] | None) -> None:
        self.plan, self.on_result, self.on_start = plan, on_result, on_start
        self.running: dict[str, TestsProcess] = {}
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.pending = list(plan.labs)
        self.gate = plan.readiness

    def take(self) -> Lab | None:
        """The next lab whose services are ready or failed, waiting for one if need be."""
        while not self.cancelled.is_set():
            with self.lock:
                if not self.pending:
                    return None
                for lab in self.pending:
                    if self.gate is None or self.gate.settled(lab.services):
                        self.pending.remove(lab)
                        return lab
            assert self.gate is not None
            self.gate.wait_change(0.5)
        return None

    def one(self, lab: Lab) -> LabResult | None:
        if self.cancelled.is_set():
            return None
        problem = self.gate.problem(lab.services) if self.gate is not None else None
        if problem:
            result = LabResult(lab, "error", 0.0,
                               f"{problem}\n(this lab needs it; labrunner doctor shows what "
                               "is installed)", started_at=time.time())
            self.on_result(result)
            return result
        if self.on_start:
            self.on_start(lab)

        def track(proc: TestsProcess | None) -> None:
            with self.lock:
                if proc is None:
                    self.running.pop(lab.id, None)
                else:
                    self.running[lab.id] = proc

        plan = self.plan
        result = run_lab(lab, plan.sources[lab.id], plan.state_file, plan.run_id,
                         plan.sandbox, on_process=track)
        if self.cancelled.is_set():
            return None
        self.on_result(result)
        return result

    def worker(self) -> list[LabResult]:
        done = []
        while (lab := self.take()) is not None:
            result = self.one(lab)
            if result is not None:
                done.append(result)
        return done

    def kill_running(self) -> None:
        self.cancelled.set()
        with self.lock:
            procs = list(self.running.values())
        for proc in procs:
            kill_group(proc)


def run_all(plan: RunPlan, on_result: Callable[[LabResult], None],
            on_start: Callable[[Lab], None] | None = None) -> list[LabResult]:
    """Run every lab of the plan (``jobs`` at a time), each as soon as the services it needs
    are ready (the first such lab in the plan's order); a lab whose service failed to start
    is an error of its own. On Ctrl-C, kill the running ones and re-raise after every
    process is gone."""
    scheduler = _Scheduler(plan, on_result, on_start)
    workers = max(1, min(plan.jobs, len(plan.labs)))
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(scheduler.worker) for _ in range(workers)]
    results: list[LabResult] = []
    try:
        for future in futures:
            results += future.result()
    except BaseException:
        scheduler.kill_running()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
