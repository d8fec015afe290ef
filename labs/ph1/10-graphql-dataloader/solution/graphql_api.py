"""ph1.10 - users -> orders in GraphQL (graphql-core), with and without DataLoader.

Resolvers run per field: the `orders` resolver of User runs once per user in the result.
Written naively, each run queries Postgres - 1 query for the users plus N for their orders.
A DataLoader turns those N loads into one batch: every `load(user_id)` made while the
executor resolves the list waits until the event loop's next turn, then a single query
fetches the orders of all of them.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiodataloader import DataLoader
from graphql import FormattedExecutionResult, GraphQLResolveInfo, build_schema, graphql
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Conn = psycopg.AsyncConnection[dict[str, Any]]

SDL = """
type Query {
  users(first: Int = 50): [User!]!
  user(id: ID!): User
}

type User {
  id: ID!
  name: String!
  orders: [Order!]!
}

type Order {
  id: ID!
  totalCents: Int!
}
"""

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1  # the smallest and largest users.id
ORDER_COLUMNS = 'id, total_cents AS "totalCents"'


class OrdersByUser(DataLoader[int, list[dict[str, Any]]]):
    """Loads the orders of many users with one query."""

    def __init__(self, conn: Conn) -> None:
        super().__init__()
        self.conn = conn

    async def batch_load_fn(self, user_ids: list[int]) -> list[list[dict[str, Any]]]:
        cursor = await self.conn.execute(
            f"SELECT user_id, {ORDER_COLUMNS} FROM orders WHERE user_id = ANY(%s) ORDER BY id",
            (list(user_ids),))
        grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in await cursor.fetchall():
            grouped[row.pop("user_id")].append(row)
        # One result per key, in the keys' order; a user without orders gets [].
        return [grouped.get(user_id, []) for user_id in user_ids]


class UsersById(DataLoader[int, dict[str, Any] | None]):
    """Loads many users by id with one query, so that fields asking for different users in
    one request (aliases) also resolve together - and their orders batch together too."""

    def __init__(self, conn: Conn) -> None:
        super().__init__()
        self.conn = conn

    async def batch_load_fn(self, user_ids: list[int]) -> list[dict[str, Any] | None]:
        cursor = await self.conn.execute("SELECT id, name FROM users WHERE id = ANY(%s)",
                                         (list(user_ids),))
        found = {row["id"]: row for row in await cursor.fetchall()}
        return [found.get(user_id) for user_id in user_ids]


@dataclass
class Context:
    conn: Conn
    batched: bool
    # Loaders live as long as one request: their cache never outlives the data it read.
    loaders: dict[str, DataLoader[Any, Any]] = field(default_factory=dict)

    def orders_loader(self) -> OrdersByUser:
        if "orders" not in self.loaders:
            self.loaders["orders"] = OrdersByUser(self.conn)
        return self.loaders["orders"]  # type: ignore[return-value]

    def users_loader(self) -> UsersById:
        if "users" not in self.loaders:
            self.loaders["users"] = UsersById(self.conn)
        return self.loaders["users"]  # type: ignore[return-value]


async def resolve_users(_: Any, info: GraphQLResolveInfo, first: int = 50) -> list[dict[str, Any]]:
    conn: Conn = info.context.conn
    cursor = await conn.execute("SELECT id, name FROM users ORDER BY id LIMIT %s", (first,))
    return await cursor.fetchall()


async def resolve_user(_: Any, info: GraphQLResolveInfo, id: str) -> dict[str, Any] | None:  # noqa: A002
    # A user's ID is the decimal string of its id: any other string names no user - a word,
    # a number past bigint, and other spellings of a number (" 2", "+2", "02", "2_0", "-0",
    # and non-ASCII digits, which str.isdigit() and int() accept). Every bigint is an id,
    # from -2**63 to 2**63 - 1 (19 digits, and a minus sign below 0): the length check first
    # keeps int() off a string of any size.
    digits = id.removeprefix("-")
    if (not (digits.isascii() and digits.isdigit()) or len(digits) > len(str(BIGINT_MAX))
            or id != str(int(id)) or not BIGINT_MIN <= int(id) <= BIGINT_MAX):
        return None
    context: Context = info.context
    if context.batched:
        return await context.users_loader().load(int(id))
    cursor = await context.conn.execute("SELECT id, name FROM users WHERE id = %s", (int(id),))
    return await cursor.fetchone()


async def resolve_orders(user: dict[str, Any], info: GraphQLResolveInfo) -> list[dict[str, Any]]:
    context: Context = info.context
    if context.batched:
        return await context.orders_loader().load(user["id"])
    # The naive resolver: one query per user - the N in N+1.
    cursor = await context.conn.execute(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = %s ORDER BY id", (user["id"],))
    return await cursor.fetchall()


schema = build_schema(SDL)
schema.query_type.fields["users"].resolve = resolve_users  # type: ignore[union-attr]
schema.query_type.fields["user"].resolve = resolve_user  # type: ignore[union-attr]
schema.get_type("User").fields["orders"].resolve = resolve_orders  # type: ignore[union-attr]


async def execute(dsn: str, query: str, variables: dict[str, Any] | None,
                  batched: bool) -> FormattedExecutionResult:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     row_factory=dict_row) as conn:
        result = await graphql(schema, query, variable_values=variables,
                               context_value=Context(conn, batched))
    return result.formatted


def make_app(dsn: str, *, batched: bool = True) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        document: Any
        if environ.get("PATH_INFO") != "/graphql" or environ["REQUEST_METHOD"] != "POST":
            status, document = "404 Not Found", {"errors": [{"message": "POST /graphql"}]}
        else:
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                request = json.loads(environ["wsgi.input"].read(length))
                status = "200 OK"
                document = asyncio.run(execute(dsn, request["query"],
                                               request.get("variables"), batched))
            except (ValueError, KeyError, TypeError):
                status = "400 Bad Request"
                document = {"errors": [{"message": 'send {"query": "...", "variables": {}}'}]}
        body = json.dumps(document).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]

    return app
