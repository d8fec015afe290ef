"""ph4.3 verification: the learner's Treiber stack (stack.c), built with make (-Wall -Wextra
-Werror, ThreadSanitizer) together with the lab's driver (c_examples/lock_free_stack).

The races a lock-free stack must survive are replayed exactly, on one thread, by the
driver: node_next()/node_set_next() (which the stack calls between reading the head and
its compare-and-swap) run "another thread's" operations right at that moment:

* aba: inside pop (head A, next B read) the other thread pops A, pops B and pushes A back;
  an untagged CAS succeeds and installs B, which the other thread still holds;
* pop_race: inside pop a push of D lands; a plain store of the head loses D;
* push_race: inside push a pop lands; a plain store of the head resurrects the popped node;
* aba_wrap: ABA with 256 successful CASes in between: a tag of 8 bits or fewer (the
  pointer's alignment bits) has wrapped back to the same value.

A lock around push/pop (the nested operation waits for the outer one: a double lock that
ThreadSanitizer reports, or a spinlock that never opens) is named as such by the driver's
watchdog: lock-free means no operation ever waits for another.

Then a stress run: 4 threads x many pop/pop/push/push rounds over 64 nodes, each pop
checked for duplicates and counted into a checksum; ThreadSanitizer must report nothing
(the payload is a plain field, so the stack's own release/acquire must order it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0"}
STRESS_ROUNDS = 20_000
RUN_TIMEOUT = 60

_builds: dict[Path, Path] = {}


@pytest.fixture
def binary(learner: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if learner.dir not in _builds:
        built = learner.build() / "lock_free_stack"
        keep = tmp_path_factory.mktemp("lock_free_stack") / "lock_free_stack"
        shutil.copy2(built, keep)
        _builds[learner.dir] = keep
    return _builds[learner.dir]


def run(binary: Path, *args: str) -> tuple[int, str, str]:
    try:
        done = subprocess.run([str(binary), *args], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT, env={**os.environ, **TSAN_ENV})
    except subprocess.TimeoutExpired:
        pytest.fail(f"'{' '.join(args)}' did not finish within {RUN_TIMEOUT} s: a CAS loop "
                    "that never succeeds (retrying with a stale expected value?) or a cycle "
                    "in the list", pytrace=False)
    return done.returncode, done.stdout, done.stderr


def tsan_report(stderr: str) -> str | None:
    m = re.search(r"WARNING: ThreadSanitizer: .*", stderr)
    return stderr[m.start():][:1800] if m else None


def crashed(code: int, stderr: str) -> bool:
    # a CHECK failure of ThreadSanitizer's allocator: free() of memory it never gave out
    return (code < 0 or "SEGV" in stderr or "ERROR: ThreadSanitizer" in stderr
            or "ThreadSanitizer: CHECK failed" in stderr)


SCENARIOS = {
    # the races first: a retry that reuses stale data fails there, with its own advice,
    # before the ABA cases (which it fails too) blame the tag
    "empty": ("pop on an empty stack returns NULL; a pushed node comes back",
              "Check for an empty stack (a NULL head) before reading top's next."),
    "free": ("stack_free() of a stack still holding two nodes the caller owns",
             "stack_free() frees the stack only, never the nodes: they belong to whoever "
             "pushed them (here they are static; elsewhere still in use, or in a pool). "
             "free(s) and nothing else."),
    "pop_race": ("a push landing inside your pop",
                 "pop must install next with compare-and-swap from the head it read, and "
                 "retry if the head changed - re-reading top AND top's next from the new "
                 "head: a next read once before the loop is stale after a failed CAS, and a "
                 "plain store overwrites the other thread's push."),
    "push_race": ("a pop landing inside your push",
                  "push must install the node with compare-and-swap from the head it linked "
                  "the node to, and retry (re-linking) if the head changed; a plain store "
                  "puts back a node that another thread has already popped."),
    "aba": ("the ABA interleaving",
            "A CAS that compares only the pointer cannot see that the head was popped and "
            "pushed back in between: keep a version tag beside the pointer in the same "
            "atomic word and bump it on every successful CAS, so the stale CAS fails."),
    "aba_wrap": ("ABA with 256 successful CASes in between",
                 "Your tag wrapped back to the value the stale CAS expects: a tag of 8 bits "
                 "or fewer (the pointer's alignment bits hold 3) wraps after 256 operations, "
                 "which a preempted thread easily sleeps through. Use the 16 spare top bits "
                 "of the 64-bit word (user-space pointers fit in 48), or a 128-bit CAS."),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scripted_interleavings(binary: Path, scenario: str) -> None:
    what, advice = SCENARIOS[scenario]
    code, out, err = run(binary, scenario)
    if crashed(code, err):
        pytest.fail(f"{scenario}: the stack crashed during {what} (exit status {code})\n"
                    f"{advice}\n{err.strip()[-800:]}", pytrace=False)
    report = tsan_report(err)
    if report is not None and "double lock of a mutex" in report:
        pytest.fail(f"{scenario}: your stack locks a mutex: the verification ran another "
                    "operation in the middle of yours (as a thread that preempts you would) "
                    "and it found the mutex already held\nLock-free means no operation "
                    "ever waits for another: take no lock in push/pop; install the change "
                    "with one compare-and-swap of the head, retried when it fails."
                    f"\n{report[:600]}", pytrace=False)
    assert report is None, f"{scenario}: ThreadSanitizer reported:\n{report}"
    fail = next((line for line in out.splitlines() if line.startswith("FAIL")), None)
    if fail is not None and fail.startswith("FAIL hang:"):
        pytest.fail(f"{scenario}: {fail[len('FAIL hang: '):]}", pytrace=False)
    assert fail is None and code == 0, (
        f"{fail[5:] if fail else f'{scenario}: exit status {code}'}\n{advice}")


def test_stress_under_thread_sanitizer(binary: Path) -> None:
    code, out, err = run(binary, "stress", str(STRESS_ROUNDS))
    report = tsan_report(err)
    if report is not None:
        pytest.fail(
            "ThreadSanitizer reported a data race under 4 threads of push/pop\n"
            "Every access to the head must be atomic (atomic_load / compare_exchange, never "
            "a plain read of a field that a CAS writes), and the CASes must order the "
            "node's contents: memory_order_release on push's successful CAS, "
            "memory_order_acquire on pop's load and CAS. With relaxed orders the payload "
            "written before a push is not guaranteed visible to the thread that pops it."
            f"\n{report}", pytrace=False)
    if crashed(code, err):
        pytest.fail(f"the stress run crashed (exit status {code})\n{err.strip()[-800:]}",
                    pytrace=False)
    fail = next((line for line in out.splitlines() if line.startswith("FAIL")), None)
    assert fail is None and code == 0, (
        f"{fail[5:] if fail else f'the stress run exited with status {code}'}\n"
        "Under real contention a push or pop that is not a single successful CAS from the "
        "head it read (or that is fooled by ABA) loses or duplicates nodes.")
