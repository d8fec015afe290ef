"""ph5.1 - why events: the producer publishes OrderPlaced to a Kafka topic and moves on; three
consumer groups (billing, shipping, analytics) each get every event; a group started later
replays the log from the beginning.

Positions are checked per event: two orders come twice (one key, two events, two
positions), so matching delivery reports to events by key shows.

Everything runs on the real broker: the test reads the topic back with its own consumer to see
what the broker stored, and asks the broker which consumer groups exist."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from labrunner.testing import KafkaProxy, verdict
from labrunner.testing.kafka import read_all
from labrunner.testing.kafka_proxy import FETCH, PRODUCE

GROUPS = ("billing", "shipping", "analytics")
ACK_TIMEOUT = 1.0   # the timeout the test gives publish_orders while no ack can come
#                     (its idempotent producer has its producer id, and sends its first
#                     Produce request, about 0.5 s after it is made: the hold is seen)
GIVE_UP_SLACK = 20.0  # how much later than that it may raise (a loaded machine)
AFTER_SEND_SLACK = 4.0  # how much later than that, from its first Produce (or, reading, Fetch)
#                         request, likewise. A right call's own deadline began BEFORE that
#                         request, so this covers only its return after the deadline (measured
#                         0.2 s before the request-based one); every wrong that keeps waiting
#                         pays all of it.
INIT_PRODUCER_ID = 22  # the request an idempotent producer opens with


def make_orders(start: int, count: int) -> list[dict[str, Any]]:
    return [{"order_id": f"order-{n}", "customer": f"customer-{n % 7}", "total_cents": 100 + n}
            for n in range(start, start + count)]


def seed(kafka: Any, topic: str, orders: list[dict[str, Any]]) -> None:
    """OrderPlaced events for ``orders`` written by the test's own producer (keyed by order
    id, acknowledged by the broker before this returns): the events a read-side test reads.
    publish_orders itself is checked in the publish tests; its idempotent producer waits
    about 0.5 s for its producer id every time it is made, which a test that only needs
    events in the log need not pay."""
    producer = Producer(kafka.producer_config(acks="all"))
    try:
        for order in orders:
            event = {"type": "OrderPlaced", "event_id": f"seed-{topic}-{order['order_id']}",
                     **order}
            producer.produce(topic, key=order["order_id"].encode(),
                             value=json.dumps(event).encode())
        left = producer.flush(30)
    finally:
        producer.close()
    assert left == 0, f"the test's producer could not write {left} events to {topic}"


def read_log(kafka: Any, topic: str) -> list[dict[str, Any]]:
    """Every record the broker holds for ``topic``, read with the test's own consumer
    (assigned partitions, no group membership, no commits)."""
    return [{"partition": r.partition, "offset": r.offset, "key": r.key,
             "event": json.loads(r.value or b"null")} for r in read_all(kafka, topic)]


def groups_under(kafka: Any) -> list[str]:
    # The client is held until its future resolves: one dropped while the request is in
    # flight (a temporary) was seen to leave the future unresolved for ever, under load.
    admin = kafka.admin()
    listed = admin.list_consumer_groups(request_timeout=10).result(timeout=30)
    return sorted(g.group_id for g in listed.valid if g.group_id.startswith(kafka.prefix))


def check_committed(kafka: Any, topic: str, group: str, read: int) -> None:
    """After ``group`` read everything the topic holds, its committed position on every
    partition must be that partition's end: tell a commit that covered only some partitions
    from no commit at all."""
    meta = kafka.admin().list_topics(topic, timeout=10).topics[topic]
    probe = Consumer(kafka.consumer_config(group, **{"enable.auto.commit": False}))
    try:
        ends = {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in meta.partitions}
        committed = {tp.partition: tp.offset for tp in probe.committed(
            [TopicPartition(topic, p) for p in meta.partitions], timeout=10)}
    finally:
        probe.close()
    behind = {p: (max(committed[p], 0), end) for p, end in ends.items()
              if end > 0 and committed[p] != end}
    if not behind:
        return
    if all(committed == end - 1 for committed, end in behind.values()):
        pytest.fail(
            f"group {group!r} read all {read} events and committed, on every partition, the "
            f"offset of the LAST event it read (committed, end per partition: {behind}): a "
            "committed offset is where the group's next read starts, the offset AFTER the "
            "last event handled (last + 1) - its next read gets each partition's last event "
            "again. commit() with no argument, commit(message=msg) and position() all give "
            "last + 1; a TopicPartition you build yourself needs msg.offset() + 1",
            pytrace=False)
    covered = sorted(p for p, end in ends.items() if end > 0 and p not in behind)
    if covered:
        pytest.fail(
            f"group {group!r} read all {read} events, but committed its position only on "
            f"partition(s) {covered}; on {sorted(behind)} it committed (committed, end) "
            f"{behind}: its next read gets those events again. A commit of one message "
            "(commit(message=last)) covers only that message's partition - commit the "
            "position of every partition you read (consumer.commit() with no argument)",
            pytrace=False)
    pytest.fail(
        f"group {group!r} read all {read} events but committed no position (committed, end "
        f"per partition: {behind}): its next read starts over - commit the group's position "
        "after reading (consumer.commit(), or auto-commit and close())", pytrace=False)


def committed_offset(kafka: Any, topic: str, group: str) -> int:
    """The position ``group`` committed on partition 0 of ``topic`` (-1: none)."""
    probe = Consumer(kafka.consumer_config(group, **{"enable.auto.commit": False}))
    try:
        (tp,) = probe.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        probe.close()
    return int(tp.offset)


def order_ids(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("order_id")) for e in events]


READ_FIRST_TIMEOUT = 3.0  # consume_exactly's timeout for a read that needs no retry
READ_FETCHING = 1.0  # how long its consumer must have been fetching for that read to count
READ_RETRY_TIMEOUT = 8.0  # the timeout of the read again, when it had not


def consume_exactly(consume: Callable[..., list[dict[str, Any]]], kafka: Any, topic: str,
                    group: str, want: list[str], why: str,
                    watched: bool = False) -> list[dict[str, Any]]:
    """Run the learner's consume() for ``group`` and check it got exactly the orders
    ``want`` (in any order across partitions), each once.

    A right read returns as soon as it has them (its consumer joins and fetches in about
    0.3 s); a read that gets too few waits out its timeout (READ_RETRY_TIMEOUT, for a slow
    group join on a loaded machine). ``watched``: the read where a wrong that gets too few
    shows first is watched through a proxy (which costs a right read about 0.1 s) with a
    short timeout (READ_FIRST_TIMEOUT): when its consumer had been fetching for
    READ_FETCHING s before it gave up, what it returned is its answer; only when it had not
    is the rest read again with READ_RETRY_TIMEOUT."""
    if not watched:
        got = consume(kafka.bootstrap, topic, kafka.group(group), len(want),
                      READ_RETRY_TIMEOUT)
    else:
        with KafkaProxy(kafka.bootstrap) as proxy:
            got = consume(proxy.bootstrap, topic, kafka.group(group), len(want),
                          READ_FIRST_TIMEOUT)
            returned = time.monotonic()
            fetched = proxy.requests(FETCH)
        if len(got) < len(want) and (not fetched
                                     or returned - fetched[0].at < READ_FETCHING):
            got = got + consume(kafka.bootstrap, topic, kafka.group(group),
                                len(want) - len(got), READ_RETRY_TIMEOUT)
    ids = order_ids(got)
    missing = sorted(set(want) - set(ids), key=lambda s: int(s.split("-")[1]))
    extra = sorted(set(ids) - set(want), key=lambda s: int(s.split("-")[1]))
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    assert not missing and not extra and not repeated, (
        f"group {group!r} {why}: expected the {len(want)} events {want[0]}..{want[-1]}, "
        f"got {len(got)}; missing {missing[:5]}, unexpected {extra[:5]}, "
        f"repeated {repeated[:5]}")
    return got


def resubmitted(orders: list[dict[str, Any]], *picks: int) -> list[dict[str, Any]]:
    """``orders`` with the orders at ``picks`` submitted again, amended: the same order id,
    a second event (events share a key by design: every event of one order, one partition)."""
    return orders + [dict(orders[i], total_cents=orders[i]["total_cents"] + 900) for i in picks]


def check_positions(orders: list[dict[str, Any]], placed: list[Any],
                    log: list[dict[str, Any]]) -> None:
    """Each event must be at the (partition, offset) publish_orders reported for it. Events
    of one order id share a partition, in produce order: the k-th event of an order id is
    the k-th record with that key."""
    by_order: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(log, key=lambda r: (r["partition"], r["offset"])):
        by_order.setdefault(str(record["event"].get("order_id")), []).append(record)
    taken: dict[str, int] = {}
    actual = {(r["partition"], r["offset"]) for r in log}
    for order, where in zip(orders, placed, strict=True):
        oid = order["order_id"]
        nth = taken[oid] = taken.get(oid, -1) + 1
        records = by_order.get(oid, [])
        assert nth < len(records), (
            f"the topic holds {len(records)} event(s) for {oid}, publish_orders was given "
            f"{[o['order_id'] for o in orders].count(oid)} orders with that id: one event "
            "per order, even when an order id comes again")
        record = records[nth]
        event = record["event"]
        assert event.get("type") == "OrderPlaced" and event.get("event_id"), (
            f"event for {oid} is {event}: expected type 'OrderPlaced' and an event_id")
        assert (event.get("customer"), event.get("total_cents")) == (
            order["customer"], order["total_cents"]), (
            f"event for {oid} carries {event}, not the order's customer and total: "
            "consumers only know what the event tells them")
        assert record["key"] == oid.encode(), (
            f"event for {oid} has key {record['key']!r}: key events by order id so every "
            "event about one order lands in one partition, in order")
        stored = (record["partition"], record["offset"])
        if tuple(where) == stored:
            continue
        siblings = [(r["partition"], r["offset"]) for r in records]
        if len(records) > 1 and tuple(where) in siblings:
            pytest.fail(
                f"publish_orders said event {nth + 1} of {len(records)} for {oid} is at "
                f"{tuple(where)}, the broker stored it at {stored} ({tuple(where)} holds "
                f"event {siblings.index(tuple(where)) + 1} of that order id): positions "
                "were matched to events by KEY; events share a key by design (an order "
                "submitted again, every event of one order), so match each delivery report "
                "to the event it acknowledges - a callback per produce() bound to that "
                "event's index, never a lookup by key", pytrace=False)
        why = ("the right positions in another order: return them in the order of "
               "`orders` (delivery reports arrive per partition batch, not in produce "
               "order - record each at its order's index)"
               if {tuple(w) for w in placed} == actual else
               "take the partition and offset from each event's delivery report")
        pytest.fail(f"publish_orders said {oid} is at {tuple(where)}, the broker has it at "
                    f"{stored}: {why}", pytrace=False)


def test_publish_needs_no_consumer(learner: Any, kafka: Any) -> None:
    """The producer is decoupled in time: with no consumer anywhere, publish_orders returns
    once the broker holds every event, keyed by order id, at the offsets it reported - one
    event per order, two of them resubmitted under an order id already sent."""
    publish = learner.function("events", "publish_orders")
    topic = kafka.create_topic("orders", 3)
    orders = resubmitted(make_orders(0, 28), 7, 20)
    n = len(orders)

    placed = publish(kafka.bootstrap, topic, orders)

    assert isinstance(placed, list) and len(placed) == n, (
        f"publish_orders returned "
        f"{f'{len(placed)} positions' if isinstance(placed, list) else repr(placed)[:80]} "
        f"for {n} orders; expected a list of {n} (partition, offset) pairs, one per order - "
        "order-7 and order-20 come twice: two events each, each with its own position from "
        "its delivery report (reports matched by key give one of them twice or drop one)")
    log = read_log(kafka, topic)
    assert len(log) == n, (
        f"right after publish_orders returned the broker held {len(log)} of {n} events: "
        "produce() only queues locally - wait for the acknowledgements (flush) before "
        "telling the caller the events are published")
    check_positions(orders, placed, log)
    assert len({r["event"]["event_id"] for r in log}) == n, "event ids must be unique"
    assert groups_under(kafka) == [], (
        f"publishing created consumer groups {groups_under(kafka)}: the producer must not "
        "consume or wait for anyone")


def check_next_call_succeeds(publish: Callable[..., Any], kafka: Any, topic: str) -> None:
    """After a call that raised over a refused event, the order service's next call, with
    events the broker accepts, must return their positions: one call's refusals are that
    call's, not every later one's."""
    before = len(read_log(kafka, topic))
    orders = make_orders(10, 2)
    try:
        placed = publish(kafka.bootstrap, topic, orders)
    except Exception as exc:  # noqa: BLE001 - said below, with what the broker holds
        stored = len(read_log(kafka, topic)) - before
        pytest.fail(
            f"after a publish_orders call raised over a refused event, the next call, with 2 "
            f"orders the broker accepts, raised too ({type(exc).__name__}: {str(exc)[:160]}), "
            f"though the broker stored {stored} of its events: expected their positions. "
            "The errors of one call are that call's: collect delivery errors in a list made "
            "by each call, not in a module-level list or flag that an earlier call's "
            "refusal keeps set for every later one", pytrace=False)
    assert isinstance(placed, list) and len(placed) == 2, (
        f"after a publish_orders call raised over a refused event, the next call, with 2 "
        f"orders the broker accepts, returned {placed!r:.80}; expected their 2 positions")


def test_a_refused_event_is_not_reported_published(learner: Any, kafka: Any) -> None:
    """The broker refuses one event (larger than the topic's max.message.bytes): its delivery
    report carries the error, and publish_orders must not return as if every event were
    stored - the caller would believe an order was announced that nobody will ever read."""
    publish = learner.function("events", "publish_orders")
    topic = kafka.create_topic("orders-small", 1, **{"max.message.bytes": "2000"})
    orders = make_orders(0, 3)
    orders[1] = {**orders[1], "customer": "c" * 4000}
    try:
        placed = publish(kafka.bootstrap, topic, orders)
    except Exception:  # noqa: BLE001 - raising is right: the caller learns of the refusal
        check_next_call_succeeds(publish, kafka, topic)
        return
    pytest.fail(
        f"publish_orders returned {placed!r:.80} for 3 orders, though the broker refused "
        f"the event of {orders[1]['order_id']} (larger than the topic's max.message.bytes): "
        "a delivery report with an error means the event was NOT published - collect the "
        "errors the delivery callback reports and raise, never return as if all were stored",
        pytrace=False)


def test_unacknowledged_events_are_not_reported_published(learner: Any, kafka: Any) -> None:
    """The broker does not acknowledge in time (a leader election, a partition): the
    learner's producer reaches it through a proxy that holds every Produce request, and
    publish_orders(..., timeout=1) must raise once its timeout has passed - events still in
    flight are not published, and the caller must not move on as if they were."""
    publish = learner.function("events", "publish_orders")
    topic = kafka.create_topic("orders-unacked", 1)
    orders = make_orders(0, 5)
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.hold(PRODUCE)
        started = time.monotonic()
        ended: dict[str, Any] = {}

        def call() -> None:
            try:
                ended["verdict"] = verdict("publish_orders", publish, proxy.bootstrap, topic,
                                           orders, refusal=(), crash=None,
                                           timeout=ACK_TIMEOUT)
            except BaseException as exc:  # noqa: BLE001 - a pytest.fail, raised below
                ended["raised"] = exc

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        # Its flush(timeout) began before its first Produce request went out (or within a
        # moment of it): from there, a publish_orders that keeps its timeout has raised
        # within AFTER_SEND_SLACK past it. One that has not is waiting longer, for acks that
        # will not come: said then, not when its own longer wait ends.
        deadline = started + ACK_TIMEOUT + GIVE_UP_SLACK
        while caller.is_alive() and time.monotonic() < deadline:
            sent = proxy.requests(PRODUCE)
            if sent:
                deadline = min(deadline, sent[0].at + ACK_TIMEOUT + AFTER_SEND_SLACK)
            caller.join(0.05)
        took = time.monotonic() - started
        if caller.is_alive():
            produced = len(proxy.requests(PRODUCE))
            pytest.fail(
                f"publish_orders(timeout={ACK_TIMEOUT:g}) had neither returned nor raised "
                f"after {took:.0f} s ({produced} Produce request(s) sent, none acknowledged: "
                "the test held them): expected it to give up after about "
                f"{ACK_TIMEOUT:g} s - wait for the acknowledgements at most `timeout` seconds "
                "(flush(timeout)), not a fixed time or forever, and raise when events are "
                "left unacknowledged", pytrace=False)
        if "raised" in ended:
            raise ended["raised"]
        outcome, detail = ended["verdict"]
        produced = len(proxy.requests(PRODUCE))
        acked = sum(1 for e in proxy.events()
                    if e.kind == "answer" and e.request.api_key == PRODUCE)
    if outcome == "ok":
        pytest.fail(
            f"publish_orders(timeout={ACK_TIMEOUT:g}) returned {detail!r:.80} after "
            f"{took:.1f} s, though the broker had acknowledged none of the 5 events (the test "
            f"held the producer's Produce requests: {produced} sent, {acked} answered): "
            "expected it to raise - flush(timeout) returns how many events are still "
            "unacknowledged, and "
            "when that is not 0 they are NOT published; raise instead of returning as if "
            "they were stored", pytrace=False)
    if detail.startswith("TypeError") and "argument" in detail:
        pytest.fail(f"publish_orders(bootstrap, topic, orders, timeout={ACK_TIMEOUT:g}) "
                    f"raised {detail}: publish_orders must take a `timeout` (seconds to wait "
                    "for the acknowledgements)", pytrace=False)
    assert took <= ACK_TIMEOUT + GIVE_UP_SLACK, (
        f"publish_orders(timeout={ACK_TIMEOUT:g}) raised only after {took:.0f} s while the "
        f"broker acknowledged nothing: expected it to give up after about {ACK_TIMEOUT:g} s "
        "- wait for the acknowledgements at most `timeout` seconds (flush(timeout)), not a "
        "fixed time or forever")


def test_acknowledged_means_stored_by_the_replicas(learner: Any, kafka: Any) -> None:
    """What "published" means is decided by what the producer asks the broker for, read off
    its requests through a proxy that only watches: every Produce request with acks=all (-1),
    so the broker answers once every in-sync replica has the events, from an idempotent
    producer (it asked for a producer id with InitProducerId, which its batches carry with
    sequence numbers). The test cluster has one broker, where acks=1 looks just the same -
    until a leader dies in a real one."""
    publish = learner.function("events", "publish_orders")
    topic = kafka.create_topic("orders-durable", 3)
    # A call naming the broker itself first: the next call names the proxy, and must reach
    # the cluster through it - each call's producer is for the bootstrap that call names.
    publish(kafka.bootstrap, topic, make_orders(100, 1))
    with KafkaProxy(kafka.bootstrap) as proxy:
        placed = publish(proxy.bootstrap, topic, make_orders(0, 5))
        asked = sorted({r.acks for r in proxy.requests(PRODUCE)}, key=str)
        idempotent = bool(proxy.requests(INIT_PRODUCER_ID))
        seen = len(proxy.requests())
    assert isinstance(placed, list) and len(placed) == 5, (
        f"publish_orders returned {placed!r:.120}; expected 5 (partition, offset) pairs")
    assert asked, (
        f"publish_orders(bootstrap=<the test's proxy>) returned 5 positions without sending "
        f"a single Produce request through that bootstrap ({seen} requests of any kind "
        f"reached it), after an earlier call had named another one (the broker's own "
        f"address): the producer made for the first call's bootstrap served this call too. "
        f"A cached producer belongs to the bootstrap it was made for: key the cache by "
        f"bootstrap (or make one per call), never one module-wide producer for whatever "
        f"cluster a later call names")
    meaning: dict[int | None, str] = {
        0: "acks=0: nobody acknowledges, so a delivery report says nothing about the log",
        1: "acks=1: only the partition LEADER has the events when it answers; if it dies "
           "before its followers copied them, a follower becomes leader without them and "
           "the OrderPlaced events the order service reported published are gone for "
           "every consumer group",
    }
    assert asked == [-1], (
        f"publish_orders' Produce requests asked for acks {asked}, expected only -1 "
        f"(acks=all): {'; '.join(meaning.get(a, f'acks={a}') for a in asked if a != -1)}. "
        f"The order service writes one fact and moves on only if the log really keeps it: "
        f"produce with acks=all and enable.idempotence=True")
    assert idempotent, (
        "publish_orders' producer is not idempotent (it never asked the broker for a "
        "producer id: no InitProducerId request, so its batches carry none); expected "
        "enable.idempotence=True: librdkafka retries a batch whose answer was lost while "
        "later ones are in flight, and without a producer id and sequence numbers the "
        "broker stores the retried OrderPlaced twice, or after a later event of the same "
        "order - the partition order per order id the key was chosen for is gone")


def test_every_group_gets_every_event(learner: Any, kafka: Any) -> None:
    """Fan-out: billing, shipping and analytics each read all 30 events through their own
    group; each group keeps its own position."""
    publish = learner.function("events", "publish_orders")
    consume = learner.function("events", "consume")
    topic = kafka.create_topic("orders", 3)
    publish(kafka.bootstrap, topic, make_orders(0, 30))
    everyone = order_ids(make_orders(0, 30))

    seen: dict[str, set[str]] = {}
    for group in GROUPS:
        got = consume_exactly(consume, kafka, topic, group, everyone,
                              "should receive every OrderPlaced event (fan-out)", watched=True)
        seen[group] = {str(e.get("event_id")) for e in got}
    assert seen["billing"] == seen["shipping"] == seen["analytics"], (
        "the three groups saw different event ids: they must read the same stored events")
    for group in GROUPS:
        check_committed(kafka, topic, group, 30)

    publish(kafka.bootstrap, topic, make_orders(30, 5))
    newer = order_ids(make_orders(30, 5))
    for group in GROUPS:
        consume_exactly(consume, kafka, topic, group, newer,
                        "consumed 30 events already, so its next read should be only the 5 new "
                        "ones - commit the group's position after reading")


def test_group_started_later_replays_history(learner: Any, kafka: Any) -> None:
    """Replay: an 'audit' group created after 20 events were published reads all of them
    from the first offset; billing, which read 10 before, continues after those 10. (The
    events are the test's own, written as publish_orders writes them: what is checked here
    is the reading side.)"""
    consume = learner.function("events", "consume")
    topic = kafka.create_topic("orders", 3)

    seed(kafka, topic, make_orders(0, 10))
    consume_exactly(consume, kafka, topic, "billing", order_ids(make_orders(0, 10)),
                    "is running from the start")
    seed(kafka, topic, make_orders(10, 10))

    audit = consume_exactly(consume, kafka, topic, "audit", order_ids(make_orders(0, 20)),
                            "joined after 20 events were published and should replay all of "
                            "them from the beginning of the log (a new group starts at "
                            "auto.offset.reset: 'earliest')")
    where = {(r["event"]["event_id"]): (r["partition"], r["offset"]) for r in read_log(kafka,
                                                                                      topic)}
    positions = [where[e["event_id"]] for e in audit]
    for partition in {p for p, _ in positions}:
        offsets = [o for p, o in positions if p == partition]
        assert offsets == sorted(offsets), (
            f"audit read partition {partition} out of order ({offsets}): a partition is an "
            "ordered log")
    consume_exactly(consume, kafka, topic, "billing", order_ids(make_orders(10, 10)),
                    "read the first 10 events before and should now get only the 10 new ones")


# consume(max_events=0)'s timeout: long enough for a read that wrongly takes events to get
# some. Its consumer joins the group and fetches about 0.3 s after the call; a right read
# returns at once and pays neither. The first try is short; only when the learner's consumer
# sent no Fetch within it (a slow group join on a loaded machine) is it tried again with the
# long one, so a wrong read is caught either way.
ZERO_READ_TIMEOUTS = (2.0, 8.0)


def check_a_read_of_none(consume: Callable[..., list[dict[str, Any]]], kafka: Any,
                         topic: str) -> None:
    """consume(max_events=0) with 20 events waiting: up to 0 events is none, and the
    group's position stays where it was (no commit)."""
    for timeout in ZERO_READ_TIMEOUTS:
        # A proxy that only watches tells whether the consumer got as far as fetching.
        with KafkaProxy(kafka.bootstrap) as proxy:
            got = consume(proxy.bootstrap, topic, kafka.group("billing"), 0, timeout)
            fetched = bool(proxy.requests(FETCH))
        committed = committed_offset(kafka, topic, "billing")
        if got or committed >= 0 or fetched:
            break
    assert not got and committed < 0, (
        f"consume(max_events=0) with 20 events waiting returned {len(got)} event(s), and "
        f"group billing committed "
        f"{'no position' if committed < 0 else f'position {committed}'}; expected no event "
        f"and no commit: up to 0 events is none\nCompare the count BEFORE taking an event "
        f"(while len(events) < max_events: ...), not only after appending one - checked "
        f"after, a limit of 0 is never met, and the read takes (and commits past) events "
        f"its caller asked not to be handed")


def test_a_small_read_commits_only_what_it_returns(learner: Any, kafka: Any) -> None:
    """20 events are waiting; billing reads 5, then 5, then the rest: a read commits the
    position after the events it RETURNS, not after everything the client fetched."""
    consume = learner.function("events", "consume")
    topic = kafka.create_topic("orders", 1)
    seed(kafka, topic, make_orders(0, 20))
    check_a_read_of_none(consume, kafka, topic)
    got: list[str] = []
    for waiting in (20, 15):
        batch = consume(kafka.bootstrap, topic, kafka.group("billing"), 5, 10.0)
        if waiting == 15 and len(batch) < 5:
            pytest.fail(
                f"billing read 5 of 20 events, then its next consume(max_events=5) returned "
                f"{len(batch)}: the first read committed the group's position past events it "
                f"fetched but did not return - commit the offsets of the events you return, "
                f"not the consumer's whole fetch", pytrace=False)
        assert len(batch) == 5, (
            f"consume(max_events=5) with {waiting} events waiting returned {len(batch)} "
            f"events: return at most max_events (and wait up to the timeout for them)")
        got += [str(e.get("order_id")) for e in batch]
        # Seen at once on the broker, instead of when the next read waits out its timeout
        # for events the group's position has already passed.
        committed = committed_offset(kafka, topic, "billing")
        if committed == len(got) - 1:
            pytest.fail(
                f"billing read {len(got)} of 20 events (offsets 0-{len(got) - 1}), and its "
                f"group committed position {committed}: the offset of the LAST event it "
                f"read, so its next read gets that event again. A committed offset is where "
                f"the next read starts: the last event's offset + 1", pytrace=False)
        if committed > len(got):
            pytest.fail(
                f"billing read {len(got)} of 20 events, and its group committed position "
                f"{committed} (partition 0): past events it fetched but did not return - "
                f"its next read would never see them. Commit the offsets of the events you "
                f"return, not the consumer's whole fetch", pytrace=False)
    # Exactly the 10 left: a right read returns as soon as it has them, instead of
    # waiting out its timeout for events that will never come.
    rest = consume(kafka.bootstrap, topic, kafka.group("billing"), 10, 10.0)
    got += [str(e.get("order_id")) for e in rest]
    want = order_ids(make_orders(0, 20))
    missing = [o for o in want if o not in got]
    assert not missing, (
        f"billing read 5, 5, then the rest, and never saw {len(missing)} of the 20 events "
        f"(e.g. {missing[:3]}): a read committed the group's position past events it fetched "
        f"but did not return - commit the offsets of the events you return, not the "
        f"consumer's whole fetch")
    assert got == want, (
        f"billing read the 20 events as {got}: expected each once, in order (one partition)")


READ_TIMEOUT = 2.0  # the timeout the test gives consume() while events keep trickling in
# (a correct read waits it out: kept short, since every run of the reference pays it)
TRICKLE_EVERY = 0.5  # one new event this often: never idle long enough to look finished


def test_a_read_gives_up_after_its_timeout(learner: Any, kafka: Any) -> None:
    """`timeout` bounds the whole read: with fewer events than max_events (3 waiting, one new
    every half second, max_events=1000), consume(..., timeout=2) must return what it has
    once its 2 s are up - not wait for events that may never come, nor restart its wait
    each time one arrives."""
    consume = learner.function("events", "consume")
    topic = kafka.create_topic("orders-trickle", 1)
    producer = Producer(kafka.producer_config())

    def send(n: int) -> None:
        order = make_orders(n, 1)[0]
        event = {"type": "OrderPlaced", "event_id": f"trickle-{n}", **order}
        producer.produce(topic, key=order["order_id"].encode(),
                         value=json.dumps(event).encode())
        producer.flush(10)

    for n in range(3):
        send(n)
    ended: dict[str, Any] = {}
    # The learner's consumer reaches the broker through a proxy that only watches: its first
    # Fetch request comes after its read began (after it joined the group), so a consume()
    # that keeps its timeout has returned within AFTER_SEND_SLACK past READ_TIMEOUT from
    # there. One that has not is said so then, not after the slack a slow group join needs.
    proxy = KafkaProxy(kafka.bootstrap)

    def call() -> None:
        try:
            ended["events"] = consume(proxy.bootstrap, topic, kafka.group("billing"), 1000,
                                      READ_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            ended["raised"] = exc

    reader = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    reader.start()
    sent = 3
    deadline = started + READ_TIMEOUT + GIVE_UP_SLACK
    while reader.is_alive() and time.monotonic() < deadline:
        reader.join(TRICKLE_EVERY)
        fetched = proxy.requests(FETCH)
        if fetched:
            deadline = min(deadline, fetched[0].at + READ_TIMEOUT + AFTER_SEND_SLACK)
        if reader.is_alive():
            send(sent)
            sent += 1
    took = time.monotonic() - started
    since_fetch = time.monotonic() - fetched[0].at if fetched else None
    if reader.is_alive():
        # The proxy stays open for the consumer still reading: closed under it, librdkafka
        # would log a refused reconnect every few milliseconds for the rest of the run.
        reading = (f" ({since_fetch:.0f} s after its consumer's first Fetch request)"
                   if since_fetch is not None else "")
        pytest.fail(
            f"consume(max_events=1000, timeout={READ_TIMEOUT:g}) had not returned after "
            f"{took:.0f} s{reading}, with {sent} events published to the topic (3 waiting, "
            f"then one every {TRICKLE_EVERY:g} s): `timeout` bounds the whole read - take a "
            f"deadline when the read starts and return the events you have once it passes. "
            f"Waiting "
            f"until max_events have come (polling with `timeout` each time), or restarting "
            f"the wait whenever an event arrives, never returns while orders keep coming, "
            f"and a service that reads in rounds stalls on the first", pytrace=False)
    proxy.close()
    if "raised" in ended:
        raise ended["raised"]
    ids = order_ids(ended["events"])
    published = set(order_ids(make_orders(0, sent)))
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    assert set(ids) <= published and not repeated, (
        f"consume returned {ids[:10]}...: expected events of the topic, each once "
        f"(repeated: {repeated[:5]})")


def fresh_process(learner: Any, order: dict[str, Any], count: int) -> Any:
    """A new process of the learner's code (a restart of the order service): events.py
    imported afresh, nothing kept from before, printing ``count`` event ids from
    order_placed(order). Started here, read by ids_from: two start side by side."""
    prelude = (
        "import json\nimport events\n"
        f"order = json.loads({json.dumps(json.dumps(order))})\n"
        f"print(json.dumps([str(events.order_placed(dict(order)).get('event_id')) "
        f"for _ in range({count})]))\n"
        "raise SystemExit(0)")
    return learner.python("events", prelude=prelude, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def ids_from(proc: Any) -> list[str]:
    """The event ids a fresh_process printed."""
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("importing events.py and calling order_placed() in a new process took "
                    "more than 60 s", pytrace=False)
    lines = out.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"importing events.py and calling order_placed() in a new process failed (exit "
        f"{proc.returncode}): {err.decode(errors='replace')[-1500:]}")
    return [str(i) for i in json.loads(lines[-1])]


def test_each_event_has_an_id_of_its_own(learner: Any) -> None:
    """An event id names one event - this placing of an order - not the order: the same
    order placed twice (a customer resubmits, a retry after a timeout) is two OrderPlaced
    events, and they must not share an id, in one process or after a restart (a new
    process: ids already in the log must not come again)."""
    order_placed = learner.function("events", "order_placed")
    order = make_orders(7, 1)[0]
    ids = [str(order_placed(dict(order)).get("event_id")) for _ in range(200)]
    restarts = [fresh_process(learner, order, 100) for _ in range(2)]
    try:
        for proc in restarts:
            ids += ids_from(proc)
    finally:
        for proc in restarts:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    distinct = len(set(ids))
    shared = sorted({i for i in ids if ids.count(i) > 1})
    assert distinct == len(ids), (
        f"order_placed() was called 400 times with the same order ({order['order_id']}: 200 "
        f"times here, then 100 times in each of two new processes, as after restarts of the "
        f"order service): {distinct} distinct event ids, e.g. {shared[:2]} shared by several "
        f"events. An event id must name one event, whatever the order says and whenever it "
        f"was made: derived from the order's content, from a clock, or from a counter that "
        f"starts again with the process, two events get one id, and a consumer that "
        f"deduplicates by event_id (ph5.10) drops the second as a redelivery - use a random "
        f"id (uuid.uuid4())")
