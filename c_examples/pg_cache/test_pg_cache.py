"""ph2.c verification: the compiled cache-aside program against live Postgres and Redis.

The learner's pg_cache.c is built with the harness main.c (-Wall -Wextra -Werror, ASan and
UBSan) and run once per lookup, as its own process. Every run must leave no sanitizer
report. Whether a lookup was served from the cache is proven, not printed: after the first
run the test changes the row in Postgres, and the second run must still print the cached
value. What the program sends Redis is recorded with MONITOR: an entry must be written
with its TTL in one atomic step (SET ... EX, SETEX, a MULTI/EXEC or a script), never a SET
and then a separate EXPIRE.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labrunner.testing import RelayLink, TcpRelay, redis_commands, resp_command

USERS = [
    (1, "Ada Lovelace", "ada@example.com"),
    (2, 'Flann "the quote" O\\Brien', "flann@example.com"),   # a quote and a backslash
    (3, "Zoë Wàng 王", "zoe@example.com"),                   # UTF-8
    # Escapes that outgrow any fixed slack: 40 quotes (2 bytes each) and 12 control
    # characters (6 bytes each as \u00XX) - a tab and a 0x01 that JSON forbids raw.
    (4, "Quoted " + '"' * 40 + " tab\there" + "\x01" * 11 + " end", "ctl@example.com"),
]
SANITIZER_MARKS = ("LeakSanitizer", "AddressSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer")


@dataclass
class Run:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def shown(self) -> str:
        return self.stdout.strip() or "(nothing)"


@dataclass
class Program:
    binary: Path
    postgres: Any
    redis_db: Any
    learner: Any

    def lookup(self, user_id: str, redis_at: tuple[str, int] | None = None,
               redis_user: tuple[str, str] | None = None) -> Run:
        """One run of the program; ``redis_at`` (host, port) and ``redis_user`` (name,
        password) replace the lab's Redis server and user (a relay, a restricted user)."""
        endpoint = self.redis_db.endpoint
        host, port = redis_at or (endpoint.host, endpoint.port)
        args = [self.postgres.dsn, host, str(port), str(self.redis_db.db), user_id]
        url = urllib.parse.urlsplit(self.redis_db.url)   # the lab user's credentials
        username, password = redis_user or (urllib.parse.unquote(url.username or ""),
                                            urllib.parse.unquote(url.password or ""))
        env = {**os.environ,
               "REDIS_USERNAME": username,
               "REDIS_PASSWORD": password,
               "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
               "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
        # learner.run: when grading, the learner's binary runs as the learner's uid.
        done = self.learner.run([str(self.binary), *args], capture_output=True, text=True,
                                timeout=30, env=env)
        run = Run(args, done.returncode, done.stdout, done.stderr)
        reports = [m for m in SANITIZER_MARKS if m in done.stderr]
        assert not reports, (
            f"pg_cache {user_id!r}: {diagnose(done.stderr, reports[0])}\n"
            f"{done.stderr[-2500:]}")
        return run


def diagnose(stderr: str, mark: str) -> str:
    """The sanitizer's finding in one line: what it saw and, where the stack says it, the
    mistake behind it."""
    found = re.search(r"ERROR: (?:Leak|Address|UndefinedBehavior)Sanitizer: ([^\n(]+)", stderr)
    what = found.group(1).split(" on address")[0].strip() if found else "an error"
    frame = re.search(r"in (\w+) \S*pg_cache\.c:(\d+)", stderr)
    where = f" in {frame.group(1)} (pg_cache.c:{frame.group(2)})" if frame else ""
    if mark == "LeakSanitizer" and re.search(r"PQmakeEmptyPGresult|pqResultAlloc|PQexec", stderr):
        return (f"LeakSanitizer {what}: a PGresult was never freed - PQclear(res) on "
                "every path, the error and not-found ones too")
    if mark == "LeakSanitizer" and "redisCommand" in stderr:
        return (f"LeakSanitizer {what}: a redisReply was never freed - "
                "freeReplyObject() every reply")
    if "overflow" in what and "READ of size" in stderr:
        return (f"AddressSanitizer: {what} (a read){where}: a string was read past its end - "
                "a field of struct user copied without its terminating NUL (strncpy(dst, v, "
                "sizeof dst) writes none when the value fills the field); bound AND terminate "
                "every copy: snprintf(dst, sizeof dst, \"%s\", v)")
    if "overflow" in what and "fetch_user" in where:
        return (f"AddressSanitizer: {what}{where}: a value longer than its field was copied "
                "into struct user (strcpy, or memcpy of PQgetlength bytes) - bound AND "
                "terminate every copy: snprintf(dst, sizeof dst, \"%s\", v)")
    if "overflow" in what and "json" in where.lower():
        return (f"AddressSanitizer: {what}{where}: the JSON is longer than its "
                "buffer - size it for the worst case, every byte escaped (\\u00XX is 6 bytes)")
    return f"{mark}: {what}{where}: a memory or undefined-behaviour error"


def binary_for(learner: Any) -> Path:
    """Built once per session (learner.build() keeps it)."""
    return Path(learner.build()) / "pg_cache"


@pytest.fixture
def program(learner: Any, postgres: Any, redis_db: Any) -> Iterator[Program]:
    binary = binary_for(learner)
    with postgres.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id integer PRIMARY KEY, name text NOT NULL, "
                     "email text NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO users VALUES (%s, %s, %s)", USERS)
    yield Program(binary, postgres, redis_db, learner)


def as_json(user: tuple[int, str, str]) -> dict[str, Any]:
    return {"id": user[0], "name": user[1], "email": user[2]}


def parse(run: Run, user_id: str) -> tuple[str, dict[str, Any]]:
    word, _, rest = run.stdout.strip().partition(" ")
    assert run.code == 0 and word in ("HIT", "MISS"), (
        f"pg_cache {user_id!r} printed {run.shown} (exit {run.code}), expected HIT or MISS "
        f"and the user's JSON; stderr: {run.stderr.strip()[-500:]}")
    try:
        return word, json.loads(rest)
    except json.JSONDecodeError as exc:
        raw = sorted({f"0x{ord(c):02x}" for c in rest if ord(c) < 0x20})
        hint = (f": it holds the control character(s) {', '.join(raw)} raw - inside a JSON "
                "string a byte below 0x20 must be written \\u00XX") if raw else ""
        pytest.fail(f"pg_cache {user_id!r} printed invalid JSON ({exc}){hint}: {rest!r}",
                    pytrace=False)


# Commands that write a string key, and the options of SET / GETEX that give it a TTL.
WRITES = {"SET", "SETNX", "SETEX", "PSETEX", "GETSET", "MSET", "MSETNX", "APPEND", "SETRANGE"}
WITH_TTL = {"SETEX", "PSETEX"}
TTL_OPTIONS = {"EX", "PX", "EXAT", "PXAT"}
EXPIRES = {"EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "GETEX"}


def shown(command: list[str]) -> str:
    return " ".join(a if len(a) <= 24 else "<json>" for a in command)


def writes_without_ttl(commands: list[tuple[str, list[str]]], key: str
                       ) -> list[tuple[list[str], list[str] | None]]:
    """The commands that wrote `key` without its expiry in the same atomic step, each with
    the separate command that gave it a TTL afterwards (or None). A MULTI/EXEC block or a
    script (source "lua") is one atomic step."""
    found: list[tuple[list[str], list[str] | None]] = []
    in_multi = False
    for source, command in commands:
        name, args = command[0], command[1:]
        if name == "MULTI":
            in_multi = True
        elif name in ("EXEC", "DISCARD"):
            in_multi = False
        elif key not in args or source == "lua" or in_multi:
            continue
        elif name in EXPIRES and found and found[-1][1] is None:
            found[-1] = (found[-1][0], command)
        elif name in WRITES and name not in WITH_TTL and not (
                name == "SET" and TTL_OPTIONS & {a.upper() for a in args[2:]}):
            found.append((command, None))
    return found


def test_miss_then_hit_with_a_300_second_ttl(program: Program) -> None:
    with redis_commands(program.redis_db, with_source=True) as commands:
        word, user = parse(program.lookup("1"), "1")
    assert (word, user) == ("MISS", as_json(USERS[0])), (
        f"the first lookup of user 1 gave {word} {user}, expected MISS {as_json(USERS[0])}")
    cache = program.redis_db.client()
    try:
        raw = cache.get("user:1")
        ttl = cache.ttl("user:1")
    finally:
        cache.close()
    assert raw is not None and json.loads(raw) == as_json(USERS[0]), (
        f"after a miss Redis user:1 holds {raw!r}, expected the user as JSON")
    assert 290 <= ttl <= 300, (
        f"user:1 has a TTL of {ttl} s, expected about 300: SET key value EX 300")
    for write, expire in writes_without_ttl(commands, "user:1"):
        gap = (f"and gave it its TTL only afterwards, in a separate {shown(expire)}: "
               f"between the two commands" if expire else
               "without a TTL in that command: until something else sets one")
        pytest.fail(
            f"on a miss the program wrote {shown(write)} {gap} the entry has no expiry - if "
            f"the program dies or the connection drops after the write (or the EXPIRE "
            f"fails), user:1 is never evicted and every later lookup serves that row, "
            f"however stale. Write the value and its TTL in one "
            f"atomic command: SET key value EX 300", pytrace=False)

    # Change the row behind the cache's back: only a cache hit still shows the old name.
    with program.postgres.connect(autocommit=True) as conn:
        conn.execute("UPDATE users SET name = 'Changed in the database' WHERE id = 1")
    word, user = parse(program.lookup("1"), "1")
    assert (word, user["name"]) == ("HIT", "Ada Lovelace"), (
        f"the second lookup of user 1 gave {word} with name {user['name']!r}, expected HIT "
        "with the cached 'Ada Lovelace': a hit is answered from Redis without the database")


def test_json_escapes_quotes_backslashes_and_keeps_utf8(program: Program) -> None:
    for user in USERS[1:]:
        word, got = parse(program.lookup(str(user[0])), str(user[0]))
        assert got == as_json(user), (
            f"user {user[0]} came back as {got}, expected {as_json(user)}: escape \" and \\ "
            "inside JSON strings; UTF-8 passes through as it is")


# Values as long as their field or longer (struct user holds 255 bytes and a NUL per
# string): each must come back cut to its first 255 bytes, the other field untouched.
# Name and email are made of different letters, so a name that ran on into the email shows.
FIELD = 255
LONG_USERS = [
    (11, "n" * FIELD, "fits@example.com"),       # exactly fills the field: kept whole
    (12, "n" * (FIELD + 1), "glued@example.com"),  # one byte too many for the NUL
    (13, "Short Name", "e" * 300),
    (14, "n" * 300, "e" * 300),
]


def test_a_value_longer_than_its_field_is_cut_and_terminated(program: Program) -> None:
    with program.postgres.connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO users VALUES (%s, %s, %s)", LONG_USERS)
    for uid, name, email in LONG_USERS:
        word, got = parse(program.lookup(str(uid)), str(uid))
        want = {"id": uid, "name": name[:FIELD], "email": email[:FIELD]}
        for field in ("name", "email"):
            value, stored = str(got.get(field)), name if field == "name" else email
            if value == want[field]:
                continue
            ran_on = (f" (those {len(want[field])} bytes, then "
                      f"{value[len(want[field]):][:40]!r})" if value.startswith(want[field])
                      else "")
            pytest.fail(
                f"user {uid}'s {field} is {len(stored)} bytes in Postgres; struct user holds "
                f"{FIELD} and a NUL, so it must come back as its first "
                f"{len(want[field])} bytes, but came back as {len(value)} bytes"
                f"{ran_on}: the copy into the fixed field was not bounded AND terminated - "
                f"strncpy(dst, v, sizeof dst) writes no NUL when the value fills the field "
                f"(the read then runs on into the next field), strcpy/memcpy write past it; "
                f"snprintf(dst, sizeof dst, \"%s\", v) does both", pytrace=False)
        assert got == want, f"user {uid} came back as {got}, expected {want}"


def test_a_failed_query_is_an_error_not_a_missing_user(program: Program) -> None:
    """'abc' is no integer: Postgres refuses the query. fetch_user must see the error
    status, print the server's message and return -1; nothing may be cached."""
    run = program.lookup("abc")
    assert run.code == 1 and "{" not in run.stdout, (
        f"pg_cache 'abc' printed {run.shown} (exit {run.code}), expected NOT FOUND: a query "
        "Postgres refused returns no user")
    assert 'column "abc" does not exist' not in run.stderr, (
        "pg_cache 'abc': Postgres read the user id as SQL (column \"abc\" does not exist): "
        "the id was spliced into the SQL text - pass it as a parameter ($1) with PQexecParams")
    assert "ERROR:" in run.stderr, (
        f"pg_cache 'abc': Postgres refused the query (invalid input syntax for type integer) "
        f"but the program said nothing about it on stderr ({run.stderr.strip()[-200:]!r}): an "
        "error is not 'no such row' - check PQresultStatus(res) == PGRES_TUPLES_OK and print "
        "PQerrorMessage(conn) when it is not")
    cache = program.redis_db.client()
    try:
        cached = cache.get("user:abc")
    finally:
        cache.close()
    assert cached is None, f"a failed query was cached as user:abc = {cached!r}"


def test_unknown_user_is_not_found(program: Program) -> None:
    run = program.lookup("999")
    assert run.code == 1 and run.stdout.strip() == "NOT FOUND", (
        f"pg_cache 999 printed {run.shown} (exit {run.code}), expected NOT FOUND: "
        "get_user_cached returns NULL when there is no row")


@pytest.mark.parametrize("payload", [
    "1; DROP TABLE users",
    "1 OR 1=1",
    "' OR '1'='1",
    "1'; DELETE FROM users; --",
])
def test_injection_in_user_id_stays_harmless(program: Program, payload: str) -> None:
    run = program.lookup(payload)
    assert "{" not in run.stdout, (
        f"the user id {payload!r} returned a user: {run.shown}. The id must reach the "
        "server as a parameter ($1), never spliced into the SQL text")
    with program.postgres.connect() as conn:
        exists = conn.execute("SELECT to_regclass('public.users') IS NOT NULL").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM users").fetchone()[0] if exists else 0
    assert exists and rows == len(USERS), (
        f"after looking up the user id {payload!r} the users table "
        f"{'has ' + str(rows) + ' rows' if exists else 'is gone'}, expected {len(USERS)} "
        "rows: the id was executed as SQL. Use PQexecParams with the id as $1")
    cache = program.redis_db.client()
    try:
        cached = cache.get(f"user:{payload}")
    finally:
        cache.close()
    assert cached is None, f"a result was cached for the user id {payload!r}: {cached!r}"


# ---- the cache fails, the database does not -------------------------------------------


class DropAtGet(TcpRelay):
    """A relay in front of Redis that cuts the connection when a GET arrives (before it
    reaches Redis): the cache goes away in the middle of a lookup, after AUTH and SELECT."""

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        buf = link.state.get("buf", b"") + chunk
        while (got := resp_command(buf)) is not None:
            command, used = got
            if command and command[0].upper() == b"GET":
                return False   # the relay closes both sides: the client sees the drop
            link.upstream.sendall(buf[:used])
            buf = buf[used:]
        if buf and not buf.startswith(b"*"):   # an inline command: pass it on
            link.upstream.sendall(buf)
            buf = b""
        link.state["buf"] = buf
        return None


@contextmanager
def user_that_cannot_write(program: Program) -> Iterator[dict[str, Any]]:
    """A Redis user of the test's own that may read but not write (-@write): its SET is
    refused with NOPERM, as a read-only replica (READONLY) or a full server with
    maxmemory-policy noeviction (OOM) refuses it."""
    name, password = f"lab-no-write-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    admin = program.redis_db.admin_client()
    admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*",
                          "+@all", "-@dangerous", "-@write")
    try:
        yield {"redis_user": (name, password)}
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


@contextmanager
def entry_of_another_type(program: Program) -> Iterator[dict[str, Any]]:
    """user:1 holds a hash: GET answers WRONGTYPE (an error reply)."""
    cache = program.redis_db.client()
    try:
        cache.hset("user:1", mapping={"stale": "format"})
    finally:
        cache.close()
    yield {}


@contextmanager
def connection_drops_at_get(program: Program) -> Iterator[dict[str, Any]]:
    endpoint = program.redis_db.endpoint
    relay = DropAtGet((endpoint.host, endpoint.port))
    try:
        yield {"redis_at": ("127.0.0.1", relay.port)}
    finally:
        relay.close()


CACHE_FAULTS: dict[str, Callable[[Program], Any]] = {
    "Redis refusing the SET (NOPERM, as a read-only replica or a full server refuses it)":
        user_that_cannot_write,
    "Redis answering the GET with an error (WRONGTYPE: user:1 holds a hash)":
        entry_of_another_type,
    "the connection to Redis dropped at the GET": connection_drops_at_get,
}


@pytest.mark.parametrize("fault", list(CACHE_FAULTS), ids=["set-refused", "get-error",
                                                          "connection-drops"])
def test_a_failing_cache_still_serves_the_row(program: Program, fault: str) -> None:
    """Cache-aside treats the cache as an optimisation: when Redis fails (and Postgres does
    not), the lookup is served from the database, the cache error reported on stderr."""
    with CACHE_FAULTS[fault](program) as how:
        run = program.lookup("1", **how)
    want = as_json(USERS[0])
    word, _, rest = run.stdout.strip().partition(" ")
    try:
        got = json.loads(rest) if word == "MISS" else None
    except json.JSONDecodeError:
        got = None
    assert run.code == 0 and got == want, (
        f"pg_cache 1 with {fault} printed {run.shown} (exit {run.code}), expected MISS "
        f"{json.dumps(want)}: the cache is an optimisation - when Redis fails, serve the "
        f"row from Postgres (the cache error goes to stderr), never turn an existing user "
        f"into NOT FOUND or an error; stderr: {run.stderr.strip()[-300:]}")
