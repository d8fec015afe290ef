"""ph5.5 - RabbitMQ patterns on a real node: direct, topic, fanout and headers exchanges; a
dead-letter exchange for rejected and expired messages; per-message and per-queue TTL.

The learner's functions declare exchanges, queues and bindings on a channel the test hands
them; the test then publishes on its own channel (with publisher confirms, so every message is
routed before it looks) and reads what each queue holds. TTLs are 200 ms (and 0: a TTL too);
expiry is awaited by polling with a deadline."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from labrunner.testing import wait_until

DEADLINE = 5.0  # seconds to wait for a 200 ms TTL to fire


# --- helpers ---------------------------------------------------------------------------

@pytest.fixture
def channels(rabbitmq: Any) -> Iterator[tuple[Any, Any]]:
    """(the learner's channel, the test's own channel with publisher confirms), each on a
    connection of its own: the services that read a queue are never the connection that
    declared it (an exclusive queue refuses them)."""
    connections = [rabbitmq.connection(), rabbitmq.connection()]
    try:
        mine = connections[1].channel()
        mine.confirm_delivery()
        yield connections[0].channel(), mine
    finally:
        for connection in connections:
            if connection.is_open:
                connection.close()


def on_queue(queue: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The test's own use of a learner's queue; a queue exclusive to the learner's
    connection (405 RESOURCE_LOCKED) fails the test saying so."""
    try:
        return fn(*args, **kwargs)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 405:
            raise
        pytest.fail(
            f"the queue {queue!r} is exclusive to the connection that declared it: the test's "
            "own connection was refused (405 RESOURCE_LOCKED) - exclusive=True (the "
            "tutorial's throwaway queues) means no service on another connection can read "
            "it, and it is deleted when that connection closes. Declare the named queues "
            f"plainly\n(RabbitMQ: {exc.reply_text})", pytrace=False)


def call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a learner function; a channel the broker closed becomes a readable failure."""
    try:
        return fn(*args)
    except pika.exceptions.ChannelClosedByBroker as exc:
        closed = f"{what}: RabbitMQ closed the channel: {exc.reply_code} {exc.reply_text}"
        if exc.reply_code == 406 and "unknown delivery tag" in str(exc.reply_text):
            closed += (" - a message was acked or rejected twice: after basic_ack (or a "
                       "get with auto_ack=True) it is gone, and cannot be rejected any more; "
                       "ack only after the handler succeeded, reject only if it raised")
        if exc.reply_code == 404 and "no queue" in str(exc.reply_text):
            closed += (" - a routing key names a queue only through the default exchange "
                       "(''); a message for a named exchange goes where that exchange's "
                       "bindings route its key: publish to the exchange you are given")
    pytest.fail(closed, pytrace=False)


def drain(ch: Any, queue: str) -> list[str]:
    """Take every message the queue holds now (bodies, in queue order)."""
    bodies: list[str] = []
    while True:
        method, _props, body = on_queue(queue, ch.basic_get, queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body.decode())


def wait_for_message(ch: Any, queue: str) -> tuple[str, Any] | None:
    """The first message to arrive in ``queue`` within DEADLINE, or None."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        method, props, body = on_queue(queue, ch.basic_get, queue, auto_ack=True)
        if method is not None:
            return body.decode(), props
        time.sleep(0.05)
    return None


def death_of(props: Any) -> dict[str, Any]:
    deaths = (props.headers or {}).get("x-death") or [{}]
    return dict(deaths[0])


def expect_queues(ch: Any, want: dict[str, list[str]], why: str) -> None:
    for queue, expected in want.items():
        got = drain(ch, queue)
        assert sorted(got) == sorted(expected), (
            f"queue {queue!r} received {sorted(got)}; expected {sorted(expected)}: {why}")


def exchange_type_mismatch(rabbitmq: Any, exchange: str, want: str) -> str | None:
    """The exchange's type, asked of the broker over AMQP, when it is not ``want``: a
    declare of an existing exchange with another type is refused (406 PRECONDITION_FAILED),
    and the broker compares the type before any other property (durable, auto_delete...).
    The management API cannot be asked: the official image turns off the metrics collector,
    and its exchange detail then answers 500."""
    connection = rabbitmq.connection()
    try:
        channel = connection.channel()
        try:
            channel.exchange_declare(exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return f"no exchange at all ({exc.reply_code} {exc.reply_text})"
        channel = connection.channel()
        try:
            channel.exchange_declare(exchange, exchange_type=want)
        except pika.exceptions.ChannelClosedByBroker as exc:
            text = str(exc.reply_text)
            if exc.reply_code == 406 and "'type'" in text:
                current = text.rsplit("current is ", 1)[-1].strip("'\" ")
                return f"a {current!r} exchange"
        return None
    finally:
        connection.close()


def expect_exchange_type(rabbitmq: Any, exchange: str, want: str, what: str) -> None:
    """The broker's word on the exchange's type: another type can route the test's keys the
    same (a topic exchange bound on plain keys, or on '#') and differ on the next key."""
    got = exchange_type_mismatch(rabbitmq, exchange, want)
    assert got is None, (
        f"{what} declared {exchange!r} as {got}; expected a {want!r} exchange: "
        f"the exchange type is the routing rule - another type only happens "
        "to route these messages the same (a topic exchange reads '*' and '#' in a binding as "
        "wildcards where a direct exchange takes them literally; a topic binding '#' is not "
        "a fanout, which ignores keys by design and skips matching)")


def queue_counts(ch: Any, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of ``queue``, from the queue itself (a passive declare):
    the management API's figures are sampled every few seconds."""
    ok = on_queue(queue, ch.queue_declare, queue, passive=True).method
    return int(ok.message_count), int(ok.consumer_count)


def expect_no_consumer_left(ch: Any, queue: str) -> None:
    _ready, consumers = queue_counts(ch, queue)
    assert consumers == 0, (
        f"handle_one returned, and {queue!r} still has {consumers} consumer(s): it subscribed "
        "(basic_consume, or channel.consume() left with a break) and never cancelled - the "
        "broker keeps pushing the queue's messages to that channel, where they sit unacked, "
        "hidden from every other worker, until the channel closes. Take one message with "
        "basic_get, or cancel the consumer before returning")


# --- exchanges ---------------------------------------------------------------------------

def test_direct_exchange_routes_by_exact_key(learner: Any, channels: Any,
                                            rabbitmq: Any) -> None:
    setup_direct = learner.function("patterns", "setup_direct")
    theirs, mine = channels
    call("setup_direct", setup_direct, theirs, "logs-direct",
         {"errors": ["error"], "everything": ["info", "warning", "error"],
          "orders": ["order.*"]})
    for severity in ("info", "warning", "error", "debug"):
        mine.basic_publish("logs-direct", severity, severity.encode())
    # A direct key is literal: 'order.*' is a key like any other, no wildcard.
    for key in ("order.created", "order.*"):
        mine.basic_publish("logs-direct", key, key.encode())
    got_orders = drain(mine, "orders")
    assert got_orders == ["order.*"], (
        f"queue 'orders', bound to the direct exchange on the key 'order.*', received "
        f"{got_orders}; expected only the message whose key is exactly 'order.*': a direct "
        "exchange compares keys literally, '*' and '#' are wildcards only in a topic exchange")
    expect_queues(mine, {"errors": ["error"], "everything": ["info", "warning", "error"]},
                  "a direct exchange delivers to every queue bound with exactly the message's "
                  "routing key - bind the queue once per key ('debug' matches no binding and "
                  "is dropped)")
    expect_exchange_type(rabbitmq, "logs-direct", "direct", "setup_direct")


TOPIC_KEYS = ["billing.error", "billing.eu.error", "auth.error", "error", "billing.info",
              "billing", "billing.eu.west.warning", "auth.info"]


def test_topic_patterns_one_word_and_many(learner: Any, channels: Any,
                                          rabbitmq: Any) -> None:
    mod = learner.load("patterns")
    theirs, mine = channels
    every_error, all_billing = getattr(mod, "EVERY_ERROR", None), getattr(mod, "ALL_BILLING",
                                                                           None)
    assert isinstance(every_error, str) and isinstance(all_billing, str), (
        "define the topic patterns EVERY_ERROR and ALL_BILLING as strings in patterns.py")
    call("setup_topic", mod.setup_topic, theirs, "logs-topic",
         {"errors": [every_error], "billing": [all_billing]})
    for key in TOPIC_KEYS:
        mine.basic_publish("logs-topic", key, key.encode())
    got_errors, got_billing = drain(mine, "errors"), drain(mine, "billing")
    want_errors = ["billing.error", "billing.eu.error", "auth.error", "error"]
    want_billing = ["billing.error", "billing.eu.error", "billing.info", "billing",
                    "billing.eu.west.warning"]
    assert sorted(got_errors) == sorted(want_errors), (
        f"EVERY_ERROR = {every_error!r} matched {sorted(got_errors)}; expected "
        f"{sorted(want_errors)}: '*' stands for exactly one word, '#' for zero or more")
    assert sorted(got_billing) == sorted(want_billing), (
        f"ALL_BILLING = {all_billing!r} matched {sorted(got_billing)}; expected "
        f"{sorted(want_billing)}: '*' stands for exactly one word, '#' for zero or more")
    expect_exchange_type(rabbitmq, "logs-topic", "topic", "setup_topic")


# A topic exchange with several patterns per queue (the way a real consumer subscribes:
# `orders.*.eu` and `orders.created.#`), one pattern shared by two queues. Each case: a
# routing key and the queues that must receive it, once each (AMQP 0-9-1 / RabbitMQ's topic
# exchange: '*' is exactly one word, '#' zero or more; a queue gets one copy of a message
# however many of its bindings match it).
MULTI_TOPIC_BINDINGS = {
    "eu-orders": ["orders.*.eu", "orders.created.#"],
    "all-orders": ["orders.#"],
    "created": ["orders.created.#", "*.created.*"],
}
MULTI_TOPIC_CASES = [
    # two patterns of eu-orders and two of created match: one copy each
    ("orders.created.eu", ["eu-orders", "all-orders", "created"]),
    ("orders.shipped.eu", ["eu-orders", "all-orders"]),
    # '#' matches zero words: orders.created.# matches orders.created, orders.# orders
    ("orders.created", ["eu-orders", "all-orders", "created"]),
    ("orders", ["all-orders"]),
    # '*' is exactly one word, never zero: orders.*.eu does not match orders.eu
    ("orders.eu", ["all-orders"]),
    ("shop.created.uk", ["created"]),
    ("orders.created.eu.north", ["eu-orders", "all-orders", "created"]),
    ("created.eu", []),
]


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ's topic match, to explain a verdict: '*' one word, '#' zero or more."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])
    return match(pattern.split("."), key.split("."))


def test_topic_queue_bound_with_several_patterns(learner: Any, channels: Any,
                                                 rabbitmq: Any) -> None:
    setup_topic = learner.function("patterns", "setup_topic")
    theirs, mine = channels
    call("setup_topic", setup_topic, theirs, "orders-topic",
         {queue: list(patterns) for queue, patterns in MULTI_TOPIC_BINDINGS.items()})
    for key, _queues in MULTI_TOPIC_CASES:
        mine.basic_publish("orders-topic", key, key.encode())
    problems: list[str] = []
    unbound: set[tuple[str, str]] = set()   # (queue, pattern) bindings seen missing
    for queue, patterns in MULTI_TOPIC_BINDINGS.items():
        got = drain(mine, queue)
        want = [key for key, queues in MULTI_TOPIC_CASES if queue in queues]
        for key in want:
            matching = [p for p in patterns if topic_matches(p, key)]
            if key not in got:
                unbound |= {(queue, p) for p in matching}
                problems.append(
                    f"{queue!r} (bound with {patterns}) did not receive {key!r}, which its "
                    f"pattern {' and '.join(map(repr, matching))} matches")
            elif got.count(key) > 1:
                problems.append(
                    f"{queue!r} received {key!r} {got.count(key)} times (it matches "
                    f"{' and '.join(map(repr, matching))}): a queue gets one copy of a "
                    "message however many of its bindings match - bind every pattern to "
                    "the queue itself, on the one exchange")
        for key in sorted(set(got) - set(want)):
            problems.append(
                f"{queue!r} (bound with {patterns}) received {key!r}, which none of its "
                "patterns matches: '*' is exactly one word (never zero), '#' zero or more")
    shared = {p for queue, patterns in MULTI_TOPIC_BINDINGS.items() for p in patterns
              if any(p in theirs for other, theirs in MULTI_TOPIC_BINDINGS.items()
                     if other != queue)}
    missing = ", ".join(f"{queue} <- {p!r}" for queue, p in sorted(unbound))
    if unbound and all(p in shared for _queue, p in unbound):
        problems.insert(0, (
            f"every missing binding ({missing}) is a pattern another queue is bound with "
            "too: a pattern two queues share is a binding for each of them - bind every "
            "(queue, pattern) pair, not one queue per pattern (a pattern -> queue table "
            "keeps only one)"))
    elif unbound:
        problems.insert(0, (
            f"missing bindings: {missing} - each pattern of a queue is a binding of its "
            "own: bind the queue once per pattern in its list, not only the first"))
    assert not problems, "\n".join(problems)
    expect_exchange_type(rabbitmq, "orders-topic", "topic", "setup_topic")


def test_fanout_copies_to_every_queue(learner: Any, channels: Any, rabbitmq: Any) -> None:
    setup_fanout = learner.function("patterns", "setup_fanout")
    theirs, mine = channels
    call("setup_fanout", setup_fanout, theirs, "order-events", ["billing", "shipping", "audit"])
    for n, key in enumerate(("orders.placed", "", "anything")):
        mine.basic_publish("order-events", key, f"event-{n}".encode())
    everything = ["event-0", "event-1", "event-2"]
    expect_queues(mine, {"billing": everything, "shipping": everything, "audit": everything},
                  "a fanout exchange copies every message to every bound queue and ignores "
                  "the routing key")
    expect_exchange_type(rabbitmq, "order-events", "fanout", "setup_fanout")


def test_headers_exchange_all_and_any(learner: Any, channels: Any, rabbitmq: Any) -> None:
    setup_headers = learner.function("patterns", "setup_headers")
    theirs, mine = channels
    call("setup_headers", setup_headers, theirs, "documents", {
        "eu-pdf": ({"format": "pdf", "region": "eu"}, True),
        "urgent": ({"priority": "high", "customer": "vip"}, False),
    })
    messages = {
        "pdf-eu": {"format": "pdf", "region": "eu"},
        "pdf-us": {"format": "pdf", "region": "us"},
        "pdf-eu-high": {"format": "pdf", "region": "eu", "priority": "high"},
        "vip": {"customer": "vip"},
        "low": {"priority": "low"},
    }
    for body, headers in messages.items():
        mine.basic_publish("documents", "ignored", body.encode(),
                           properties=pika.BasicProperties(headers=headers))
    got_eu, got_urgent = drain(mine, "eu-pdf"), drain(mine, "urgent")
    assert sorted(got_eu) == ["pdf-eu", "pdf-eu-high"], (
        f"eu-pdf (format=pdf AND region=eu) received {sorted(got_eu)}; expected "
        "['pdf-eu', 'pdf-eu-high']: bind with the arguments {'x-match': 'all', 'format': "
        "'pdf', 'region': 'eu'}")
    assert sorted(got_urgent) == ["pdf-eu-high", "vip"], (
        f"urgent (priority=high OR customer=vip) received {sorted(got_urgent)}; expected "
        "['pdf-eu-high', 'vip']: bind with 'x-match': 'any'")
    expect_exchange_type(rabbitmq, "documents", "headers", "setup_headers")


# --- dead letters and TTL ----------------------------------------------------------------

def handle_each(mod: Any, theirs: Any, mine: Any) -> tuple[list[Any], list[str], list[str]]:
    """handle_one x5 over ok-1 bad-1 ok-2 bad-2: (its results, the bodies the handler
    took, what 'work' holds ready after), then the learner's channel closed - a message it
    took and never settled comes back to 'work' then, and fails the test."""
    handled: list[str] = []
    # A handler fails in more than one way: a message it refuses (ValueError) and a
    # dependency that timed out (TimeoutError). Either way the message is dead-lettered.
    failures = {b"bad-1": ValueError("cannot handle bad-1"),
                b"bad-2": TimeoutError("the payment service did not answer for bad-2")}

    def handler(body: bytes) -> None:
        if body in failures:
            raise failures[body]
        handled.append(body.decode())

    results = []
    for n in range(5):
        try:
            results.append(call("handle_one", mod.handle_one, theirs, "work", handler))
        except (ValueError, TimeoutError) as exc:
            pytest.fail(
                f"handle_one (message {n + 1} of 4) let the handler's {type(exc).__name__} "
                "escape: that message was neither acked nor rejected - it stays "
                "unacked until the channel closes, then comes back. Any exception of the "
                "handler must dead-letter the message (except Exception: basic_reject with "
                "requeue=False)", pytrace=False)
    expect_no_consumer_left(mine, "work")
    ready = drain(mine, "work")
    theirs.close()  # what the learner's channel still holds unsettled is requeued now
    held = drain(mine, "work")
    assert not held, (
        f"handle_one left {held} neither acked nor rejected (they came back to 'work' when "
        "the test closed its channel): a failed handler's message was kept unacknowledged - "
        "held from every other consumer until the channel closes, then redelivered, never "
        "dead-lettered. Settle every message taken: ack on success, basic_reject("
        "requeue=False) when the handler raised")
    return results, handled, ready


def test_rejected_message_goes_to_the_dead_letter_queue(learner: Any, channels: Any,
                                                        rabbitmq: Any) -> None:
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "work", "dlx", "dead")
    for body in ("ok-1", "bad-1", "ok-2", "bad-2"):
        mine.basic_publish("", "work", body.encode())
    results, handled, ready = handle_each(mod, theirs, mine)
    assert results == [True, True, True, True, False] and handled == ["ok-1", "ok-2"], (
        f"handle_one x5 returned {results} and handled {handled}; expected True x4, then "
        "False (queue empty), with ok-1 and ok-2 handled: a failed message must be rejected "
        "WITHOUT requeue, or it comes straight back and blocks the queue")
    dead = wait_for_message(mine, "dead")
    vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
    arguments = rabbitmq.api("GET", f"/queues/{vhost}/work").get("arguments") or {}
    routes = False
    if dead is None and "x-dead-letter-exchange" in arguments:
        # Does the dead-letter route work? The test sends a probe the way the broker
        # dead-letters (to the DLX, with the original or the configured routing key).
        mine.basic_publish(str(arguments["x-dead-letter-exchange"]),
                           str(arguments.get("x-dead-letter-routing-key", "work")), b"probe")
        routes = wait_for_message(mine, "dead") is not None
    assert dead is not None or not routes, (
        "bad-1 never reached the dead-letter queue, though 'work' has an "
        f"x-dead-letter-exchange ({arguments.get('x-dead-letter-exchange')!r}): handle_one "
        "took it with auto_ack=True (or acked it before the handler ran), so the broker had "
        "already deleted it when the handler failed - get with auto_ack=False, ack after "
        "success, basic_reject(requeue=False) on failure")
    assert dead is not None, (
        "bad-1 never reached the dead-letter queue: declare 'work' with "
        "x-dead-letter-exchange, and make sure the DLX routes to 'dead' - a dead-lettered "
        "message keeps its original routing key ('work'), so use a fanout DLX or set "
        "x-dead-letter-routing-key")
    body, props = dead
    death = death_of(props)
    assert body == "bad-1" and death.get("reason") == "rejected" and death.get(
        "queue") == "work", (
        f"the dead-letter queue got {body!r} with x-death {death}; expected bad-1, reason "
        "'rejected', from queue 'work'")
    second = wait_for_message(mine, "dead")
    assert second is not None and second[0] == "bad-2", (
        f"after bad-1 the dead-letter queue got {second and second[0]!r}; expected bad-2, "
        "whose handler raised TimeoutError: every failure of the handler dead-letters")
    assert ready + drain(mine, "work") == [] and drain(mine, "dead") == [], (
        "after the run 'work' and 'dead' should hold nothing more")


def test_handle_one_takes_one_message_and_leaves_the_rest(learner: Any,
                                                          channels: Any) -> None:
    """handle_one takes ONE message: the others stay ready for every worker of the queue,
    none held by the learner's channel after it returned."""
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "work", "dlx", "dead")
    for body in ("job-1", "job-2", "job-3"):
        mine.basic_publish("", "work", body.encode())
    handled: list[bytes] = []
    took = call("handle_one", mod.handle_one, theirs, "work", handled.append)
    assert took is True and handled == [b"job-1"], (
        f"handle_one returned {took!r} having handled {handled}; expected True and job-1")
    expect_no_consumer_left(mine, "work")
    rest: list[str] = []
    deadline = time.monotonic() + DEADLINE
    while len(rest) < 2 and time.monotonic() < deadline:
        rest += drain(mine, "work")
    assert rest == ["job-2", "job-3"], (
        f"after handle_one took job-1, another worker found {rest} in 'work'; expected "
        "job-2 and job-3, in order: handle_one must take one message and leave the rest "
        "ready for every consumer of the queue")


# Messages handle_one must hand to the handler as they came: (body, what it is, the mistake
# that loses it). A queue is empty only when basic_get returns no method.
EVERY_BODY: list[tuple[bytes, str, str]] = [
    (b"", "an empty body (an event whose data is all in its headers)",
     "`if not body` takes an empty message for an empty queue"),
    (b"\xff\xd8\xff\xe0 a jpeg's first bytes", "a body that is not UTF-8 text",
     "a body is bytes: decoding it (for a log line, a check) fails on binary payloads"),
]


def test_handle_one_hands_every_message_to_the_handler(learner: Any, channels: Any,
                                                       rabbitmq: Any) -> None:
    """Whatever a message holds, and however often it was delivered, handle_one runs the
    handler on it and acks it: an empty or binary body is a message, and a message that
    comes back because its first worker crashed before settling it (redelivered=True) was
    never handled - at-least-once delivery means handling it again, never dropping it."""
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "work", "dlx", "dead")
    for body, what, mistake in EVERY_BODY:
        mine.basic_publish("", "work", body)
        handled: list[bytes] = []
        try:
            took = call("handle_one", mod.handle_one, theirs, "work", handled.append)
        except Exception as exc:  # noqa: BLE001 - named to the learner
            pytest.fail(f"handle_one on a message with {what} ({body!r}) raised "
                        f"{type(exc).__name__}: {exc}, expected the handler to get it: "
                        f"{mistake}", pytrace=False)
        assert took is True and handled == [body], (
            f"handle_one on a message with {what} ({body!r}) returned {took!r}, and the "
            f"handler got {handled}; expected True and the handler to get {body!r} as it "
            f"came: {mistake}. The queue is empty only when basic_get returns no method")
    # A worker crashes mid-message: it took job-1 (unacked) and its connection dies.
    mine.basic_publish("", "work", b"job-1")
    crashed = rabbitmq.connection()
    try:
        method, _props, _body = crashed.channel().basic_get("work", auto_ack=False)
        assert method is not None, "the test's crashing worker found 'work' empty"
    finally:
        crashed.close()
    wait_until(lambda: queue_counts(mine, "work")[0] == 1,
               "the crashed worker's unacked message to be back in 'work'")
    handled = []
    took = call("handle_one", mod.handle_one, theirs, "work", handled.append)
    dead = drain(mine, "dead")
    assert took is True and handled == [b"job-1"] and dead == [], (
        f"job-1 came back to 'work' because the worker that took it crashed before acking "
        f"(redelivered=True); handle_one returned {took!r}, the handler got {handled} and "
        f"'dead' holds {dead}; expected True and the handler to get job-1: a redelivered "
        "message was NOT handled (its worker died first) - at-least-once delivery means "
        "handling it again (make the handler idempotent), never acking or dead-lettering it "
        "unseen")


def test_setup_run_again_keeps_what_the_queues_hold(learner: Any, channels: Any) -> None:
    """Every instance of a service declares what it needs when it starts, so a setup runs
    again over queues that hold messages. A declare is idempotent: nothing waiting in the
    work queue or the dead-letter queue may be lost to a restart."""
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "work", "dlx", "dead")
    mine.basic_publish("", "work", b"failed-earlier")
    method, _props, _body = on_queue("work", mine.basic_get, "work", auto_ack=False)
    assert method is not None, "the message the test published to 'work' never arrived"
    mine.basic_reject(method.delivery_tag, requeue=False)
    wait_until(lambda: queue_counts(mine, "dead")[0] == 1,
               "the message the test rejected from 'work' to reach 'dead'", timeout=DEADLINE)
    mine.basic_publish("", "work", b"waiting")
    call("setup_dead_lettering (run again, as at a restart)", mod.setup_dead_lettering,
         theirs, "work", "dlx", "dead")
    work, dead = drain(mine, "work"), drain(mine, "dead")
    assert work == ["waiting"] and dead == ["failed-earlier"], (
        f"after setup_dead_lettering ran again with the same arguments (a service restart), "
        f"'work' held {work} and 'dead' {dead}; expected ['waiting'] and ['failed-earlier']: "
        "the setup deleted or purged a queue that held messages - every job waiting and "
        "every dead letter not yet looked at is lost at each restart. Declare again as it "
        "is (a declare with the same arguments is a no-op); never delete or purge a queue "
        "in a setup")


def test_dead_letters_are_routed_whatever_their_key(learner: Any, channels: Any) -> None:
    """A dead letter keeps the routing key it was published with - the queue's name only when
    it came through the default exchange. Messages reach 'work' three ways (the default
    exchange, and a topic exchange of the test's with a one-word and a three-word key); the
    test rejects each (requeue=False) on its own channel, and every one must reach 'dead'."""
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "work", "dlx", "dead")
    mine.exchange_declare("events", exchange_type="topic")
    on_queue("work", mine.queue_bind, "work", "events", routing_key="#")
    sent = {"work": ("", "via-default"), "audit": ("events", "via-audit"),
            "billing.eu.error": ("events", "via-billing-eu-error")}
    for key, (exchange, body) in sent.items():
        mine.basic_publish(exchange, key, body.encode())
    rejected = 0
    while True:
        method, _props, _body = on_queue("work", mine.basic_get, "work", auto_ack=False)
        if method is None:
            break
        mine.basic_reject(method.delivery_tag, requeue=False)
        rejected += 1
    assert rejected == len(sent), f"'work' held {rejected} of the {len(sent)} messages sent"
    arrived: list[str] = []
    while len(arrived) < len(sent) and (dead := wait_for_message(mine, "dead")) is not None:
        arrived.append(dead[0])
    lost = {key: body for key, (_exchange, body) in sent.items() if body not in arrived}
    assert not lost, (
        f"rejected messages with the routing keys {sorted(lost)} never reached the dead-letter "
        f"queue (it got {sorted(arrived)}): a dead letter keeps its routing key, and a DLX "
        "that routes only some keys drops the rest silently - bind a fanout DLX, or a topic "
        "DLX with '#' (zero or more words; '*' is exactly one word), or set "
        "x-dead-letter-routing-key to the key the DLX binds")


def test_per_message_ttl_expires_into_the_dlx(learner: Any, channels: Any,
                                              rabbitmq: Any) -> None:
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "work", "dlx", "dead")
    call("publish_with_ttl", mod.publish_with_ttl, theirs, "", "work", b"short", 200)
    call("publish_with_ttl", mod.publish_with_ttl, theirs, "", "work", b"long", 60_000)
    dead = wait_for_message(mine, "dead")
    assert dead is not None, (
        f"a message published with a 200 ms TTL was not dead-lettered within {DEADLINE:.0f} s: "
        "set the AMQP 'expiration' property (a string of milliseconds, e.g. '200') - a "
        "header named x-message-ttl does nothing on a message")
    body, props = dead
    expiration = death_of(props).get("original-expiration")
    assert body != "short" or expiration in (None, "200"), (
        f"publish_with_ttl(..., ttl_ms=200) sent a message whose expiration was "
        f"{expiration!r}: AMQP's expiration is a string of MILLISECONDS - '200' here, not "
        "seconds or anything else")
    assert body == "short" and death_of(props).get("reason") == "expired", (
        f"the dead-letter queue got {body!r} with x-death {death_of(props)}; expected 'short', "
        "reason 'expired'")
    still = drain(mine, "work")
    if still != ["long"]:
        late = wait_for_message(mine, "dead") if "long" not in still else None
        if late is not None and late[0] == "long":
            pytest.fail(
                f"the message published with ttl_ms=60000 (60 s) was dead-lettered within "
                f"seconds, as {death_of(late[1]).get('reason')!r} with expiration "
                f"{death_of(late[1]).get('original-expiration')!r}: expiration is a string "
                "of MILLISECONDS ('60000')", pytrace=False)
    assert still == ["long"], (
        f"'work' holds {still}; expected only 'long' (60 s TTL): each message carries its own "
        "expiration")
    # A TTL of 0 is a TTL: deliver at once or expire (work has no consumer: it expires).
    call("publish_with_ttl", mod.publish_with_ttl, theirs, "", "work", b"now-or-never", 0)
    dead = wait_for_message(mine, "dead")
    if dead is None:
        left = drain(mine, "work")
        pytest.fail(
            f"publish_with_ttl(..., ttl_ms=0) into 'work' (no consumer) was not dead-lettered "
            f"within {DEADLINE:.0f} s, expected it to expire at once (reason 'expired'); "
            f"'work' still holds {left}: a TTL of 0 was sent as no expiration at all\n"
            "In RabbitMQ an expiration of '0' means 'deliver now or expire', not 'never "
            "expires': send expiration=str(ttl_ms) for every ttl_ms, 0 included (test "
            "`ttl_ms is not None`, never its truth).", pytrace=False)
    assert dead[0] == "now-or-never" and death_of(dead[1]).get("reason") == "expired", (
        f"after publish_with_ttl(..., ttl_ms=0) the dead-letter queue got {dead[0]!r} with "
        f"x-death {death_of(dead[1])}; expected 'now-or-never', reason 'expired'")
    # Through a named exchange whose key is no queue's name: the message goes where the
    # exchange routes it, not to a queue named after the key.
    mine.exchange_declare("jobs", exchange_type="direct")
    on_queue("work", mine.queue_bind, "work", "jobs", routing_key="job.new")
    call("publish_with_ttl", mod.publish_with_ttl, theirs, "jobs", "job.new", b"routed", 200)
    dead = wait_for_message(mine, "dead")
    if dead is None:
        vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
        stray = [f"{q['name']!r} ({q.get('messages', '?')} message(s))"
                 for q in rabbitmq.api("GET", f"/queues/{vhost}")
                 if q["name"] not in ("work", "dead")]
        pytest.fail(
            "publish_with_ttl(ch, 'jobs', 'job.new', b'routed', 200) never reached 'work' "
            "(bound to the direct exchange 'jobs' on 'job.new') and was not dead-lettered "
            f"within {DEADLINE:.0f} s; other queues in the vhost: {stray or 'none'}\n"
            "publish_with_ttl publishes to the exchange it is given: basic_publish(exchange, "
            "routing_key, ...) - through the default exchange ('') the routing key names a "
            "queue, and a message for a queue that does not exist is dropped silently (or "
            "lands in a queue declared on the spot that nobody reads).", pytrace=False)
    death = death_of(dead[1])
    assert dead[0] == "routed" and death.get("reason") == "expired" and death.get(
        "exchange") == "jobs", (
        f"publish_with_ttl(ch, 'jobs', 'job.new', ...) was dead-lettered as {dead[0]!r} with "
        f"x-death {death}; expected 'routed', reason 'expired', published to exchange 'jobs'")


def test_per_queue_ttl_expires_into_the_dlx(learner: Any, channels: Any,
                                            rabbitmq: Any) -> None:
    mod = learner.load("patterns")
    theirs, mine = channels
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "slow-work", "dlx2", "dead2",
         200)
    vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
    arguments = rabbitmq.api("GET", f"/queues/{vhost}/slow-work")["arguments"]
    assert arguments.get("x-message-ttl") == 200 and arguments.get(
        "x-dead-letter-exchange") == "dlx2", (
        f"the broker shows slow-work's arguments as {arguments}; expected x-message-ttl 200 "
        "(an integer, milliseconds) and x-dead-letter-exchange 'dlx2'")
    call("setup_dead_lettering", mod.setup_dead_lettering, theirs, "instant-work", "dlx3",
         "dead3", 0)
    instant = rabbitmq.api("GET", f"/queues/{vhost}/instant-work")["arguments"]
    assert instant.get("x-message-ttl") == 0, (
        f"setup_dead_lettering(..., queue_ttl_ms=0) declared instant-work with the arguments "
        f"{instant}: expected x-message-ttl 0 - a TTL of 0 is a TTL (a message expires unless "
        "it is delivered at once), not 'no TTL'; test `queue_ttl_ms is not None`, not its "
        "truth")
    mine.basic_publish("", "slow-work", b"stale")
    dead = wait_for_message(mine, "dead2")
    assert dead is not None and dead[0] == "stale" and death_of(dead[1]).get(
        "reason") == "expired", (
        f"a message left in slow-work (queue TTL 200 ms) should be dead-lettered with reason "
        f"'expired' within {DEADLINE:.0f} s; got {dead and (dead[0], death_of(dead[1]))}")
