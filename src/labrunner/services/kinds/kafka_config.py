"""The one-node KRaft broker's server.properties: what a test broker needs, and what makes
it start (and form groups) quickly. Data only; :mod:`.kafka` writes it."""

from __future__ import annotations

from pathlib import Path


def broker_properties(data: Path, port: int, controller_port: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        # One node: internal topics cannot have more replicas than brokers.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions: the first consumer group or transaction then takes
        # well under a second instead of creating 50 partitions.
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        # Tests form groups quickly: no initial delay, short minimum timeouts.
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "2000",
        "group.consumer.min.session.timeout.ms": "2000",
        "group.consumer.session.timeout.ms": "10000",
        "group.consumer.min.heartbeat.interval.ms": "100",
        "group.consumer.heartbeat.interval.ms": "500",
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "log.segment.bytes": "16777216",
        # Start-up: no lab compacts a topic (no cleaner threads to start), a test broker
        # needs few threads, and nothing is worth recovering from a fresh copy of the
        # template.
        "log.cleaner.enable": "false",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "num.replica.fetchers": "1",
        "controller.quorum.election.timeout.ms": "200",
        "controller.quorum.fetch.timeout.ms": "1000",
        "initial.broker.registration.timeout.ms": "10000",
    }
    return "".join(f"{k}={v}\n" for k, v in settings.items())
