"""ph1.6 - an accounts API whose every error is an RFC 7807 (RFC 9457) problem document.

All errors leave through one function, problem(), so they all look alike:
Content-Type application/problem+json and a body with type, title, status, detail and
instance. A catch-all turns anything unexpected into a generic 500 problem; what went wrong
is logged on the server, never sent to the client.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

log = logging.getLogger(__name__)

PROBLEMS = "https://example.com/problems/"
VALIDATION = (PROBLEMS + "validation-error", "Your request is not valid.")
OUT_OF_CREDIT = (PROBLEMS + "out-of-credit", "You do not have enough credit.")

# accounts.id is a bigint: an id is 1 to 19 ASCII digits, at most BIGINT_MAX. A longer
# number names no account (and int() refuses one past 4300 digits).
BIGINT_MAX = 2**63 - 1
ACCOUNT = re.compile(r"^/accounts/([0-9]{1,19})$")
WITHDRAWALS = re.compile(r"^/accounts/([0-9]{1,19})/withdrawals$")


class Problem(Exception):
    """An error to report as a problem document. Without a type, it is 'about:blank' and its
    title is the HTTP status phrase (RFC 7807, section 4.2)."""

    def __init__(self, status: int, detail: str, kind: tuple[str, str] | None = None,
                 headers: list[tuple[str, str]] | None = None, **extensions: Any):
        super().__init__(detail)
        self.status = status
        self.type, self.title = kind or ("about:blank", HTTPStatus(status).phrase)
        self.detail = detail
        self.headers = headers or []
        self.extensions = extensions

    def document(self, instance: str) -> dict[str, Any]:
        return {"type": self.type, "title": self.title, "status": self.status,
                "detail": self.detail, "instance": instance, **self.extensions}


def read_amount(environ: dict[str, Any]) -> int:
    media_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise Problem(415, f"send the body as application/json, not {media_type or 'nothing'}")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        data = json.loads(environ["wsgi.input"].read(length))
    except ValueError:
        raise Problem(400, "the body is not valid JSON") from None
    amount = data.get("amount_cents") if isinstance(data, dict) else None
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= 10**12:
        raise Problem(422, "amount_cents must be a whole number of cents between 1 and 10^12",
                      VALIDATION, errors=[{"pointer": "#/amount_cents",
                                           "detail": "must be an integer in 1..10^12"}])
    return amount


def account_id(match: re.Match[str]) -> int:
    """The id in a matched path; one past bigint names no account."""
    number = int(match.group(1))
    if number > BIGINT_MAX:
        raise Problem(404, f"there is no account {number}")
    return number


def make_app(dsn: str) -> WSGIApp:
    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(dsn, row_factory=dict_row)

    def get_account(account_id: int) -> dict[str, Any]:
        with connect() as conn:
            row = conn.execute("SELECT id, owner, balance_cents FROM accounts WHERE id = %s",
                               (account_id,)).fetchone()
        if row is None:
            raise Problem(404, f"there is no account {account_id}")
        return row

    def withdraw(account_id: int, amount: int) -> dict[str, Any]:
        with connect() as conn, conn.transaction():
            row = conn.execute("SELECT balance_cents FROM accounts WHERE id = %s FOR UPDATE",
                               (account_id,)).fetchone()
            if row is None:
                raise Problem(404, f"there is no account {account_id}")
            if row["balance_cents"] < amount:
                raise Problem(409, f"the balance is {row['balance_cents']} cents, the "
                              f"withdrawal needs {amount}", OUT_OF_CREDIT,
                              balance_cents=row["balance_cents"])
            conn.execute("UPDATE accounts SET balance_cents = balance_cents - %s WHERE id = %s",
                         (amount, account_id))
        return {"account_id": account_id, "amount_cents": amount,
                "balance_cents": row["balance_cents"] - amount}

    def route(environ: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if (match := ACCOUNT.match(path)) is not None:
            if method != "GET":
                raise Problem(405, f"{method} is not supported on an account",
                              headers=[("Allow", "GET")])
            return 200, get_account(account_id(match))
        if (match := WITHDRAWALS.match(path)) is not None:
            if method != "POST":
                raise Problem(405, f"{method} is not supported on withdrawals",
                              headers=[("Allow", "POST")])
            return 201, withdraw(account_id(match), read_amount(environ))
        raise Problem(404, f"there is nothing at {path}")

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        # instance is a URI reference, so ASCII: PATH_INFO is the path percent-decoded and
        # read as latin-1 (PEP 3333); encode its bytes again to name the path as sent.
        instance = quote(environ.get("PATH_INFO", "/").encode("latin-1"), safe="/:@!$&'()*+,;=")
        try:
            status, document = route(environ)
            media_type, headers = "application/json", []
        except Exception as exc:  # noqa: BLE001 - every error leaves as a problem
            if not isinstance(exc, Problem):
                # Unexpected: keep the details in the server log, send none of them.
                log.exception("unhandled error on %s %s", environ["REQUEST_METHOD"], instance)
                exc = Problem(500, "The server could not complete the request. "
                                   "It has been logged; try again later.")
            status, document = exc.status, exc.document(instance)
            media_type, headers = "application/problem+json", exc.headers
        body = json.dumps(document).encode()
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", media_type), ("Content-Length", str(len(body))),
                        *headers])
        return [body]

    return app
