"""ph1.10 - users -> orders in GraphQL (graphql-core), with and without DataLoader.

The schema and the naive resolvers work: run a query and count the SQL it sends. Your job
is the batched path (make_app(dsn, batched=True)): DataLoaders, created per request, that
turn the N orders queries into one. See README.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
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

ORDER_COLUMNS = 'id, total_cents AS "totalCents"'


@dataclass
class Context:
    conn: Conn
    batched: bool
    # TODO: the request's DataLoaders (aiodataloader.DataLoader), e.g. orders by user id


async def resolve_users(_: Any, info: GraphQLResolveInfo, first: int = 50) -> list[dict[str, Any]]:
    conn: Conn = info.context.conn
    cursor = await conn.execute("SELECT id, name FROM users ORDER BY id LIMIT %s", (first,))
    return await cursor.fetchall()


async def resolve_user(_: Any, info: GraphQLResolveInfo, id: str) -> dict[str, Any] | None:  # noqa: A002
    if not id.isdigit() or len(id) > 19 or int(id) > 2**63 - 1:  # past bigint: no user
        return None
    # TODO (batched): load through a users-by-id DataLoader
    conn: Conn = info.context.conn
    cursor = await conn.execute("SELECT id, name FROM users WHERE id = %s", (int(id),))
    return await cursor.fetchone()


async def resolve_orders(user: dict[str, Any], info: GraphQLResolveInfo) -> list[dict[str, Any]]:
    # TODO (batched): load through an orders-by-user DataLoader instead of one query per user
    conn: Conn = info.context.conn
    cursor = await conn.execute(
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
