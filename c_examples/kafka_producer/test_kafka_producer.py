"""ph5.c verification: the compiled librdkafka producer against a live Kafka 4 broker.

The learner's producer.c is built with the harness main.c (-Wall -Wextra -Werror, ASan and
UBSan, linked against the system librdkafka) and run as its own process with KEY=VALUE
arguments. A Python confluent-kafka consumer then reads what the broker stored. The partition
each key must land in is not computed here: a Python producer configured with the
Java-compatible partitioner (murmur2_random) places the same keys in a twin topic, and the
C program must agree with it. A value past the client's message.max.bytes, which
rd_kafka_produce refuses for good, counts as failed and the rest are produced. Against a
broker that cannot be reached every message must come out counted as failed: the ones still
queued when the flush gives up too. A burst larger than librdkafka's local queue, read from
stdin while a proxy holds the broker's side, must all be delivered: QUEUE_FULL is
back-pressure to wait out, not a failure."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from labrunner.testing import KafkaProxy, process_activity, program_reading
from labrunner.testing.kafka_proxy import PRODUCE

SANITIZER_MARKS = ("LeakSanitizer", "AddressSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer")
PARTITIONS = 6
RUN_TIMEOUT = 60


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def counts(self) -> tuple[int, int] | None:
        found = re.search(r"delivered=(\d+) failed=(\d+)", self.stdout)
        return (int(found.group(1)), int(found.group(2))) if found else None


def binary_for(learner: Any) -> Path:
    """Built once per session (learner.build() keeps it)."""
    return Path(learner.build()) / "kafka_producer"


SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def did_not_finish(brokers: str) -> None:
    pytest.fail(f"kafka_producer did not finish within {RUN_TIMEOUT} s (brokers "
                f"{brokers}): bound every wait - message.timeout.ms gives up on a message "
                "that cannot be delivered, and rd_kafka_flush takes a timeout", pytrace=False)


def finished(code: int, stdout: str, stderr: str) -> Run:
    """The program's run, once any sanitizer report in it has failed the test."""
    reports = [m for m in SANITIZER_MARKS if m in stderr]
    if reports:
        found = re.search(r"ERROR: \w+Sanitizer: ([^\n(]+)", stderr)
        what = found.group(1).split(" on address")[0].strip() if found else "an error"
        frame = re.search(r"in (\w+) \S*producer\.c:(\d+)", stderr)
        where = f" in {frame.group(1)} (producer.c:{frame.group(2)})" if frame else ""
        pytest.fail(f"kafka_producer: {reports[0]}: {what}{where}: a memory or undefined-"
                    f"behaviour error\n{stderr[-2500:]}", pytrace=False)
    return Run(code, stdout, stderr)


def run_producer(learner: Any, brokers: str, topic: str, pairs: list[tuple[str, str]], *,
                 via_stdin: bool = False,
                 stuck: Callable[[list[str]], str | None] | None = None
                 ) -> tuple[Run, bool, str | None]:
    """The program's run, whether it ended within RUN_TIMEOUT (killed otherwise, with what it
    printed until then), and why it was killed early if ``stuck`` (given the stderr lines so
    far) named a reason: a program seen going round in a loop that never ends is not waited
    on for RUN_TIMEOUT. via_stdin: the pairs go in on stdin, for values longer than one
    command-line argument may be (128 KiB)."""
    args = [str(binary_for(learner)), brokers, topic]
    args += ["-"] if via_stdin else [f"{k}={v}" for k, v in pairs]
    lines = "".join(f"{k}={v}\n" for k, v in pairs) if via_stdin else None
    # learner.popen: when grading, the learner's binary runs as the learner's uid.
    with learner.popen(args, stdin=subprocess.PIPE if via_stdin else subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, **SANITIZER_ENV}) as proc:
        out: list[str] = []
        err: list[str] = []
        readers = [threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
                   for s, into in ((proc.stdout, out), (proc.stderr, err))]
        if lines is not None:
            readers.append(threading.Thread(target=feed, args=(proc, lines), daemon=True))
        for reader in readers:
            reader.start()
        deadline, why = time.monotonic() + RUN_TIMEOUT, None
        while proc.poll() is None and time.monotonic() < deadline:
            why = stuck(list(err)) if stuck else None
            if why:
                break
            time.sleep(0.05)
        ended = proc.poll() is not None
        if not ended:
            proc.kill()
        proc.wait()
        for reader in readers:
            reader.join(10)
    return finished(proc.returncode, "".join(out), "".join(err)), ended, why


def feed(proc: subprocess.Popen[str], lines: str) -> None:
    """Write ``lines`` to the program's stdin and close it (a program that stopped reading
    or exited is no error of the test's)."""
    try:
        assert proc.stdin is not None
        proc.stdin.write(lines)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def produce(learner: Any, brokers: str, topic: str, pairs: list[tuple[str, str]]) -> Run:
    run, ended, _ = run_producer(learner, brokers, topic, pairs)
    if not ended:
        did_not_finish(brokers)
    return run


def java_partitions(kafka: Any, keys: set[str]) -> dict[str, int]:
    """Where a Java-compatible producer (confluent-kafka, partitioner murmur2_random) puts
    each key, observed on the broker through a twin topic."""
    twin = kafka.create_topic("twin", PARTITIONS)
    placed: dict[str, int] = {}

    def report(err: Any, msg: Any) -> None:
        assert err is None, f"the test's own produce failed: {err}"
        placed[msg.key().decode()] = msg.partition()

    producer = Producer(kafka.producer_config(partitioner="murmur2_random"))
    for key in sorted(keys):
        producer.produce(twin, key=key.encode(), value=b"", on_delivery=report)
    assert producer.flush(15) == 0
    return placed


def read_topic(kafka: Any, topic: str, partitions: int) -> list[tuple[int, str, str]]:
    """(partition, key, value) of every record, in offset order per partition."""
    consumer = Consumer(kafka.consumer_config("test-reader", **{
        "enable.auto.commit": False, "enable.partition.eof": True, "fetch.wait.max.ms": 10}))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    records: list[tuple[int, str, str]] = []
    at_end: set[int] = set()
    try:
        while len(at_end) < partitions:
            msg = consumer.poll(10)
            assert msg is not None, "reading the topic back timed out"
            if msg.error():
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                at_end.add(msg.partition())
                continue
            records.append((msg.partition(), (msg.key() or b"").decode(),
                            (msg.value() or b"").decode()))
    finally:
        consumer.close()
    return records


KEYS = ["customer-1", "customer-2", "order-17", "order-42", "sku-9", "a", "zz", "customer-300"]
PAIRS = [(KEYS[n % len(KEYS)], f"event-{n}") for n in range(30)]


def test_keyed_events_land_where_java_would_put_them(learner: Any, kafka: Any) -> None:
    topic = kafka.create_topic("events", PARTITIONS)
    run = produce(learner, kafka.bootstrap, topic, PAIRS)
    counted = run.counts()
    assert counted is None or sum(counted) >= len(PAIRS), (
        f"kafka_producer printed {run.stdout.strip()!r}: only {sum(counted or (0, 0))} of "
        f"{len(PAIRS)} messages got a delivery report before produce_events returned - "
        "rd_kafka_flush(rk, timeout) before rd_kafka_destroy waits for every report (and "
        f"serves delivery_cb); destroy does not\n{run.stderr[-800:]}")
    assert run.code == 0 and run.counts() == (30, 0), (
        f"kafka_producer printed {run.stdout.strip()!r} and exited {run.code}; expected "
        f"'delivered=30 failed=0' and exit 0: count each delivery report\n{run.stderr[-800:]}")

    records = read_topic(kafka, topic, PARTITIONS)
    sent_keys = {k for k, _ in PAIRS}
    odd = sorted({k for _, k, _ in records if k and k not in sent_keys})
    assert not odd, (
        f"the topic holds keys that were never sent: {odd[:4]!r} (sent: {sorted(sent_keys)}): "
        "the key length given to rd_kafka_produce is not the key's - strlen(keys[i]), not "
        "sizeof(keys[i]) (a pointer's size) nor strlen + 1")
    keyless = [v for _, k, v in records if not k]
    assert not keyless, (
        f"{len(keyless)} of the {len(records)} records have no key (e.g. the one with value "
        f"{keyless[0]!r}): pass keys[i] and strlen(keys[i]) to rd_kafka_produce - without a "
        "key the partitioner has nothing to hash, and one key's events scatter")
    got = sorted((k, v) for _, k, v in records)
    assert got == sorted(PAIRS), (
        f"the topic holds {len(records)} records; expected each of the 30 key=value pairs "
        "exactly once")
    java = java_partitions(kafka, set(KEYS))
    stray = sorted({(k, p, java[k]) for p, k, _ in records if p != java.get(k, p)})
    assert not stray, (
        f"key {stray[0][0]!r} went to partition {stray[0][1]}, a Java client puts it in "
        f"{stray[0][2]} ({len(stray)} keys differ): librdkafka's default partitioner "
        "(consistent_random, CRC32) is not Java's - set partitioner=murmur2_random")
    for key in KEYS:
        values = [v for _, k, v in records if k == key]
        sent = [v for k, v in PAIRS if k == key]
        assert values == sent, (
            f"key {key!r}: the partition holds {values}, sent in the order {sent}: one key, "
            "one partition, in order")


def small_topic_and_lone_key(kafka: Any, name: str) -> tuple[str, str]:
    """A topic that accepts records up to 1,000 bytes, and a key for the big message that no
    small one (keys ok-1, ok-2) shares a partition with: the big one travels in a batch of
    its own, so the broker's refusal of it cannot take the small ones along."""
    topic = kafka.create_topic(name, PARTITIONS, **{"max.message.bytes": "1000"})
    java = java_partitions(kafka, {"ok-1", "ok-2"} | {f"big-{n}" for n in range(20)})
    big = next(k for k in sorted(java) if k.startswith("big-")
               and java[k] not in (java["ok-1"], java["ok-2"]))
    return topic, big


def test_a_rejected_message_is_counted_and_reported(learner: Any, kafka: Any) -> None:
    """The topic accepts records up to 1,000 bytes: one 5,000-byte value is rejected by the
    broker (its delivery report carries the error); the two small ones are delivered."""
    topic, big = small_topic_and_lone_key(kafka, "small")
    pairs = [("ok-1", "small"), (big, "x" * 5000), ("ok-2", "small too")]
    run = produce(learner, kafka.bootstrap, topic, pairs)
    stored = sorted(k for _, k, _ in read_topic(kafka, topic, PARTITIONS))
    lost = sorted({"ok-1", "ok-2"} - set(stored))
    if run.counts() == (3, 0) and lost:
        pytest.fail(
            f"kafka_producer printed {run.stdout.strip()!r}, yet {lost} never reached the "
            f"topic (it holds {stored}): a message reported delivered that the broker does "
            "not have - with acks=0 a message counts as sent once it leaves the client, and "
            "the broker closing the connection over the refused one drops what follows. Set "
            "acks=all: delivered must mean stored", pytrace=False)
    if run.counts() == (3, 0) and stored == ["ok-1", "ok-2"]:
        refused = f"the broker refused the 5,000-byte one (the topic holds only {stored})"
        if big in run.stderr:  # the delivery report's error reached stderr, not the counts
            pytest.fail(
                f"kafka_producer printed {run.stdout.strip()!r}, though {refused} and its "
                f"failed delivery report was printed ({run.stderr.strip()[-160:]!r}): the "
                "counts do not come from the delivery reports - count in delivery_cb, "
                "delivered or failed by msg->err, not when rd_kafka_produce queues a message",
                pytrace=False)
        pytest.fail(
            f"kafka_producer printed {run.stdout.strip()!r}: every delivery report counted as "
            f"a success, though {refused}, and nothing on stderr says so. Either delivery_cb "
            "ignores msg->err (count the message as failed and print rd_kafka_err2str when it "
            "is set) or the producer runs with acks=0, where the broker never answers and "
            "every report is a success: set acks=all", pytrace=False)
    assert run.counts() == (2, 1) and run.code == 1, (
        f"kafka_producer printed {run.stdout.strip()!r} and exited {run.code}; expected "
        "'delivered=2 failed=1' and exit 1: the broker rejected the 5,000-byte message - "
        "the delivery report callback sees msg->err for it and must count it as failed\n"
        f"{run.stderr[-800:]}")
    assert "too large" in run.stderr.lower() or "size" in run.stderr.lower(), (
        f"the failure was not reported on stderr (got {run.stderr.strip()[-300:]!r}): print "
        "rd_kafka_err2str(msg->err) for a failed delivery")
    assert stored == ["ok-1", "ok-2"], f"the topic holds {stored}, expected ok-1 and ok-2"


HUGE = 2_000_000  # bytes: past the client's own message.max.bytes (1,000,000 by default)
# A program that printed the refused message's key this many times (not counting librdkafka's
# own log) is producing it again and again: killed then, not at RUN_TIMEOUT. A right one
# names it once, in its one refusal.
REFUSALS_SEEN = 5


def test_a_message_the_client_refuses_counts_as_failed(learner: Any, kafka: Any) -> None:
    """A 2,000,000-byte value between two small ones: rd_kafka_produce refuses it at once
    (MSG_SIZE_TOO_LARGE), for good - no delivery report will ever come for it. It counts as
    failed, the error is printed, and the next message is produced: only QUEUE_FULL is worth
    producing again."""
    topic, big = small_topic_and_lone_key(kafka, "refused")
    pairs = [("ok-1", "small"), (big, "x" * HUGE), ("ok-2", "small too")]
    started = time.monotonic()

    def refused_again_and_again(stderr: list[str]) -> str | None:
        said = [line for line in stderr if big in line and not line.startswith("%")]
        if len(said) < REFUSALS_SEEN:
            return None
        return (f"printed the refusal of the {HUGE:,}-byte value (key {big}, between two "
                f"small ones) {len(said)} times in {time.monotonic() - started:.1f} s: it "
                "produces that message again and again")

    run, ended, stuck = run_producer(learner, kafka.bootstrap, topic, pairs, via_stdin=True,
                                     stuck=refused_again_and_again)
    said = run.stderr.strip().splitlines()[-1:] or ["nothing on stderr"]
    if not ended:
        lead = stuck or (f"was still running {RUN_TIMEOUT} s after it was handed a "
                         f"{HUGE:,}-byte value (between two small ones)")
        pytest.fail(
            f"kafka_producer {lead} and had to be killed; its stderr "
            f"ended with {said[0][:200]!r}. rd_kafka_produce refuses such a message for good "
            "(MSG_SIZE_TOO_LARGE: past message.max.bytes) - producing it again refuses it "
            "again, forever. Only RD_KAFKA_RESP_ERR__QUEUE_FULL is temporary (wait with "
            "rd_kafka_poll, then produce again); any other error: count the message as "
            "failed, print rd_kafka_err2str, and go on with the next one", pytrace=False)
    stored = sorted(k for _, k, _ in read_topic(kafka, topic, PARTITIONS))
    counted = run.counts()
    if counted is not None and sum(counted) < len(pairs) and "ok-2" in stored:
        pytest.fail(
            f"kafka_producer printed {run.stdout.strip()!r} for {len(pairs)} messages: the "
            f"{HUGE:,}-byte one, which rd_kafka_produce refused at once (MSG_SIZE_TOO_LARGE), "
            "was counted neither delivered nor failed. A message rd_kafka_produce refuses "
            "(anything but QUEUE_FULL) is never queued, so no delivery report comes for it: "
            "count it as failed right there", pytrace=False)
    assert "ok-2" in stored, (
        f"kafka_producer printed {run.stdout.strip()!r} and the topic holds only {stored}: "
        f"ok-2, produced after the refused {HUGE:,}-byte message, never reached it. A "
        "refusal from rd_kafka_produce is that message's alone: count it as failed and go on "
        f"producing the rest\n{run.stderr[-600:]}")
    assert counted == (2, 1) and run.code == 1, (
        f"kafka_producer printed {run.stdout.strip()!r} and exited {run.code}; expected "
        f"'delivered=2 failed=1' and exit 1: the {HUGE:,}-byte message was refused (by "
        f"rd_kafka_produce, or by the broker if the client's message.max.bytes was raised) "
        f"and the two small ones delivered\n{run.stderr[-600:]}")
    assert "too large" in run.stderr.lower() or "size" in run.stderr.lower(), (
        f"the refusal was not reported on stderr (got {run.stderr.strip()[-300:]!r}): print "
        "rd_kafka_err2str(rd_kafka_last_error()) when rd_kafka_produce refuses a message")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def second_producer(stderr: list[str]) -> str | None:
    """librdkafka names each client it creates in a process rdkafka#producer-1, -2, ... in
    its log lines: a second one means a client was built for another message."""
    named = [line for line in stderr if "rdkafka#producer-2" in line]
    return (f"created a second librdkafka producer (its log names rdkafka#producer-2: "
            f"{named[0].strip()[:160]!r})") if named else None


def test_messages_that_never_got_a_report_count_as_failed(learner: Any) -> None:
    """No broker listens at the address given: no message can be delivered. Each one ends
    either with a failed delivery report (message.timeout.ms) or still queued when
    rd_kafka_flush() gives up - and then it is a failure too, never left uncounted."""
    pairs = [("a", "1"), ("b", "2"), ("c", "3")]
    brokers = f"127.0.0.1:{closed_port()}"
    run, ended, why = run_producer(learner, brokers, "unreachable", pairs,
                                   stuck=second_producer)
    if why:
        pytest.fail(
            f"kafka_producer {why}, and was killed then: it builds a client per message, and "
            "each waits out its own flush against a broker that cannot be reached. One "
            "producer for all the messages: create it once, produce everything, flush once, "
            "destroy", pytrace=False)
    if not ended:
        did_not_finish(brokers)
    counted = run.counts()
    if counted is not None and sum(counted) < len(pairs):
        pytest.fail(
            f"kafka_producer printed {run.stdout.strip()!r} for {len(pairs)} messages to a "
            f"broker that cannot be reached: {len(pairs) - sum(counted)} of them counted "
            "neither delivered nor failed. They were still queued, without a delivery report, "
            "when rd_kafka_flush() returned RD_KAFKA_RESP_ERR__TIMED_OUT: count those as "
            "failed (rd_kafka_outq_len says how many), or set message.timeout.ms below the "
            f"flush timeout so librdkafka fails each one in its report\n{run.stderr[-600:]}",
            pytrace=False)
    assert counted == (0, len(pairs)) and run.code == 1, (
        f"kafka_producer printed {run.stdout.strip()!r} and exited {run.code} with no broker "
        f"reachable; expected 'delivered=0 failed={len(pairs)}' and exit 1: nothing can be "
        f"delivered\n{run.stderr[-600:]}")
    own = [line for line in run.stderr.splitlines() if line.strip()
           and not line.startswith("%")]  # librdkafka's own log lines start with %
    assert own, (
        "every message failed but the program printed nothing on stderr (only librdkafka's "
        "own log): print why - the delivery report's rd_kafka_err2str(msg->err), or how "
        "many were left after the flush")


BURST = 150_000   # messages: past librdkafka's local queue (queue.buffering.max.messages 100,000)
# The broker's side is held until the program has queued all it can: its threads all asleep
# in QUIET_READINGS readings in a row, 20 ms apart (producing, its main thread runs or waits
# to run; waiting for room, it sleeps in rd_kafka_poll), or STALL_CAP seconds went by - about
# a second on a loaded machine, well within any message.timeout.ms a producer may choose.
QUIET_READINGS = 10
STALL_CAP = 4.0


def wait_until_queued_all_it_can(learner: Any, proc: subprocess.Popen[str]) -> None:
    deadline, quiet = time.monotonic() + STALL_CAP, 0
    while quiet < QUIET_READINGS and proc.poll() is None and time.monotonic() < deadline:
        awake, _, _ = program_reading(learner, proc, process_activity)
        quiet = quiet + 1 if awake == 0 else 0
        time.sleep(0.02)


# One producer connects to the bootstrap address and to the broker it names (a reconnection
# or two more): a program seen opening more than this many connections builds a client per
# message, and is stopped there instead of being waited on for RUN_TIMEOUT.
CONNECTIONS_AT_MOST = 20


def watch_connections(proxy: KafkaProxy, proc: subprocess.Popen[str],
                      talker: threading.Thread) -> int:
    """Wait for the program's run (``talker``) to end, at most RUN_TIMEOUT + 5 s; kill the
    program if it opens more than CONNECTIONS_AT_MOST connections. Return how many it
    opened."""
    deadline = time.monotonic() + RUN_TIMEOUT + 5
    opened = 0
    while talker.is_alive() and time.monotonic() < deadline:
        opened = len({r.connection for r in proxy.requests()})
        if opened > CONNECTIONS_AT_MOST:
            proc.kill()
            talker.join(10)
            break
        talker.join(0.1)
    return opened


def test_a_burst_past_the_local_queue_waits_for_room(learner: Any, kafka: Any) -> None:
    """150,000 messages, more than librdkafka's local queue holds, while the broker's side is
    slow (the test holds the Produce requests at a proxy until the program has queued all it
    can): rd_kafka_produce answers QUEUE_FULL, which is back-pressure - serve the delivery
    reports (rd_kafka_poll) to make room and produce that message again - not a failure."""
    topic = kafka.create_topic("burst", 1)
    lines = "".join(f"k{n % 97}=v{n}\n" for n in range(BURST))
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.hold(PRODUCE)
        proc = learner.popen([str(binary_for(learner)), proxy.bootstrap, topic, "-"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **SANITIZER_ENV})
        outputs: dict[str, Any] = {}

        def communicate() -> None:
            try:
                outputs["out"] = proc.communicate(lines, timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()

        talker = threading.Thread(target=communicate, daemon=True)
        talker.start()
        try:
            while not proxy.requests(PRODUCE) and proc.poll() is None:
                time.sleep(0.02)
            wait_until_queued_all_it_can(learner, proc)
        finally:
            proxy.release(PRODUCE)
            opened = watch_connections(proxy, proc, talker)
    if opened > CONNECTIONS_AT_MOST:
        pytest.fail(
            f"kafka_producer opened {opened} connections to the broker for one burst (and "
            f"was killed then, with {len(proxy.requests(PRODUCE))} Produce requests sent): it "
            "builds a client (rd_kafka_new: connections, metadata, threads) per message - at "
            f"that pace {BURST:,} messages take far longer than the {RUN_TIMEOUT} s they "
            "get. One producer for all the messages: create it once, produce everything, "
            "flush once, destroy", pytrace=False)
    if "out" not in outputs:
        did_not_finish(proxy.bootstrap)
    run = finished(proc.returncode, *outputs["out"])
    refused = run.stderr.lower().count("queue full")
    counted = run.counts()
    if counted is not None and counted[1] and refused:
        pytest.fail(
            f"kafka_producer printed {run.stdout.strip()!r} for a burst of {BURST:,} messages "
            f"to a healthy broker (its answers held back at a proxy for a moment): "
            f"rd_kafka_produce refused {refused:,} of them with QUEUE_FULL - librdkafka's "
            f"local queue was full (queue.buffering.max.messages: 100,000) - and they were "
            f"counted failed, never sent. QUEUE_FULL is back-pressure, not a failure: serve "
            f"the delivery reports, waiting for them (rd_kafka_poll(rk, 100), not a single "
            f"poll(rk, 0)), and produce the same message again until the queue takes it",
            pytrace=False)
    assert run.code == 0 and counted == (BURST, 0), (
        f"kafka_producer printed {run.stdout.strip()!r} and exited {run.code} for a burst of "
        f"{BURST:,} messages to a healthy broker; expected 'delivered={BURST} failed=0' and "
        f"exit 0\n{run.stderr[-800:]}")
