"""An event-sourced bank account: the events are the truth, the state is derived.

* append() writes new events after the version the caller last saw (optimistic concurrency:
  if someone else appended meanwhile, the caller decided on stale state and must retry);
* the state is a fold of the events; a snapshot stores the fold at some version, so loading
  reads the snapshot and only the events after it;
* old events keep their old schema forever; they are *upcast* to the current schema when read.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

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
    PRIMARY KEY (stream_id, version)   -- one event per version: the concurrency guard
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


# --- writing -------------------------------------------------------------------------------

def current_version(conn: Conn, stream_id: str) -> int:
    row = conn.execute("SELECT coalesce(max(version), 0) FROM events WHERE stream_id = %s",
                       (stream_id,)).fetchone()
    return int(row[0]) if row else 0


def append(conn: Conn, stream_id: str, expected_version: int,
           events: list[dict[str, Any]]) -> int:
    """Append ``events`` ({"type", "data"}, current schema) as versions expected_version+1...
    Return the stream's new version; raise ConcurrencyError if it is not at
    ``expected_version`` - checked up front, and guaranteed by the primary key when two
    appends race: the second INSERT of the same (stream, version) waits for the first
    transaction and fails if it commits."""
    try:
        with conn.transaction():
            found = current_version(conn, stream_id)
            if found != expected_version:
                raise ConcurrencyError(
                    f"{stream_id}: expected version {expected_version}, found {found}")
            version = expected_version
            for event in events:
                version += 1
                conn.execute("INSERT INTO events (stream_id, version, type, schema_version, "
                             "data) VALUES (%s, %s, %s, %s, %s)",
                             (stream_id, version, event["type"], CURRENT_SCHEMA,
                              Jsonb(event["data"])))
    except psycopg.errors.UniqueViolation as exc:
        raise ConcurrencyError(f"{stream_id}: another append took version "
                               f"{expected_version + 1} first") from exc
    return version


# --- reading: upcasting --------------------------------------------------------------------

def upcast(event_type: str, schema_version: int, data: dict[str, Any]) -> dict[str, Any]:
    """Bring an event's data to the current schema. v1 stored amounts as decimal strings of
    euros ("12.50") and had no currency; v2 has integer cents and a currency. Decimal, never
    float: float("0.29") * 100 is 28.999999999999996."""
    if schema_version == 1:
        if event_type == "AccountOpened":
            return {**data, "currency": "EUR"}
        if event_type in ("MoneyDeposited", "MoneyWithdrawn"):
            # WRONG: float money
            return {"amount_cents": int(float(data["amount"]) * 100), "currency": "EUR"}
    return data


def read_stream(conn: Conn, stream_id: str, after_version: int = 0) -> list[dict[str, Any]]:
    """The stream's events after ``after_version``, in order, in the current schema. The
    stored rows are never rewritten: history stays as it was recorded."""
    rows = conn.execute("SELECT version, type, schema_version, data FROM events "
                        "WHERE stream_id = %s AND version > %s ORDER BY version",
                        (stream_id, after_version)).fetchall()
    return [{"version": v, "type": t, "data": upcast(t, s, d)} for v, t, s, d in rows]


# --- state ---------------------------------------------------------------------------------

def apply(state: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """One step of the fold (pure: returns a new state)."""
    data = event["data"]
    if event["type"] == "AccountOpened":
        return {"owner": data["owner"], "currency": data["currency"], "balance_cents": 0,
                "transactions": 0}
    if event["type"] == "MoneyDeposited":
        return {**state, "balance_cents": state["balance_cents"] + data["amount_cents"],
                "transactions": state["transactions"] + 1}
    if event["type"] == "MoneyWithdrawn":
        return {**state, "balance_cents": state["balance_cents"] - data["amount_cents"],
                "transactions": state["transactions"] + 1}
    raise ValueError(f"unknown event type {event['type']!r}")


def fold(state: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    for event in events:
        state = apply(state, event)
    return state


def replay(conn: Conn, stream_id: str) -> tuple[dict[str, Any], int]:
    """State and version from every event, ignoring snapshots."""
    events = read_stream(conn, stream_id)
    return fold({}, events), (events[-1]["version"] if events else 0)


def load(conn: Conn, stream_id: str) -> tuple[dict[str, Any], int]:
    """State and version from the latest snapshot plus the events after it."""
    row = conn.execute("SELECT version, state FROM snapshots WHERE stream_id = %s",
                       (stream_id,)).fetchone()
    state, version = (row[1], row[0]) if row else ({}, 0)
    tail = read_stream(conn, stream_id, after_version=version)
    return fold(state, tail), (tail[-1]["version"] if tail else version)


def save_snapshot(conn: Conn, stream_id: str) -> int:
    """Store the current state as the stream's snapshot; return its version."""
    with conn.transaction():
        state, version = load(conn, stream_id)
        conn.execute("INSERT INTO snapshots VALUES (%s, %s, %s) ON CONFLICT (stream_id) DO "
                     "UPDATE SET version = EXCLUDED.version, state = EXCLUDED.state "
                     "WHERE snapshots.version < EXCLUDED.version",
                     (stream_id, version, Jsonb(state)))
    return version
