"""ph5.4 - delivery semantics, proven by a real crash.

The learner's worker runs as its own process (``python semantics.py MODE ...``). At its 4th
record it reaches the lab's crash point - between its two steps - and dies there at once by
SIGKILL: nothing the client library still holds is sent afterwards (a hook that only froze the
process would let librdkafka's threads finish an unflushed delivery or an asynchronous commit
in the background, and hide those mistakes). The test looks at what the broker holds, starts
the worker again and lets it finish.

* at-most-once loses the 4th record (its offset was committed, its output never written);
* at-least-once writes it twice (its output was written, its offset not committed);
* exactly-once writes it once: the killed run's transaction is aborted by the restarted run
  (same transactional.id), and read_committed readers never see the aborted copy.

The input topic itself holds an aborted transaction of two "poison" records, which a worker
reading with read_committed never sees.

Mistakes a learner makes here, each caught with its own message:
- at-most-once committing after producing                       -> the offset at the crash
  (an asynchronous commit is named when it is seen still in the client at the crash; it
  usually leaves the client within microseconds, so it is not reliably observable)
- at-least-once without waiting for the ack (no flush)          -> pay-3 missing at the crash
- at-least-once committing first                                -> the offset at the crash
- committing the record's own offset, not the next one          -> off by one, named
- a restarted worker starting from the beginning, not from the committed offset
- an output record without its input's key (or with another): every payment has a key of its
  own, and each output's key is read back
- at-least-once waiting for the ack longer than its --ack-timeout (flush(30), flush() with no
  timeout) while the proxy holds its output: named at that flush() call, which says its
  timeout on stderr (FLUSH_WATCH) - not 8 s later, when a worker still waiting is seen idle
- at-least-once trusting flush() returning 0 when the broker REFUSED an output (a record
  larger than the output topic's max.message.bytes): the offset committed past a lost output
- taking a poll() that returns nothing for the end of the input: the proxy holds the worker's
  fetches (a broker slow to answer) until its polls have come back empty twice and 3 s have
  passed (15 s at most: a poll(5) or a poll(10) meets its empty answer too), and the worker
  must still process it all - neither stop as if done nor raise
- taking any consumer error for the end of the input, or for a record: the proxy fails the
  first Fetch answer carrying the input (TOPIC_AUTHORIZATION_FAILED), and the worker must
  raise, or go on to the end - not exit 0 with the input unprocessed
- exactly-once aborting a failed transaction (the broker refused its output) and going on
  with the next record: a later transaction commits an offset past the lost one
- exactly-once: offsets committed by the consumer, idempotence without a transaction, a fresh
  transactional.id per run (no fencing: named from the two runs' InitProducerId requests,
  read by a proxy that only watches - at once, rather than after the 30 s the restarted
  worker waits on the open transaction, and also when a short transaction.timeout.ms lets
  the broker abort it and the restarted run finish), reading read_uncommitted (poison
  records), a transactional.id shared by workers running at once (the group alone, the
  input alone, a constant: they fence each other - three workers run together, one held
  mid-transaction)

Two mistakes hide from a crash at crash_point(), because librdkafka finishes them in the
background before the kill; a proxy in front of the broker shows them at the protocol point:
- at-least-once committing asynchronously: the proxy refuses the first commit (answers it
  with an error, never forwarded) and the worker's next output reaches the broker before
  any commit of the first record was stored - it never waited for the answer
- exactly-once committing the input offset with consumer.commit() after commit_transaction:
  the worker is killed the moment that OffsetCommit arrives (it is never forwarded), and the
  restarted worker processes again a record whose output is already committed
- at-least-once producing with acks=1: on a single broker the leader's ack is every
  replica's, so nothing is lost here; the proxy reads the acks each Produce request asks for
- at-least-once catching a refused commit's error and going on: on the wire it is the
  asynchronous commit's mistake (the next output before any stored commit), named as either
- auto-commit left on (librdkafka's default): its timer and close() commit the position of
  whatever poll() returned; the restarted run's close() commits the partition's end, past
  the last payment's next offset, which no commit(message=msg) gives - named as auto-commit
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from labrunner.testing import (
    API_NAMES,
    KafkaEvent,
    KafkaProxy,
    KafkaRequest,
    process_activity,
    program_reading,
    read_all,
)
from labrunner.testing.kafka_proxy import (
    ADD_OFFSETS_TO_TXN,
    END_TXN,
    FETCH,
    INIT_PRODUCER_ID,
    OFFSET_COMMIT,
    PRODUCE,
    TOPIC_AUTHORIZATION_FAILED,
    TXN_OFFSET_COMMIT,
)

PAYMENTS = [f"pay-{n}" for n in range(6)]


def key_of(value: str) -> bytes:
    """The input record's key: the account, one of its own per payment (pay-3: acct-3)."""
    return value.replace("pay-", "acct-").replace("poison-", "acct-p").encode()


FENCING = (" - the killed run's transaction is still open, and it holds the group's offsets "
           "(and read_committed readers) until it is aborted: restart with the SAME "
           "transactional.id so init_transactions() fences the dead run and aborts it")
CRASH_AT = 4  # the 4th payment, pay-3
QUIET_POLL = ("A poll() that returns None (a consume() that returns []) only says no "
              "record came within its timeout (a broker slow to answer, a consumer still "
              "starting): it is not the end of the input. The end is the partition-EOF "
              "event (enable.partition.eof=true, an error _PARTITION_EOF): keep polling "
              "until it comes")
# The test holds the worker's fetches (a broker slow to answer) until the worker's polls have
# come back empty EMPTY_POLLS times AND FETCH_HOLD s have passed since its first Fetch - or
# FETCH_HOLD_CAP s, for a worker whose poll waits longer. A worker that takes an empty poll
# (or two) for the end of its input, whatever its poll's timeout up to the cap, meets one;
# FETCH_HOLD is for one that stops after a few seconds of silence counted over short polls.
FETCH_HOLD = 3.0
EMPTY_POLLS = 2
FETCH_HOLD_CAP = 15.0
EMPTY_POLL_MARK = "labrunner-test: a poll came back empty"
# Run in the worker's process before its script: confluent_kafka.Consumer, as the script
# imports it, is a subclass whose poll()/consume() say on stderr when they come back empty
# (nothing else changes), so the test holds the fetches past the worker's empty polls.
POLL_WATCH = f"""
import sys as _sys
import confluent_kafka as _ck


class _WatchedConsumer(_ck.Consumer):
    def _empty(self):
        _sys.stderr.write("\\n{EMPTY_POLL_MARK}\\n")
        _sys.stderr.flush()

    def poll(self, *args, **kwargs):
        msg = super().poll(*args, **kwargs)
        if msg is None:
            self._empty()
        return msg

    def consume(self, *args, **kwargs):
        batch = super().consume(*args, **kwargs)
        if not batch:
            self._empty()
        return batch


_ck.Consumer = _WatchedConsumer
"""
FLUSH_MARK = "labrunner-test: flush"
# Run in the worker's process before its script: confluent_kafka.Producer, as the script
# imports it, is a subclass whose flush() says on stderr, as it is called, the timeout it was
# given (None: none, it waits for good) and how many records are still unacknowledged.
FLUSH_WATCH = f"""
import sys as _sys
import confluent_kafka as _ck


class _WatchedProducer(_ck.Producer):
    def flush(self, *args, **kwargs):
        timeout = args[0] if args else kwargs.get("timeout")
        _sys.stderr.write(f"\\n{FLUSH_MARK} {{timeout!r}} {{len(self)}}\\n")
        _sys.stderr.flush()
        return super().flush(*args, **kwargs)


_ck.Producer = _WatchedProducer
"""
ACK_TIMEOUT = 2.0   # --ack-timeout of the at-least-once worker whose output is never acked
# How long the test waits for that worker to give up or commit: long, since a right worker
# exits soon after ACK_TIMEOUT, and a wrong one that ignores --ack-timeout and commits after
# a fixed flush(30) that timed out must show too - unless it is seen idle before that.
ACK_WATCH = 45.0
# s past ACK_TIMEOUT (from its output's Produce request) after which a worker that has neither
# committed nor exited is looked at: one idle then (every thread asleep, next to no CPU time
# used over IDLE_SPAN s) is still waiting for the ack it was told to give up on, not slow to
# exit (an exit under load runs or waits to run). A worker seen busy is watched on to
# ACK_WATCH as before.
GIVE_UP_GRACE = 6.0
IDLE_SPAN = 1.0
IDLE_CPU_SHARE = 0.05


@dataclass
class View:
    """What the broker holds at one moment."""

    committed: int               # the group's committed offset on the input partition
    output: list[str]            # the output as a read_committed consumer sees it
    output_uncommitted: list[str]  # the output including records of open/aborted txns


@dataclass
class Run:
    offsets: list[int]   # input offset of each payment
    at_crash: View
    final: View
    output_keys: list[tuple[str, bytes | None]]   # (value, key) of the final output


# --- helpers ---------------------------------------------------------------------------

def write_input(kafka: Any, topic: str) -> None:
    """pay-0..2 committed, poison-0..1 aborted, pay-3..5 committed - three transactions."""
    producer = Producer(kafka.producer_config(**{"transactional.id": kafka.topic("feeder")}))
    try:
        # Connected first: init_transactions() with no broker connection up yet finds none,
        # and librdkafka asks again only after 0.5 s (measured 0.5 s in one call of two,
        # 0.05 s once connected).
        producer.list_topics(timeout=10)
        producer.init_transactions(30)
        for values, commit in ((PAYMENTS[:3], True), (["poison-0", "poison-1"], False),
                               (PAYMENTS[3:], True)):
            producer.begin_transaction()
            for value in values:
                producer.produce(topic, key=key_of(value), value=value.encode(), partition=0)
            if commit:
                producer.commit_transaction(30)
            else:
                producer.flush(30)
                producer.abort_transaction(30)
    finally:
        producer.close()
    # commit_transaction() returns once the coordinator logged the commit; the markers that
    # make the records visible at read_committed reach the partition a moment later (seen
    # late on a loaded machine: a read_committed reader, the worker too, then stops short).
    # Everyone starts from the input as a read_committed reader will see it for good.
    deadline = time.monotonic() + 30
    while (seen := [v for _, v in read_topic(kafka, topic, "read_committed")]) != PAYMENTS:
        if time.monotonic() > deadline:
            pytest.fail(f"the test's input transactions were committed, but after 30 s a "
                        f"read_committed reader of {topic} sees {seen}, not {PAYMENTS}",
                        pytrace=False)
        time.sleep(0.1)


def read_topic(kafka: Any, topic: str, isolation: str) -> list[tuple[int, str]]:
    """(offset, value) of every record in partition 0 visible at ``isolation``."""
    return [(r.offset, (r.value or b"").decode())
            for r in read_all(kafka, topic, isolation=isolation, partitions=[0])]


def transactions_settled(kafka: Any, topic: str, within: float) -> None:
    """Wait (up to ``within`` s) until no transaction is pending on partition 0 of ``topic``:
    its last stable offset has reached its end. A producer's commit or abort returns before
    the markers reach the partition, so a read_committed read right after a worker exits
    may stop short of what it committed. Past ``within`` the checks read what is there and
    say what they saw (a transaction left open is the worker's to explain)."""
    from confluent_kafka import IsolationLevel
    from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

    admin, tp = kafka.admin(), TopicPartition(topic, 0)   # connected (KafkaNS.admin)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ends = [admin.list_offsets({tp: OffsetSpec.latest()},  # type: ignore[no-untyped-call]
                                   isolation_level=level, request_timeout=5)[tp].result(10)
                for level in (IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED)]
        if ends[0].offset == ends[1].offset:
            return
        time.sleep(0.1)


def view(kafka: Any, topics: dict[str, str], group: str) -> View:
    # read_uncommitted: a read_committed client asks for "stable" offsets and waits while a
    # transaction holding offsets for this group is open (as at the exactly-once crash point).
    reader = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group,
                       "isolation.level": "read_uncommitted", "log_level": 0})
    try:
        (tp,) = reader.committed([TopicPartition(topics["input"], 0)], timeout=10)
    finally:
        reader.close()
    return View(tp.offset,
                [v for _, v in read_topic(kafka, topics["output"], "read_committed")],
                [v for _, v in read_topic(kafka, topics["output"], "read_uncommitted")])


def start(learner: Any, kafka: Any, mode: str, topics: dict[str, str], group: str,
          crash_after: int | None = None, bootstrap: str | None = None,
          ack_timeout: float | None = None, prelude: str = "") -> subprocess.Popen[bytes]:
    args = [mode, "--bootstrap", bootstrap or kafka.bootstrap, "--input", topics["input"],
            "--output", topics["output"], "--group", group]
    if crash_after is not None:
        args += ["--crash-after", str(crash_after)]
    if ack_timeout is not None:
        args += ["--ack-timeout", f"{ack_timeout:g}"]
    return cast(subprocess.Popen[bytes], learner.python("semantics", *args, prelude=prelude,
                                                        stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE))


def first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The process's first line of output, or '' if it printed none within ``timeout``."""
    stdout = proc.stdout
    assert stdout is not None
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].decode().strip() if line else ""


def stderr_tail(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace").strip()[-1500:]


class EmptyPolls:
    """The worker's stderr, read as it comes (a worker started with POLL_WATCH or
    FLUSH_WATCH): how many of its polls came back empty so far, its flush() calls (the
    timeout each was given, None for none, and the records then unacknowledged), and the
    rest of what it wrote."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.count = 0
        self.flushes: list[tuple[float | None, int]] = []
        self.lines: list[str] = []
        self._stream = proc.stderr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self._stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if line == EMPTY_POLL_MARK:
                self.count += 1
            elif line.startswith(FLUSH_MARK + " "):
                timeout, pending = line[len(FLUSH_MARK):].split()
                try:
                    waits = None if timeout == "None" else float(timeout)
                except ValueError:   # a timeout of a type of its own: flush() judges it
                    continue
                self.flushes.append((None if waits is not None and waits < 0 else waits,
                                     int(pending)))
            elif line:
                self.lines.append(line)

    def tail(self) -> str:
        self._reader.join(10)
        return "\n".join(self.lines).strip()[-1500:]

    def waits_past(self, limit: float) -> float | None:
        """The timeout of the worker's first flush() with records unacknowledged, if it is
        longer than ``limit`` s (math.inf: none given, or a negative one - for good)."""
        waits = next((timeout for timeout, pending in self.flushes if pending), limit)
        return math.inf if waits is None else waits if waits > limit else None


def ended_early(learner: Any, kafka: Any, mode: str, topics: dict[str, str], line: str) -> str:
    """Why a first run (a new group, no committed offset) ended before the crash point. If
    it processed nothing, a worker of a group whose committed offset is 0 is run too: one
    that reads the input then started the new group at the partition's end."""
    if line == "processed 0":
        probe = kafka.group(f"probe-{mode}")
        committer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": probe,
                              "log_level": 0})
        try:
            committer.commit(offsets=[TopicPartition(topics["input"], 0, 0)],
                             asynchronous=False)
        finally:
            committer.close()
        worker = start(learner, kafka, mode, topics, probe, crash_after=CRASH_AT)
        try:
            then = first_line(worker, 30)
        finally:
            worker.kill()
            worker.wait()
        if then == f"CRASH-POINT {CRASH_AT}":
            return (f"{mode}: a worker of a new group (no committed offset) processed nothing "
                    f"({line!r}) of the 6 payments in the input, while one of a group whose "
                    f"committed offset is 0 read them: with no committed offset the consumer "
                    f"starts where auto.offset.reset says, and librdkafka's default (latest) "
                    f"is the partition's end - the input already there is skipped. Set "
                    f"auto.offset.reset=earliest: a new group starts at the beginning")
    return (f"{mode}: the worker ended its run ({line!r}) before the 4th of the 6 payments in "
            f"the input, so it never reached that record's crash point: it stopped before "
            f"the end of the input partition. {QUIET_POLL}")


def crash_and_restart(learner: Any, kafka: Any, mode: str) -> Run:
    """Run ``mode`` until the crash point of the 4th payment, look, SIGKILL, run again to the
    end of the input, look again."""
    topics = {"input": kafka.create_topic("payments"), "output": kafka.create_topic("out")}
    group = kafka.group(f"worker-{mode}")
    write_input(kafka, topics["input"])
    # Exactly-once runs reach the broker through a proxy that only watches: each run's
    # InitProducerId names its transactional.id, so a restart under another id is named at
    # once, not after the 30 s the restarted worker waits on the open transaction it left.
    with contextlib.ExitStack() as stack:
        proxy = (stack.enter_context(KafkaProxy(kafka.bootstrap)) if mode == "exactly-once"
                 else None)
        return crashed_and_restarted(learner, kafka, mode, topics, group, proxy)


def crashed_and_restarted(learner: Any, kafka: Any, mode: str, topics: dict[str, str],
                          group: str, proxy: KafkaProxy | None) -> Run:
    offsets = [o for o, _ in read_topic(kafka, topics["input"], "read_committed")]
    poison_offsets = {o for o, v in read_topic(kafka, topics["input"], "read_uncommitted")
                      if v.startswith("poison")}
    bootstrap = proxy.bootstrap if proxy is not None else None
    first = start(learner, kafka, mode, topics, group, crash_after=CRASH_AT,
                  bootstrap=bootstrap)
    try:
        line = first_line(first, 30)
        if line != f"CRASH-POINT {CRASH_AT}":
            first.kill()
            code = first.wait()
            errors = stderr_tail(first)
            last = errors.splitlines()[-1] if errors else f"first output line {line!r}"
            if line.startswith("processed "):
                raise AssertionError(ended_early(learner, kafka, mode, topics, line))
            raise AssertionError(
                f"{mode}: the worker never reached crash_point() for the 4th record (exit "
                f"{code}: {last}): call crash_point(processed, crash_after) between your two "
                f"steps for every record\n{errors}")
        # The lab's crash_point() kills the process itself, at once; a hook that only
        # freezes it is killed here.
        try:
            first.wait(10)
        except subprocess.TimeoutExpired:
            first.send_signal(signal.SIGKILL)
            first.wait()
        at_crash = view(kafka, topics, group)
        # Every mode has committed pay-0..pay-2 (synchronously, or in their committed
        # transactions) by pay-3's crash point, once their outputs are there.
        assert at_crash.committed >= 0 or len(at_crash.output) < 3, (
            f"{mode}: at the crash point of pay-3 the output holds {len(at_crash.output)} "
            f"records, but the group {group!r} - the --group the worker was given - has no "
            f"committed offset on the input at all ({at_crash.committed}): the worker "
            f"commits its progress to ANOTHER group (a group.id of its own), or nowhere. "
            f"Use the group it is given (group.id = group, which send_offsets_to_transaction "
            f"takes from consumer_group_metadata() too): the restarted worker, and anyone "
            f"watching its lag, find its progress there")
        own = {offsets[2]: "pay-2", offsets[3]: "pay-3"}
        assert at_crash.committed not in own, (
            f"{mode}: at the crash point the committed input offset is {at_crash.committed}, "
            f"the offset OF {own.get(at_crash.committed)} itself: a committed offset is the "
            f"NEXT record to read - commit msg.offset() + 1 (commit(message=msg) does that), "
            f"or the restarted worker processes that record again")
        poison = [v for v in at_crash.output_uncommitted if "poison" in v]
        if at_crash.committed - 1 in poison_offsets:
            poison.append(f"(a commit of the poison record at offset {at_crash.committed - 1})")
        assert not poison, (
            f"{mode}: the worker acted on records of an aborted input transaction: {poison} - "
            "consume with isolation.level=read_committed")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    since = time.monotonic()
    second = start(learner, kafka, mode, topics, group, bootstrap=bootstrap)
    deadline = since + 30
    while True:
        status = second.poll()
        renamed = restarted_under_another_id(proxy, since) if proxy is not None else ""
        if renamed:
            second.kill()
            second.wait()
            raise AssertionError(renamed)
        if status is not None:
            break
        if time.monotonic() > deadline:
            second.kill()
            second.wait()
            raise AssertionError(
                f"{mode}: the restarted worker did not finish within 30 s (it must stop at the "
                f"end of the input partition){FENCING if mode == 'exactly-once' else ''}")
        time.sleep(0.05)
    hint = FENCING if mode == "exactly-once" else ""
    assert status == 0, (
        f"{mode}: the restarted worker exited with {status}{hint}\n{stderr_tail(second)}")
    transactions_settled(kafka, topics["output"], 10)
    keys = [((r.value or b"").decode(), r.key) for r in read_all(
        kafka, topics["output"], isolation="read_committed", partitions=[0])]
    return Run(offsets, at_crash, view(kafka, topics, group), keys)


def restarted_under_another_id(proxy: KafkaProxy, since: float) -> str:
    """Why the restarted exactly-once worker (started at ``since``) is wrong, if its
    init_transactions() named a transactional.id the killed run never used ('' if not, or
    not seen yet): read from both runs' InitProducerId requests."""
    ids = [(r.at >= since, r.transactional_id) for r in proxy.requests(INIT_PRODUCER_ID)
           if r.transactional_id]
    killed = {tid for restarted, tid in ids if not restarted}
    now = {tid for restarted, tid in ids if restarted}
    if not killed or not now or killed & now:
        return ""
    return (f"exactly-once: the restarted worker's init_transactions() named the "
            f"transactional.id {sorted(now)}, the killed run's was {sorted(killed)}: an id new "
            f"on every run fences nothing - the killed run's transaction stays open, holding "
            f"pay-3's output and input offset (the restarted worker's lookup of its committed "
            f"offset and every read_committed reader wait on it) until its "
            f"transaction.timeout.ms runs out. Use the SAME transactional.id on every run: the "
            f"next init_transactions() then fences the dead run and aborts its transaction at "
            f"once - derive it from the group, the input topic and the partition, never from "
            f"a random or per-run value")


def check_final(run: Run, mode: str, want: list[str], meaning: str) -> None:
    got = run.final.output
    assert not [v for v in got if v.startswith("processed:poison")], (
        f"{mode}: the output holds {got}: the worker processed records of an aborted input "
        "transaction - consume with isolation.level=read_committed")
    assert got.count("processed:pay-0") <= want.count("pay-0"), (
        f"{mode}: after the restart the output is {got}: the restarted worker began again at "
        f"the start of the partition, not at the group's committed offset - assign the "
        f"partition without an explicit offset (or with the one committed() returns)")
    assert got == [f"processed:{v}" for v in want], (
        f"{mode}: after the crash and restart the output is {got}; expected "
        f"{['processed:' + v for v in want]}: {meaning}")
    rekeyed = [(value, key) for value, key in run.output_keys
               if key != key_of(value.removeprefix("processed:"))]
    assert not rekeyed, (
        f"{mode}: the output record {rekeyed[0][0]!r} has the key {rekeyed[0][1]!r}; its "
        f"input record had the key {key_of(rekeyed[0][0].removeprefix('processed:'))!r} "
        f"({len(rekeyed)} of {len(run.output_keys)} outputs keyed otherwise): produce "
        "transform(value) with the input's key (key=msg.key(), the bytes as they are) - the "
        "key picks the output partition, and one account's records keep their order only "
        "within one partition")
    assert run.final.committed <= run.offsets[-1] + 1, (
        f"{mode}: after the restarted run the committed input offset is "
        f"{run.final.committed}, past pay-5's next offset ({run.offsets[-1] + 1}): the "
        f"partition's end (the input's last transaction marker is at {run.offsets[-1] + 1}), "
        f"which no commit(message=msg) of a processed record gives - the consumer's "
        f"auto-commit does: enable.auto.commit defaults to true, and then a timer and close() "
        f"commit the position of whatever poll() returned, processed or not (a crash right "
        f"after such a commit loses records at least-once promised). Set "
        f"enable.auto.commit=false and commit only in the mode's order")
    assert run.final.committed == run.offsets[-1] + 1, (
        f"{mode}: after the restarted run the committed input offset is "
        f"{run.final.committed}, expected {run.offsets[-1] + 1} (past the last payment)")


# --- the three modes ---------------------------------------------------------------------

def test_at_most_once_loses_the_record_in_flight(learner: Any, kafka: Any) -> None:
    run = crash_and_restart(learner, kafka, "at-most-once")
    pay3 = run.offsets[3]
    assert run.at_crash.committed != run.offsets[2] + 1 or len(run.at_crash.output) != 3, (
        f"at-most-once: when the worker died at pay-3's crash point, its commit of pay-3 had "
        f"not reached the broker (committed offset still {run.at_crash.committed}): an "
        f"asynchronous commit is still in the client when the process dies - commit "
        f"synchronously (asynchronous=False), then crash_point(), then produce")
    assert len(run.at_crash.output) >= 3 or run.at_crash.committed != pay3 + 1, (
        f"at-most-once: when the worker died at pay-3's crash point only "
        f"{len(run.at_crash.output)} of pay-0..pay-2's outputs had reached the broker: a "
        f"record still queued in the client when the process dies is lost too - flush() "
        f"after producing each record (with acks=0 it returns once the record is sent)")
    assert run.at_crash.committed == pay3 + 1 and len(run.at_crash.output) == 3, (
        f"at-most-once at the crash point of pay-3: committed offset {run.at_crash.committed} "
        f"and {len(run.at_crash.output)} output records; expected offset {pay3 + 1} (pay-3 "
        "already committed) and 3 outputs (pay-3 not yet processed): commit FIRST, then "
        "crash_point(), then produce")
    check_final(run, "at-most-once", ["pay-0", "pay-1", "pay-2", "pay-4", "pay-5"],
                "pay-3's offset was committed before it was processed, so the restarted "
                "worker skips it - lost, never duplicated")


def test_at_least_once_duplicates_the_record_in_flight(learner: Any, kafka: Any) -> None:
    run = crash_and_restart(learner, kafka, "at-least-once")
    pay2 = run.offsets[2]
    assert run.at_crash.output == [f"processed:pay-{n}" for n in range(4)], (
        f"at-least-once at the crash point of pay-3 the broker holds the outputs "
        f"{run.at_crash.output}; expected pay-0..pay-3: produce the output and wait for the "
        "broker's ack (flush) BEFORE committing - an unacknowledged output is not processed")
    assert run.at_crash.committed == pay2 + 1, (
        f"at-least-once at the crash point of pay-3 the committed offset is "
        f"{run.at_crash.committed}; expected {pay2 + 1} (pay-3 not committed yet): process "
        "first, then crash_point(), then commit")
    check_final(run, "at-least-once",
                ["pay-0", "pay-1", "pay-2", "pay-3", "pay-3", "pay-4", "pay-5"],
                "pay-3 was processed but its offset not committed, so the restarted worker "
                "processes it again - a duplicate, never a loss")


def test_exactly_once_neither_loses_nor_duplicates(learner: Any, kafka: Any) -> None:
    run = crash_and_restart(learner, kafka, "exactly-once")
    pay2 = run.offsets[2]
    # pay-3's output may or may not have left the client before the SIGKILL: either way
    # it is inside the open transaction, never committed.
    assert run.at_crash.output_uncommitted in (
            [f"processed:pay-{n}" for n in range(4)],
            [f"processed:pay-{n}" for n in range(3)]), (
        f"exactly-once at the crash point of pay-3 the output (read_uncommitted) holds "
        f"{run.at_crash.output_uncommitted}; expected pay-0..pay-2, and pay-3 only inside the "
        "open transaction: begin_transaction, produce, send_offsets_to_transaction, then "
        "crash_point(), then commit_transaction")
    assert run.at_crash.output == [f"processed:pay-{n}" for n in range(3)], (
        f"exactly-once at the crash point a read_committed reader sees {run.at_crash.output}; "
        "expected pay-0..pay-2 only: pay-3's output must still be inside an uncommitted "
        "transaction (use a transactional producer)")
    assert run.at_crash.committed == pay2 + 1, (
        f"exactly-once at the crash point the committed input offset is "
        f"{run.at_crash.committed}, expected {pay2 + 1}: the offset is committed by the "
        "transaction (send_offsets_to_transaction), not by the consumer")
    check_final(run, "exactly-once", PAYMENTS,
                "the killed run's transaction (pay-3's output and offset) must be aborted "
                "and pay-3 processed once more in a committed one - the restarted worker must "
                "use the SAME transactional.id so init_transactions() fences the dead one and "
                "aborts its transaction (otherwise it stays open and blocks read_committed "
                "readers at that point)")
    copies = run.final.output_uncommitted.count("processed:pay-3")
    sent_before_crash = "processed:pay-3" in run.at_crash.output_uncommitted
    assert copies == 1 + sent_before_crash, (
        f"read_uncommitted shows pay-3's output {copies} time(s); expected "
        f"{1 + sent_before_crash} - the committed one"
        + (" and the aborted copy from the killed run" if sent_before_crash else "")
        + ": read_committed is what hides an aborted copy")


REFUSED_AT = 1    # the input record whose output the broker refuses (too large)
OUTPUT_LIMIT = "1500"   # the output topic's max.message.bytes: one small record fits


@dataclass
class Refused:
    """What a worker left behind after the broker refused pay-1's output."""

    offsets: list[int]     # input offset of pay-0 .. pay-3
    code: int | None       # its exit status (None: still running, killed)
    committed: int         # the group's committed input offset
    stored: list[str]      # the output, read_committed (each value's first 20 characters)


def run_refused(learner: Any, kafka: Any, mode: str, wait: float) -> Refused:
    """Run ``mode`` once over pay-0, a pay-1 of 3,000 bytes, pay-2 and pay-3, with an output topic
    taking 1,500 bytes (max.message.bytes): the broker refuses pay-1's output
    (MESSAGE_TOO_LARGE), a permanent error no retry helps. Kill it after ``wait`` s."""
    topics = {"input": kafka.create_topic("payments"),
              "output": kafka.create_topic("out", **{"max.message.bytes": OUTPUT_LIMIT})}
    group = kafka.group(f"worker-refused-{mode}")
    values = ["pay-0", "pay-1:" + "x" * 3000, "pay-2", "pay-3"]
    producer = Producer(kafka.producer_config())
    for value in values:
        producer.produce(topics["input"], key=key_of(value[:5]), value=value.encode(),
                         partition=0)
    assert producer.flush(30) == 0, "the test could not write its input"
    offsets = [o for o, _ in read_topic(kafka, topics["input"], "read_committed")]
    worker = start(learner, kafka, mode, topics, group)
    try:
        code: int | None = worker.wait(wait)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    transactions_settled(kafka, topics["output"], 10)
    return Refused(offsets, code, view(kafka, topics, group).committed,
                   [v[:20] for _, v in read_topic(kafka, topics["output"], "read_committed")])


def test_an_output_the_broker_refuses_is_not_processed(learner: Any, kafka: Any) -> None:
    """The input holds pay-0, a pay-1 of 3,000 bytes, pay-2 and pay-3; the output topic takes
    records of at most 1,500 bytes (max.message.bytes), so the broker refuses pay-1's
    output (MESSAGE_TOO_LARGE) - a permanent error, no retry helps. That output is not
    processed: the worker must not commit pay-1's input offset (it raises and exits). A
    worker that trusts flush() returning 0 commits it: flush counts the records still
    waiting, and a refused record is no longer waiting - its delivery report carries the
    error. The output is lost, and the restarted worker never sees pay-1 again."""
    mode = "at-least-once"
    got = run_refused(learner, kafka, mode, 60)
    code, committed = got.code, got.committed
    assert committed <= got.offsets[REFUSED_AT], (
        f"{mode}: the broker refused pay-1's output (3,000 bytes, the output topic takes "
        f"{OUTPUT_LIMIT}: MESSAGE_TOO_LARGE), and the worker committed the input offset "
        f"{committed}, past pay-1 (offset {got.offsets[REFUSED_AT]}); the output holds "
        f"{got.stored} - pay-1 is lost, the restarted worker never sees it "
        f"again (worker exit status {code}). flush() returning 0 means no record is still "
        "WAITING, not that every record was stored: a refused record's delivery report "
        "carries the error. Produce with on_delivery=... and look at each report's error: a "
        "refused output is not processed - raise, do not commit")
    assert code not in (0, None) or committed < got.offsets[REFUSED_AT], (
        f"{mode}: the broker refused pay-1's output and the worker "
        + ("was still running 60 s later" if code is None else "exited with status 0")
        + ": an output the broker refuses is not processed - raise (the worker exits with "
        "an error)")


def test_exactly_once_a_failed_transaction_is_not_skipped(learner: Any, kafka: Any) -> None:
    """The same refused pay-1, exactly-once: its transaction cannot commit (commit_transaction
    raises; the transaction must be aborted), and aborting it takes back pay-1's offset with
    its output. A worker that aborts and goes on with the next record commits a later offset
    - past pay-1 - in a later transaction (librdkafka fails pay-2's too, with an epoch bump;
    pay-3's commits): pay-1 is lost, though no crash happened. Right: raise
    (the worker exits with an error), or rewind to the committed offset and try again (then
    it is still trying when the test stops it: nothing is committed past pay-1 either)."""
    mode = "exactly-once"
    got = run_refused(learner, kafka, mode, 30)
    assert got.committed <= got.offsets[REFUSED_AT], (
        f"{mode}: the transaction holding pay-1's output failed (the broker refused the "
        f"3,000-byte output: the output topic takes {OUTPUT_LIMIT}), yet a later transaction "
        f"committed the input offset {got.committed}, past pay-1 (offset "
        f"{got.offsets[REFUSED_AT]}); the output holds {got.stored} (worker exit status "
        f"{got.code}) - pay-1 is lost without any crash. Aborting a transaction takes back "
        f"its output AND its offset: after abort_transaction() the worker must not go on "
        f"with the next record as if pay-1 were done - raise (exit with an error), or seek "
        f"back to the last committed offset and process it again")
    assert got.code != 0, (
        f"{mode}: the transaction holding pay-1's output failed (the broker refused it), and "
        f"the worker exited with status 0 - reporting the input done while pay-1 (offset "
        f"{got.offsets[REFUSED_AT]}) was never processed: a failed transaction is not a "
        f"processed record - raise, or seek back to the committed offset and try again")


# --- at the protocol point: a proxy between the worker and the broker ------------------------

def test_a_broker_slow_to_answer_is_not_the_end_of_the_input(learner: Any,
                                                             kafka: Any) -> None:
    """The worker runs behind a proxy that holds its Fetch requests (a broker slow to answer)
    until its polls have come back empty twice and FETCH_HOLD s have passed since the first
    Fetch (FETCH_HOLD_CAP s at most), or until it exits; then every record comes. A right
    worker keeps polling to the partition-EOF event and processes all six payments; one that
    takes an empty poll for the end of the input exits with the input unprocessed, reporting
    success - whatever its poll's timeout, since the test waits out the worker's empty polls."""
    mode = "at-least-once"
    topics = {"input": kafka.create_topic("payments"), "output": kafka.create_topic("out")}
    group = kafka.group("worker-slow-fetch")
    write_input(kafka, topics["input"])
    offsets = [o for o, _ in read_topic(kafka, topics["input"], "read_committed")]
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.hold(FETCH)
        worker = start(learner, kafka, mode, topics, group, bootstrap=proxy.bootstrap,
                       prelude=POLL_WATCH)
        empty = EmptyPolls(worker)
        try:
            deadline = time.monotonic() + 30
            while (not proxy.requests(FETCH) and worker.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            fetches = proxy.requests(FETCH)
            first = fetches[0].at if fetches else time.monotonic()
            while worker.poll() is None:
                now = time.monotonic()
                if now >= first + FETCH_HOLD_CAP or (
                        now >= first + FETCH_HOLD and empty.count >= EMPTY_POLLS):
                    break
                time.sleep(0.05)
            exited_held = worker.poll() is not None
            held = time.monotonic() - first
            quiet = empty.count
        finally:
            proxy.release(FETCH)
        code = finished(worker, mode, "whose fetches the test held a while")
        line = first_line(worker, 5)
    got = view(kafka, topics, group)
    seen = (f"the test held the worker's fetches for {held:.1f} s (a broker slow to answer), "
            f"while {quiet} of its polls came back empty")
    assert code != 0 or got.committed == offsets[-1] + 1, (
        f"{mode}: {seen}, and the worker exited with status 0 ({line or 'no output'!r}) with "
        f"the committed input offset at {got.committed if got.committed >= 0 else 'none'}, "
        f"not past the last payment "
        f"({offsets[-1] + 1}), and {len(got.output)} of 6 outputs - it took a quiet moment "
        f"for the end of the input, and reported success. {QUIET_POLL}")
    assert not (exited_held and code != 0), (
        f"{mode}: {seen}, and the worker exited with status {code} before they were let go, "
        f"with {len(got.output)} of 6 outputs - it took a quiet moment for an error. A broker "
        f"slow to answer is no failure either. {QUIET_POLL}\n{empty.tail()}")
    assert code == 0 and got.output == [f"processed:{v}" for v in PAYMENTS], (
        f"{mode}: {seen}, then let them go; expected the worker to process all 6 payments and "
        f"exit 0, saw exit status {code} and the output {got.output}\n{empty.tail()}")


def test_a_consumer_error_is_not_the_end_of_the_input(learner: Any, kafka: Any) -> None:
    """The worker runs behind a proxy that fails the first Fetch answer carrying its input:
    the broker's answer for the partition is TOPIC_AUTHORIZATION_FAILED, no records (as while
    an ACL denies the read for a moment); the next fetch gets them. poll() returns that
    consumer error - a message whose error() is not _PARTITION_EOF. A right worker raises (exits
    with an error, its input left for a restart) or logs it and polls on to the real end; a
    wrong one takes it for the end (exits 0 with the input unprocessed) or for a record."""
    mode = "at-least-once"
    topics = {"input": kafka.create_topic("payments"), "output": kafka.create_topic("out")}
    group = kafka.group("worker-fetch-error")
    producer = Producer(kafka.producer_config())
    for value in PAYMENTS:
        producer.produce(topics["input"], key=key_of(value), value=value.encode(), partition=0)
    assert producer.flush(30) == 0, "the test could not write its input"
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.fail_fetches(TOPIC_AUTHORIZATION_FAILED)
        worker = start(learner, kafka, mode, topics, group, bootstrap=proxy.bootstrap)
        code = finished(worker, mode, "whose first fetch of the input the test failed")
        line = first_line(worker, 5)
        failed = [e for e in proxy.events() if e.kind == "failed"]
        assert not proxy.errors, f"the test's Kafka proxy: {proxy.errors}"
    got = view(kafka, topics, group)
    want = [f"processed:{v}" for v in PAYMENTS]
    if not failed:
        errors = stderr_tail(worker)
        pytest.fail(
            f"{mode}: the test meant to fail the worker's first Fetch answer carrying the "
            f"input, but no Fetch answer of the worker carried records: it exited with status "
            f"{code} ({line or (errors.splitlines() or ['no output'])[-1]!r}) and "
            f"{len(got.output)} of 6 outputs - read partition 0 of the input to its end",
            pytrace=False)
    error = ("the test failed the first Fetch answer that carried the input's records (the "
             "proxy answered it TOPIC_AUTHORIZATION_FAILED with no records, as a broker does "
             "while an ACL denies the read; the next fetch gets them), so poll() returned a "
             "consumer error: a message whose error() is not _PARTITION_EOF")
    stray = [v for v in got.output if v not in want]
    assert not stray, (
        f"{mode}: {error}; the worker processed that error as a record - the output holds "
        f"{stray[:2]}, none of them a payment's. A message with error() set carries no record: "
        f"look at msg.error() first, and treat every error, not only _PARTITION_EOF")
    assert code != 0 or got.committed == len(PAYMENTS), (
        f"{mode}: {error}; the worker exited with status 0 ({line or 'no output'!r}), the "
        f"committed input offset at {got.committed if got.committed >= 0 else 'none'}, not "
        f"past the last payment ({len(PAYMENTS)}), and {len(got.output)} of 6 outputs - it "
        f"took a consumer error for the end of the input, and reported success. Only the "
        f"_PARTITION_EOF event is the end: on any other msg.error() raise (the worker exits "
        f"with an error, and its restart resumes at the committed offset), or log it and "
        f"poll on (librdkafka fetches again) - never stop as if done")
    assert code != 0 or got.output == want, (
        f"{mode}: {error}; the worker exited 0 with the output {got.output}; expected "
        f"{want}\n{stderr_tail(worker)}")


def idle_throughout(learner: Any, proc: subprocess.Popen[bytes], span: float) -> bool:
    """Whether the learner's running program stays idle for ``span`` s: every thread asleep at
    each reading (0.1 s apart) and less than IDLE_CPU_SHARE of a core used in all (librdkafka's
    threads wake now and then, an exit or a busy loop runs). False once it has exited."""
    try:
        first = program_reading(learner, proc, process_activity)
    except RuntimeError:
        return False
    ended = time.monotonic() + span
    while time.monotonic() < ended:
        time.sleep(0.1)
        try:
            now = program_reading(learner, proc, process_activity)
        except RuntimeError:
            return False
        if now[0] != 0 or first[0] != 0 or proc.poll() is not None:
            return False
    return cast(int, now[1] - first[1]) / 1e9 < IDLE_CPU_SHARE * span  # CPU time in ns


def finished(proc: subprocess.Popen[bytes], mode: str, what: str) -> int:
    """Wait for the worker to exit (killing it after 30 s); its exit code."""
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{mode}: the worker {what} did not exit within 30 s (it must stop "
                             "at the end of the input partition)") from None


def wire(events: list[KafkaEvent], *api_keys: int) -> list[str]:
    """The requests of ``api_keys`` that arrived, by name, in order."""
    return [API_NAMES[e.request.api_key] for e in events
            if e.kind == "request" and e.request.api_key in api_keys]


def went_on_before_a_stored_commit(events: list[KafkaEvent]) -> int:
    """How many Produce requests (outputs after the first record's) arrived before any
    OffsetCommit the broker took (one answered that the proxy had not refused)."""
    refused = {(e.request.connection, e.request.correlation_id) for e in events
               if e.kind == "refused"}
    produced = 0
    for e in events:
        key = (e.request.connection, e.request.correlation_id)
        if e.kind == "answer" and e.request.api_key == OFFSET_COMMIT and key not in refused:
            break
        if e.kind == "request" and e.request.api_key == PRODUCE:
            produced += 1
    return max(produced - 1, 0)


def assert_acked_by_all_replicas(events: list[KafkaEvent]) -> None:
    """Every output the at-least-once worker produced asked for acks=all (-1), read from the
    Produce requests on the wire: the config key or its spelling does not matter."""
    acks = sorted({e.request.acks for e in events
                   if e.kind == "request" and e.request.api_key == PRODUCE}, key=str)
    named: dict[int | None, str] = {0: "acks=0 (no acknowledgement)",
                                    1: "acks=1 (the partition leader alone)"}
    assert acks == [-1], (
        f"at-least-once: the worker's Produce requests asked for "
        f"{', '.join(named.get(a, f'acks={a}') for a in acks) or 'nothing'}; expected "
        f"acks=all (-1) on every output. The offset is committed once the output is "
        f"acknowledged, so the ack must mean durable: with acks=1 the leader acknowledges "
        f"alone, and if its broker dies before the followers copied the record, a follower "
        f"becomes leader without it - the output is gone while the input offset is already "
        f"past it: the record is lost (at-most-once). Produce with acks=all (and retries)")


def test_at_least_once_waits_for_the_broker_to_store_each_commit(learner: Any,
                                                                   kafka: Any) -> None:
    """The worker runs behind a proxy, which refuses its first commit (pay-0's offset: answered
    with an error, never forwarded). A worker that waits for the answer stops there (commit
    raises) or commits again; one that commits asynchronously has already gone on to pay-1."""
    topics = {"input": kafka.create_topic("payments"), "output": kafka.create_topic("out")}
    group = kafka.group("worker-alo-wire")
    write_input(kafka, topics["input"])
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.refuse(OFFSET_COMMIT, count=1)
        worker = start(learner, kafka, "at-least-once", topics, group,
                       bootstrap=proxy.bootstrap)
        finished(worker, "at-least-once", "whose first commit was refused")
        events = proxy.events()
    assert_acked_by_all_replicas(events)
    assert wire(events, OFFSET_COMMIT), (
        f"at-least-once: the worker sent no OffsetCommit (requests seen: "
        f"{wire(events, PRODUCE, OFFSET_COMMIT, TXN_OFFSET_COMMIT)}): commit each record's "
        "offset with consumer.commit(message=msg, asynchronous=False) after its output is "
        "acknowledged")
    ahead = went_on_before_a_stored_commit(events)
    assert ahead == 0, (
        f"at-least-once: the worker went on past a commit the broker never stored - the "
        f"test refused the commit of pay-0 (answered it with an error, never forwarded), yet "
        f"{ahead} more output(s) reached the broker before any commit of pay-0 was stored "
        f"(requests in order: {wire(events, PRODUCE, OFFSET_COMMIT)}): it did not wait for "
        f"the answer, or it caught the commit's error and carried on. An asynchronous commit "
        f"(asynchronous=True, the default of consumer.commit()) returns at once, so a worker "
        f"killed right after loses commits it believed made, and processes more than the one "
        f"record in flight again - commit with asynchronous=False, which waits and raises on "
        f"a refusal, and let that error stop the worker (its restart resumes at the last "
        f"stored offset) rather than log it and go on")


def test_at_least_once_commits_only_after_its_output_is_acknowledged(learner: Any,
                                                                    kafka: Any) -> None:
    """The worker runs with --ack-timeout 2 behind a proxy that holds its Produce requests:
    its first output is never acknowledged. A right worker sends no OffsetCommit and gives up
    (raises) once its ack timeout has passed. A wrong one commits anyway: at once (it did not
    wait for the ack), or when its wait timed out (it did not look at what flush() returned)
    - and a crash right there loses that output for good. No timing decides against a right
    worker: the test only watches for an OffsetCommit until the worker exits (or 45 s). A
    worker that waits for the ack longer than its ack timeout (its first flush() with the
    output unacknowledged is given more) is named at that call, as flush() says on stderr
    (FLUSH_WATCH); one seen idle well past its ack timeout, whatever it waits in, is too."""
    topics = {"input": kafka.create_topic("payments"), "output": kafka.create_topic("out")}
    group = kafka.group("worker-alo-ack")
    write_input(kafka, topics["input"])
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.hold(PRODUCE)
        worker = start(learner, kafka, "at-least-once", topics, group,
                       bootstrap=proxy.bootstrap, ack_timeout=ACK_TIMEOUT, prelude=FLUSH_WATCH)
        said = EmptyPolls(worker)
        try:
            deadline = time.monotonic() + 30
            while (not proxy.requests(PRODUCE) and worker.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            if not proxy.requests(PRODUCE) and worker.poll() is not None:
                pytest.fail(
                    f"at-least-once with --ack-timeout {ACK_TIMEOUT:g}: the worker exited "
                    f"(status {worker.returncode}) before sending any output; its stderr: "
                    f"{said.tail() or '(nothing)'}", pytrace=False)
            produced = proxy.wait_for(PRODUCE, timeout=max(1.0, deadline - time.monotonic()),
                                      what="the at-least-once worker's first output")
            deadline = time.monotonic() + ACK_WATCH
            look_at = produced.at + ACK_TIMEOUT + GIVE_UP_GRACE
            idle, waits = False, None
            while (time.monotonic() < deadline and not proxy.requests(OFFSET_COMMIT)
                   and worker.poll() is None):
                # More than 1 s over: a right worker's flush(remaining) is never given more.
                if (waits := said.waits_past(ACK_TIMEOUT + 1)) is not None:
                    break
                if time.monotonic() >= look_at:
                    idle = idle_throughout(learner, worker, IDLE_SPAN)
                    if idle and not proxy.requests(OFFSET_COMMIT) and worker.poll() is None:
                        break
                    idle, look_at = False, time.monotonic() + IDLE_SPAN
                time.sleep(0.05)
            stuck = time.monotonic() - produced.at
            early = wire(proxy.events(), PRODUCE, OFFSET_COMMIT)
            commits = proxy.requests(OFFSET_COMMIT)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            proxy.release(PRODUCE)
    if waits is not None and not commits:
        pytest.fail(
            f"at-least-once with --ack-timeout {ACK_TIMEOUT:g}: the test held the worker's "
            f"output (its Produce request) unanswered, and the worker called flush("
            f"{'' if math.isinf(waits) else f'{waits:g}'}) to wait for its ack - "
            + ("with no timeout, forever" if math.isinf(waits) else f"up to {waits:g} s")
            + f", not the --ack-timeout {ACK_TIMEOUT:g} it was given: it gives the broker "
            f"longer than it was told to. Wait ack_timeout seconds (flush(ack_timeout)), and "
            f"look at what flush returns: the number of records still unacknowledged - when "
            f"that is not 0 the output is NOT processed: raise instead of committing (a flush "
            f"with another timeout whose result is ignored ends in a commit of an output the "
            f"broker never acknowledged)", pytrace=False)
    if idle and not commits:
        pytest.fail(
            f"at-least-once with --ack-timeout {ACK_TIMEOUT:g}: the test held the worker's "
            f"output (its Produce request) unanswered, and {stuck:.0f} s after sending it the "
            f"worker was still waiting for the ack, idle - neither raising nor committing: it "
            f"gives the broker longer than the --ack-timeout it was given. Wait ack_timeout "
            f"seconds (flush(ack_timeout)), and look at what flush returns: the number of "
            f"records still unacknowledged - when that is not 0 the output is NOT processed: "
            f"raise instead of committing (a flush with another timeout that is ignored ends "
            f"in a commit of an output the broker never acknowledged)", pytrace=False)
    if not commits:
        return
    waited = commits[0].at - produced.at
    given = (f"--ack-timeout {ACK_TIMEOUT:g}" if waited < ACK_TIMEOUT + 5 else
             f"not the --ack-timeout {ACK_TIMEOUT:g} it was given: wait ack_timeout seconds")
    why = (f"it committed {waited:.1f} s after sending the output, once its wait for the ack "
           f"had timed out ({given}): flush(timeout) returns how many "
           f"records are still unacknowledged - when that is not 0 the output is NOT "
           f"processed: raise instead of committing"
           if waited >= ACK_TIMEOUT - 0.5 else
           f"it committed {waited:.1f} s after sending the output, without waiting for the "
           f"ack: produce() only queues the record in the client - flush() (or wait for the "
           f"delivery report) until the broker acknowledged the output, THEN commit")
    pytest.fail(
        f"at-least-once: the worker committed its input offset while its output was not "
        f"acknowledged - the test held the output's Produce request, and an OffsetCommit "
        f"arrived anyway (requests in order: {early}); {why}. A crash right after that "
        f"commit loses the output, and the restarted worker resumes after it",
        pytrace=False)


def test_exactly_once_commits_the_offset_inside_the_transaction(learner: Any,
                                                                 kafka: Any) -> None:
    """The worker runs behind a proxy that kills it (SIGKILL) the moment it sends an
    OffsetCommit - the consumer's own commit, outside any transaction - before the broker
    sees it. A worker that commits its offsets in the transaction (TxnOffsetCommit) sends
    none and finishes; one that commits after commit_transaction is restarted, and must not
    process again a record whose output is already committed."""
    topics = {"input": kafka.create_topic("payments"), "output": kafka.create_topic("out")}
    group = kafka.group("worker-eos-wire")
    write_input(kafka, topics["input"])
    ready = threading.Event()
    workers: list[subprocess.Popen[bytes]] = []
    with KafkaProxy(kafka.bootstrap) as proxy:
        proxy.drop(OFFSET_COMMIT)

        def kill_the_worker(_request: KafkaRequest) -> None:
            if ready.wait(30):
                workers[0].send_signal(signal.SIGKILL)

        proxy.on_request(OFFSET_COMMIT, kill_the_worker)
        workers.append(start(learner, kafka, "exactly-once", topics, group,
                             bootstrap=proxy.bootstrap))
        ready.set()
        code = finished(workers[0], "exactly-once", "behind the proxy")
        events = proxy.events()
    order = wire(events, PRODUCE, ADD_OFFSETS_TO_TXN, TXN_OFFSET_COMMIT, END_TXN, OFFSET_COMMIT)
    if "OffsetCommit" not in order:
        assert code == 0, (f"exactly-once: the worker behind the proxy exited with {code}\n"
                           f"{stderr_tail(workers[0])}")
        return
    second = start(learner, kafka, "exactly-once", topics, group)
    code = finished(second, "exactly-once", "restarted after the kill")
    output = [v for _, v in read_topic(kafka, topics["output"], "read_committed")]
    twice = sorted({v for v in output if output.count(v) > 1})
    cut = order.index("OffsetCommit") + 1
    assert not twice, (
        f"exactly-once: the worker committed its input offset with the consumer's own "
        f"OffsetCommit, outside the transaction (requests until then: {order[:cut]}); killed "
        f"as that OffsetCommit arrived, its transaction was already committed and the offset "
        f"was not, so the restarted worker processed {twice} again - read_committed now "
        f"shows {output}. Commit the offset IN the transaction: "
        f"producer.send_offsets_to_transaction([...offset + 1], "
        f"consumer.consumer_group_metadata()) before commit_transaction(), never "
        f"consumer.commit()")
    assert code == 0, (f"exactly-once: the restarted worker exited with {code}\n"
                       f"{stderr_tail(second)}")


def test_exactly_once_workers_running_together_do_not_fence_each_other(learner: Any,
                                                                        kafka: Any) -> None:
    """A transactional.id names ONE worker: the next init_transactions() with that id fences
    whoever held it before, as a zombie. Worker A (group G, input IN-A) runs behind a proxy
    that holds its first EndTxn, so its first transaction stays open on the broker. Meanwhile
    two more exactly-once workers start: B of the same group on another input (IN-B: the
    group scaled out to another topic or partition) and C of another group on the same input
    (another service reading IN-A). Once both are producing, A's EndTxn goes on.
    With an id per worker (group + input topic + partition) nobody is fenced and all three
    finish; an id shared by two of them (the group alone, the input alone, a constant) fences
    A - its commit_transaction fails and it dies, though it was alive all along."""
    output = kafka.create_topic("out")
    inputs = {"IN-A": kafka.create_topic("pay-a"), "IN-B": kafka.create_topic("pay-b")}
    groups = {"G": kafka.group("payments"), "H": kafka.group("audit")}
    for topic in inputs.values():
        write_input(kafka, topic)
    cast = {"A": ("G", "IN-A"), "B": ("G", "IN-B"), "C": ("H", "IN-A")}

    def who(name: str) -> str:
        group, source = cast[name]
        return f"worker {name} (group {group}, input {source})"

    def launch(name: str, bootstrap: str | None = None) -> subprocess.Popen[bytes]:
        group, source = cast[name]
        return start(learner, kafka, "exactly-once",
                     {"input": inputs[source], "output": output}, groups[group],
                     bootstrap=bootstrap)

    procs: dict[str, subprocess.Popen[bytes]] = {}
    codes: dict[str, int] = {}
    errors: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(KafkaProxy(kafka.bootstrap))
        proxy.hold(END_TXN)
        procs["A"] = launch("A", proxy.bootstrap)
        try:
            # A worker that dies first never sends it: waiting stops there, and says so.
            deadline = time.monotonic() + 45
            while (not proxy.requests(END_TXN) and procs["A"].poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            if not proxy.requests(END_TXN):
                code = procs["A"].poll()
                pytest.fail(
                    f"exactly-once: {who('A')} "
                    + (f"exited with {code} before its first commit_transaction(): "
                       f"{(stderr_tail(procs['A']).splitlines() or ['(no stderr)'])[-1][:300]}"
                       if code is not None else
                       "sent no EndTxn (its first commit_transaction()) within 45 s")
                    + " - each worker commits its first transaction after its first records",
                    pytrace=False)
            # B and C reach the broker through proxies that only watch: once one has sent
            # its first output, its init_transactions() is done - and has fenced whoever
            # shared its transactional.id. A is let go then, not after B and C finished,
            # so its commit_transaction() waits a few seconds only.
            watches = {name: stack.enter_context(KafkaProxy(kafka.bootstrap))
                       for name in ("B", "C")}
            for name, watch in watches.items():
                procs[name] = launch(name, watch.bootstrap)
            for name, watch in watches.items():
                deadline = time.monotonic() + 45
                while (not watch.requests(PRODUCE) and procs[name].poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
        finally:
            proxy.release(END_TXN)
            for name, proc in procs.items():
                codes[name] = finished(proc, "exactly-once", who(name))
                errors[name] = stderr_tail(proc)
    failed = [name for name in ("A", "B", "C") if codes[name] != 0]
    if failed:
        seen = "; ".join(
            f"{who(name)} exited with {codes[name]}: "
            f"{(errors[name].splitlines() or ['(no stderr)'])[-1][:300]}" for name in failed)
        pytest.fail(
            f"exactly-once: live workers fenced each other - their transactional.id is "
            f"shared, not unique per worker: {seen}. The three ran at the same time (A held "
            f"in its first transaction while B, same group and another input, and C, "
            f"another group and the same input, started); expected all three to "
            f"finish: a transactional.id identifies ONE worker, so the next "
            f"init_transactions() with it fences the previous holder as a zombie and "
            f"aborts its transaction. An id shared by live workers (derived from the group "
            f"alone, the input alone, or a constant) makes them knock each other out; "
            f"derive it from what makes the worker unique AND stays the same on its "
            f"restart: group + input topic + partition", pytrace=False)
    got = [v for _, v in read_topic(kafka, output, "read_committed")]
    assert sorted(got) == sorted(f"processed:{v}" for v in PAYMENTS * 3), (
        f"exactly-once: after workers A, B and C each processed pay-0..pay-5 the output "
        f"(read_committed) holds {sorted(got)}; expected each payment three times, once per "
        f"worker")
