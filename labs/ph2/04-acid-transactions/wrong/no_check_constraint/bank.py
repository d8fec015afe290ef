"""WRONG: the no-negative-balance rule is only checked in Python; the schema allows anything.

A money transfer that is atomic, consistent, isolated and durable - on Postgres."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


class InsufficientFunds(Exception):
    """The source account holds less than the amount; nothing was changed."""


class UnknownAccount(Exception):
    """One of the two accounts does not exist; nothing was changed."""


def create_schema(conn: Conn) -> None:
    """Create the accounts and the transfer ledger.

    Consistency lives in the schema, so that no code path (a bug, a psql session, a
    migration) can break it: a balance is never negative, an amount is always positive,
    and the ledger only names accounts that exist. The tables are ordinary (logged)
    tables: every change is written to the WAL before COMMIT returns, which is what makes
    a committed transfer survive a crash (an UNLOGGED table would be emptied by one).
    """
    with conn.transaction():
        conn.execute("""
            CREATE TABLE accounts (
                id      integer PRIMARY KEY,
                balance bigint  NOT NULL  -- WRONG: the invariant lives only in Python
            )""")
        conn.execute("""
            CREATE TABLE transfers (
                id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                from_id    integer     NOT NULL REFERENCES accounts (id),
                to_id      integer     NOT NULL REFERENCES accounts (id),
                amount     bigint      NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            )""")


def transfer(conn: Conn, from_id: int, to_id: int, amount: int, *,
             after_debit: Callable[[], None] | None = None) -> int:
    """Move ``amount`` from one account to another and record it; return the ledger id.

    All or nothing: the debit, the credit and the ledger row commit together, or none of
    them does - whether this function raises, the connection drops or the server crashes
    in between. ``after_debit`` (if given) is called between the debit and the credit.
    """
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")
    if from_id == to_id:
        raise ValueError("cannot transfer to the same account")
    with conn.transaction():  # BEGIN ... COMMIT, or ROLLBACK if the block raises
        # The debit does check and write in one statement, under the row lock it takes.
        # A concurrent transfer from the same account waits for that lock, then
        # re-evaluates "balance >= amount" against the committed new balance (READ
        # COMMITTED re-checks the WHERE on the latest row version) - so two transfers
        # can never both spend the same money, and no update is lost.
        debited = conn.execute(
            "UPDATE accounts SET balance = balance - %s WHERE id = %s AND balance >= %s "
            "RETURNING balance", (amount, from_id, amount)).fetchone()
        if debited is None:
            exists = conn.execute("SELECT 1 FROM accounts WHERE id = %s",
                                  (from_id,)).fetchone()
            if exists is None:
                raise UnknownAccount(f"account {from_id} does not exist")
            raise InsufficientFunds(f"account {from_id} holds less than {amount}")

        if after_debit is not None:
            after_debit()

        # An UPDATE that matches nothing is not an error to Postgres: check the count.
        credited = conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                (amount, to_id)).rowcount
        if credited != 1:
            raise UnknownAccount(f"account {to_id} does not exist")  # rolls the debit back

        row = conn.execute(
            "INSERT INTO transfers (from_id, to_id, amount) VALUES (%s, %s, %s) RETURNING id",
            (from_id, to_id, amount)).fetchone()
        assert row is not None
        transfer_id: int = row[0]
    # Leaving the block sent COMMIT and Postgres answered only after the WAL record of
    # the commit was written: from here on the transfer survives a crash.
    return transfer_id
