"""Where an object lives: a helper that must share its process runs there (the learner's
own, when grading), and the probes that observe the learner's process from inside it."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..learner.modes import OWN_THREAD_PREFIX
from ..proc_sockets import LISTEN, process_tcp_sockets
from ..slow_steps import threading_waits_in


def _lives_elsewhere(obj: Any) -> bool:
    """True for a proxy to an object in another process (the learner's, when grading)."""
    from ..learner import remote_connection

    return remote_connection(obj) is not None


def _beside(obj: Any, helper: Callable[..., Any], *args: Any) -> Any:
    """``helper(obj, *args)`` run in the process ``obj`` lives in: the learner's own
    (grading) for the learner's objects, this one for the test's."""
    from ..learner import remote_connection

    conn = remote_connection(obj)
    if conn is None:
        return helper(obj, *args)
    return conn.root.run_helper(helper.__module__, helper.__qualname__, (obj, *args))


def _entered(context: Any) -> tuple[Any, Callable[[], Any]]:
    """Enter a context manager here; return what it yields and how to leave it (a server
    the test stops when its block ends, from the other process)."""
    value = context.__enter__()
    return value, lambda: context.__exit__(None, None, None)



def learner_threads() -> list[threading.Thread]:
    """The threads alive in the process this runs in, labrunner's own left out (a learner
    host's serving threads and the pool serving the tests' calls, started and grown as the
    test goes): the main thread and those the learner's code started. Run it where the
    learner's code runs (a lab's harness, ``learner.run_helper``)."""
    return [t for t in threading.enumerate()
            if t.is_alive() and not t.name.startswith(OWN_THREAD_PREFIX)]


def threads_waiting_in(folder: str) -> int:
    """How many threads of this process sit in a ``threading`` wait (a Condition, an Event,
    a Semaphore: a pool's queue) called, at any depth, from code in ``folder``. Run it where
    the learner's code runs: ``learner.run_helper(threads_waiting_in, str(learner.dir))``."""
    return len(threading_waits_in(folder))


def file_bytes(path: str) -> bytes:
    """A file's bytes, read where this runs: ``learner.run_helper(file_bytes, key)`` reads a
    file the learner's code made private to its own user (a 0600 key)."""
    return Path(path).read_bytes()


def local_timezone(spec: str | None) -> str | None:
    """Set the local time zone of the process this runs in (``TZ``, then ``tzset``) and
    return the one it had (None: unset). ``learner.run_helper(local_timezone, "LAB-5:30")``
    puts the learner's code in UTC+05:30 for a test - a POSIX zone, no tzdata needed - and
    ``learner.run_helper(local_timezone, previous)`` puts it back: a machine in UTC hides
    local time written where UTC is meant."""
    import time

    previous = os.environ.get("TZ")
    if spec is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = spec
    time.tzset()
    return previous


def own_cpu_seconds() -> float:
    """CPU seconds the calling process has used so far, all its threads (user and system).
    Through ``learner.run_helper`` it reads the process the learner's code runs in - the
    tests' own when the learner's functions run in a thread there, the learner's when its
    code runs apart (grading): two readings around a quiet spell tell a wait asleep in the
    kernel (next to no CPU) from a busy loop (ph0.2)."""
    return time.process_time()


def process_threads(pid: int) -> int:
    """How many threads process ``pid`` runs (its entries in /proc/<pid>/task), or -1 when it
    is gone or out of sight. Run it where the learner's code runs:
    ``learner.run_helper(process_threads, proc.pid)`` counts the threads of a program that
    ``learner.python`` or ``learner.popen`` started, which under grading runs as the
    learner's uid, in a /proc where the verification's uid cannot see it (ph4.1)."""
    try:
        return sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return -1


def process_resources(pid: int) -> tuple[int, int, int]:
    """What process ``pid`` holds: (threads, open descriptors, resident KiB), each -1 when
    it is gone or out of sight. Like :func:`process_threads`, run it where the learner's code
    runs when the verification's /proc cannot see the learner's program (grading): ph4.5
    reads a C10K server's descriptors, threads and memory this way."""
    proc = Path(f"/proc/{pid}")
    try:
        threads = sum(1 for _ in (proc / "task").iterdir())
        fds = sum(1 for _ in (proc / "fd").iterdir())
        rss = next((int(line.split()[1]) for line in
                    (proc / "status").read_text().splitlines() if line.startswith("VmRSS:")),
                   0)
    except (OSError, ValueError):
        return -1, -1, -1
    return threads, fds, rss


def process_address_space(pid: int) -> int:
    """The KiB of address space process ``pid`` has mapped (VmSize), -1 when it is gone or
    out of sight. A thread that ended without being joined or detached keeps its stack
    mapped (8 MiB by default) while /proc no longer lists the thread: ph0.7 tells such a
    leak by this growing with every finished connection."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    return next((int(line.split()[1]) for line in status.splitlines()
                 if line.startswith("VmSize:")), -1)


# (threads not asleep, CPU nanoseconds, each thread's (tid, voluntary sleeps, syscall))
Activity = tuple[int, int, tuple[tuple[int, int, int], ...]]


def process_activity(pid: int) -> Activity:
    """Whether process ``pid`` is doing anything: (threads not asleep, CPU nanoseconds its
    threads have used, each thread's (tid, voluntary sleeps so far, the system call it sleeps
    in: -1 when running or not readable)); (-1, -1, ()) when it is gone or out of sight. A
    thread asleep (state S) whose CPU time has not moved between two readings slept all
    along: nothing it waits for has come. Such readings tell a server that sleeps while work
    waits for it (a blocked loop, a request swallowed) from one merely slow on a loaded
    machine (runnable, state R). Like :func:`process_threads`, run it beside the learner's
    program when grading hides its /proc (ph4.1, ph4.5)."""
    awake, cpu, threads = 0, 0, []
    try:
        tids = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    except (OSError, ValueError):
        return -1, -1, ()
    for tid in tids:
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
            try:
                ran = int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):   # no schedstats: clock ticks
                ran = (int(fields[11]) + int(fields[12])) * 10_000_000
        except (OSError, IndexError, ValueError):
            continue   # the thread ended while being read
        try:
            call = (task / "syscall").read_text().split()[0]
        except (OSError, IndexError):
            call = ""
        voluntary = next((int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("voluntary_ctxt_switches:")), 0)
        awake += fields[0] not in ("S", "Z", "X")
        cpu += ran
        threads.append((tid, voluntary, int(call) if call.isdigit() else -1))
    if not threads:
        return -1, -1, ()
    return awake, cpu, tuple(threads)


ThreadTimes = tuple[int, tuple[tuple[int, int, int, int], ...]]


def thread_times(pid: int) -> ThreadTimes:
    """How the threads of process ``pid`` spent their time so far, as the scheduler counted
    it: (CLOCK_MONOTONIC ns at the reading, each thread's (tid, ns it ran on a CPU, ns it
    waited runnable for one, voluntary sleeps)); (-1, ()) when it is gone, out of sight, or
    the kernel keeps no schedstats. Two readings tell exactly how long a thread slept in
    between (the time it neither ran nor waited for a CPU) and how often: what a loaded
    machine cannot change, where a look at its state now and then only estimates it (ph7.12:
    a drain that sleeps microseconds between looks at a counter, not milliseconds). Like
    :func:`process_activity`, run it beside the learner's program when grading hides its
    /proc."""
    threads = []
    try:
        tids = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    except (OSError, ValueError):
        return -1, ()
    for tid in tids:
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            ran, waited = (int(n) for n in (task / "schedstat").read_text().split()[:2])
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue   # the thread ended while being read
        except (OSError, ValueError):
            return -1, ()   # no schedstats (or out of sight)
        voluntary = next((int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("voluntary_ctxt_switches:")), 0)
        threads.append((tid, ran, waited, voluntary))
    if not threads:
        return -1, ()
    return time.monotonic_ns(), tuple(threads)


def asleep_throughout(before: Activity, after: Activity) -> bool:
    """Two :func:`process_activity` readings of one process: no thread of it ran between
    them (CPU time unmoved, the same threads) and none is runnable."""
    return before[0] == 0 and after[0] == 0 and before[1] == after[1] and (
        [t[0] for t in before[2]] == [t[0] for t in after[2]])


def cpu_burnt_while_idle(read: Callable[[], Activity], limit: float, within: float,
                         every: float = 0.2) -> float | None:
    """For a process that has nothing to do (every client idle, or waiting on what only a
    client can free): the CPU seconds it burnt, once more than ``limit`` without its being
    seen :func:`asleep_throughout` between two readings ``every`` s apart - a busy loop;
    None once it is seen so, or after ``within`` s undecided (a correct process on a loaded
    machine is never failed). ``read`` gives a :func:`process_activity` reading."""
    first = last = read()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(every)
        now = read()
        if now[0] == -1 or asleep_throughout(last, now):
            return None
        if (burnt := (now[1] - first[1]) / 1e9) > limit:
            return burnt
        last = now
    return None


def _unreadable(value: Any) -> bool:
    """The "gone or out of sight" answer of the /proc helpers here: -1, None, or a tuple
    whose first item is -1."""
    if value is None:
        return True
    if isinstance(value, tuple):
        return bool(value) and value[0] == -1
    return isinstance(value, int) and value == -1


def program_reading(learner: Any, proc: Any, helper: Callable[[int], Any]) -> Any:
    """``helper(proc.pid)`` for one of the learner's programs (``learner.popen``), read where
    its /proc can be seen: here when it can, else beside it (``learner.run_helper``: under
    grading the program runs as the learner's uid, hidden from the verification's). A
    reading that comes back empty while the program still runs raises instead of being
    returned: a check given -1 for "no descriptors" would judge nothing (ph0.7 did, under
    grading, until this)."""
    pid = int(proc.pid)
    value = helper(pid) if Path(f"/proc/{pid}/task").is_dir() or learner is None else None
    if _unreadable(value) and learner is not None:
        value = learner.run_helper(helper, pid)
    if _unreadable(value) and proc.poll() is None:
        raise RuntimeError(
            f"{helper.__name__}({pid}): the /proc of the learner's running program could not "
            "be read, here or beside it: the verification cannot judge it")
    return value


def open_descriptors(pid: int) -> list[int] | None:
    """The descriptor numbers process ``pid`` holds (its /proc/<pid>/fd), sorted; None when
    it is gone or out of sight. Run it beside the learner's program when grading hides its
    /proc (ph4.4: the highest descriptor of a server holding 1,100 connections)."""
    try:
        return sorted(int(fd.name) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except (OSError, ValueError):
        return None


def open_files_limit(pid: int) -> int:
    """Process ``pid``'s own soft limit on open files (/proc/<pid>/limits); -1 when it is
    gone or out of sight."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except (OSError, IndexError, ValueError):
        pass
    return -1


def epoll_interest(pid: int) -> dict[int, tuple[int, str]]:
    """Every descriptor in the epoll sets of process ``pid``: {descriptor: (the events mask
    it is registered with, what it is: its /proc/<pid>/fd link, such as socket:[inode])},
    from /proc/<pid>/fdinfo; empty when it is gone or out of sight. Run it beside the
    learner's program when grading hides its /proc (ph4.4 reads EPOLLOUT and EPOLLET)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    interest: dict[int, tuple[int, str]] = {}
    try:
        for fd in fd_dir.iterdir():
            if os.readlink(fd) != "anon_inode:[eventpoll]":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
            for match in re.finditer(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)", info):
                try:
                    target = os.readlink(fd_dir / match.group(1))
                except OSError:
                    continue   # closed since
                interest[int(match.group(1))] = (int(match.group(2), 16), target)
    except OSError:
        pass
    return interest


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in LISTEN in
    /proc/net/tcp and tcp6), sorted; empty when it is gone or out of sight. Like
    :func:`process_threads`, run it beside the learner's program when grading hides its
    /proc from the verification (ph6.10)."""
    return sorted({sock.local[1] for sock in process_tcp_sockets(pid) if sock.state == LISTEN})
