"""ph5.2 - message queue vs event stream: the same jobs on a RabbitMQ work queue and on a Kafka
topic.

RabbitMQ: competing workers each get different jobs, a nacked or orphaned job comes back
(marked redelivered), and after the acks the queue is empty - checked through the management
API. Kafka: reading removes nothing; a new group reads everything, and a group that seeks to
offset 0 reads it all again; a record with a null value (a tombstone) is read past, as the
empty job, not crashed on: a log has no nack, so a poison record would hold the group there."""

from __future__ import annotations

import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pytest

from labrunner.testing import verdict

JOBS = [f"job-{n}" for n in range(10)]
RETRIES = 2  # more refused rabbit_enqueue calls, as a caller that retries would make


@dataclass(frozen=True)
class Payload:
    """A job body the happy path never sends, and what the learner's code must hand back
    for it: a payload is bytes, possibly empty, possibly not UTF-8, and a job all the same."""

    what: str
    raw: bytes | None  # what the broker holds; None: a Kafka record with a null value
    body: str          # the job's body as next_job / kafka_read_new return it
    mistake: str       # what a reader that loses or crashes on it does wrong


EMPTY = Payload("the empty job (a body of 0 bytes)", b"", "",
                "an empty body is a job like any other: a reader that skips it "
                "(`if not body: continue`) loses a job its producer sent")
NOT_UTF8 = Payload("a job that is not UTF-8 (Latin-1 'caf\\xe9': 0xE9 alone)", b"caf\xe9",
                   "caf\ufffd",
                   "a body is bytes, and not every producer writes UTF-8: decode with "
                   "errors='replace' (each bad sequence becomes U+FFFD, as Kafka's own "
                   "StringDeserializer does) - a strict decode() raises on it")
PAYLOADS = [EMPTY, NOT_UTF8]
DUPLICATE = Payload("job-0 a second time (the same job published twice, as a producer "
                    "that retries does)", b"job-0", "job-0",
                    "a job in the log twice is two records and two jobs: a reader (or a "
                    "publisher) that drops a body equal to one it has seen loses one; "
                    "duplicates are told apart by record (partition, offset) or by a job id, "
                    "never by the payload")
TOMBSTONE = Payload("a record with a null value (a tombstone)", None, "",
                    "a record whose value is None (a tombstone, a producer that sent no "
                    "value) is the empty job: read it as \"\" (msg.value() or b\"\")")


# --- helpers ---------------------------------------------------------------------------

def queue_contents(rabbitmq: Any, queue: str) -> list[str]:
    """What the queue still holds, asked of the management API (a get that puts every
    message straight back, so looking changes nothing)."""
    vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
    got = rabbitmq.api("POST", f"/queues/{vhost}/{queue}/get",
                       {"count": 100, "ackmode": "reject_requeue_true", "encoding": "auto"})
    return [m["payload"] for m in got]


def assert_queue_empty(rabbitmq: Any, queue: str) -> None:
    left = queue_contents(rabbitmq, queue)
    assert left == [], (
        f"after every job was acknowledged the queue still holds {left}: on a work queue an "
        "acked message is deleted (and an unacked one comes back when its worker leaves)")


def take(worker: Any, timeout: float = 3.0) -> Any:
    job = worker.next_job(timeout)
    assert job is None or isinstance(getattr(job, "body", None), str), (
        f"next_job returned {job!r}: expected a Job (body, redelivered, delivery_tag) or None")
    return job


def records_on_broker(kafka: Any, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.consumer_config("test-watermarks"))
    try:
        meta = kafka.admin().list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def positions(kafka: Any, topic: str, group: str) -> dict[int, tuple[int, int]]:
    """Per partition: (the group's committed offset, the end of the log); -1001 = none."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.consumer_config(group))
    try:
        meta = kafka.admin().list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
        return {tp.partition: (committed[tp.partition],
                               consumer.get_watermark_offsets(tp, timeout=10)[1])
                for tp in parts}
    finally:
        consumer.close()


def produce_split(kafka: Any, topic: str, jobs: list[str]) -> None:
    from confluent_kafka import Producer

    producer = Producer(kafka.producer_config(acks="all"))
    for n, body in enumerate(jobs):
        producer.produce(topic, value=body.encode(), partition=n % 2)
    assert producer.flush(30) == 0, "the test's producer could not deliver the jobs"


def assert_all_jobs(got: Any, who: str, why: str) -> None:
    assert isinstance(got, list), f"{who} returned {got!r:.80}; expected a list of job bodies"
    assert sorted(got) == sorted(JOBS), (
        f"{who} read {len(got)} jobs {sorted(got)[:4]}...; expected each of the 10 jobs once: "
        f"{why}")


def assert_survives_a_broker_restart(rabbitmq: Any, queue: str) -> None:
    """A job queue outlives a broker restart only if the queue is durable AND each message
    is persistent (delivery_mode 2): read from the management API, which reports both."""
    vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
    info = rabbitmq.api("GET", f"/queues/{vhost}/{queue}")
    assert info.get("durable") is True, (
        f"the queue {queue!r} is not durable: a broker restart deletes it with every job in "
        f"it - queue_declare(queue, durable=True) (in the producer and the workers alike)")
    got = rabbitmq.api("POST", f"/queues/{vhost}/{queue}/get",
                       {"count": 100, "ackmode": "reject_requeue_true", "encoding": "auto"})
    transient = [m["payload"] for m in got
                 if (m.get("properties") or {}).get("delivery_mode") != 2]
    assert not transient, (
        f"{len(transient)} of {len(got)} jobs were published as transient messages (e.g. "
        f"{transient[0]!r}): a durable queue keeps only persistent messages over a restart - "
        f"publish with properties=pika.BasicProperties(delivery_mode=2)")


def amqp_connections_left(rabbitmq: Any,
                          timeout: float = 30.0) -> list[dict[str, Any]] | None:
    """The AMQP connections still open on the test's vhost, from the management API; None
    where the broker does not collect them (the official image's
    management_agent.disable_metrics_collector: its API lists no connection at all).

    The API lists a new connection only at its next statistics round (a second or more
    later), but drops a closed one at once. So the test opens a marker connection of its own
    AFTER the learner's calls and waits until the API lists it: by then every connection
    opened before it and still open is listed too. A closed connection may take a moment
    to go: the others are read again for a few seconds until none is left."""
    import pika

    if (rabbitmq.api("GET", "/overview") or {}).get("disable_stats"):
        return None
    vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
    params = pika.URLParameters(rabbitmq.url)
    params.client_properties = {"connection_name": "labrunner-marker"}
    marker = pika.BlockingConnection(params)
    try:
        def others() -> tuple[bool, list[dict[str, Any]]]:
            listed = rabbitmq.api("GET", f"/vhosts/{vhost}/connections") or []
            mine = [c for c in listed if (c.get("client_properties") or {})
                    .get("connection_name") == "labrunner-marker"]
            return bool(mine), [c for c in listed if c not in mine]

        deadline = time.monotonic() + timeout
        seen, left = others()
        while not seen:
            if time.monotonic() > deadline:
                # Not even the test's own connection: this broker's API lists none.
                return left or None
            time.sleep(0.1)
            seen, left = others()
        settle = time.monotonic() + 5.0
        while left and time.monotonic() < settle:
            time.sleep(0.2)
            left = others()[1]
        return left
    finally:
        marker.close()


# --- RabbitMQ: a work queue --------------------------------------------------------------

def test_competing_workers_share_the_queue(learner: Any, rabbitmq: Any) -> None:
    """While worker 1 is busy with one job, worker 2 does the other nine: each job goes to
    exactly one worker, and acknowledged jobs are gone from the queue."""
    mod = learner.load("workload")
    mod.rabbit_enqueue(rabbitmq.url, "work", JOBS)
    assert_survives_a_broker_restart(rabbitmq, "work")
    w1, w2 = mod.RabbitWorker(rabbitmq.url, "work"), mod.RabbitWorker(rabbitmq.url, "work")
    try:
        busy = take(w1)
        assert busy is not None, "worker 1 got no job from a queue holding 10"
        others = []
        # The other 9, each at once: no wait for a tenth (a job delivered to both, or
        # published twice, would be left over and named by assert_queue_empty below).
        for _ in range(len(JOBS) - 1):
            job = take(w2, 1.0)
            if job is None:
                break
            others.append(job.body)
            w2.ack(job)
        assert len(others) == 9 and busy.body not in others, (
            f"worker 2 got {len(others)} jobs ({others}) while worker 1 was busy with "
            f"{busy.body}; expected the other 9: worker 1 is sitting on jobs it has not "
            "started - limit unacknowledged jobs per worker with basic_qos(prefetch_count=1) "
            "and acknowledge by hand")
        w1.ack(busy)
        assert sorted([busy.body, *others]) == sorted(JOBS), (
            f"the two workers got {sorted([busy.body, *others])}: every job exactly once")
    finally:
        w1.close()
        w2.close()
    assert_queue_empty(rabbitmq, "work")


def test_nacked_and_orphaned_jobs_are_redelivered(learner: Any, rabbitmq: Any) -> None:
    """A nacked job comes back for another worker; a job whose worker died before acking
    comes back too; both are marked redelivered. After the acks the queue is empty."""
    mod = learner.load("workload")
    mod.rabbit_enqueue(rabbitmq.url, "work", ["job-a", "job-b"])

    w1 = mod.RabbitWorker(rabbitmq.url, "work")
    first = take(w1)
    assert first is not None and first.body == "job-a", f"worker 1 expected job-a, got {first}"
    w1.nack(first)
    w1.close()

    w2 = mod.RabbitWorker(rabbitmq.url, "work")
    again = take(w2)
    assert again is not None and again.body == "job-a", (
        f"after worker 1 nacked job-a, worker 2 got {again and again.body!r}; expected job-a "
        "back at the head of the queue: nack with requeue=True gives the job back, "
        "requeue=False (or auto-ack) throws it away")
    assert again.redelivered, (
        "job-a came back with redelivered=False: report the broker's redelivered flag, it "
        "is how a worker knows a job may have been half done before")
    w2.ack(again)
    second = take(w2)
    assert second is not None and second.body == "job-b", f"expected job-b, got {second}"
    w2.close()  # dies without acking job-b

    w3 = mod.RabbitWorker(rabbitmq.url, "work")
    try:
        orphan = take(w3)
        assert orphan is not None and orphan.body == "job-b" and orphan.redelivered, (
            f"worker 2 left without acking job-b, and worker 3 got {orphan!r}; expected job-b "
            "redelivered: with manual acks an unacknowledged job survives its worker "
            "(with auto_ack it was deleted the moment it was sent, and is lost)")
        w3.ack(orphan)
        assert take(w3, 0.3) is None, "the queue should be empty after job-a and job-b"
    finally:
        w3.close()
    assert_queue_empty(rabbitmq, "work")


def test_a_refused_job_is_not_reported_enqueued(learner: Any, rabbitmq: Any) -> None:
    """The broker refuses jobs: a policy caps the queue at 2 messages and rejects publishes
    beyond that (overflow reject-publish: the broker nacks them - a disk or memory alarm, a
    quota, do the same). rabbit_enqueue of 5 jobs must raise: only a publisher confirm says a
    job is on the broker, and the caller must not believe 3 dropped jobs are queued. And
    rabbit_enqueue leaves no AMQP connection open, whether it returned or raised."""
    mod = learner.load("workload")
    # A connection left open must stay open until the test has looked: a garbage
    # collection would close it whenever it happens to run (harness.py).
    harness = learner.harness()
    collecting = harness.hold_collection()
    try:
        refused_job_raises_and_closes(mod, rabbitmq)
    finally:
        harness.release_collection(collecting)


def refused_job_raises_and_closes(mod: Any, rabbitmq: Any) -> None:
    vhost = urllib.parse.quote(rabbitmq.vhost, safe="")
    rabbitmq.api("PUT", f"/policies/{vhost}/cap-full", {
        "pattern": "^full$", "apply-to": "queues",
        "definition": {"max-length": 2, "overflow": "reject-publish"}})
    mod.rabbit_enqueue(rabbitmq.url, "ok", ["job-ok"])
    jobs = [f"job-{n}" for n in range(5)]
    outcome, detail = verdict("rabbit_enqueue", mod.rabbit_enqueue, rabbitmq.url, "full", jobs,
                              refusal=(), crash=None)
    held = queue_contents(rabbitmq, "full")
    if outcome == "ok":
        pytest.fail(
            f"rabbit_enqueue returned normally for {len(jobs)} jobs, but the broker refused "
            f"{len(jobs) - len(held)} of them (the queue is capped at 2 with overflow "
            f"reject-publish; it holds {held}): expected it to raise - the caller now "
            "believes jobs are queued that are lost. Without publisher confirms a publish is "
            "fire-and-forget: channel.confirm_delivery() makes basic_publish raise NackError "
            "for a job the broker refuses - let that reach the caller, never catch it and "
            "carry on", pytrace=False)
    # Every path of rabbit_enqueue closes its connection: the one that succeeded above and,
    # above all, the one the broker refused - a client that leaks a connection each time the
    # broker pushes back (a retry loop, a full queue, a disk alarm) adds to the pressure
    # until the broker's connection limit or file descriptors run out for everyone. The
    # caller retries twice more, as a caller would, while the queue is still full.
    for _ in range(RETRIES):
        verdict("rabbit_enqueue", mod.rabbit_enqueue, rabbitmq.url, "full", jobs,
                refusal=(), crash=None)
    left = amqp_connections_left(rabbitmq)  # None: this broker cannot tell (docker image)
    if left:
        opened = ", ".join(sorted(str(c.get("name")) for c in left))
        pytest.fail(
            f"after rabbit_enqueue returned once (1 job queued) and raised {1 + RETRIES} "
            f"times (the broker refused jobs; the caller retried), the management API still "
            f"lists {len(left)} open AMQP "
            f"connection(s) from it ({opened}); expected none: rabbit_enqueue must close "
            "its connection on every path, the refusal too - open it in "
            "`with pika.BlockingConnection(...) as connection:` or close it in a finally "
            "(closing only the channel keeps the connection). A connection leaked per "
            "refused enqueue piles up exactly when the broker is under pressure, until its "
            "connection limit or file descriptors refuse every publisher", pytrace=False)


def publish_raw(rabbitmq: Any, queue: str, bodies: list[bytes]) -> None:
    """The test's own publisher: bodies as bytes, persistent, on a durable queue."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=True)
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(exchange="", routing_key=queue, body=body,
                                  properties=pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


@pytest.mark.parametrize("payload", PAYLOADS, ids=["empty", "not-utf8"])
def test_a_worker_gets_every_payload(learner: Any, rabbitmq: Any, payload: Payload) -> None:
    """job-0, then the odd payload, then job-1 on the queue (the empty job through
    rabbit_enqueue; bytes that are no text through the test's own publisher): one worker
    gets all three, in order, and acks them; the queue is empty afterwards."""
    mod = learner.load("workload")
    assert payload.raw is not None
    try:
        text = payload.raw.decode()
    except UnicodeDecodeError:
        publish_raw(rabbitmq, "odd", [b"job-0", payload.raw, b"job-1"])
        sent = "the test published"
    else:
        mod.rabbit_enqueue(rabbitmq.url, "odd", ["job-0", text, "job-1"])
        sent = "rabbit_enqueue put"
    want = ["job-0", payload.body, "job-1"]
    worker = mod.RabbitWorker(rabbitmq.url, "odd")
    got: list[str] = []
    crashed = ""
    try:
        for _ in want:
            try:
                job = take(worker)
            except Exception as exc:  # noqa: BLE001 - the learner's error, named below
                crashed = f"{type(exc).__name__}: {str(exc)[:160]}"
                break
            if job is None:
                break
            got.append(job.body)
            worker.ack(job)
    finally:
        try:
            worker.close()
        except Exception:  # noqa: BLE001,S110 - a worker that crashed may not close cleanly
            pass
    poison = ("; the job goes back to the queue unacked and kills the next worker it is "
              "lent to as well: a poison message" if crashed else "")
    seen = f"raised {crashed} after {got}" if crashed else f"returned {got}"
    assert got == want, (
        f"{sent} job-0, {payload.what}, job-1 on the queue; the worker's next_job {seen}, "
        f"expected {want}: {payload.mistake}{poison}")
    assert_queue_empty(rabbitmq, "odd")


# --- Kafka: a log ----------------------------------------------------------------------------

def assert_nothing_new(mod: Any, kafka: Any, topic: str,
                       where: dict[int, tuple[int, int]]) -> None:
    """Group workers read the whole log and committed (``where``: per partition, its
    committed offset and the end of the log): its next read finds nothing new, and says so
    by returning [] - the read with nothing to read is a path of its own."""
    outcome, again = verdict("kafka_read_new", mod.kafka_read_new, kafka.bootstrap, topic,
                             kafka.group("workers"), refusal=(), crash=None)
    assert outcome == "ok", (
        f"the second kafka_read_new of group workers, with nothing new in the log, raised "
        f"{again}; expected []: a read that finds nothing new is no error. It consumed "
        f"nothing, so it has no position to commit: commit() with nothing consumed raises "
        f"KafkaException _NO_OFFSET ('No offset stored') - commit only when the read "
        f"returned records")
    if not again:
        return
    behind = {p: c for p, (c, end) in where.items() if c < end}
    assert not (behind and len(behind) < len(where)), (
        f"group workers read {again} again on its second kafka_read_new: after its first "
        f"read the group had committed the end of some partitions but not of partitions "
        f"{sorted(behind)} (committed offset, end of log: {where}) - commit(message=msg) "
        f"commits only msg's partition; commit every partition read (commit() with no "
        f"argument commits each assigned partition's position)")
    last_read = sorted(p for p, (c, end) in where.items() if end > 0 and c == end - 1)
    assert not last_read, (
        f"group workers read {again} again on its second kafka_read_new: its first read "
        f"committed, in partitions {last_read}, the offset of the LAST record it read "
        f"(committed offset, end of log: {where}), so that record is read again - a "
        f"committed offset is the NEXT record to read: last offset + 1 (commit(message=msg) "
        f"adds the 1 itself; commit() with no argument commits each partition's position)")
    assert again == [], (
        f"group workers read {again} again on its second kafka_read_new; expected nothing: "
        "commit the group's position after reading")


def test_kafka_keeps_the_log_for_new_groups_and_replay(learner: Any, kafka: Any) -> None:
    """Reading a topic removes nothing: the group that read it has nothing new, a new group
    reads all 10 jobs, and the first group reads all 10 again after seeking to offset 0."""
    mod = learner.load("workload")
    topic = kafka.create_topic("jobs", 2)
    # The ten jobs go to both partitions, five each (a producer's sticky partitioner may put
    # a quick burst all in one): a group's position is per partition, and a commit that
    # covers only one of them must show.
    produce_split(kafka, topic, JOBS)

    assert_all_jobs(mod.kafka_read_new(kafka.bootstrap, topic, kafka.group("workers")),
                    "kafka_read_new for group workers", "a new group starts at the beginning")
    where = positions(kafka, topic, "workers")  # what the first read committed
    assert_nothing_new(mod, kafka, topic, where)
    assert records_on_broker(kafka, topic) == 10, "the topic should still hold all 10 jobs"

    assert_all_jobs(mod.kafka_read_new(kafka.bootstrap, topic, kafka.group("auditors")),
                    "kafka_read_new for a brand-new group auditors",
                    "the log keeps what was read, so a new group (auto.offset.reset "
                    "'earliest') replays it all")
    # Two more jobs arrive before the replay: replaying moves the group ITSELF back to 0,
    # so it reads them too, and afterwards they are no longer new to it.
    more = ["job-10", "job-11"]
    mod.kafka_publish(kafka.bootstrap, topic, more)
    replayed = mod.kafka_replay(kafka.bootstrap, topic, kafka.group("workers"))
    assert isinstance(replayed, list), (
        f"kafka_replay returned {replayed!r:.80}; expected a list of job bodies")
    assert sorted(replayed) == sorted(JOBS + more), (
        f"kafka_replay for group workers read {len(replayed)} jobs {sorted(replayed)[:4]}...; "
        f"expected all 12 in the log: replay moves the group's partitions back to offset 0 "
        f"(seek / OFFSET_BEGINNING in on_assign) - its committed position is at the end, so "
        f"auto.offset.reset does nothing")
    after = mod.kafka_read_new(kafka.bootstrap, topic, kafka.group("workers"))
    assert sorted(after) != sorted(more), (
        f"after kafka_replay read all 12 jobs, group workers still had {after} to read - the "
        f"two published since its last read: the replay did not move group workers itself "
        f"(another group id, or no commit). Replay = the SAME group seeks its partitions to "
        f"offset 0, reads to the end and commits")
    assert after == [], (
        f"after the replay group workers still had {after} to read; expected nothing: "
        "commit the position the replay reached")


def test_a_refused_record_is_not_reported_published(learner: Any, kafka: Any) -> None:
    """The broker refuses a record: the topic takes records of at most 1 KiB
    (max.message.bytes) and one job is 8 KiB of incompressible text. kafka_publish must
    raise, as rabbit_enqueue does for a refused job: the caller must not believe a job is in
    the log that the broker never stored."""
    mod = learner.load("workload")
    topic = kafka.create_topic("capped", 1, **{"max.message.bytes": "1024"})
    big = "job-big-" + os.urandom(4096).hex()   # random: no compression brings it under 1 KiB
    jobs = ["job-small", big]
    outcome, detail = verdict("kafka_publish", mod.kafka_publish, kafka.bootstrap, topic, jobs,
                              refusal=(), crash=None)
    stored = records_on_broker(kafka, topic)
    if outcome == "ok":
        pytest.fail(
            f"kafka_publish returned normally for {len(jobs)} jobs, but the broker stored "
            f"{stored} of them (the topic takes records of at most 1 KiB, max.message.bytes; "
            f"one job is {len(big) // 1024} KiB: the broker answered MSG_SIZE_TOO_LARGE): "
            f"expected it to raise - the caller now believes a job is in the log that is not. "
            f"producer.flush() only returns how many records are still WAITING; a refused "
            f"record is not waiting, so flush() returns 0 for it too. The broker's answer "
            f"for each record comes to its delivery report: produce(..., on_delivery=cb), "
            f"and after flush() raise if any report carried an error (flush() runs the "
            f"reports: look after it, not before). With acks=0 the producer never waits for "
            f"an answer, and every report says delivered: keep acks=all", pytrace=False)
    # The refusal belongs to that call: the next one, whose jobs the broker stores, returns.
    outcome, detail = verdict("kafka_publish", mod.kafka_publish, kafka.bootstrap, topic,
                              ["job-after"], refusal=(), crash=None)
    if outcome != "ok":
        pytest.fail(
            f"after one kafka_publish was refused, the next call, with one small job the "
            f"broker stored ({records_on_broker(kafka, topic) - stored} record added), raised "
            f"{detail}; expected it to return: the refusal of an earlier call leaked into "
            f"this one (errors kept in a module global, a class attribute or a default "
            f"argument, never emptied). Each call collects its own delivery reports",
            pytrace=False)


def test_a_batch_past_the_producers_local_queue_is_all_published(learner: Any,
                                                                 kafka: Any) -> None:
    """More jobs in one call than librdkafka's local queue holds (queue.buffering.max.messages,
    100,000 by default): a record leaves that queue only when its delivery report is served,
    and reports are served only by poll() or flush(). A loop that only produce()s meets
    BufferError at record 100,001; the batch must be published all the same."""
    mod = learner.load("workload")
    topic = kafka.create_topic("batch", 1)
    jobs = [f"j{n}" for n in range(120_000)]
    outcome, detail = verdict("kafka_publish", mod.kafka_publish, kafka.bootstrap, topic, jobs,
                              refusal=(), crash=None)
    stored = records_on_broker(kafka, topic)
    did = "returned" if outcome == "ok" else f"raised {detail}"
    assert outcome == "ok" and stored == len(jobs), (
        f"kafka_publish of {len(jobs):,} jobs {did} and the broker holds {stored:,} of them; "
        f"expected all {len(jobs):,} published: "
        "librdkafka keeps each produced record in a local queue (at most 100,000, "
        "queue.buffering.max.messages) until its delivery report is served, and reports are "
        "served only by poll() or flush() - call producer.poll(0) as you produce, and on "
        "BufferError (the queue is full) poll(1) to let reports drain and produce that "
        "record again")


@pytest.mark.parametrize("payload", [TOMBSTONE, *PAYLOADS, DUPLICATE],
                         ids=["null", "empty", "not-utf8", "duplicate"])
def test_an_odd_record_does_not_stop_the_group(learner: Any, kafka: Any,
                                               payload: Payload) -> None:
    """A log has no nack: a record the reader cannot get past stops its group at that offset
    for good, and a record it skips is a job lost. job-0, the odd record, job-1 (the empty
    job through kafka_publish, the others from the test's producer): kafka_read_new returns
    all three in order, then nothing."""
    from confluent_kafka import Producer

    mod = learner.load("workload")
    topic = kafka.create_topic("odd", 1)
    text = None
    if payload.raw is not None:
        try:
            text = payload.raw.decode()
        except UnicodeDecodeError:
            text = None
    if text is not None:
        mod.kafka_publish(kafka.bootstrap, topic, ["job-0", text, "job-1"])
    else:
        producer = Producer(kafka.producer_config(acks="all"))
        for body in (b"job-0", payload.raw, b"job-1"):
            producer.produce(topic, key=b"k", value=body)
        assert producer.flush(30) == 0, "the test's producer could not deliver the records"
    group = kafka.group("odd")
    want = ["job-0", payload.body, "job-1"]
    poisoned = (f"{payload.mistake}. A log has no nack and its group advances only by its "
                "committed offset: a record the reader crashes on is a poison pill that stops "
                "every later read of the group at the same offset, for good; a record it "
                "skips is a job nobody does")
    for attempt in ("first", "second"):
        _, got = verdict("kafka_read_new", mod.kafka_read_new, kafka.bootstrap, topic, group,
                         refusal=(), crash=f"on the {attempt} call, over the records job-0, "
                         f"{payload.what}, job-1; expected {want}: {poisoned}")
        if attempt == "first":
            assert isinstance(got, list) and got == want, (
                f"kafka_read_new over job-0, {payload.what}, job-1 returned {got!r:.120}; "
                f"expected {want}: {poisoned}")
    assert got == [], (
        f"after reading job-0, {payload.what} and job-1, group {group} read {got!r:.120} "
        f"again on its next kafka_read_new; expected nothing: it must commit past every "
        f"record it read, the odd one too")
