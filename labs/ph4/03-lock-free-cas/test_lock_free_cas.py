"""ph4.3 verification: the learner's Treiber stack (stack.c), built with make (-Wall -Wextra
-Werror, ThreadSanitizer) together with the lab's driver (c_examples/lock_free_stack).

The races a lock-free stack must survive are replayed exactly, on one thread, by the
driver: node_next()/node_set_next() (which the stack calls between reading the head and
its compare-and-swap) run "another thread's" operations right at that moment:

* aba: inside pop (head A, next B read) the other thread pops A, pops B and pushes A back;
  an untagged CAS succeeds and installs B, which the other thread still holds;
* pop_race: inside pop a push of D lands; a plain store of the head loses D;
* push_race: inside push a pop lands; a plain store of the head resurrects the popped node;
* pop_last: the stack holds one node and inside pop another pop takes it: the retry sees
  an empty stack and must return NULL (an empty check made once, before the retry loop,
  lets the retry dereference the NULL head or return the node the other thread holds);
* aba_wrap: ABA with 256 successful CASes in between: a tag of 8 bits or fewer (the
  pointer's alignment bits) has wrapped back to the same value;
* aba_at_cas: ABA again, landing right before pop's compare-and-swap (the driver's build
  routes every CAS through a wrapper): a tag kept in a word of its own, checked before a
  CAS of the pointer alone, does not see it;
* empty_aba: ABA through an empty stack: inside your pop the other thread pops every node
  and pushes two back; a version tag that restarts on the empty stack (the head reset to
  0, a push onto an empty stack starting from tag 1) comes back to the word your pop read;
* push_publish: right after push's compare-and-swap (or exchange) installs the node, a pop
  lands (the build routes those calls through the driver): a node linked only after it is
  published has a stale next, and the nodes below it are lost;
* two_stacks: two stacks alive at once keep their own nodes (no head in a static);
* new_on_reused_memory: stack_new() on memory freed blocks left full of stale bytes (the
  address of a node nobody pushed): its first pop returns NULL (a head left as malloc()
  found it does not);
* empty: after a push and a pop the stack is empty again with its version moved on: an
  empty check that compares the whole word with 0 reads through the NULL pointer;
* a pop that returns NULL while the stack was never empty (a lost CAS race taken for an
  empty stack, in pop_race, the aba cases, pop_retry_aba, or the stress run) fails;
* free: stack_free() releases what stack_new() allocated (ThreadSanitizer's allocator
  counts the bytes in use) and never touches the nodes;
* push_retry_aba, pop_retry_aba: your operation's first CAS fails and it retries while a
  third thread's pop (a real thread, run only while the driver waits for it) has read the
  head and waits right before its CAS; a retry that installs a tag derived from its FIRST
  read (computed once, before the loop) sets the version back to the value that pop
  expects, and its stale CAS wins.

A lock around push/pop (the nested operation waits for the outer one: a double lock that
ThreadSanitizer reports, or a spinlock that never opens) is named as such by the driver's
watchdog: lock-free means no operation ever waits for another.

Then a stress run: 4 threads x many pop/pop/push/push rounds over 64 nodes, each pop
checked for duplicates and counted into a checksum; ThreadSanitizer must report nothing
(the payload is a plain field, so the stack's own release/acquire must order it). A race
on the stack's own memory is translated: a plain read of the head beside its CAS, or a
second word (an ABA tag kept apart from the pointer) updated by a store of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0"}
STRESS_ROUNDS = 20_000
RUN_TIMEOUT = 60

@pytest.fixture
def binary(learner: Any) -> Path:
    """Built with the c_examples Makefile (once per session: learner.build() keeps it)."""
    return learner.build() / "lock_free_stack"  # type: ignore[no-any-return]


def run(learner: Any, binary: Path, *args: str) -> tuple[int, str, str]:
    # learner.run: when grading, the binary (the learner's stack in the test's driver) runs
    # as the learner's uid, never as the verification's.
    try:
        done = learner.run([str(binary), *args], capture_output=True, text=True,
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


def crash_seen(code: int, stderr: str) -> str:
    """What the crash was, in words: the signal, the address, the learner's line."""
    m = re.search(r"ERROR: ThreadSanitizer: ([A-Z]+) on unknown address (0x[0-9a-f]+)"
                  r".*\n(?:.*\n)*?.*The signal is caused by a (READ|WRITE)", stderr)
    frame = re.search(r"#\d+ (\w+) \S*/stack\.c:(\d+)", stderr)
    where = f" in {frame[1]} (stack.c:{frame[2]})" if frame else ""
    if m:
        address = int(m[2], 16)
        target = ("a NULL pointer" if address < 4096 else f"address {m[2]}")
        return f"crashed with SIG{m[1]}: a {m[3].lower()} through {target}{where}"
    if code < 0:
        return f"was killed by signal {-code}{where}"
    return f"crashed (exit status {code}){where}"


def crash_excerpt(stderr: str) -> str:
    """ThreadSanitizer's own account of the crash, from its first line."""
    start = re.search(r"^.*(?:ERROR: ThreadSanitizer|ThreadSanitizer: CHECK failed)", stderr,
                      re.M)
    return stderr[start.start():][:1200] if start else stderr.strip()[-800:]


@dataclass(frozen=True)
class Scenario:
    what: str     # the interleaving, for "the stack crashed during <what>"
    advice: str   # why it failed, what to do instead
    mistake: str | None = None  # the one mistake any failure here means: the first line
    # the mistake a read through NULL after the driver's "step" line means, if any
    null_after_step: str | None = None
    # the mistake a read through a wild (non-NULL) address before any "step" line means
    wild_before_step: str | None = None


SCENARIOS = {
    # the races first: a retry that reuses stale data fails there, with its own advice,
    # before the ABA cases (which it fails too) blame the tag
    "empty": Scenario(
        "pop on an empty stack returns NULL; a pushed node comes back",
        "Check for an empty stack (a NULL head) before reading top's next. The NULL is the "
        "pointer part of the head word: once the version tag has moved on, an empty stack's "
        "word is tag << 48 | 0, not 0 - test ptr_of(old) == NULL, never old == 0.",
        null_after_step="your pop read through NULL on a stack emptied by a pop (push A, "
                        "pop A, pop): the empty check must test the head's POINTER for NULL - "
                        "the word of an emptied stack still carries its version tag, it is "
                        "not the 0 that stack_new() gave",
        wild_before_step="the first pop of a new stack read through an address no push put "
                         "there: stack_new() must set the head to an empty stack (memory "
                         "from malloc() is not zeroed: calloc() it, or atomic_init() the "
                         "head)"),
    "new_on_reused_memory": Scenario(
        "stack_new() on memory a freed block left full of stale bytes, then a pop",
        "malloc() hands back memory as a freed block left it: a new stack whose head is "
        "not set holds whatever was there. calloc() the struct (all zero: a NULL pointer, "
        "tag 0), or set the head with atomic_init() before returning it."),
    "free": Scenario("stack_free() of a stack still holding two nodes the caller owns",
                     "stack_free() frees the stack only, never the nodes: they belong to "
                     "whoever pushed them (here they are static; elsewhere still in use, or "
                     "in a pool). free(s) - and whatever else stack_new() allocated - and "
                     "nothing else."),
    "two_stacks": Scenario(
        "two stacks alive at once",
        "Everything a stack is lives in the struct lfstack that stack_new() allocates: a "
        "head kept in a static or global variable (or one static struct handed out by every "
        "stack_new()) is one stack shared by all, and a second queue in the same program "
        "pops the first one's nodes.",
        mistake="each stack_new() must make a stack of its own: two stacks alive at once "
                "shared their contents (state kept in a static or global variable)"),
    "pop_race": Scenario(
        "a push landing inside your pop",
        "pop must install next with compare-and-swap from the head it read, and retry if "
        "the head changed - re-reading top AND top's next from the new head: a next read "
        "once before the loop is stale after a failed CAS, and a plain store overwrites the "
        "other thread's push."),
    "push_race": Scenario(
        "a pop landing inside your push",
        "push must install the node with compare-and-swap from the head it linked the node "
        "to, and retry (re-linking) if the head changed; a plain store puts back a node that "
        "another thread has already popped."),
    "pop_last": Scenario(
        "a pop of the last node landing inside your pop",
        "Your pop saw one node, then another thread popped it before your CAS: the CAS "
        "failed and handed back the new head, which is NULL. Read the head, test it for "
        "NULL, read next and CAS, all inside the loop: an empty check made once, before the "
        "loop, only held for the head you read first.",
        mistake="the empty check must be inside the retry loop: re-check the head for NULL "
                "after every re-read (here another thread popped the last node between your "
                "check and your CAS, and your retry had to return NULL)"),
    "aba": Scenario(
        "the ABA interleaving",
        "A CAS that compares only the pointer cannot see that the head was popped and "
        "pushed back in between: keep a version tag beside the pointer in the same atomic "
        "word and bump it on every successful CAS, so the stale CAS fails."),
    "aba_wrap": Scenario(
        "ABA with 256 successful CASes in between",
        "Your tag wrapped back to the value the stale CAS expects: a tag of 8 bits or fewer "
        "(the pointer's alignment bits hold 3) wraps after 256 operations, which a "
        "preempted thread easily sleeps through. Use the 16 spare top bits of the 64-bit "
        "word (user-space pointers fit in 48), or a 128-bit CAS."),
    "aba_at_cas": Scenario(
        "ABA landing right before your compare-and-swap",
        "A tag kept in a word of its own (two atomics, or a struct whose pointer alone is "
        "CASed), checked before the CAS and bumped by a store after it, leaves a window "
        "between the check and the CAS: here the other thread popped A, popped B and pushed "
        "A back in it, and a CAS comparing the pointer alone installed B, which the other "
        "thread holds. Pack the tag with the pointer in one 64-bit word (tag << 48 | "
        "pointer) or swap a 16-byte {pointer, tag} with a double-width CAS: then the stale "
        "CAS fails.",
        mistake="the pointer and its ABA tag must change together in ONE compare-and-swap: "
                "your CAS compared the pointer alone, and an ABA landing after your checks, "
                "right before the CAS, got through"),
    "empty_aba": Scenario(
        "ABA through an empty stack (your pop read A, next C; the other thread popped A "
        "and C, then pushed B and A)",
        "The stack ran empty in between, and your head word came back to the very (pointer, "
        "tag) your pop had read: the version restarted when the stack was empty. The empty "
        "head is a version like any other: every successful CAS installs a tag newer than "
        "the head it replaces - the pop of the last node too (pack(NULL, old), not 0, the "
        "word stack_new() starts from), and a push onto an empty stack (old tag + 1, not a "
        "fresh 1).",
        mistake="the version tag must keep growing through an empty stack: yours restarted "
                "when the stack ran empty, so after it refilled, the head word your stalled "
                "pop had read came back and its CAS matched"),
    "push_publish": Scenario(
        "a pop landing right after your push's successful compare-and-swap",
        "The moment your CAS installs the node as the head, any other thread may pop it and "
        "read its next: that link must already be in place. Link the node to the head you "
        "read (node_set_next) inside the loop, BEFORE the CAS that publishes it - never "
        "after (nor publish with an exchange and link afterwards: that window loses "
        "everything below the node).",
        mistake="push must link the node BEFORE the compare-and-swap (or exchange) that "
                "publishes it: a pop that ran right after your CAS read the node's next "
                "before you set it"),
    # a retry that reuses a tag derived from its first read of the head: last, once every
    # other mistake has had its own scenario
    **{f"{op}_retry_aba": Scenario(
        f"a retry of your {op} while a third thread's pop waited right before its CAS",
        f"Your {op}'s first CAS failed (the head had changed) and its retry succeeded - with "
        "a tag worked out from the head it read the first time, so the head's version went "
        "BACK: the value a third thread's stalled pop had read came round again, its stale "
        "CAS matched, and it installed a node the other thread holds (ABA, long before the "
        "16-bit tag could wrap). The tag protects only if every successful CAS installs a "
        "version newer than the one it replaces: inside the loop, derive everything from "
        "the head the failed CAS handed back - "
        + ("the node's link and the new word with its tag (pack(n, old) in the CAS call)."
           if op == "push" else
           "top, its next and the new word with its tag (pack(next, old) in the CAS call)."),
        mistake=f"a retry must recompute everything it derives from the head it re-read, "
                f"the version tag too: your {op} retried and installed a tag older than the "
                "head it replaced, and a stalled CAS from long before then succeeded")
       for op in ("push", "pop")},
}


# ---- ThreadSanitizer's race reports, read for what raced ---------------------------------

@dataclass(frozen=True)
class Access:
    atomic: bool
    write: bool
    line: int | None  # the line of the learner's stack.c that made it

    def quote(self, source: list[str]) -> str:
        if self.line is None:
            return "your stack.c"
        text = source[self.line - 1].strip() if 0 < self.line <= len(source) else ""
        text = text if len(text) <= 40 else text[:36] + " ..."
        return f"stack.c:{self.line} `{text}`" if text else f"stack.c:{self.line}"


CAS_CALL = re.compile(r"compare_exchange|compare_and_swap|cmpxchg", re.I)


def race_accesses(report: str) -> list[Access]:
    accesses = []
    for m in re.finditer(r"^  (?:Previous )?(atomic |Atomic )?(read|write|Read|Write) of size "
                         r"\d+ at 0x[0-9a-f]+[^\n]*\n((?:    #[^\n]*\n)*)", report, re.M):
        frame = re.search(r"/stack\.c:(\d+)", m[3])
        accesses.append(Access(bool(m[1]), m[2].lower() == "write",
                               int(frame[1]) if frame else None))
    return accesses


def race_on_the_stack(report: str, source: list[str]) -> tuple[str, str] | None:
    """(first line, advice) when ThreadSanitizer's race is on the stack's own memory (the
    block stack_new() allocated), naming which mistake put it there; None otherwise."""
    block = re.search(r"Location is heap block of size (\d+) at 0x[0-9a-f]+ allocated by "
                      r"[^\n]*\n((?:    #[^\n]*\n)*)", report)
    accesses = race_accesses(report)
    if block is None or "stack_new" not in block[2] or len(accesses) != 2:
        return None
    plain = [a for a in accesses if not a.atomic]
    by_cas = [a for a in accesses if a.atomic and a.line is not None
              and CAS_CALL.search(" ".join(source[a.line - 1:a.line + 1]))]
    if by_cas or int(block[1]) <= 8:
        # the word a CAS swaps (or the stack's only word): the head, read or written plainly
        other = by_cas[0] if by_cas else next(a for a in accesses if a is not plain[0])
        return (f"{plain[0].quote(source)} accesses the head without an atomic operation, "
                f"racing with {other.quote(source)} in another thread: every access to the "
                "head must be atomic",
                "Read the head with atomic_load_explicit() (a plain read of a word that "
                "another thread's CAS writes is a data race: the compiler may tear it, cache "
                "it in a register, or reorder it), and change it only with compare-and-swap.")
    written = next((a for a in accesses if a.write), accesses[0])
    other = accesses[1] if written is accesses[0] else accesses[0]
    return (f"{written.quote(source)} changes a second word of your stack with a plain "
            "store, outside the compare-and-swap that swaps the head, while "
            f"{other.quote(source)} uses it in another thread: a data race",
            "If that word is an ABA tag: the pointer and its tag must change together in ONE "
            "compare-and-swap - packed into one 64-bit word (tag << 48 | pointer) or swapped "
            "as a 16-byte {pointer, tag} with a double-width CAS. A tag bumped by a store of "
            "its own, after the pointer's CAS, is a separate step that other threads see "
            "half done, and ABA gets through between the check of the tag and the CAS. "
            "Anything else the threads share must be atomic itself.")


def learner_source(learner: Any) -> list[str]:
    return cast(str, learner.path("stack.c").read_text(encoding="utf-8",
                                                       errors="replace")).splitlines()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scripted_interleavings(learner: Any, binary: Path, scenario: str) -> None:
    case = SCENARIOS[scenario]
    code, out, err = run(learner, binary, scenario)
    # the first line: the mistake this scenario exists to catch, else what was seen
    headline = f"{scenario}: {case.mistake}\n" if case.mistake else ""
    steps = "\n".join(line for line in out.splitlines() if line.startswith("step "))
    if crashed(code, err):
        seen = crash_seen(code, err)
        null = "through a NULL pointer" in seen
        if case.null_after_step and steps and null:
            headline = f"{scenario}: {case.null_after_step}\n"
        if case.wild_before_step and not steps and "through address" in seen:
            headline = f"{scenario}: {case.wild_before_step}\n"
        pytest.fail(f"{headline}{scenario}: the stack {seen} during "
                    f"{case.what}{f' ({steps})' if steps else ''}\n{case.advice}\n"
                    f"{crash_excerpt(err)}", pytrace=False)
    report = tsan_report(err)
    if report is not None and "double lock of a mutex" in report:
        pytest.fail(f"{scenario}: your stack locks a mutex: the verification ran another "
                    "operation in the middle of yours (as a thread that preempts you would) "
                    "and it found the mutex already held\nLock-free means no operation "
                    "ever waits for another: take no lock in push/pop; install the change "
                    "with one compare-and-swap of the head, retried when it fails."
                    f"\n{report[:600]}", pytrace=False)
    if report is not None:
        named = race_on_the_stack(report, learner_source(learner))
        pytest.fail(f"{scenario}: {named[0]}\n{named[1]}\n{report}" if named else
                    f"{scenario}: ThreadSanitizer reported:\n{report}", pytrace=False)
    fail = next((line for line in out.splitlines() if line.startswith("FAIL")), None)
    if fail is not None and fail.startswith("FAIL hang:"):
        pytest.fail(f"{scenario}: {fail[len('FAIL hang: '):]}", pytrace=False)
    assert fail is None and code == 0, (
        f"{headline}{fail[5:] if fail else f'{scenario}: exit status {code}'}\n{case.advice}")


def test_stress_under_thread_sanitizer(learner: Any, binary: Path) -> None:
    code, out, err = run(learner, binary, "stress", str(STRESS_ROUNDS))
    report = tsan_report(err)
    named = race_on_the_stack(report, learner_source(learner)) if report else None
    if named is not None:
        pytest.fail(f"{named[0]}\n{named[1]}\n{report}", pytrace=False)
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
        pytest.fail(f"the stress run {crash_seen(code, err)}\n{crash_excerpt(err)}",
                    pytrace=False)
    fail = next((line for line in out.splitlines() if line.startswith("FAIL")), None)
    assert fail is None and code == 0, (
        f"{fail[5:] if fail else f'the stress run exited with status {code}'}\n"
        "Under real contention a push or pop that is not a single successful CAS from the "
        "head it read (or that is fooled by ABA) loses or duplicates nodes.")
