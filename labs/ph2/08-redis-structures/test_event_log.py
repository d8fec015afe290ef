"""ph2.8 verification, the event log: a stream read by consumer groups.

Its commands are observed as test_redis_structures.py observes the other structures' (MONITOR
on the test's own database: no KEYS or SCAN), and its reads through a gate that notes each
XREADGROUP before the server gets it, so a read seen waiting at the server (CLIENT LIST) is
known by what it asked for. (The lab's folders are not packages: the two test files cannot
import each other, so the few helpers both need are each file's own.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType
from typing import Any, NamedTuple

import pytest

from labrunner.testing import assert_decoded, redis_commands, redis_gate, wait_until

KEYSPACE_WALKS = {"KEYS", "SCAN"}


def recorded(redis_db: Any, label: str,
             action: Callable[[], Any]) -> tuple[Any, list[list[str]]]:
    """Run one learner call, return its result and the commands it sent; no call may walk
    the keyspace."""
    with redis_commands(redis_db) as sent:
        result = action()
    walks = [" ".join(c) for c in sent if c[0] in KEYSPACE_WALKS]
    assert not walks, (
        f"{label} sent {walks[0]!r}: KEYS and SCAN walk the whole keyspace, O(N) in every "
        "key of the database; keep the key names you need and address them directly")
    return result, sent


def structure(module: ModuleType, name: str, *args: Any) -> Any:
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        pytest.fail(f"structures.py: define a class {name} (see the README)", pytrace=False)
    return cls(*args)


def starts_at_end(redis_db: Any, group: str, appended: list[str]) -> None:
    """A group that read nothing of a stream holding events: was it created at '$' (its
    position at the end of the stream), so the events before it will never be delivered?"""
    client = redis_db.client(decode_responses=True)
    try:
        groups = {g["name"]: g for g in client.xinfo_groups("events")}
    finally:
        client.close()
    info = groups.get(group)
    if info is not None and info.get("last-delivered-id") == appended[-1]:
        pytest.fail(
            f"group {group!r} read nothing of the {len(appended)} events in the stream: it "
            f"was created with its position at the stream's end (last-delivered-id "
            f"{appended[-1]}, the newest event) - XGROUP CREATE ... $ means 'only events "
            f"appended from now on'; create the group at 0 so it reads the log from its "
            f"start", pytrace=False)


class ReadGate(NamedTuple):
    url: str                  # the learner's EventLog connects here, through the gate
    reads: list[list[bytes]]  # each XREADGROUP it sent, noted before the server got it
    redis_db: Any


@pytest.fixture
def read_gate(redis_db: Any) -> Iterator[ReadGate]:
    reads: list[list[bytes]] = []
    with redis_gate(redis_db.url, lambda c: reads.append(c) if c[0].upper() == b"XREADGROUP"
                    else None) as url:
        yield ReadGate(url, reads, redis_db)


def read_now(gate: ReadGate, log: Any, group: str, consumer: str, count: int) -> Any:
    """log.read() on a thread, watched until it returns: it hands back the new events there
    are now. Seen waiting at the server (CLIENT LIST flag b) in an XREADGROUP with BLOCK 0,
    or in two of them, it waits for events no one will append: the test says so."""
    box: dict[str, Any] = {}
    blocked: set[int] = set()  # which XREADGROUP (1st, 2nd... of this call) was seen waiting
    start = len(gate.reads)

    def run() -> None:
        try:
            box["got"] = log.read(group, consumer, count)
        except Exception as exc:  # noqa: BLE001 - raised again on the test's thread
            box["error"] = exc

    def stuck() -> bool:
        noted = len(gate.reads)
        if waiting_readers(gate.redis_db) and len(gate.reads) == noted > start:
            blocked.add(noted)  # nothing sent meanwhile: the one waiting is the last noted
        return len(blocked) > 1 or any(block_ms(gate.reads[n - 1]) == 0 for n in blocked)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    call = f"read({group!r}, {consumer!r}, {count})"
    wait_until(lambda: not thread.is_alive() or stuck(), f"{call} to return: it hands back "
               "the new events there are now (fewer than asked, or []), it does not wait "
               "for more to arrive")
    if thread.is_alive():
        sent = [" ".join(a.decode(errors="replace") for a in gate.reads[n - 1])
                for n in sorted(blocked)]
        with gate.redis_db.admin_client() as admin:  # let it go: the stream stays as is
            for reader in waiting_readers(gate.redis_db):
                admin.client_unblock(reader)
        why = ("BLOCK 0 waits for ever (0 means no timeout in Redis, not 'do not wait')"
               if any(block_ms(gate.reads[n - 1]) == 0 for n in blocked) else
               "asking again after each wait, it waits until enough events arrive")
        pytest.fail(
            f"{call} waits in Redis and does not return: it sent {' then '.join(sent)} and "
            f"was seen blocked there, waiting for events no one appends - {why}. read() "
            f"hands back the new events there are now: fewer than asked, or [] if none",
            pytrace=False)
    if "error" in box:
        raise box["error"]
    return box["got"]


def waiting_readers(redis_db: Any) -> list[int]:
    """The ids of the connections on the test's database blocked in an XREADGROUP."""
    with redis_db.admin_client(decode_responses=True) as admin:
        return [int(c["id"]) for c in admin.client_list() if int(c.get("db", -1)) ==
                redis_db.db and "b" in c.get("flags", "") and c.get("cmd") == "xreadgroup"]


def block_ms(command: list[bytes]) -> int | None:
    upper = [a.upper() for a in command]
    return int(command[upper.index(b"BLOCK") + 1]) if b"BLOCK" in upper else None


def test_event_log_is_a_stream_with_a_consumer_group(learner: Any, redis_db: Any,
                                                    read_gate: ReadGate) -> None:
    module = learner.load("structures")
    log = structure(module, "EventLog", read_gate.url, "events")
    appended = [log.append({"type": "order", "n": str(n)}) for n in range(10)]
    assert_decoded("append()", appended)
    assert len(set(appended)) == 10, f"append() returned {appended[:3]}...: ten distinct ids"
    log.create_group("billing")
    log.create_group("billing")  # idempotent: a second worker starting up does the same

    first, _ = recorded(redis_db, "read()", partial(read_now, read_gate, log, "billing",
                                                    "worker-a", 4))
    second, _ = recorded(redis_db, "read()", partial(read_now, read_gate, log, "billing",
                                                     "worker-b", 10))
    assert_decoded("read()", first + second)
    got = [fields.get("n") for _, fields in first + second]
    if not got:
        starts_at_end(redis_db, "billing", appended)
    assert got == [str(n) for n in range(10)], (
        f"worker-a then worker-b read events {got}, expected 0..9 each exactly once: "
        "consumers of one group share the work (XREADGROUP >), they do not each see all")
    assert [eid for eid, _ in first + second] == appended, "read() must return the event ids"
    assert log.pending("billing") == 10, (
        f"pending('billing') is {log.pending('billing')}, expected 10 delivered, unacked events")
    acked = log.ack("billing", [eid for eid, _ in first])
    assert acked == 4 and log.pending("billing") == 6, (
        f"after acking worker-a's 4 events, pending is {log.pending('billing')}, expected 6")
    assert read_now(read_gate, log, "billing", "worker-a", 10) == [], (
        "a group's consumers must not receive already delivered events again")
    acks_nothing(log, "billing")

    log.create_group("audit")
    audit = read_now(read_gate, log, "audit", "auditor", 100)
    if not audit:
        starts_at_end(redis_db, "audit", appended)
    assert len(audit) == 10, (
        f"a second group 'audit' read {len(audit)} events, expected all 10: every group "
        "sees the whole log")
    with redis_db.client(decode_responses=True) as client:
        kind = client.type("events")
    assert kind == "stream", (
        "the event log is not a stream under the key 'events' (the name passed in)")

    # A worker usually starts before any producer has written: its group must be creatable
    # on a log that does not exist yet, and see every event appended after.
    early = structure(module, "EventLog", read_gate.url, "signups")
    try:
        early.create_group("mailer")
    except Exception as exc:  # noqa: BLE001 - the learner's error, named in the message
        pytest.fail(f"create_group('mailer') on a log nothing was appended to yet raised "
                    f"{type(exc).__name__}: {exc}\nA consumer starts independently of the "
                    "producers: XGROUP CREATE ... MKSTREAM creates the empty stream with the "
                    "group (otherwise it needs the key to exist)", pytrace=False)
    later = [early.append({"type": "signup", "n": str(n)}) for n in range(3)]
    seen = [eid for eid, _ in read_now(read_gate, early, "mailer", "mailer-1", 10)]
    assert seen == later, (
        f"a group created before the log had any event read {seen} after 3 appends, "
        f"expected all 3 {later}: the group starts at the beginning of the (empty) stream")


def acks_nothing(log: Any, group: str) -> None:
    """A worker acks what read() handed it, and read() hands back [] when nothing is new:
    ack() of no ids acknowledges nothing."""
    try:
        acked = log.ack(group, [])
    except Exception as exc:  # noqa: BLE001 - the learner's error, named in the message
        pytest.fail(f"ack({group!r}, []) raised {type(exc).__name__}: {exc} - a worker acks "
                    "the ids read() handed it, and read() hands back [] when nothing is new: "
                    "XACK needs at least one id, so for no ids send nothing and return 0",
                    pytrace=False)
    assert acked == 0, f"ack({group!r}, []) returned {acked!r}, expected 0: no ids, no acks"


BACKLOG = 1_200  # above any page size a listing is commonly capped at (10, 100, 1000)


def test_pending_is_the_groups_count_however_large(learner: Any, redis_db: Any) -> None:
    log = structure(learner.load("structures"), "EventLog", redis_db.url, "backlog")
    log.create_group("billing")
    client = redis_db.client(decode_responses=True)
    try:
        with client.pipeline(transaction=False) as pipe:  # the backlog, written quickly
            for n in range(BACKLOG):
                pipe.xadd("backlog", {"type": "order", "n": str(n)})
            pipe.execute()
    finally:
        client.close()
    delivered = len(log.read("billing", "worker-a", BACKLOG))
    assert delivered == BACKLOG, (
        f"read('billing', 'worker-a', {BACKLOG}) returned {delivered} of the {BACKLOG} "
        "events appended")
    count, sent = recorded(redis_db, "pending()", lambda: log.pending("billing"))
    assert count == BACKLOG, (
        f"pending('billing') is {count} after {BACKLOG} events were delivered and none "
        f"acknowledged, expected {BACKLOG}: a count taken by listing the pending entries "
        "(XPENDING key group - + N, XRANGE) is capped by the page size, so a monitor never "
        "sees the backlog grow past it. Ask the group for its count: the summary form "
        "XPENDING key group (or XINFO GROUPS) answers in one command")
    listed = [" ".join(c[:6]) for c in sent
              if (c[0] == "XPENDING" and len(c) > 3) or c[0] in ("XRANGE", "XREVRANGE")]
    assert not listed, (
        f"pending() sent {listed[0]!r}: it lists the pending entries to count them, O(n) "
        f"in the backlog (and {BACKLOG} entries sent over the wire) where the summary form "
        "XPENDING key group returns the count the group already keeps")
