"""A money transfer that is atomic, consistent, isolated and durable - on Postgres.

Every function gets a psycopg connection in autocommit mode: each statement commits on its
own unless you open a transaction (``with conn.transaction(): ...``).
"""

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
    """Create the tables (see README.md for their exact columns):

    accounts  (id, balance)                               - a balance is never negative
    transfers (id, from_id, to_id, amount, created_at)   - the ledger of transfers
    """
    raise NotImplementedError("create_schema: CREATE TABLE accounts and transfers")


def transfer(conn: Conn, from_id: int, to_id: int, amount: int, *,
             after_debit: Callable[[], None] | None = None) -> int:
    """Move ``amount`` from one account to another, record it in transfers, and return
    the new transfer's id.

    All or nothing. Raise InsufficientFunds or UnknownAccount (nothing changed). Call
    ``after_debit()`` (if given) after the debit and before the credit - the check uses it
    to crash things in the middle.
    """
    raise NotImplementedError("transfer: debit, credit and record in one transaction")
