"""An event-sourced bank account (see README.md). SCHEMA, ConcurrencyError and setup() are
given; the rest is yours."""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

# Given by the lab (the verification writes legacy v1 rows into `events` directly).
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    stream_id      text NOT NULL,
    version        integer NOT NULL CHECK (version > 0),
    type           text NOT NULL,
    schema_version integer NOT NULL,
    data           jsonb NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    stream_id  text PRIMARY KEY,
    version    integer NOT NULL,
    state      jsonb NOT NULL
);
"""

CURRENT_SCHEMA = 2


class ConcurrencyError(Exception):
    """The stream is not at the version the caller expected."""


def setup(conn: Conn) -> None:
    with conn.transaction():
        conn.execute(SCHEMA)


def append(conn: Conn, stream_id: str, expected_version: int,
           events: list[dict[str, Any]]) -> int:
    """Append ``events`` ({"type", "data"}) as versions expected_version+1, ...; return the
    new version; raise ConcurrencyError if the stream is not at ``expected_version``."""
    raise NotImplementedError("append: check the expected version, insert the events")


def read_stream(conn: Conn, stream_id: str, after_version: int = 0) -> list[dict[str, Any]]:
    """[{"version", "type", "data"}] after ``after_version``, in order, in schema v2."""
    raise NotImplementedError("read_stream: select the events and upcast v1 to v2")


def replay(conn: Conn, stream_id: str) -> tuple[dict[str, Any], int]:
    """(state, version) from every event."""
    raise NotImplementedError("replay: fold all events")


def load(conn: Conn, stream_id: str) -> tuple[dict[str, Any], int]:
    """(state, version) from the latest snapshot plus the events after it."""
    raise NotImplementedError("load: snapshot + tail")


def save_snapshot(conn: Conn, stream_id: str) -> int:
    """Store the current state as the stream's snapshot; return its version."""
    raise NotImplementedError("save_snapshot: store load()'s state and version")
