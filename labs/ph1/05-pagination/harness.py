"""Runs where the learner's make_app runs (in its process when grading): the connect() the
app is handed opens its connection there, so each query the app runs is a call in its own
process, not one made across to the test's. The plans the verification reads do not come
from here: they travel on the wire, through the test's proxy (the dsn names it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg


def connector(dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    """connect() for make_app: a new autocommit connection to ``dsn`` on each call."""

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, autocommit=True)

    return connect
