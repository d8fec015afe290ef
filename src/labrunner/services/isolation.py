"""Names for the namespaces inside a shared service, one per test (a database, a Kafka topic
and group prefix, a RabbitMQ vhost, a Prometheus job; each kind makes its own with
:meth:`ServiceKind.open`). Labs and graded submissions running side by side on one set of
services never see each other's data."""

from __future__ import annotations

import secrets


def namespace(run_id: str, counter: int, label: str = "") -> str:
    """A short unique name usable as database, prefix, vhost and job: ``lr_3fa2c1_7``."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in label.lower())[:20]
    return f"lr_{run_id}_{counter}" + (f"_{safe}" if safe else "")


def new_run_id() -> str:
    return secrets.token_hex(4)
