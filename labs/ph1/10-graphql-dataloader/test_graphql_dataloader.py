"""Verification for ph1.10 graphql-dataloader.

SQL is counted on the wire, not by trusting the learner: the DSN the app gets points at a
TCP proxy in front of the real Postgres. The proxy reads the frontend protocol and records
every statement Postgres is asked to run - a simple Query ('Q') or an Execute ('E') of a
Parse'd statement (so prepared statements count each time too). Transaction control
(BEGIN, COMMIT, SET ...) is not a query for this purpose. The app runs behind a threaded
wsgiref server on 127.0.0.1:0 and is queried with http.client; the expected data is
computed by this test from the rows it inserted.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

USERS = 50
USERS_QUERY = "{ users(first: 50) { id name orders { id totalCents } } }"
NOT_A_QUERY = re.compile(
    r"^\s*(BEGIN|START|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|SET|SHOW|RESET|DISCARD|"
    r"DEALLOCATE|CLOSE|LISTEN|UNLISTEN)\b", re.IGNORECASE)


# ---- counting statements on the Postgres wire -------------------------------------------

class PgStatementCounter:
    """A TCP proxy in front of Postgres that logs each statement the server is asked to
    execute. Logging happens before the bytes are forwarded, so by the time a client has a
    result, its statement is in the log."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._log: list[str] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def take(self) -> list[str]:
        """The statements logged since the last take()."""
        with self._lock:
            log, self._log = self._log, []
        return log

    def _record(self, sql: str) -> None:
        sql = " ".join(sql.split())
        if sql and not NOT_A_QUERY.match(sql):
            with self._lock:
                self._log.append(sql)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._frontend, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._relay, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _frontend(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client -> server: parse messages, log statements, forward the bytes unchanged."""
        buffer = bytearray()
        started = False  # before the StartupMessage, messages have no type byte
        prepared: dict[bytes, str] = {}  # statement name -> SQL (Parse)
        portals: dict[bytes, str] = {}  # portal name -> SQL (Bind)
        try:
            while chunk := client.recv(65536):
                buffer += chunk
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        (length,) = struct.unpack("!I", buffer[:4])
                        if len(buffer) < length:
                            break
                        (code,) = struct.unpack("!I", buffer[4:8])
                        started = code not in (80877103, 80877104)  # SSL / GSSENC request
                        del buffer[:length]
                        continue
                    if len(buffer) < 5:
                        break
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    kind, body = bytes(buffer[:1]), bytes(buffer[5:1 + length])
                    del buffer[:1 + length]
                    if kind == b"Q":
                        for sql in body.rstrip(b"\0").decode(errors="replace").split(";"):
                            self._record(sql)
                    elif kind == b"P":
                        name, sql = body.split(b"\0")[:2]
                        prepared[name] = sql.decode(errors="replace")
                    elif kind == b"B":
                        portal, statement = body.split(b"\0")[:2]
                        portals[portal] = prepared.get(statement, "")
                    elif kind == b"E":
                        self._record(portals.get(body.split(b"\0")[0], ""))
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in self._sockets:
            sock.close()


# ---- a real HTTP server around the learner's WSGI app, and a real client -----------------

class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep output clean
        pass


@contextmanager
def serving(app: Callable[..., Any]) -> Iterator[str]:
    """Serve a WSGI app on 127.0.0.1:<free port> in a thread; yield host:port."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer,
                         handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def ask(host: str, query: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, timeout=15)
    try:
        conn.request("POST", "/graphql", body=json.dumps({"query": query}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        document = json.loads(body)
    except ValueError:
        pytest.fail(f"POST /graphql {query}: expected JSON, saw {resp.status} {body[:200]!r}",
                    pytrace=False)
    assert resp.status == 200 and not document.get("errors"), (
        f"POST /graphql {query}: expected 200 and no errors, saw {resp.status} "
        f"{str(document.get('errors'))[:300]}")
    return document.get("data") or {}


# ---- data -------------------------------------------------------------------------------

def orders_of(user_id: int) -> int:
    """0 to 3 orders per user, with some users having none (a batch must keep their slot)."""
    return (user_id * 7) % 4


def seed(db: Any) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
            CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL REFERENCES users,
                                 total_cents integer NOT NULL);
            CREATE INDEX orders_user ON orders (user_id);""")
        order_id = 1000
        for user_id in range(USERS, 0, -1):  # inserted newest user first: heap order != ids
            conn.execute("INSERT INTO users VALUES (%s, %s)", (user_id, f"user {user_id}"))
            for n in range(orders_of(user_id)):
                order_id += 1
                conn.execute("INSERT INTO orders VALUES (%s, %s, %s)",
                             (order_id, user_id, 100 * user_id + n))


def expected_users(db: Any) -> list[dict[str, Any]]:
    with db.connect(autocommit=True) as conn:
        users = conn.execute("SELECT id, name FROM users ORDER BY id LIMIT 50").fetchall()
        orders = conn.execute("SELECT user_id, id, total_cents FROM orders ORDER BY id").fetchall()
    return [{"id": str(uid), "name": name,
             "orders": [{"id": str(oid), "totalCents": cents}
                        for owner, oid, cents in orders if owner == uid]}
            for uid, name in users]


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def counter(postgres: Any) -> Iterator[PgStatementCounter]:
    seed(postgres)
    info = conninfo_to_dict(postgres.dsn)
    proxy = PgStatementCounter(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_dsn(postgres: Any, counter: PgStatementCounter) -> str:
    """The DSN handed to the learner: the proxy, no TLS, so every message can be read."""
    info = conninfo_to_dict(postgres.dsn)
    info.update(host="127.0.0.1", port=str(counter.port), sslmode="disable",
                gssencmode="disable")
    return make_conninfo(**info)


@pytest.fixture
def make_app(learner: Any) -> Callable[..., Any]:
    return learner.function("graphql_api", "make_app")  # type: ignore[no-any-return]


def run(host: str, counter: PgStatementCounter, query: str) -> tuple[dict[str, Any], list[str]]:
    counter.take()
    data = ask(host, query)
    return data, counter.take()


def listing(statements: list[str]) -> str:
    shown = "; ".join(statements[:3])
    return shown + (f"; ... ({len(statements) - 3} more)" if len(statements) > 3 else "")


# ---- the verification -------------------------------------------------------------------

def test_dataloader_needs_two_queries(make_app: Callable[..., Any], proxied_dsn: str,
                                      counter: PgStatementCounter, postgres: Any) -> None:
    with serving(make_app(proxied_dsn, batched=True)) as host:
        data, statements = run(host, counter, USERS_QUERY)
    assert data.get("users") == expected_users(postgres), (
        f"{USERS_QUERY}: the data differs from the database: each user must get exactly its "
        f"own orders, in id order (first users: {str(data.get('users'))[:300]})")
    assert len(statements) <= 2, (
        f"{USERS} users with their orders took {len(statements)} SQL queries, expected at most "
        f"2 (users, then all their orders in one batch): {listing(statements)}")


def test_naive_resolvers_show_n_plus_one(make_app: Callable[..., Any], proxied_dsn: str,
                                         counter: PgStatementCounter, postgres: Any) -> None:
    with serving(make_app(proxied_dsn, batched=False)) as naive, \
            serving(make_app(proxied_dsn, batched=True)) as batched:
        slow, statements = run(naive, counter, USERS_QUERY)
        fast, _ = run(batched, counter, USERS_QUERY)
    assert len(statements) >= USERS + 1, (
        f"batched=False took {len(statements)} SQL queries for {USERS} users; the naive "
        f"resolver queries orders once per user ({USERS} + 1): keep it, it is the baseline "
        "the DataLoader is measured against")
    assert slow == fast, (
        "the naive and the DataLoader resolvers return different data: batching must change "
        "how many queries run, never the result")


def test_loaders_do_not_outlive_a_request(make_app: Callable[..., Any], proxied_dsn: str,
                                          counter: PgStatementCounter, postgres: Any) -> None:
    with serving(make_app(proxied_dsn, batched=True)) as host:
        run(host, counter, USERS_QUERY)
        with postgres.connect(autocommit=True) as conn:  # the data changes between requests
            conn.execute("INSERT INTO orders VALUES (9999, 4, 123456)")
        data, _ = run(host, counter, USERS_QUERY)
    user_4 = next((u for u in data.get("users", []) if u.get("id") == "4"), {})
    assert {"id": "9999", "totalCents": 123456} in user_4.get("orders", []), (
        f"after a new order for user 4, the next request still shows its old orders "
        f"{user_4.get('orders')}: a DataLoader caches what it loaded, so create it per request")


def test_aliased_users_share_one_orders_query(make_app: Callable[..., Any], proxied_dsn: str,
                                              counter: PgStatementCounter,
                                              postgres: Any) -> None:
    query = ('{ a: user(id: "1") { orders { id } } b: user(id: "2") { orders { id } } '
             'c: user(id: "3") { name orders { totalCents } } nobody: user(id: "999") { name } }')
    with serving(make_app(proxied_dsn, batched=True)) as host:
        data, statements = run(host, counter, query)
    expected = {u["id"]: u for u in expected_users(postgres)}
    assert data.get("nobody", "missing") is None, (
        f"user(id: \"999\") must be null for a user that does not exist, saw "
        f"{data.get('nobody', 'no such field')!r}")
    assert data.get("c") == {"name": "user 3", "orders": [
        {"totalCents": o["totalCents"]} for o in expected["3"]["orders"]]}, (
        f"user(id: \"3\"): expected {expected['3']}, saw {data.get('c')}")
    for alias, uid in (("a", "1"), ("b", "2")):
        want = [{"id": o["id"]} for o in expected[uid]["orders"]]
        assert (data.get(alias) or {}).get("orders") == want, (
            f"{alias}: user(id: \"{uid}\"): expected orders {want}, saw {data.get(alias)}")
    on_orders = [s for s in statements if re.search(r"\borders\b", s, re.IGNORECASE)]
    assert len(on_orders) == 1, (
        f"three users fetched in one request read their orders with {len(on_orders)} queries, "
        f"expected 1 batch: {listing(on_orders)}")
