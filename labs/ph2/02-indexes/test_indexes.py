"""ph2.2 indexes: the learner's indexes.sql serves a fixed workload on 100,000 orders.

Each check builds the table server-side (generate_series), runs indexes.sql, then
VACUUM ANALYZE (statistics over every row, so the plans are the same on every run, and a
fresh visibility map so Index Only Scans need no heap fetches). Each workload query is
then explained by Postgres itself (EXPLAIN ANALYZE, FORMAT JSON) on a clean connection,
and the plan must use the intended kind of index:

* Q1 history: a composite index leading with (customer_id, created_at), no Sort;
* Q2 count: the same index's left prefix (customer_id);
* Q3 lookup: an Index Only Scan on a UNIQUE index keyed by external_ref alone that
  INCLUDEs the selected columns;
* Q4 pending: a partial index (WHERE status = 'pending'), no Sort.

Finally no index may be redundant (a left prefix of, or equal to, another) or unused, and
none may turn a coincidence into a rule: orders that differ only in id and external_ref
(the key that really identifies an order) must still insert.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import errors

Conn = psycopg.Connection[Any]
Plan = dict[str, Any]

ROWS = 100_000

# No autovacuum: the check runs VACUUM ANALYZE itself, once; an automatic ANALYZE later (a
# smaller sample) must not change the statistics in the middle of a check.
CREATE_TABLE = """
CREATE TABLE orders (
    id           bigint      PRIMARY KEY,
    customer_id  integer     NOT NULL,
    external_ref text        NOT NULL,
    status       text        NOT NULL,
    created_at   timestamptz NOT NULL,
    total_cents  integer     NOT NULL,
    note         text        NOT NULL
) WITH (autovacuum_enabled = false)"""

# Server-side generation: 1,000 customers with 100 orders each, spread over the table;
# about 1% pending, 9% cancelled, the rest shipped; five minutes between orders.
FILL_TABLE = f"""
INSERT INTO orders
SELECT g,
       (g * 7919) % 1000 + 1,
       'ORD-' || to_char(g, 'FM0000000'),
       CASE WHEN g % 97 = 0 THEN 'pending' WHEN g % 10 = 0 THEN 'cancelled'
            ELSE 'shipped' END,
       timestamptz '2024-01-01 00:00+00' + g * interval '5 minutes',
       (g * 37) % 50000 + 100,
       repeat('x', 60)
FROM generate_series(1, {ROWS}) AS g"""


@dataclass(frozen=True)
class Query:
    name: str
    sql: str
    reads: frozenset[str] = frozenset()  # every column the query touches


Q1 = Query("Q1 customer history",
           "SELECT id, created_at, total_cents FROM orders "
           "WHERE customer_id = 42 AND created_at >= '2024-06-01 00:00+00' "
           "ORDER BY created_at DESC LIMIT 20",
           frozenset({"id", "customer_id", "created_at", "total_cents"}))
# The same query with other values: the customer and the date are the page's parameters,
# not part of the workload's shape; an index fitted to the README's example values (a
# partial index on created_at >= '2024-06-01') serves no other window.
Q1_OTHER = Query("Q1 customer history for customer 917 since 2024-02-15",
                 "SELECT id, created_at, total_cents FROM orders "
                 "WHERE customer_id = 917 AND created_at >= '2024-02-15 00:00+00' "
                 "ORDER BY created_at DESC LIMIT 20",
                 Q1.reads)
Q2 = Query("Q2 customer order count", "SELECT count(*) FROM orders WHERE customer_id = 42",
           frozenset({"customer_id"}))
Q3 = Query("Q3 lookup by reference",
           "SELECT status, total_cents FROM orders WHERE external_ref = 'ORD-0054321'",
           frozenset({"external_ref", "status", "total_cents"}))
Q3_READS = frozenset({"status", "total_cents"})
Q4 = Query("Q4 pending queue",
           "SELECT id, created_at FROM orders WHERE status = 'pending' "
           "ORDER BY created_at LIMIT 50",
           frozenset({"id", "status", "created_at"}))
WORKLOAD = [Q1, Q1_OTHER, Q2, Q3, Q4]

INDEX_NODES = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}


@dataclass(frozen=True)
class Index:
    name: str
    keys: tuple[str, ...]  # key columns (or expressions), in order
    include: tuple[str, ...]
    unique: bool
    primary: bool
    predicate: str | None  # the WHERE of a partial index
    size: int  # bytes
    options: tuple[int, ...] = ()  # per key column: pg_index.indoption (1 DESC, 2 NULLS FIRST)

    def key_order(self, k: int) -> str:
        """'DESC NULLS LAST' or '' (the default order) for key column k."""
        option = self.options[k] if k < len(self.options) else 0
        desc, nulls_first = bool(option & 1), bool(option & 2)
        text = "DESC" if desc else ""
        if nulls_first != desc:  # the default puts NULLs first exactly when DESC
            text += " NULLS FIRST" if nulls_first else " NULLS LAST"
        return text.strip()

    def describe(self) -> str:
        keys = [f"{key} {self.key_order(k)}".strip() for k, key in enumerate(self.keys)]
        text = f"{self.name} ({', '.join(keys)})"
        if self.include:
            text += f" INCLUDE ({', '.join(self.include)})"
        if self.predicate:
            text += f" WHERE {self.predicate}"
        return ("UNIQUE " if self.unique else "") + text


@dataclass
class Workload:
    conn: Conn  # a clean connection for EXPLAIN: nothing indexes.sql SET applies to it
    indexes: dict[str, Index]

    def plan(self, query: Query) -> Plan:
        row = self.conn.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {query.sql}").fetchone()
        assert row is not None
        plan: Plan = row[0][0]["Plan"]
        return plan

    def index_used(self, query: Query) -> tuple[Plan, Index | None, Plan]:
        """The plan, the index of its first index node on orders (if any), and that node."""
        plan = self.plan(query)
        for node in walk(plan):
            if node["Node Type"] in INDEX_NODES and node.get("Index Name") in self.indexes:
                return plan, self.indexes[node["Index Name"]], node
        return plan, None, plan


def walk(plan: Plan) -> Iterator[Plan]:
    yield plan
    for child in plan.get("Plans", []):
        yield from walk(child)


def shape(plan: Plan) -> str:
    """A plan in one line, root first: 'Limit > Sort > Seq Scan on orders'."""
    parts = []
    for node in walk(plan):
        text = node["Node Type"]
        if "Index Name" in node:
            text += f" using {node['Index Name']}"
        elif "Relation Name" in node:
            text += f" on {node['Relation Name']}"
        parts.append(text)
    return " > ".join(parts)


def read_indexes(conn: Conn) -> dict[str, Index]:
    rows = conn.execute(
        """SELECT c.relname::text, ix.indnkeyatts, ix.indnatts, ix.indisunique,
                  ix.indisprimary, pg_get_expr(ix.indpred, ix.indrelid),
                  pg_relation_size(c.oid), ix.indoption::int2[],
                  ARRAY(SELECT pg_get_indexdef(ix.indexrelid, k, true)
                        FROM generate_series(1, ix.indnatts) k ORDER BY k)
           FROM pg_index ix JOIN pg_class c ON c.oid = ix.indexrelid
           WHERE ix.indrelid = 'orders'::regclass""").fetchall()
    return {
        name: Index(name, tuple(cols[:nkey]), tuple(cols[nkey:natts]), unique, primary, pred,
                    size, tuple(options[:nkey]))
        for name, nkey, natts, unique, primary, pred, size, options, cols in rows
    }


def prepare(db: Conn, clean: Conn, learner: Any) -> Workload:
    """Run indexes.sql, VACUUM ANALYZE, and ready the clean connection for EXPLAIN."""
    script = learner.path("indexes.sql").read_text(encoding="utf-8")
    columns = db.execute(COLUMNS).fetchall()
    settings: list[tuple[str, str, str]] = db.execute(TABLE_SETTINGS).fetchall()
    try:
        with db.transaction():
            db.execute(script)
    except psycopg.Error as exc:
        why = ("; the script runs as one transaction, so leave CONCURRENTLY out here (no "
               "one else uses the table while it is indexed)"
               if isinstance(exc, psycopg.errors.ActiveSqlTransaction) else "")
        pytest.fail(f"indexes.sql failed: {type(exc).__name__}: "
                    f"{exc.diag.message_primary}{why}", pytrace=False)
    refuse_changed_columns(columns, db.execute(COLUMNS).fetchall())
    refuse_changed_settings(settings, db.execute(TABLE_SETTINGS).fetchall())
    count = db.execute("SELECT count(*) FROM orders").fetchone()
    if count != (ROWS,):
        pytest.fail(f"after indexes.sql the table holds {count[0] if count else 0:,} rows "
                    f"instead of {ROWS:,}: the script may only add indexes", pytrace=False)
    # A statistics target of 400 samples 120,000 rows: all of them, so ANALYZE gives the
    # same statistics (and the planner the same plans) on every run. VACUUM sets the
    # visibility map, without which an Index Only Scan must still visit the heap.
    db.execute("SET default_statistics_target = 400")
    db.execute("VACUUM (ANALYZE) orders")
    # Plans are judged with the planner's stock settings: indexes.sql cannot win by
    # switching sequential scans off (its SETs apply to the other connection, and this
    # undoes ALTER DATABASE/ROLE/SYSTEM ... SET as well).
    for name, boot in clean.execute(
            "SELECT name, boot_val FROM pg_settings WHERE (name LIKE 'enable\\_%' "
            "OR name LIKE '%\\_cost') AND setting IS DISTINCT FROM boot_val").fetchall():
        clean.execute("SELECT set_config(%s, %s, false)", (name, boot))
    clean.execute("SET max_parallel_workers_per_gather = 0")  # no Gather: stable plans
    return Workload(clean, read_indexes(clean))


# Each column of orders as the table defines it: name, type (with its length), NOT NULL,
# its default, its collation where it has one, and whether the database makes its values
# (identity, generated).
COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), c.collname, a.attidentity, a.attgenerated
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation c ON c.oid = a.attcollation
WHERE a.attrelid = 'orders'::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum"""

# What each part of a column's definition that the script changed does to the application.
CHANGED_COLUMN = {
    1: "a column narrowed to the values the table holds today (a reference of 11 "
       "characters, the three statuses' lengths) refuses the next longer one the shop "
       "writes - a rule the domain does not have",
    2: "NOT NULL dropped lets an order without that value in; added, it is a rule the "
       "domain does not have",
    3: "a default the table did not have (or another one): an INSERT that leaves the "
       "column out is no longer refused (NOT NULL) but silently gets the default (status "
       "DEFAULT 'pending': an order whose status the caller forgot enters the pending "
       "queue)",
    4: "a collation of its own: every query of the application on that column (ORDER BY, "
       "<, LIKE, the UNIQUE rule's equality for a nondeterministic one) then compares and "
       "sorts by it rather than by the database's; an index may carry its own COLLATE "
       "without changing the table",
    5: "values the database makes itself (an identity): an INSERT that leaves the column "
       "out is no longer refused but numbered by the database",
    6: "values the database makes itself (a generated column): the application can no "
       "longer write them",
}


def spelled(column: tuple[Any, ...]) -> str:
    name, kind, not_null, default, collation, identity, generated = column
    return (f"{name} {kind}" + (f' COLLATE "{collation}"' if collation not in (None, "default")
                                else "")
            + (" NOT NULL" if not_null else "")
            + (f" DEFAULT {default}" if default is not None and not generated else "")
            + {"a": " GENERATED ALWAYS AS IDENTITY",
               "d": " GENERATED BY DEFAULT AS IDENTITY"}.get(identity, "")
            + (f" GENERATED ALWAYS AS ({default}) STORED" if generated else ""))


def refuse_changed_columns(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> None:
    """The script adds indexes: a column it narrows (text to varchar(11), "every reference
    is 11 characters today"), or gives a default ("status DEFAULT 'pending'"), is a rule
    that refuses, or silently fills in, the values the shop writes next."""
    pairs = list(zip(before, after, strict=False))
    changed = [f"{spelled(old)} became {spelled(new)}" for old, new in pairs if old != new]
    parts = sorted({i for old, new in pairs for i in CHANGED_COLUMN if old[i] != new[i]})
    if changed or len(before) != len(after):
        pytest.fail(
            "indexes.sql changed the table's columns: "
            f"{'; '.join(changed) or 'columns added or dropped'}, expected the columns as the "
            "table defines them: "
            + ("; ".join(CHANGED_COLUMN[i] for i in parts) or "the table's columns are the "
               "application's, not the script's")
            + "\nThe script may only add indexes; a smaller or faster index is never worth "
            "refusing valid orders or changing what the application reads and writes.",
            pytrace=False)


# What the table is besides its columns' definitions, one (kind, text) row each: how it is
# stored (logged or not, its storage parameters, each column's storage and compression) and
# what runs on its writes and reads (triggers, rules, row security and its policies).
# Each row: (kind, what it is about, its text); one about the same thing before and after
# the script is shown as a change.
TABLE_SETTINGS = """
SELECT 'persistence', 'table',
       CASE c.relpersistence WHEN 'u' THEN 'UNLOGGED' WHEN 't' THEN 'TEMPORARY' ELSE 'LOGGED' END
FROM pg_class c WHERE c.oid = 'orders'::regclass
UNION ALL
SELECT 'storage', 'parameters', 'WITH (' || array_to_string(c.reloptions, ', ') || ')'
FROM pg_class c WHERE c.oid = 'orders'::regclass
UNION ALL
SELECT 'storage', 'security', 'ROW LEVEL SECURITY ' || CASE WHEN c.relforcerowsecurity THEN 'FORCED'
                                           ELSE 'ENABLED' END
FROM pg_class c WHERE c.oid = 'orders'::regclass AND c.relrowsecurity
UNION ALL
SELECT 'storage', a.attname, format('%I SET STORAGE %s%s', a.attname,
       CASE a.attstorage WHEN 'p' THEN 'PLAIN' WHEN 'e' THEN 'EXTERNAL' WHEN 'm' THEN 'MAIN'
                         ELSE 'EXTENDED' END,
       CASE WHEN a.attcompression <> '' THEN ' COMPRESSION '
            || CASE a.attcompression WHEN 'l' THEN 'lz4' ELSE 'pglz' END ELSE '' END)
FROM pg_attribute a WHERE a.attrelid = 'orders'::regclass AND a.attnum > 0
                      AND NOT a.attisdropped
UNION ALL
SELECT 'trigger', t.tgname::text, pg_get_triggerdef(t.oid, true)
FROM pg_trigger t WHERE t.tgrelid = 'orders'::regclass AND NOT t.tgisinternal
UNION ALL
SELECT 'rule', r.rulename::text, pg_get_ruledef(r.oid, true)
FROM pg_rewrite r WHERE r.ev_class = 'orders'::regclass
UNION ALL
SELECT 'policy', p.polname::text,
       format('POLICY %I %s', p.polname, pg_get_expr(p.polqual, p.polrelid))
FROM pg_policy p WHERE p.polrelid = 'orders'::regclass
ORDER BY 1, 2, 3"""

# What each kind of change to the table (not to its indexes) does to the application.
CHANGED_SETTING = {
    "persistence": "an UNLOGGED table (and every index on it) skips the write-ahead log: "
                   "after a crash Postgres empties it - every order gone - and no replica or "
                   "backup by WAL ever holds it; the cost of indexes is paid by having fewer "
                   "of them, never by giving up durability",
    "storage": "how every row is stored is the table's, not the workload's indexes': a "
               "fillfactor leaves part of each page empty (every scan reads more pages), a "
               "column's STORAGE PLAIN or MAIN keeps values inline (a note too big for a page "
               "is refused), row security hides rows from the application",
    "trigger": "a trigger runs on each of the application's writes and fills in, changes or "
               "refuses what it writes (a status filled in as 'pending' is a default by "
               "another name: an order whose status the caller forgot enters the pending "
               "queue) - and it is one more cost on every INSERT, the cost indexes.sql is "
               "asked to keep low",
    "rule": "a rule rewrites the application's statements on this table into others",
    "policy": "a row security policy decides which rows the application may see or write",
}


def refuse_changed_settings(before: list[tuple[str, str, str]],
                            after: list[tuple[str, str, str]]) -> None:
    """The script adds indexes: an UNLOGGED table ("no WAL for all those index writes"), a
    trigger that fills in a forgotten status, a column's storage changed, is the table's
    behaviour changed under the application."""
    if before == after:
        return
    old = {(kind, about): text for kind, about, text in before}
    new = {(kind, about): text for kind, about, text in after}
    changes = [(key[0], f"{old[key]} became {new[key]}" if key in old and key in new
                else f"{new[key]} added" if key in new else f"{old[key]} removed")
               for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    kinds = list(dict.fromkeys(kind for kind, _ in changes))
    pytest.fail(
        "indexes.sql changed the table itself, not only its indexes: "
        f"{'; '.join(text for _, text in changes)}, expected the table as it was defined "
        "(its columns, its storage, no trigger): "
        + "; ".join(CHANGED_SETTING[k] for k in kinds)
        + "\nThe script may only add indexes (CREATE INDEX, with the index's own options).",
        pytrace=False)


@pytest.fixture
def script_written(learner: Any) -> None:
    """Before the test's database is made: the starter's script fails at once."""
    refuse_empty_script(learner)


@pytest.fixture
def workload(script_written: None, postgres: Any,
             learner: Any) -> Iterator[Callable[[], Workload]]:
    """The orders table with 100,000 rows and only its primary key; calling the fixture's
    value runs indexes.sql. The script runs inside the test, so a broken script is a
    failed check in the database's words rather than a setup error."""
    with postgres.connect(autocommit=True) as db, postgres.connect(autocommit=True) as clean:
        db.execute(CREATE_TABLE)
        db.execute(FILL_TABLE)
        yield lambda: prepare(db, clean, learner)


def refuse_empty_script(learner: Any) -> None:
    """An indexes.sql with no statement at all (the starter: comments only) fails before
    the 100,000 rows are generated and analyzed: there is nothing to explain yet."""
    script = learner.path("indexes.sql").read_text(encoding="utf-8")
    without_comments = re.sub(r"--[^\n]*|/\*.*?\*/", "", script, flags=re.DOTALL)
    if not without_comments.replace(";", "").strip():
        pytest.fail("indexes.sql has no statement yet: write the CREATE INDEX statements the "
                    "workload in README.md needs (Q1 history, Q2 count, Q3 lookup, Q4 "
                    "pending queue)", pytrace=False)


def no_index_message(query: Query, plan: Plan, need: str) -> str:
    return (f"{query.name}: the plan is {shape(plan)}, no index on orders was used: "
            f"it needs {need}")


def has_sort(plan: Plan) -> bool:
    return any(node["Node Type"] in ("Sort", "Incremental Sort") for node in walk(plan))


def nulls_order_clash(query: Query, plan: Plan, index: Index, column: str,
                      desc: bool) -> str:
    """Why an index on `column` still leaves a Sort under ORDER BY column [DESC]: its
    NULLS order is neither the query's nor the query's read backwards ('' if not that)."""
    if column not in index.keys:
        return ""
    k = index.keys.index(column)
    option = index.options[k] if k < len(index.options) else 0
    if bool(option & 1) == bool(option & 2):  # ASC NULLS LAST or DESC NULLS FIRST
        return ""
    return (f"{query.name}: the plan still sorts ({shape(plan)}): {index.describe()} keeps "
            f"{column} {index.key_order(k)}, but the query's ORDER BY {column}"
            f"{' DESC' if desc else ''} puts NULLs {'first' if desc else 'last'} (the "
            f"default): read forwards or backwards, the index gives neither order, so "
            f"Postgres sorts the rows again ({column} being NOT NULL does not change that); "
            f"leave NULLS FIRST/LAST out of the index, or write the query's own")


def known(workload: Workload) -> str:
    learner_indexes = [i.describe() for i in workload.indexes.values() if not i.primary]
    return "; ".join(learner_indexes) or "none besides the primary key"


# --------------------------------------------------------------------------------------


def test_q1_history_uses_a_composite_index(workload: Callable[[], Workload]) -> None:
    w = workload()
    plan, index, _ = w.index_used(Q1)
    need = "a composite index on (customer_id, created_at)"
    assert index is not None, no_index_message(Q1, plan, need)
    assert index.keys[:2] == ("customer_id", "created_at"), (
        f"{Q1.name}: the plan uses {index.describe()}, expected an index leading with "
        f"(customer_id, created_at): equality column first, then the range/order column, "
        f"so the scan seeks one customer and reads its orders already in date order")
    assert not has_sort(plan), nulls_order_clash(Q1, plan, index, "created_at", True) or (
        f"{Q1.name}: the plan still sorts ({shape(plan)}): with (customer_id, created_at) "
        f"the rows of one customer come out of the index in created_at order")
    # Customer 42 and 2024-06-01 are the README's example values: the page asks for any
    # customer and any window, and must be served the same way.
    other_plan, other, _ = w.index_used(Q1_OTHER)
    assert other is index and not has_sort(other_plan), (
        f"{Q1_OTHER.name}: the same query with other values runs as {shape(other_plan)}, "
        f"while Q1 for customer 42 since 2024-06-01 used {index.describe()}: the customer "
        f"and the date are parameters, and an index fitted to the example's values (a "
        f"WHERE on the date) serves no other window; index every order by "
        f"(customer_id, created_at)")


def test_q2_count_uses_the_left_prefix(workload: Callable[[], Workload]) -> None:
    w = workload()
    plan, index, _ = w.index_used(Q2)
    assert index is not None, no_index_message(Q2, plan, "an index leading with customer_id")
    assert index.keys[0] == "customer_id", (
        f"{Q2.name}: the plan uses {index.describe()}, whose first column is "
        f"{index.keys[0]}: without customer_id leading, the B-tree cannot seek to one "
        f"customer and has to read the whole index")
    _, q1_index, _ = w.index_used(Q1)
    assert index is q1_index, (
        f"{Q2.name}: the plan uses {index.describe()}, but Q1 uses "
        f"{q1_index.describe() if q1_index else 'no index'}: the workload wants one "
        f"composite index for both - Q2 seeks customer_id, the left prefix of Q1's "
        f"(customer_id, created_at) over every order - and each extra index is one more "
        f"write on every INSERT (indexes: {known(w)})")


def test_q3_lookup_is_an_index_only_scan_on_a_unique_covering_index(
        workload: Callable[[], Workload]) -> None:
    w = workload()
    plan, index, node = w.index_used(Q3)
    refuse_uniqueness_by_status(w)  # after EXPLAIN: its refused rows leave dead tuples
    refuse_uniqueness_by_form(w)
    assert index is not None, no_index_message(
        Q3, plan, "a UNIQUE index on (external_ref) INCLUDE (status, total_cents)")
    assert node["Node Type"] == "Index Only Scan", (
        f"{Q3.name}: expected an Index Only Scan, saw {node['Node Type']} using "
        f"{index.describe()}: the query reads status and total_cents, so the index must "
        f"carry them (INCLUDE) or every lookup also visits the table")
    assert index.keys == ("external_ref",), (
        f"{Q3.name}: the Index Only Scan uses {index.describe()}: status and total_cents "
        f"are key columns there, but nothing searches or sorts on them; put them in "
        f"INCLUDE so the key (and UNIQUE) is external_ref alone and the inner pages stay "
        f"small")
    assert index.unique, (
        f"{Q3.name}: {index.describe()} is not UNIQUE: external_ref identifies an order, "
        f"and this one index can both enforce that and cover the lookup")
    assert node.get("Heap Fetches", 0) == 0, (
        f"{Q3.name}: the Index Only Scan still fetched {node['Heap Fetches']} heap rows")
    try:
        with w.conn.transaction(force_rollback=True):
            w.conn.execute("INSERT INTO orders SELECT 0, 1, 'ORD-0054321', 'shipped', now(), "
                           "1, ''")
    except errors.UniqueViolation:
        pass
    else:
        pytest.fail(
            f"{Q3.name}: inside a transaction, an INSERT of a second order with external_ref "
            f"'ORD-0054321' was accepted, although {index.describe()} is UNIQUE: the check is "
            "deferred (DEFERRABLE INITIALLY DEFERRED) to COMMIT, so until then queries see two "
            "orders with one reference and INSERT ... ON CONFLICT (external_ref) cannot use "
            "it - make it a plain unique index, checked at each statement", pytrace=False)
    unread = [c for c in index.include if c not in Q3_READS]
    assert not unread, (
        f"{Q3.name}: {index.describe()} INCLUDEs {', '.join(unread)}, which Q3 never reads: "
        "every INSERT and every UPDATE of those columns now rewrites the index too (and "
        "wide ones make entries too big to store). INCLUDE only what the query reads "
        f"({', '.join(sorted(Q3_READS))})")


def split_by_refusal(w: Workload, cases: dict[str, list[tuple[str, tuple[Any, ...]]]]
                     ) -> tuple[list[str], list[str]]:
    """Run each case's inserts in a transaction rolled back after them (constraints checked
    at once, deferred ones too): (the cases accepted, the cases refused as a duplicate)."""
    accepted, refused = [], []
    for name, inserts in cases.items():
        try:
            with w.conn.transaction(force_rollback=True):
                for sql, args in inserts:
                    w.conn.execute(sql, args)
                w.conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        except errors.IntegrityError:
            refused.append(name)
        else:
            accepted.append(name)
    return accepted, refused


# A second order with an existing reference, in each status (one the table does not hold
# yet too): the reference identifies every order, whatever its status.
DUPLICATE_REF = "INSERT INTO orders SELECT 0, 1, 'ORD-0054321', %s, now(), 1, ''"
STATUSES = ("pending", "cancelled", "shipped", "refunded")


def refuse_uniqueness_by_status(w: Workload) -> None:
    """A reference unique among some orders only (a partial UNIQUE index) lets an order
    outside its WHERE share a reference with another."""
    accepted, refused = split_by_refusal(
        w, {status: [(DUPLICATE_REF, (status,))] for status in STATUSES})
    if not (accepted and refused):
        return  # the same rule for every order: judged below
    partial = [i.describe() for i in w.indexes.values()
               if i.unique and i.predicate and "external_ref" in i.keys]
    pytest.fail(
        f"{Q3.name}: a second order with the reference 'ORD-0054321' (an order already "
        f"has it) was refused as {', '.join(refused)} but accepted as "
        f"{', '.join(accepted)}: {' and '.join(partial) or 'a rule'} makes external_ref "
        "unique only among the orders its WHERE keeps, so an order outside it shares a "
        "reference with another (and a lookup for any reference cannot use a partial index). "
        "external_ref identifies every order: a UNIQUE index with no WHERE "
        f"(indexes: {known(w)})", pytrace=False)


# New references of several forms, each inserted twice: another shop's or an import's
# (sorting before and after 'ORD-'), an empty one, digits only, lower case, not ASCII.
REFERENCE_FORMS = ("ORD-7777777", "AMZ-7731", "zz-7731", "", "0077731", "ord-7731", "ÖRD-7731")
NEW_ORDER = "INSERT INTO orders SELECT %s, %s, %s, 'shipped', now(), 1, ''"


def refuse_uniqueness_by_form(w: Workload) -> None:
    """A reference unique only in some forms (a partial UNIQUE index whose WHERE is on
    external_ref itself, so the lookup can still use it) lets the other forms repeat."""
    accepted, refused = split_by_refusal(
        w, {ref: [(NEW_ORDER, (-n, n, ref)) for n in (1, 2)] for ref in REFERENCE_FORMS})
    if not (accepted and refused):
        return  # the same rule for every reference: judged below
    partial = [f"{i.describe()}" for i in w.indexes.values()
               if i.unique and i.predicate and "external_ref" in i.keys]
    pytest.fail(
        f"{Q3.name}: two new orders with one reference were refused for "
        f"{', '.join(map(repr, refused))} but accepted for {', '.join(map(repr, accepted))}: "
        f"{' and '.join(partial) or 'a rule'} makes external_ref unique only for the "
        "references its WHERE keeps, so a reference of another form (an import's, a "
        "partner's, an empty one) may name two orders. external_ref identifies every "
        f"order: a UNIQUE index with no WHERE (indexes: {known(w)})", pytrace=False)


def test_q4_pending_queue_uses_a_partial_index(workload: Callable[[], Workload]) -> None:
    w = workload()
    plan, index, _ = w.index_used(Q4)
    need = "a partial index on (created_at) WHERE status = 'pending'"
    assert index is not None, no_index_message(Q4, plan, need)
    pending = w.conn.execute(
        "SELECT count(*) FROM orders WHERE status = 'pending'").fetchone()
    assert pending is not None
    assert index.predicate is not None, (
        f"{Q4.name}: the plan uses {index.describe()} ({index.size // 1024} kB), an index "
        f"over all {ROWS:,} rows, of which only {pending[0]:,} are pending: a partial index "
        f"(... WHERE status = 'pending') holds just those, and the other 99% of writes "
        f"never touch it")
    assert "pending" in index.predicate, (
        f"{Q4.name}: the plan uses the partial index {index.describe()}, whose WHERE does "
        f"not name the pending status: it describes the rows Q4 wants by what they are not, "
        f"so every status other than those it names - one added next year (on_hold, "
        f"refunded) included - is indexed, and Q4 reads it only to throw it away; make the "
        f"WHERE exactly the query's: status = 'pending'")
    # The predicate must hold the pending rows and nothing else: a broader one ("open"
    # orders, status <> 'shipped', IN (...)) still serves Q4, but indexes (and keeps up to
    # date) rows the query only reads to throw away.
    held = w.conn.execute(
        f"SELECT count(*) FROM orders WHERE {index.predicate}").fetchone()
    assert held is not None
    assert held[0] == pending[0], (
        f"{Q4.name}: the plan uses {index.describe()}, which holds {held[0]:,} rows, but "
        f"only {pending[0]:,} are pending: the other {held[0] - pending[0]:,} are indexed "
        f"(and written on every change) only for Q4 to read and filter them out; make the "
        f"WHERE of the partial index exactly the query's: status = 'pending'")
    assert not has_sort(plan), nulls_order_clash(Q4, plan, index, "created_at", False) or (
        f"{Q4.name}: the plan still sorts ({shape(plan)}): index the pending rows by "
        f"created_at so the oldest come first")
    strays = statuses_held(w, index)
    assert not strays, (
        f"{Q4.name}: the plan uses {index.describe()}, which would also hold orders of "
        f"status {', '.join(map(repr, strays))} (a pending order's row with only its status "
        f"changed satisfies the WHERE): the test's table has only pending, shipped and "
        f"cancelled orders, so today the index holds exactly the {pending[0]:,} pending "
        f"ones, but the first order of another status is indexed (and written on every "
        f"change) only for Q4 to filter it out; make the WHERE exactly the query's: "
        f"status = 'pending'")


# Statuses the table does not hold today but a shop soon has, and spellings that are not
# 'pending': a partial index for the pending queue must hold none of them.
OTHER_STATUSES = ("on_hold", "refunded", "processing", "awaiting_payment", "returned",
                  "draft", "Pending", "PENDING", "pending ")


def statuses_held(w: Workload, index: Index) -> list[str]:
    """The statuses other than 'pending' that the index's WHERE accepts, tried on a pending
    order's row with only its status changed: OTHER_STATUSES, and every literal the WHERE
    names (an IN list's other members). Evaluated by Postgres, not matched as text."""
    assert index.predicate is not None
    literals = [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'",
                                                         index.predicate)]
    probes = sorted({*OTHER_STATUSES, *literals} - {"pending"})
    rows = w.conn.execute(
        "SELECT status FROM ("
        " SELECT o.id, o.customer_id, o.external_ref, s.status, o.created_at,"
        "        o.total_cents, o.note"
        " FROM (SELECT * FROM orders WHERE status = 'pending' ORDER BY id LIMIT 1) AS o"
        " CROSS JOIN unnest(%s::text[]) AS s(status)) AS orders"
        f" WHERE {index.predicate.replace('%', '%%')} ORDER BY status",
        (probes,)).fetchall()
    return [r[0] for r in rows]


def test_no_index_is_redundant_or_unused(workload: Callable[[], Workload]) -> None:
    w = workload()
    indexes = sorted(w.indexes.values(), key=lambda i: i.name)
    assert any(not i.primary for i in indexes), (
        "indexes.sql created no index yet: there is nothing to judge for redundancy")
    problems: list[str] = []
    for x in indexes:
        for y in indexes:
            if x is y or x.predicate != y.predicate:
                continue
            if x.keys == y.keys and x.name < y.name:
                problems.append(
                    f"{x.describe()} and {y.describe()} have the same key: one index can do "
                    f"both jobs (CREATE UNIQUE INDEX ... INCLUDE ... if one enforces "
                    f"uniqueness)")
            elif (len(x.keys) < len(y.keys) and y.keys[:len(x.keys)] == x.keys
                  and not x.unique):
                problems.append(
                    f"{x.describe()} is redundant: its columns are a left prefix of "
                    f"{y.describe()}, which serves the same lookups; it only adds write cost")
    used = {w.index_used(q)[1] for q in WORKLOAD}
    for index in indexes:
        if not index.primary and index not in used:
            problems.append(
                f"{index.describe()} serves no query of the workload: every index is updated "
                f"on every INSERT, so an unused one is pure write amplification")
    assert not problems, "\n".join(problems) + f"\n(indexes: {known(w)})"


def test_the_primary_key_stays(workload: Callable[[], Workload]) -> None:
    """indexes.sql may add indexes; the table's primary key is its rule, not the workload's
    index: that no query of the workload reads it does not make it unused."""
    w = workload()
    keys = w.conn.execute(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'orders'::regclass AND contype = 'p'").fetchall()
    definition = keys[0][1] if keys else None
    assert definition == "PRIMARY KEY (id)", (
        f"after indexes.sql the table's primary key is "
        f"{definition or 'gone'} (it was PRIMARY KEY (id)): the id identifies a row - "
        "UPDATE ... WHERE id, foreign keys from other tables, a retried INSERT refused - "
        "and nothing else may take its place; 'no unused index' judges the indexes you "
        "create, and the primary key's index is the table's. Leave it as it is (and give "
        f"external_ref its own UNIQUE index) (indexes: {known(w)})")
    try:
        with w.conn.transaction(force_rollback=True):
            w.conn.execute("INSERT INTO orders SELECT 54321, 7, 'ORD-SAME-ID', 'shipped', "
                           "now(), 1, ''")
    except errors.UniqueViolation:
        return
    pytest.fail("an INSERT of a second order with id 54321 was accepted: the primary key "
                "on id no longer refuses it (indexes.sql may add indexes, never weaken the "
                f"table's rules) (indexes: {known(w)})", pytrace=False)


# Every note so far was 60 x's; a customer's real note can be long and incompressible. One
# such order per status, so that a partial index (WHERE status = ...) gets one as well, each
# of its own customer, instant and total (only the note is new here).
LONG_NOTES = """
INSERT INTO orders
SELECT -s.n, 1000 + s.n, 'ORD-LONG-NOTE-' || s.n, s.status,
       now() - s.n * interval '1 minute', 100 + s.n,
       (SELECT string_agg(md5(g::text || s.status), '') FROM generate_series(1, 100) g)
FROM (VALUES (1, 'pending'), (2, 'cancelled'), (3, 'shipped')) AS s(n, status)"""


def index_refusing(w: Workload, exc: psycopg.Error) -> Index | None:
    """The index that refused a row: the one Postgres names ("index row size ... for index
    "x""), else the one the catalog shows carrying note (key, expression or INCLUDE)."""
    named = re.search(r'index "([^"]+)"', str(exc))
    if named and named[1] in w.indexes:
        return w.indexes[named[1]]
    carrying = [i for i in w.indexes.values()
                if any(re.search(r"\bnote\b", c) for c in i.keys + i.include)]
    return carrying[0] if carrying else None


def long_note_message(w: Workload, served: dict[str, list[Query]],
                      exc: psycopg.Error) -> str:
    seen = (f"an order with a 3,200-character note could not be inserted "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}): ")
    limit = ("a B-tree entry is limited to about 2.7 kB (a third of a page), so one wide "
             "column in an index caps the size of every row")
    if not isinstance(exc, errors.ProgramLimitExceeded):
        return seen + ("these orders repeat no other order's customer, instant or reference; "
                       f"any order may carry a note of a few kilobytes (indexes: {known(w)})")
    index = index_refusing(w, exc)
    if index is None:
        return seen + f"an index copies a wide column into its entries, and {limit}"
    queries = served.get(index.name, [])
    names = list(dict.fromkeys(q.name.split(" for ")[0] for q in queries))
    read = sorted(frozenset().union(*(q.reads for q in queries)))
    return (seen + f"{index.describe()} carries note, which "
            + (f"{' and '.join(names)}, the {'query' if len(names) == 1 else 'queries'} it "
               f"serves, never read{'s' if len(names) == 1 else ''}" if names
               else "no query of the workload reads")
            + f", and copies it into each of its entries; {limit}. Carry only what the "
            f"queries an index serves read{' (' + ', '.join(read) + ')' if read else ''} "
            f"(indexes: {known(w)})")


def test_indexes_carry_only_what_their_queries_read(
        workload: Callable[[], Workload]) -> None:
    w = workload()
    served: dict[str, list[Query]] = {}
    for query in WORKLOAD:
        index = w.index_used(query)[1]
        if index is not None:
            served.setdefault(index.name, []).append(query)
    try:
        with w.conn.transaction(force_rollback=True):
            w.conn.execute(LONG_NOTES)
    except errors.DatabaseError as exc:
        pytest.fail(long_note_message(w, served, exc), pytrace=False)
    problems: list[str] = []
    for index in sorted(w.indexes.values(), key=lambda i: i.name):
        queries = served.get(index.name)
        if index.primary or not queries:
            continue  # the primary key is the table's; unused ones are judged above
        read = frozenset().union(*(q.reads for q in queries))
        names = list(dict.fromkeys(q.name.split(" for ")[0] for q in queries))
        extra = [c for c in index.keys + index.include if c not in read]
        if extra:
            problems.append(
                f"{index.describe()} carries {', '.join(extra)}, which "
                f"{' and '.join(names)} never read"
                f"{'s' if len(names) == 1 else ''}: a column in an index (key or INCLUDE) "
                f"is written into it on every INSERT and on every UPDATE of that column "
                f"(a status going from pending to shipped rewrites it), and makes every "
                f"entry wider; carry only what the queries it serves read "
                f"({', '.join(sorted(read))})")
    assert not problems, "\n".join(problems) + f"\n(indexes: {known(w)})"


# Orders the domain allows: only id and external_ref identify an order. Each case is one
# INSERT of orders that repeat other orders' customer, instant, status, total and note - or
# carry a status the table does not hold yet: the shop adds statuses as it grows.
VALID_WRITES = [
    ("a basket split into two orders of customer 42 at the same instant (one statement, "
     "created_at = now())",
     "INSERT INTO orders SELECT -g, 42, 'ORD-SPLIT-' || g, 'pending', now(), 500, 'basket' "
     "FROM generate_series(1, 2) g"),
    ("a re-import of customer 42's orders and of every pending order under new ids and "
     "references (same customer, created_at, status, total and note as the originals)",
     "INSERT INTO orders SELECT -id - 10, customer_id, 'COPY-' || external_ref, status, "
     "created_at, total_cents, note FROM orders WHERE customer_id = 42 OR status = 'pending'"),
    ("an order of a status the shop adds next ('on_hold': a pending order's row under a new "
     "id and reference, its status changed)",
     "INSERT INTO orders SELECT -id - 200000, customer_id, 'HOLD-' || external_ref, "
     "'on_hold', created_at, total_cents, note FROM orders WHERE status = 'pending' "
     "ORDER BY id LIMIT 1"),
]


def refusal_message(w: Workload, case: str, exc: psycopg.Error) -> str:
    rule = exc.diag.constraint_name or ""
    index = w.indexes.get(rule)
    if index is not None or isinstance(exc, errors.UniqueViolation):
        return (f"{case} was rejected ({type(exc).__name__} on {rule or 'a constraint'}): "
                f"{index.describe() if index else rule} makes a rule of a coincidence. Only "
                "external_ref identifies an order; a customer may place two orders at the "
                "same instant, and many pending orders share one. An index serves queries "
                "without UNIQUE: keep UNIQUE for the key that identifies a row "
                f"(indexes: {known(w)})")
    found = w.conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'orders'::regclass AND conname = %s", (rule,)).fetchone()
    definition = f"{rule} {found[0]}" if found else rule or "a rule indexes.sql added"
    return (f"{case} was rejected ({type(exc).__name__}: "
            f"{exc.diag.message_primary}): {definition} turns the statuses the table holds "
            "today into the only ones allowed, but the shop adds statuses as it grows "
            "(on_hold, refunded) and the partial index for Q4 needs no such rule - its "
            "WHERE status = 'pending' already leaves every other status out. indexes.sql "
            "adds indexes; it must not refuse orders the application writes "
            f"(indexes: {known(w)})")


def test_only_the_reference_is_unique(workload: Callable[[], Workload]) -> None:
    w = workload()
    for case, sql in VALID_WRITES:
        try:
            with w.conn.transaction(force_rollback=True):
                w.conn.execute(sql)
                w.conn.execute("SET CONSTRAINTS ALL IMMEDIATE")  # deferred ones check now
        except (errors.IntegrityError, errors.DataError) as exc:
            pytest.fail(refusal_message(w, case, exc), pytrace=False)
