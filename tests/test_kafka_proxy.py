"""labrunner.testing.KafkaProxy against the real broker: clients given the proxy's bootstrap
stay behind it (the broker addresses it announces are rewritten), every request is recorded
(a Produce's acks, the transaction's requests in order), and held, refused, dropped
requests, a kill at a request's arrival and a failed Fetch answer do what the labs rely on."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from labrunner.testing import KafkaProxy, wait_until
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

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def broker(local_services: Any) -> Iterator[tuple[str, str]]:
    """(bootstrap, a fresh name prefix) on the session's real Kafka; the prefix's topics
    and groups are deleted afterwards."""
    from labrunner.services.kinds import kafka as kf

    endpoint = local_services.ensure(["kafka"])["kafka"]
    prefix = f"lr_kproxy_{uuid.uuid4().hex[:8]}"
    yield endpoint.url, prefix
    kf.delete_prefix(endpoint, prefix)


def make_topic(bootstrap: str, name: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(timeout=20)
    return name


def fill(bootstrap: str, topic: str, count: int) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 0})
    for n in range(count):
        producer.produce(topic, value=f"v{n}".encode(), partition=0)
    assert producer.flush(20) == 0


def consumer(bootstrap: str, group: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 0,
                     "enable.auto.commit": False, "auto.offset.reset": "earliest"})


def committed(bootstrap: str, topic: str, group: str) -> int:
    from confluent_kafka import TopicPartition

    reader = consumer(bootstrap, group)
    try:
        (tp,) = reader.committed([TopicPartition(topic, 0)], timeout=15)
        return int(tp.offset)
    finally:
        reader.close()


def test_clients_stay_behind_the_proxy_and_produce_acks_are_read(
        broker: tuple[str, str]) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    bootstrap, prefix = broker
    topic = make_topic(bootstrap, f"{prefix}.acks")
    with KafkaProxy(bootstrap) as proxy:
        port = int(proxy.bootstrap.rsplit(":", 1)[1])
        meta = AdminClient({"bootstrap.servers": proxy.bootstrap,
                            "log_level": 0}).list_topics(timeout=15)
        assert {b.port for b in meta.brokers.values()} == {port}, (
            "the brokers a client behind the proxy learns of must be the proxy's ports")
        for acks in ("0", "1", "all"):
            producer = Producer({"bootstrap.servers": proxy.bootstrap, "acks": acks,
                                 "log_level": 0})
            producer.produce(topic, value=acks.encode(), partition=0)
            assert producer.flush(20) == 0
        seen = [r.acks for r in proxy.requests(PRODUCE)]
        assert seen == [0, 1, -1], f"acks of the Produce requests: {seen}"
        assert not proxy.errors


def test_a_transaction_and_a_commit_are_seen_in_order(broker: tuple[str, str]) -> None:
    from confluent_kafka import Producer, TopicPartition

    bootstrap, prefix = broker
    source, sink = (make_topic(bootstrap, f"{prefix}.{n}") for n in ("in", "out"))
    fill(bootstrap, source, 2)
    with KafkaProxy(bootstrap) as proxy:
        reader = consumer(proxy.bootstrap, f"{prefix}.g")
        reader.assign([TopicPartition(source, 0)])
        msg = reader.poll(15)
        assert msg is not None and msg.error() is None
        producer = Producer({"bootstrap.servers": proxy.bootstrap, "log_level": 0,
                             "transactional.id": f"{prefix}.tx"})
        producer.init_transactions(20)
        producer.begin_transaction()
        producer.produce(sink, value=b"x", partition=0)
        assert producer.flush(20) == 0  # the Produce goes before AddOffsetsToTxn
        producer.send_offsets_to_transaction([TopicPartition(source, 0, 1)],
                                             reader.consumer_group_metadata(), 20)
        producer.commit_transaction(20)
        reader.commit(message=msg, asynchronous=False)
        reader.close()
        keys = [r.api_key for r in proxy.requests(PRODUCE, ADD_OFFSETS_TO_TXN,
                                                   TXN_OFFSET_COMMIT, END_TXN, OFFSET_COMMIT)]
        assert keys == [PRODUCE, ADD_OFFSETS_TO_TXN, TXN_OFFSET_COMMIT, END_TXN,
                        OFFSET_COMMIT], keys
        (produce,) = proxy.requests(PRODUCE)
        assert (produce.acks, produce.transactional_id) == (-1, f"{prefix}.tx")
        # init_transactions(): its InitProducerId names the transactional.id too
        inits = {r.transactional_id for r in proxy.requests(INIT_PRODUCER_ID)}
        assert inits == {f"{prefix}.tx"}, f"InitProducerId transactional ids: {inits}"


def test_a_held_commit_is_stored_only_once_released(broker: tuple[str, str]) -> None:
    from confluent_kafka import TopicPartition

    bootstrap, prefix = broker
    topic = make_topic(bootstrap, f"{prefix}.hold")
    group = f"{prefix}.g"
    with KafkaProxy(bootstrap) as proxy:
        member = consumer(proxy.bootstrap, group)
        proxy.hold(OFFSET_COMMIT)
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(member.commit(
            offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)), daemon=True)
        worker.start()
        proxy.wait_for(OFFSET_COMMIT)
        assert proxy.held() == 1 and not done, "the commit must wait while it is held"
        assert committed(bootstrap, topic, group) < 0
        proxy.release(OFFSET_COMMIT)
        worker.join(20)
        assert done, "the synchronous commit did not return once released"
        assert committed(bootstrap, topic, group) == 3
        assert [e.kind for e in proxy.events() if e.request.api_key == OFFSET_COMMIT] == [
            "request", "answer"]
        member.close()


def test_a_refused_commit_raises_and_stores_nothing(broker: tuple[str, str]) -> None:
    from confluent_kafka import KafkaException, TopicPartition

    bootstrap, prefix = broker
    topic = make_topic(bootstrap, f"{prefix}.refuse")
    group = f"{prefix}.g"
    with KafkaProxy(bootstrap) as proxy:
        member = consumer(proxy.bootstrap, group)
        proxy.refuse(OFFSET_COMMIT, count=1)
        with pytest.raises(KafkaException):
            member.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        assert committed(bootstrap, topic, group) < 0
        member.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
        assert committed(bootstrap, topic, group) == 4
        kinds = [e.kind for e in proxy.events() if e.request.api_key == OFFSET_COMMIT]
        assert kinds == ["request", "refused", "answer", "request", "answer"], kinds
        member.close()


CHILD = """
import sys
from confluent_kafka import Consumer, TopicPartition
bootstrap, topic, group = sys.argv[1:4]
member = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 0})
member.commit(offsets=[TopicPartition(topic, 0, 5)], asynchronous=False)
print("commit returned", flush=True)
"""


@pytest.mark.parametrize("rule", ["drop", "hold"])
def test_a_process_killed_at_its_commit_stores_nothing(broker: tuple[str, str],
                                                       rule: str) -> None:
    """The hook runs when the OffsetCommit arrives: the process is killed there; a dropped
    request, or a held one whose client is gone, never reaches the broker."""
    bootstrap, prefix = broker
    topic = make_topic(bootstrap, f"{prefix}.kill")
    group = f"{prefix}.g"
    with KafkaProxy(bootstrap) as proxy:
        children: list[subprocess.Popen[bytes]] = []
        started = threading.Event()
        getattr(proxy, rule)(OFFSET_COMMIT)
        proxy.on_request(OFFSET_COMMIT,
                         lambda _request: started.wait(10) and children[0].kill())
        child = subprocess.Popen([sys.executable, "-c", CHILD, proxy.bootstrap, topic, group],
                                 stdout=subprocess.PIPE)
        children.append(child)
        started.set()
        assert child.stdout is not None
        assert child.stdout.read() == b"", "the child was not killed at its commit"
        child.wait()
        proxy.release(OFFSET_COMMIT)
        want = ["request", "dropped" if rule == "drop" else "gone"]
        wait_until(lambda: [e.kind for e in proxy.events()
                            if e.request.api_key == OFFSET_COMMIT] == want,
                   f"the proxy to record the commit as {want}")
        assert committed(bootstrap, topic, group) < 0



def test_a_failed_fetch_reaches_poll_as_an_error_then_the_records_come(
        broker: tuple[str, str]) -> None:
    """The first Fetch answer carrying records is failed: poll() returns a consumer error
    with that code (not the end of the partition), then every record once, then the end.
    The topic holds an aborted transaction, so the answer lists it (read_committed): the
    fields after it are found past it."""
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

    bootstrap, prefix = broker
    topic = make_topic(bootstrap, f"{prefix}.fail")
    fill(bootstrap, topic, 2)
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 0,
                         "transactional.id": f"{prefix}.tx"})
    producer.init_transactions(20)
    for value, commit in ((b"aborted", False), (b"v2", True)):
        producer.begin_transaction()
        producer.produce(topic, value=value, partition=0)
        producer.flush(20)
        (producer.commit_transaction if commit else producer.abort_transaction)(20)
    with KafkaProxy(bootstrap) as proxy:
        proxy.fail_fetches(TOPIC_AUTHORIZATION_FAILED)
        reader = Consumer({"bootstrap.servers": proxy.bootstrap, "group.id": f"{prefix}.g",
                           "log_level": 0, "enable.auto.commit": False,
                           "auto.offset.reset": "earliest", "enable.partition.eof": True,
                           "isolation.level": "read_committed",
                           "fetch.error.backoff.ms": 100})
        seen: list[str] = []
        try:
            reader.assign([TopicPartition(topic, 0)])
            while not seen or seen[-1] != "eof":
                msg = reader.poll(15)
                assert msg is not None, f"poll() returned nothing after {seen}"
                err = msg.error()
                seen.append((msg.value() or b"").decode() if err is None else
                            "eof" if err.code() == KafkaError._PARTITION_EOF else
                            f"error {err.code()}")
        finally:
            reader.close()
        assert seen == [f"error {TOPIC_AUTHORIZATION_FAILED}", "v0", "v1", "v2", "eof"], seen
        kinds = [e.kind for e in proxy.events() if e.request.api_key == FETCH]
        assert kinds[:3] == ["request", "failed", "answer"], kinds
        assert kinds.count("failed") == 1 and not proxy.errors, (kinds, proxy.errors)
