"""ph5.3 - Kafka internals: keyed partitioning, a consumer group splitting partitions and
rebalancing, manual commits (a commit with nothing new processed is a no-op, not an error),
resuming after a crash, consumer lag.

Ground truth is always the broker: where it stored each keyed record (produced with the
Java-compatible ``murmur2_random`` partitioner, not the learner's code), which member it
assigned each partition to, which offsets it holds as committed. The crash is a real one: a
consumer process using the learner's GroupConsumer is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from labrunner.testing import KafkaProxy
from labrunner.testing.kafka_proxy import (
    API_NAMES,
    CONSUMER_GROUP_HEARTBEAT,
    FETCH,
    HEARTBEAT,
    JOIN_GROUP,
    LEAVE_GROUP,
    OFFSET_COMMIT,
    SYNC_GROUP,
)

# Kafka's own test vectors for Utils.murmur2 (clients/src/test/.../UtilsTest.java).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


# --- helpers ---------------------------------------------------------------------------

Written = dict[tuple[int, int], str]
Records = list[tuple[int, int, str]]


def fill(kafka: Any, topic: str, per_partition: dict[int, int], tag: str) -> Written:
    """Write ``count`` records to each partition (explicit partitions: the test, not a
    partitioner, decides where they go); return each one's text by (partition, offset).
    The values are UTF-8 and not only ASCII: what a consumer returns is checked against it."""
    producer = Producer(kafka.producer_config(acks="all"))
    written: Written = {}

    def report(err: Any, msg: Any) -> None:
        assert err is None, f"the test's produce failed: {err}"
        written[(msg.partition(), msg.offset())] = msg.value().decode()

    for partition, count in per_partition.items():
        for n in range(count):
            producer.produce(topic, value=f"{tag}-p{partition}-{n}-€ü".encode(),
                             partition=partition, on_delivery=report)
    assert producer.flush(15) == 0, "the test's own records were not acknowledged"
    return written


def check_values(who: str, records: Records, written: Written) -> None:
    """Each record's value is the text the producer wrote at its (partition, offset)."""
    bad = [(p, o, v, written[(p, o)]) for p, o, v in records
           if (p, o) in written and v != written[(p, o)]]
    if bad:
        p, o, got, want = bad[0]
        pytest.fail(
            f"{who} returned {len(bad)} of {len(records)} records with a value that is not "
            f"the text the producer wrote, e.g. partition {p} offset {o}: {got!r}, written "
            f"{want!r} (the UTF-8 bytes {want.encode()!r}): a record's value is bytes, and "
            "its text is value.decode('utf-8') - not str(value) (the bytes' repr, b'...'), "
            "not another codec", pytrace=False)


def broker_assignment(admin: Any, group: str) -> list[set[int]]:
    """The partitions the group coordinator assigned to each member, as the broker says.
    (``admin`` is held by the caller: a client dropped mid-request fails with _DESTROY.)"""
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return sorted(({tp.partition for tp in m.assignment.topic_partitions}
                   for m in described.members), key=lambda s: sorted(s))


def split_two_by_two(members: list[set[int]]) -> bool:
    """Two members owning two partitions each, together all four (whichever assignor)."""
    return (len(members) == 2 and all(len(m) == 2 for m in members)
            and members[0] | members[1] == {0, 1, 2, 3})


def left_the_group(admin: Any, group: str, who: str, owned: set[int]) -> None:
    """``who``'s close() has returned: the broker must stop listing it as a member. Its
    LeaveGroup is answered in milliseconds; a member that never left keeps heart-beating
    from librdkafka's own thread, so the broker keeps it (and its partitions) for minutes."""
    deadline = time.monotonic() + 10
    while len(members := broker_assignment(admin, group)) > 1:
        if time.monotonic() > deadline:
            pytest.fail(
                f"10 s after {who}'s close() returned, the broker still lists it as a member "
                f"of the group (members' partitions: {members}): close() did not leave the "
                f"group, so partitions {sorted(owned)} stay assigned to a member that no "
                "longer reads them - nobody processes them until the broker gives up on it "
                "(max.poll.interval.ms, 5 minutes by default, while its client's background "
                "thread keeps heart-beating). Close the consumer (consumer.close(): on_revoke "
                "commits, then it sends LeaveGroup and the group rebalances at once)",
                pytrace=False)
        time.sleep(0.05)


def committed(kafka: Any, topic: str, group: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets as stored on the broker (-1001: none)."""
    reader = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group,
                       "log_level": 0})
    try:
        got = reader.committed([TopicPartition(topic, p) for p in range(partitions)],
                               timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        reader.close()


def watermarks(kafka: Any, topic: str, partitions: int) -> dict[int, tuple[int, int]]:
    reader = Consumer(kafka.consumer_config("test-watermarks"))
    try:
        return {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in range(partitions)}
    finally:
        reader.close()


def drive(members: list[Any], until: Callable[[list[Records]], bool], what: str,
          timeout: float = 20.0) -> list[Records]:
    """Poll every member in turn (rebalances happen inside poll) until ``until(got)``, where
    ``got`` holds the records each member returned meanwhile; return ``got``."""
    got: list[Records] = [[] for _ in members]
    deadline = time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        for index, member in enumerate(members):
            try:
                got[index] += member.poll_records(100, 0.1)
            except Exception as exc:  # noqa: BLE001 - crossed from the learner's process
                if "group.instance.id" not in str(exc) and "FENCED" not in str(exc).upper():
                    raise
                pytest.fail(
                    f"member {'AB'[index] if len(members) == 2 else index + 1} was fenced by "
                    "the broker: another member joined the group with the same "
                    "group.instance.id (static membership). That id names ONE member "
                    "instance - derived from the host, the process or the group, every "
                    "GroupConsumer made there shares it, and each one that joins throws the "
                    "previous one out. Leave it unset (dynamic membership), or give each "
                    f"instance its own\npoll_records raised {type(exc).__name__}: {exc}",
                    pytrace=False)
    return got


def commit_nothing_new(member: Any, who: str, since: str) -> None:
    """commit() with nothing processed since ``since``: the committed offsets are already
    right, so it must do nothing - not send an empty commit that librdkafka refuses
    (_NO_OFFSET) and raise out of the member's poll/process/commit loop."""
    try:
        member.commit()
    except Exception as exc:  # noqa: BLE001 - crossed from the learner's process
        pytest.fail(
            f"{who}'s commit() with nothing processed {since} raised {type(exc).__name__}: "
            f"{exc}; expected it to do nothing (the committed offsets are already right)\n"
            "A member commits on a schedule in its poll/process/commit loop: on an idle "
            "topic, or right after a rebalance committed everything in on_revoke, it has "
            "no new offsets - skip the commit when there are none (committing an empty "
            "list fails with _NO_OFFSET) instead of crashing the consumer.", pytrace=False)


def lag_short_by_one(lag: dict[int, int], want: dict[int, int]) -> str:
    """The mistake named when every committed partition's lag is one short (a committed offset
    read as the last record read): what to say, or "" when that is not what was seen."""
    short = [p for p in want if p in lag and want[p] - lag[p] == 1]
    if short and all(want[p] - lag.get(p, want[p]) in (0, 1) for p in want):
        return (f"partitions {short} are each 1 short: a committed offset is already the "
                "NEXT offset to read (last processed + 1), and the high watermark the offset "
                "AFTER the last record (the next to be written) - lag = high watermark - "
                "committed, with no -1 on either side")
    return ""


def offsets_of(records: Records) -> list[tuple[int, int]]:
    return sorted((p, o) for p, o, _ in records)


# --- partitioning ------------------------------------------------------------------------

def test_murmur2_matches_java(learner: Any) -> None:
    """murmur2 must give Java's signed 32-bit results for Kafka's own test vectors."""
    murmur2 = learner.function("internals", "murmur2")
    for key, want in JAVA_MURMUR2.items():
        got = murmur2(key)
        assert got == want, (
            f"murmur2({key!r}) = {got}, Java's Utils.murmur2 gives {want}: keep every "
            "intermediate to 32 bits (& 0xFFFFFFFF after each multiply), read 4-byte blocks "
            "little-endian, and return a signed int")


def test_partition_for_matches_the_broker(learner: Any, kafka: Any) -> None:
    """300 keys of every length 0-40 (ASCII and UTF-8) produced with the Java-compatible
    partitioner: partition_for must name the partition the broker stored each one in."""
    partition_for = learner.function("internals", "partition_for")
    topic = kafka.create_topic("keyed", 6)
    keys = [("k" * (n % 41))[: n % 41].encode() if n % 7 == 0 else
            f"customer-{n}-{'é' * (n % 5)}-{'x' * (n % 13)}".encode() for n in range(300)]
    placed: dict[bytes, int] = {}

    def report(err: Any, msg: Any) -> None:
        assert err is None, f"the test's produce failed: {err}"
        placed[msg.key()] = msg.partition()

    producer = Producer(kafka.producer_config(partitioner="murmur2_random", acks="all"))
    for key in keys:
        producer.produce(topic, key=key, value=b"v", on_delivery=report)
    assert producer.flush(15) == 0
    wrong = [(k, placed[k], partition_for(k, 6)) for k in placed if partition_for(k, 6) !=
             placed[k]]
    assert not wrong, (
        f"{len(wrong)} of {len(placed)} keys: partition_for disagrees with the broker, e.g. "
        f"key {wrong[0][0]!r} is in partition {wrong[0][1]}, partition_for says {wrong[0][2]}: "
        "the partition is (murmur2(key) & 0x7fffffff) % partitions - the sign bit cleared, "
        "not abs()")


# --- the group ---------------------------------------------------------------------------

def test_a_commit_with_nothing_new_is_a_no_op(learner: Any, kafka: Any) -> None:
    """A member commits what it processed, polls an idle topic and commits again (a
    poll/process/commit loop does, on every turn): the second commit has nothing to say."""
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("idle", 1)
    written = fill(kafka, topic, {0: 3}, "rec")
    member = group_consumer(kafka.consumer_config("idle"), topic)
    try:
        (read,) = drive([member], lambda got: len(got[0]) >= 3, "the member to read 3 records")
        check_values("poll_records()", read, written)
        member.commit()
        idle = member.poll_records(10, 0.3)
        assert idle == [], f"an idle topic gave {idle}: the 3 records came again"
        commit_nothing_new(member, "the member", "since its last commit() (an idle poll "
                           "returned nothing)")
    finally:
        # One record processed, so that close() (whose on_revoke commits) has an offset to
        # commit whatever commit() does with none: an error raised in that callback ends
        # the process instead of failing this test.
        fill(kafka, topic, {0: 1}, "last")
        drive([member], lambda got: len(got[0]) >= 1, "the member to read 1 new record")
        member.close()


# Records besides text: a tombstone (no value at all - what a compacted topic keeps to say
# its key was deleted) and an empty value. Each is a record: returned, with the value "".
ODD_VALUES = [(b"k-text", "before: grüße €".encode()), (b"k-deleted", None),
              (b"k-empty", b""), (b"k-text", b"after")]


def test_a_record_without_a_value_is_a_record(learner: Any, kafka: Any) -> None:
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("tombstones", 1)
    producer = Producer(kafka.producer_config(acks="all"))
    for key, value in ODD_VALUES:
        producer.produce(topic, key=key, value=value, partition=0)
    assert producer.flush(15) == 0, "the test's own records were not acknowledged"
    last = len(ODD_VALUES) - 1
    member = group_consumer(kafka.consumer_config("tombstones"), topic)
    try:
        try:
            (got,) = drive([member], lambda got: any(o >= last for _, o, _ in got[0]),
                           f"the member to read up to offset {last}")
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - crossed from the learner's process
            pytest.fail(
                f"poll_records() raised {type(exc).__name__}: {exc}, on a partition holding "
                "a tombstone (offset 1: a record whose value is None - what a compacted topic "
                "keeps to say its key was deleted) and an empty value (offset 2). A record "
                "without a value is still a record: return it, with the value ''", pytrace=False)
    finally:
        member.close()
    want = [(0, offset, (value or b"").decode()) for offset, (_, value) in enumerate(ODD_VALUES)]
    assert sorted(got) == want, (
        f"poll_records() returned {sorted(got)}; expected {want}: a tombstone (value None) "
        "and an empty value are records like any other - returned (value ''), processed, and "
        "committed past; a consumer that drops them hides deletions from its caller")


def test_group_splits_partitions_and_rebalances(learner: Any, kafka: Any) -> None:
    """Member A reads all 4 partitions; B joins and the group splits 2+2 without B
    re-reading what A processed; new records go to each partition's owner only; B leaves and
    A takes everything back without re-reading what B processed."""
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("events", 4)
    group = kafka.group("workers")
    config = kafka.consumer_config("workers")
    admin = kafka.admin()
    written = fill(kafka, topic, {p: 10 for p in range(4)}, "first")

    a = group_consumer(config, topic)
    b = None
    try:
        (first,) = drive([a], lambda got: len(got[0]) >= 40, "A, alone, to read 40 records")
        assert broker_assignment(admin, group) == [{0, 1, 2, 3}], (
            f"the broker shows the group's members owning {broker_assignment(admin, group)}; "
            "expected one member with partitions 0-3")
        assert offsets_of(first) == [(p, o) for p in range(4) for o in range(10)], (
            f"A, alone in the group, read {len(first)} records; expected offsets 0-9 of each "
            "of the 4 partitions")
        check_values("A's poll_records()", first, written)

        b = joined = group_consumer(config, topic)
        during = drive([a, b], lambda _: split_two_by_two(broker_assignment(admin, group))
                       and a.assignment() | joined.assignment() == {0, 1, 2, 3}
                       and not a.assignment() & joined.assignment(),
                       "the group to split the 4 partitions 2+2 between A and B")
        written |= fill(kafka, topic, {p: 10 for p in range(4)}, "second")
        got_a, got_b = drive([a, b], lambda got: len(got[0]) + len(got[1]) >= 40,
                             "A and B to read 40 new records")
        again = [(p, o) for p, o, _ in during[0] + during[1] + got_a + got_b if o < 10]
        assert again == [], (
            f"after B joined, records A had already processed were read again: {again[:6]}: "
            "commit what you processed in the revoke callback (on_revoke), before the "
            "partitions move to the other member")
        for who, member, got in (("A", a, got_a), ("B", b, got_b)):
            strays = [(p, o) for p, o, _ in got if p not in member.assignment()]
            assert not strays, f"{who} got records of partitions it does not own: {strays[:5]}"
        assert offsets_of(got_a + got_b) == [(p, o) for p in range(4) for o in range(10, 20)], (
            "A and B together should read offsets 10-19 of each partition exactly once, got "
            f"{offsets_of(got_a + got_b)[:8]}...")
        check_values("A's and B's poll_records()", got_a + got_b, written)

        b.commit()
        commit_nothing_new(b, "B", "since its last commit()")
        b_owns = b.assignment()
        before = committed(kafka, topic, group, 4)
        a.commit()  # A commits what it processed: only A's own partitions may move
        moved = {p: (before[p], now) for p, now in committed(kafka, topic, group, 4).items()
                 if p in b_owns and now != before[p]}
        assert not moved, (
            f"A's commit() moved the committed offsets of B's partitions {sorted(moved)} "
            f"(before -> after: {moved}): A still held offsets it had processed on those "
            "partitions before they were revoked, and committed them again, rewinding B's "
            "progress - once a partition is revoked (after committing it in on_revoke), "
            "forget its processed offset")
        b.close()
        b = None
        left_the_group(admin, group, "B", b_owns)
        (after,) = drive([a], lambda _: broker_assignment(admin, group) == [{0, 1, 2, 3}]
                         and a.assignment() == {0, 1, 2, 3}, "A to take back all 4 partitions")
        assert after == [], (
            f"after B committed and left, A read B's processed records again: "
            f"{offsets_of(after)[:6]}")
        commit_nothing_new(a, "A", "since the rebalance (its on_revoke committed what it "
                           "had processed)")
        fill(kafka, topic, {p: 1 for p in range(4)}, "third")
        (last,) = drive([a], lambda got: len(got[0]) >= 4, "A to read one new record per partition")
        assert offsets_of(last) == [(p, 20) for p in range(4)], (
            f"A read {offsets_of(last)}; expected offset 20 of each partition")
    finally:
        a.close()
        if b is not None:
            b.close()


def test_records_in_hand_when_a_revoke_comes(learner: Any, kafka: Any) -> None:
    """A rebalance can come in the middle of a poll_records() call: a poll() inside it runs
    on_revoke after the call has taken records it has not yet returned. A, alone, has
    committed everything; 40 new records are in its client's queue (seen by its fetches at a
    proxy) when its poll_records(41, ...) starts and B joins. librdkafka hands A the queued
    records before the revoke, so on_revoke runs with them in hand: it must commit them, or
    B, their partitions' new owner, reads again what A returns."""
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("inhand", 4)
    group = kafka.group("inhand")
    admin = kafka.admin()
    fill(kafka, topic, {p: 10 for p in range(4)}, "first")
    call: dict[str, Any] = {}
    with KafkaProxy(kafka.bootstrap) as proxy:
        a = group_consumer(kafka.consumer_config(
            "inhand", **{"bootstrap.servers": proxy.bootstrap}), topic)
        b = None
        caller = None
        try:
            drive([a], lambda got: len(got[0]) >= 40, "A, alone, to read 40 records")
            a.commit()
            fill(kafka, topic, {p: 10 for p in range(4)}, "second")
            # Two fetches of A's after the records were stored: the first was answered with
            # them, and the second was sent once A's client had queued that answer.
            proxy.wait_for(FETCH, len(proxy.requests(FETCH)) + 2,
                           what=" of A's after 40 new records were stored")

            def a_polls() -> None:
                try:
                    call["records"] = a.poll_records(41, 30)
                except BaseException as exc:  # noqa: BLE001 - judged by the main thread
                    call["error"] = exc

            # A hears of the rebalance B's join starts only in the answer to a heartbeat:
            # A's heartbeats wait at the proxy until its call has had a second to take the
            # 40 queued records (microseconds of work). A revoke that came first would drop
            # them from A's queue unread, and the mistake would not show.
            proxy.hold(HEARTBEAT)
            caller = threading.Thread(target=a_polls, daemon=True)
            caller.start()
            in_call = time.monotonic()
            b = group_consumer(kafka.consumer_config("inhand"), topic)
            time.sleep(max(0.0, in_call + 1.0 - time.monotonic()))
            proxy.release(HEARTBEAT)
            got_b = drive([b], lambda _: split_two_by_two(broker_assignment(admin, group))
                          and len(b.assignment()) == 2,
                          "B to join and the group to split 2+2 (A polls meanwhile)")[0]
            fill(kafka, topic, {p: 1 for p in range(4)}, "third")   # A's 41st record
            caller.join(40)
            assert not caller.is_alive(), (
                "A's poll_records(41, 30) had not returned 40 s after its call, with 41 "
                "records to read on the partitions it owned")
            error = call.get("error")
            assert error is None, (
                f"A's poll_records() raised {type(error).__name__}: {error} while the group "
                "rebalanced under it")
            owned = b.assignment()
            got_b += drive([b], lambda got: {(p, 20) for p in owned}
                           <= set(offsets_of(got_b + got[0])),
                           "B to read the new record of each partition it owns")[0]
        finally:
            if caller is not None:
                caller.join(40)
            a.close()
            if b is not None:
                b.close()
    in_hand = call["records"]
    again = sorted(set(offsets_of(in_hand)) & set(offsets_of(got_b)))
    assert not again, (
        f"B, given partitions {sorted(owned)} when it joined, read {len(again)} records that "
        f"A's poll_records() returned too, e.g. {again[:6]}: the revoke came inside A's "
        "call (a poll() in it ran on_revoke) after the call had taken those records, and "
        "on_revoke committed without them - so the partitions' new owner started before "
        "them. A record is processed the moment poll_records takes it for its caller: note "
        "its offset before the next poll(), which may run on_revoke")


# What a consumer_lag that joins the group sends: JoinGroup/SyncGroup (the classic protocol),
# ConsumerGroupHeartbeat (KIP-848's), LeaveGroup on the way out. A read of committed offsets
# (OffsetFetch, through the admin API or committed() of a consumer that never subscribes)
# needs none of them.
GROUP_MEMBERSHIP = {key: API_NAMES[key] for key in (JOIN_GROUP, SYNC_GROUP, LEAVE_GROUP,
                                                    CONSUMER_GROUP_HEARTBEAT)}


def test_consumer_lag_reads_without_joining_the_group(learner: Any, kafka: Any) -> None:
    """Lag is asked of a group while it works: a live member holds all 4 partitions (the
    test's own consumer, polling all along so that a rebalance would complete). consumer_lag
    reaches the broker through a proxy, which sees every request it sends: reading committed
    offsets is an OffsetFetch; a JoinGroup means it subscribed, made itself a member and
    forced the live group to rebalance - every member's partitions revoked, for a
    read-only question (and again when it leaves)."""
    consumer_lag = learner.function("internals", "consumer_lag")
    topic = kafka.create_topic("watched", 4)
    group = kafka.group("watched")
    fill(kafka, topic, {p: 10 for p in range(4)}, "rec")
    seen: list[str] = []

    def note(what: str) -> Callable[[Any, list[TopicPartition]], None]:
        return lambda _c, parts: seen.append(f"{what} {sorted(tp.partition for tp in parts)}")

    member = Consumer(kafka.consumer_config("watched", **{"enable.auto.commit": False}))
    member.subscribe([topic], on_assign=note("assigned"), on_revoke=note("revoked"))
    stop = threading.Event()

    def keep_polling() -> None:  # a working member: a rebalance it is told of completes
        while not stop.is_set():
            member.poll(0.1)

    poller = threading.Thread(target=keep_polling, daemon=True)
    try:
        deadline = time.monotonic() + 20
        read = 0
        while read < 40 or len(member.assignment()) < 4:
            assert time.monotonic() < deadline, (
                "timed out after 20 s waiting for the test's member to read its 40 records")
            msg = member.poll(0.1)
            read += msg is not None and msg.error() is None
        # The live member has processed up to offset 2p+1 of partition p: lag 8 - 2p.
        member.commit(offsets=[TopicPartition(topic, p, 2 * p + 2) for p in range(4)],
                      asynchronous=False)
        seen.clear()
        poller.start()
        with KafkaProxy(kafka.bootstrap) as proxy:
            lag = consumer_lag(proxy.bootstrap, topic, group)
            sent = [r.name for r in proxy.requests(*GROUP_MEMBERSHIP)]
            asked = sorted({r.name for r in proxy.requests()})
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(10)
        member.close()
    assert not sent, (
        f"consumer_lag sent {', '.join(dict.fromkeys(sent))} to the broker (all it asked: "
        f"{asked}): it joined a consumer group - subscribe() made it a member. With the "
        "group's own id, the live group rebalanced under its working member for a read-only "
        f"question (the member saw: {seen or 'nothing yet'}), and does again when it leaves; "
        "with another id, it reads another group's offsets. Read the committed offsets "
        "without joining: AdminClient.list_consumer_group_offsets(), or committed() of a "
        "Consumer with the group's id that never subscribes (nor assigns)")
    want = {p: 8 - 2 * p for p in range(4)}
    assert lag == want, (
        f"consumer_lag = {lag} while a live member holds the partitions, expected {want}: "
        + (lag_short_by_one(lag, want) or "lag = high watermark - the group's committed offset"))


CRASHING_MEMBER = """
import json, sys, time
from internals import GroupConsumer
config, topic = json.loads(sys.argv[1]), sys.argv[2]
member = GroupConsumer(config, topic)
done = []
while len(done) < 8:
    done += member.poll_records(8 - len(done), 1.0)
member.commit()
pending = []
while len(pending) < 4:
    pending += member.poll_records(4 - len(pending), 1.0)
print(json.dumps({"committed": done, "uncommitted": pending}), flush=True)
time.sleep(120)  # the test kills this process here
"""


def test_commit_crash_resume_and_lag(learner: Any, kafka: Any) -> None:
    """A member processes 8 records, commits, processes 4 more and is killed (SIGKILL). The
    broker must hold exactly the 8 as committed (next offset = last processed + 1); lag is
    log end minus commit (log start where the group never committed); a new member resumes
    at the commit, so the 4 uncommitted records come again and nothing is skipped."""
    consumer_lag = learner.function("internals", "consumer_lag")
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("ledger", 2)
    group = kafka.group("resume")
    fill(kafka, topic, {0: 10, 1: 10}, "rec")
    # Partition 1's first 4 records age out: its log now starts at offset 4.
    admin = kafka.admin()
    for future in admin.delete_records([TopicPartition(topic, 1, 4)]).values():
        future.result(timeout=10)

    lag = consumer_lag(kafka.bootstrap, topic, group)
    assert set(lag) == {0, 1}, (
        f"consumer_lag for a group that never committed = {lag}; expected an entry for each "
        f"of the topic's partitions, {{0: 10, 1: 6}}: a partition the group has no commit on "
        "still has lag - the group would start it at the log start (low watermark), so it is "
        "high - low behind; leaving it out reports a group that has read nothing as caught up")
    assert lag == {0: 10, 1: 6}, (
        f"consumer_lag for a group that never committed = {lag}; expected {{0: 10, 1: 6}}: "
        "such a group starts at the log start (low watermark), and partition 1's log starts "
        "at offset 4 (records 0-3 were deleted)")

    # A group that committed offset 1 of partition 1 before retention deleted past it: it
    # can only resume at the log start, so it is 6 behind there, not 9.
    stale = Consumer(kafka.consumer_config("stale", **{"enable.auto.commit": False}))
    try:
        stale.commit(offsets=[TopicPartition(topic, 1, 1)], asynchronous=False)
    finally:
        stale.close()
    lag = consumer_lag(kafka.bootstrap, topic, kafka.group("stale"))
    assert lag == {0: 10, 1: 6}, (
        f"consumer_lag for a group whose commit on partition 1 (offset 1) is older than that "
        f"log's start (offset 4: records 0-3 were deleted) = {lag}; expected {{0: 10, 1: 6}}: "
        "the group can only resume at the log start, so lag = high watermark - max(committed, "
        "low watermark) - subtracting a commit below the log start counts records that no "
        "longer exist")

    # Fast session expiry so the killed member leaves the group in 2 s; an auto-commit
    # interval so short that a consumer still auto-committing shows it before the kill.
    config = kafka.consumer_config("resume", **{"session.timeout.ms": 2000,
                                                "heartbeat.interval.ms": 300,
                                                "auto.commit.interval.ms": 100})
    # learner.popen: the member runs the learner's code, so when grading it runs as the
    # learner's uid, never as the tests'.
    member = learner.popen(
        [sys.executable, "-c", CRASHING_MEMBER, json.dumps(config), topic],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(learner.dir)},
        cwd=learner.dir)
    try:
        assert member.stdout is not None
        line = member.stdout.readline()
        assert line, f"the member process exited ({member.wait()}) before processing 12 records"
        report = json.loads(line)
        time.sleep(0.5)  # five auto-commit intervals: uncommitted progress would show now
        on_broker = committed(kafka, topic, group, 2)
    finally:
        member.send_signal(signal.SIGKILL)
        member.wait()

    low = {p: lw for p, (lw, _) in watermarks(kafka, topic, 2).items()}
    done = [tuple(r) for r in report["committed"]]
    want = {p: max((o for q, o, _ in done if q == p), default=-1) + 1 for p in (0, 1)}
    want = {p: o if o > 0 else -1001 for p, o in want.items()}
    assert on_broker == want, (
        f"after commit() of 8 processed records {offsets_of(done)} and 4 more processed but "
        f"not committed, the broker holds committed offsets {on_broker}; expected {want} "
        "(-1001 = none): commit the NEXT offset to read (last processed + 1), only for "
        "processed records, and turn enable.auto.commit off")

    high = {p: hw for p, (_, hw) in watermarks(kafka, topic, 2).items()}
    start = {p: on_broker[p] if on_broker[p] >= 0 else low[p] for p in (0, 1)}
    want_lag = {p: high[p] - start[p] for p in (0, 1)}
    lag = consumer_lag(kafka.bootstrap, topic, group)
    assert lag == want_lag, (
        f"consumer_lag = {lag}, expected {want_lag}: " + (lag_short_by_one(lag, want_lag) or
        "lag = high watermark - committed offset (or - low watermark when the group never "
        "committed that partition)"))

    resumed = group_consumer(kafka.consumer_config("resume"), topic)
    try:
        remaining = sum(want_lag.values())
        (got,) = drive([resumed], lambda got: len(got[0]) >= remaining,
                       f"the restarted member to read the {remaining} records after the commit")
        expected = [(p, o) for p in (0, 1) for o in range(start[p], high[p])]
        assert offsets_of(got) == expected, (
            f"after the crash the new member read {offsets_of(got)}; expected {expected}: it "
            "resumes at the committed offsets, so the 4 uncommitted records are processed "
            "again (at-least-once) and none is skipped")
        uncommitted = {(p, o) for p, o, _ in report["uncommitted"]}
        assert uncommitted <= set(offsets_of(got)), "the 4 uncommitted records must come again"
        resumed.commit()
        lag = consumer_lag(kafka.bootstrap, topic, group)
        assert lag == {0: 0, 1: 0}, f"after reading and committing everything lag is {lag}"
    finally:
        resumed.close()


def commit_again_after_refusal(member: Any, kafka: Any, topic: str, group: str,
                               outcome: str) -> None:
    """The broker refused the commit and ``commit()`` said so (``outcome``); the broker
    takes the next one. The 5 records are still processed and not committed, so the next
    ``commit()`` must store them: offsets are pending until the broker has them."""
    try:
        member.commit()
    except Exception as exc:  # noqa: BLE001 - crossed from the learner's process
        pytest.fail(f"commit() after a refused one raised {type(exc).__name__}: {exc}; the "
                    "broker was taking commits again", pytrace=False)
    stored = committed(kafka, topic, group, 1)[0]
    assert stored == 5, (
        f"the broker refused a commit (commit() {outcome}: right), and the next commit() "
        f"stored nothing: the broker holds offset {stored} for the 5 records read (-1001 = "
        "none); expected 5. The refused offsets were dropped as if committed (taken out of "
        "what is pending, or a 'nothing new' flag cleared, before the broker took them), so "
        "no later commit() nor on_revoke stores them and the partition's next owner "
        "processes all 5 again - forget an offset only once its commit succeeded")


def test_commit_returns_once_the_broker_stored_the_offsets(learner: Any, kafka: Any) -> None:
    """The member reaches the broker through a proxy, which refuses its commit (it answers
    the OffsetCommit with an error in the broker's place and stores nothing). commit() must
    wait for that answer: raise, or commit again until the broker took it - not return as if
    the offsets were stored, or a process killed right after loses a commit it believed
    made."""
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("acked", 1)
    group = kafka.group("acked")
    fill(kafka, topic, {0: 5}, "rec")
    with KafkaProxy(kafka.bootstrap) as proxy:
        member = group_consumer(kafka.consumer_config(
            "acked", **{"bootstrap.servers": proxy.bootstrap}), topic)
        try:
            drive([member], lambda got: len(got[0]) >= 5, "the member to read 5 records")
            proxy.refuse(OFFSET_COMMIT, count=1)
            try:
                member.commit()
                outcome = "returned"
            except Exception as exc:  # noqa: BLE001 - crossed from the learner's process
                outcome = f"raised {type(exc).__name__}: {exc}"
            stored = committed(kafka, topic, group, 1)[0]
            kinds = [e.kind for e in proxy.events() if e.request.api_key == OFFSET_COMMIT]
            assert outcome != "returned" or stored == 5, (
                f"commit() returned before the broker stored the offsets: the test refused the "
                f"OffsetCommit (answered it with an error, never forwarded) and the broker "
                f"holds offset {stored} for the 5 records read (-1001 = none), yet "
                f"commit() returned as if it had worked (the proxy saw: {kinds}). An "
                f"asynchronous commit (asynchronous=True, the default of consumer.commit()) "
                f"returns at once and reports only to a callback; a process killed right "
                f"after loses the commit - commit with asynchronous=False, which waits for "
                f"the broker and raises when it refuses")
            assert "request" in kinds, (
                f"commit() {outcome} without sending an OffsetCommit to the broker: commit "
                "the processed offsets with consumer.commit(offsets=..., asynchronous=False)")
            if stored != 5:
                commit_again_after_refusal(member, kafka, topic, group, outcome)
        finally:
            proxy.release(OFFSET_COMMIT)
            member.close()
