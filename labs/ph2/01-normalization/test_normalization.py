"""ph2.1 normalization: the learner's schema.sql takes orders_denormalized to 3NF.

Every check runs on real Postgres 15 in a database of its own: the original table is
created and filled with data the learner has not seen, schema.sql runs, and then

* the catalog (information_schema, pg_catalog) shows each fact stored once, in the table
  whose primary key is the fact's determinant, with foreign keys, UNIQUE and NOT NULL;
* rows that break the rules (orphans, duplicates, zero quantities, negative prices) are
  rejected by the database itself, and so is deleting a customer or a product that orders
  still name (a cascading foreign key would delete the sales history with it);
* with the original table dropped, the view orders_rebuilt gives back exactly the original
  rows (EXCEPT ALL both ways, so duplicates and missing rows both count).

The checks find the learner's tables by their keys, not by their names.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import psycopg
import pytest
from psycopg import errors, sql

# The original table's columns, in order, with their types.
ORIGINAL_COLUMNS: list[tuple[str, str]] = [
    ("order_id", "integer"),
    ("order_date", "date"),
    ("customer_id", "integer"),
    ("customer_email", "text"),
    ("customer_name", "text"),
    ("customer_city", "text"),
    ("product_sku", "text"),
    ("product_name", "text"),
    ("quantity", "integer"),
    ("unit_price", "numeric(10,2)"),
]
ATTRIBUTES = [name for name, _ in ORIGINAL_COLUMNS]


@dataclass(frozen=True)
class Entity:
    """A determinant and the attributes it decides: one table in 3NF."""

    name: str
    key: tuple[str, ...]
    decides: tuple[str, ...]


# The functional dependencies of orders_denormalized (README.md states them in words).
ENTITIES = [
    Entity("customer", ("customer_id",), ("customer_email", "customer_name", "customer_city")),
    Entity("product", ("product_sku",), ("product_name",)),
    Entity("order", ("order_id",), ("order_date", "customer_id")),
    Entity("order line", ("order_id", "product_sku"), ("quantity", "unit_price")),
]
DETERMINANT = {attr: e.key for e in ENTITIES for attr in e.decides}
VIEW = "orders_rebuilt"

Row = tuple[Any, ...]
Conn = psycopg.Connection[Any]


# --------------------------------------------------------------------------------------
# The original data: generated, so the learner's script cannot hard-code it. It contains
# the traps a wrong decomposition falls into: two customers with the same name, two SKUs
# with the same name, the same SKU sold at different prices, repeat customers.


# The ids of the rows an older system left: far above the generated ones (and below the
# edge cases' 2147483647).
LEGACY_IDS = {"customer_id": 1_900_000_001, "order_id": 2_000_000_001}


def original_rows(seed: int = 2024) -> list[Row]:
    rng = random.Random(seed)
    # Values as they were typed: a trailing space, two spaces inside a name, a space before
    # a city. They are the business's data; the migration copies them as they are.
    names = ["Ana Silva", "Ben Okafor", "Chen Wei", "Dora Novak", "Eli Cohen", "Fay Moreau",
             "Gus Lindqvist", "Hana Sato", "Ivo  Petrov", "Jo Kim ", "Ana Silva", "Kai Müller"]
    cities = ["Lisbon", "Lagos", "Shanghai", "Zagreb", "Haifa", "Lyon", "Malmö", " Osaka"]
    customers = [
        (cid, f"customer{cid}@shop.test", names[i % len(names)], rng.choice(cities))
        for i, cid in enumerate(range(101, 101 + 24))
    ]
    products = [
        ("SKU-CBL-1M", "USB-C cable", Decimal("9.90")),
        ("SKU-CBL-2M", "USB-C cable", Decimal("12.90")),
        ("SKU-KBD", "Keyboard", Decimal("49.00")),
        ("SKU-MSE", "Mouse", Decimal("25.00")),
        ("SKU-MON", "Monitor 27in", Decimal("289.00")),
        ("SKU-HUB", "USB hub", Decimal("34.50")),
        ("SKU-CAM", "Webcam", Decimal("59.00")),
        ("SKU-MIC", "Microphone", Decimal("79.00")),
        ("SKU-LMP", "Desk lamp ", Decimal("39.00")),
        ("SKU-PAD", "Mouse pad", Decimal("0.00")),  # a free gift: price 0 is allowed
    ]
    rows: list[Row] = []
    day = dt.date(2024, 3, 1)
    for order_id in range(5001, 5001 + 90):
        customer = rng.choice(customers[:18])  # some customers order again and again
        day += dt.timedelta(days=rng.choice([0, 0, 1, 2]))
        for sku, pname, list_price in rng.sample(products, rng.randint(1, 4)):
            # Promotions: the price charged depends on the order, not only on the product.
            price = (list_price * Decimal(rng.choice(["1", "1", "0.9", "0.75"]))).quantize(
                Decimal("0.01"))
            rows.append((order_id, day, *customer, sku, pname, rng.randint(1, 5), price))
    rng.shuffle(rows)
    # A customer and an order carried over from an older system, their ids far above the
    # rest: a generator must move past the ids the data HAS (setval to their max), not
    # start at a number guessed to be beyond them (START WITH 100000).
    rows.append((LEGACY_IDS["order_id"], dt.date(2024, 3, 15), LEGACY_IDS["customer_id"],
                 "legacy.buyer@shop.test", "Olga Ivanova", "Riga", "SKU-KBD", "Keyboard", 1,
                 Decimal("49.00")))
    return rows


ROWS = original_rows()


def create_original(conn: Conn) -> None:
    cols = ", ".join(f"{name} {kind} NOT NULL" for name, kind in ORIGINAL_COLUMNS)
    conn.execute(f"CREATE TABLE orders_denormalized ({cols})")
    with conn.cursor() as cur, cur.copy(
            f"COPY orders_denormalized ({', '.join(ATTRIBUTES)}) FROM STDIN") as copy:
        for row in ROWS:
            copy.write_row(row)


@pytest.fixture
def db(postgres: Any) -> Iterator[Conn]:
    """A database holding the original table and its data."""
    with postgres.connect(autocommit=True) as conn:
        create_original(conn)
        yield conn


def apply_schema(conn: Conn, learner: Any) -> None:
    """Run schema.sql. Called by each test (not by the fixture) so that a broken script is a
    failed check in the database's own words rather than a setup error."""
    script = learner.path("schema.sql").read_text(encoding="utf-8")
    body = "\n".join(line for line in script.splitlines()
                     if not line.strip().startswith("--")).strip()
    if not body:
        pytest.fail("schema.sql has no statements yet: write the CREATE TABLEs, the "
                    "INSERT ... SELECT migration and the orders_rebuilt view", pytrace=False)
    try:
        with conn.transaction():
            conn.execute(script)
    except psycopg.Error as exc:
        pytest.fail(f"schema.sql failed on the original data: {describe(exc)}", pytrace=False)


def describe(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = f"{type(exc).__name__} (SQLSTATE {exc.sqlstate}): {diag.message_primary}"
    if diag.message_detail:
        text += f" - {diag.message_detail}"
    return text


# --------------------------------------------------------------------------------------
# The catalog, read the way a DBA would: which columns live where, which keys exist.


@dataclass
class Table:
    name: str
    columns: list[str]
    primary_key: tuple[str, ...] | None
    unique_keys: list[tuple[str, ...]]
    foreign_keys: list[tuple[tuple[str, ...], str, tuple[str, ...]]]
    not_null: set[str]


def read_catalog(conn: Conn) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for name, column, nullable in conn.execute(
        """SELECT c.table_name, c.column_name, c.is_nullable
           FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
           WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
             AND c.table_name <> 'orders_denormalized'
           ORDER BY c.table_name, c.ordinal_position"""
    ):
        table = tables.setdefault(name, Table(name, [], None, [], [], set()))
        table.columns.append(column)
        if nullable == "NO":
            table.not_null.add(column)
    constraints = conn.execute(
        """SELECT con.contype::text, rel.relname::text,
                  ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                        ORDER BY k.i),
                  frel.relname::text,
                  ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
                        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
                        ORDER BY k.i)
           FROM pg_constraint con
           JOIN pg_class rel ON rel.oid = con.conrelid
           LEFT JOIN pg_class frel ON frel.oid = con.confrelid
           WHERE rel.relnamespace = 'public'::regnamespace"""
    ).fetchall()
    for kind, name, cols, ref_table, ref_cols in constraints:
        owner = tables.get(name)
        if owner is None:
            continue
        if kind == "p":
            owner.primary_key = tuple(cols)
        elif kind == "u":
            owner.unique_keys.append(tuple(cols))
        elif kind == "f":
            owner.foreign_keys.append((tuple(cols), ref_table, tuple(ref_cols)))
    # A unique index enforces uniqueness just as well as a UNIQUE constraint.
    for name, cols in conn.execute(
        """SELECT rel.relname::text,
                  ARRAY(SELECT a.attname::text
                        FROM unnest(ix.indkey::int2[]) WITH ORDINALITY k(n, i)
                        JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.n
                        WHERE k.i <= ix.indnkeyatts ORDER BY k.i)
           FROM pg_index ix JOIN pg_class rel ON rel.oid = ix.indrelid
           WHERE rel.relnamespace = 'public'::regnamespace AND ix.indisunique
             AND NOT ix.indisprimary AND ix.indpred IS NULL AND ix.indexprs IS NULL"""
    ):
        if name in tables and tuple(cols) not in tables[name].unique_keys:
            tables[name].unique_keys.append(tuple(cols))
    return tables


def homes(tables: dict[str, Table]) -> dict[str, Table]:
    """For each entity, the table whose primary key is exactly its determinant."""
    found: dict[str, Table] = {}
    for entity in ENTITIES:
        for table in tables.values():
            if table.primary_key and set(table.primary_key) == set(entity.key):
                found[entity.name] = table
    return found


def fmt(cols: tuple[str, ...] | None) -> str:
    return "(" + ", ".join(cols) + ")" if cols else "no primary key"


def require_homes(tables: dict[str, Table]) -> dict[str, Table]:
    found = homes(tables)
    for entity in ENTITIES:
        if entity.name not in found:
            have = "; ".join(f"{t.name} {fmt(t.primary_key)}" for t in tables.values())
            pytest.fail(
                f"no table has PRIMARY KEY {fmt(entity.key)}: {', '.join(entity.decides)} "
                f"depend on {fmt(entity.key)}, so the {entity.name} facts need a table keyed "
                f"by it (tables found: {have or 'none'})", pytrace=False)
    return found


# --------------------------------------------------------------------------------------
# 1. The decomposition


def test_every_fact_is_stored_once_under_its_own_key(db: Conn, learner: Any) -> None:
    apply_schema(db, learner)
    tables = read_catalog(db)
    where: dict[str, list[Table]] = {a: [] for a in ATTRIBUTES}
    for table in tables.values():
        for column in table.columns:
            if column in where:
                where[column].append(table)
    missing = [a for a, found in where.items() if not found]
    assert not missing, (
        f"column {', '.join(missing)} is in no table: keep every original column name "
        f"(tables found: {', '.join(tables) or 'none'}) - the check follows each fact by name")
    problems: list[str] = []
    for attr in ATTRIBUTES:
        determinant = DETERMINANT.get(attr, ())
        homes_of_attr = [t for t in where[attr]
                         if determinant and set(t.primary_key or ()) == set(determinant)]
        if len(homes_of_attr) > 1:
            names = ", ".join(t.name for t in homes_of_attr)
            problems.append(f"{attr} is stored in {names}: a fact stored twice can disagree")
        for table in where[attr]:
            key = table.primary_key or ()
            if attr in key or (determinant and set(key) == set(determinant)):
                continue  # a key column (referenced by foreign keys), or the fact's home
            if not determinant:
                why = f"{fmt(key)} does not decide it (it identifies something else)"
            elif set(determinant) < set(key):
                why = (f"partial dependency (breaks 2NF): it depends on {fmt(determinant)} "
                       f"alone, a part of the key {fmt(key)}, so it repeats on every row")
            elif set(key) < set(determinant):
                why = (f"{fmt(key)} does not decide it: it depends on {fmt(determinant)}, "
                       f"so one row per {fmt(key)} cannot hold its different values")
            elif key:
                why = (f"transitive dependency (breaks 3NF): {fmt(key)} decides it only "
                       f"through {fmt(determinant)}, so it is copied onto every "
                       f"{table.name} row with the same {fmt(determinant)}")
            else:
                why = "the table has no primary key, so nothing stops copies"
            problems.append(f"{attr} is stored in {table.name} {fmt(key)}: {why}")
    assert not problems, "\n".join(problems)
    found = require_homes(tables)
    # The order table must refer to a customer, not copy the customer's details.
    order_table = found["order"]
    assert "customer_id" in order_table.columns, (
        f"{order_table.name} has no customer_id: order_id decides the customer, so the "
        f"order row must say which customer (a foreign key to {found['customer'].name})")


def test_foreign_keys_unique_and_not_null_are_declared(db: Conn, learner: Any) -> None:
    apply_schema(db, learner)
    tables = read_catalog(db)
    found = require_homes(tables)
    key_home = {e.key[0]: found[e.name] for e in ENTITIES if len(e.key) == 1}
    problems: list[str] = []
    # Wherever a key attribute appears outside its home, it is a reference to that home.
    for table in tables.values():
        for column in table.columns:
            home = key_home.get(column)
            if home is None or home is table:
                continue
            if (((column,), home.name, (column,)) not in table.foreign_keys):
                problems.append(
                    f"{table.name}.{column} has no FOREIGN KEY to {home.name}({column}): "
                    f"nothing stops rows of {table.name} from pointing at {column} values "
                    f"that do not exist")
    customers = found["customer"]
    if ("customer_email",) not in customers.unique_keys:
        problems.append(
            f"{customers.name}.customer_email is not UNIQUE: it is a second candidate key "
            f"(one email, one customer), and only a UNIQUE constraint makes Postgres "
            f"enforce that")
    for attr in ATTRIBUTES:
        for table in tables.values():
            if attr in table.columns and attr not in table.not_null:
                problems.append(f"{table.name}.{attr} allows NULL: every original row has a "
                                f"value for it; declare it NOT NULL")
    assert not problems, "\n".join(problems)


def test_every_table_keeps_its_rows_through_a_crash(db: Conn, learner: Any) -> None:
    """The normalized tables are now the only home of the business's facts (the original is
    dropped after the move): an UNLOGGED table writes no WAL, so Postgres empties it when it
    recovers from a crash, and a replica never has its rows."""
    apply_schema(db, learner)
    tables = read_catalog(db)
    unlogged = [name for name, in db.execute(
        """SELECT relname::text FROM pg_class
           WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')
             AND relpersistence = 'u' ORDER BY relname""") if name in tables]
    assert not unlogged, (
        f"{', '.join(unlogged)} {'is' if len(unlogged) == 1 else 'are'} UNLOGGED: Postgres "
        "writes no WAL for such a table, so it empties it on recovery from a crash (and a "
        "replica never sees its rows) - the orders moved there are lost at the first crash, "
        "with orders_denormalized gone. Create every table as a plain (logged) table; a load "
        "made faster with UNLOGGED must end with ALTER TABLE ... SET LOGGED")


# --------------------------------------------------------------------------------------
# 2. Rows that break the rules are rejected by the database


def immediate(conn: Conn) -> None:
    """Check deferred constraints at each statement's end, in the transaction just begun: a
    DEFERRABLE INITIALLY DEFERRED key is checked at COMMIT, which an attempt that is rolled
    back never reaches - the refusal COMMIT would give comes at once instead."""
    conn.execute("SET CONSTRAINTS ALL IMMEDIATE")


@dataclass
class Writer:
    """Inserts into the learner's tables, found by their keys, each attempt in a savepoint."""

    conn: Conn
    tables: dict[str, Table]

    def insert(self, entity: str, returning: str | None = None, **values: Any) -> Any:
        """Insert one row; with returning, the value the database gave that column."""
        table = self.tables[entity]
        query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table.name),
            sql.SQL(", ").join(map(sql.Identifier, values)),
            sql.SQL(", ").join(sql.Placeholder() * len(values)))
        if returning is None:
            self.conn.execute(query, list(values.values()))
            return None
        query += sql.SQL(" RETURNING {}").format(sql.Identifier(returning))
        row = self.conn.execute(query, list(values.values())).fetchone()
        return row[0] if row else None

    def delete(self, entity: str, column: str, value: Any) -> None:
        query = sql.SQL("DELETE FROM {} WHERE {} = %s").format(
            sql.Identifier(self.tables[entity].name), sql.Identifier(column))
        self.conn.execute(query, [value])

    def outcome(self, action: Callable[[], None]) -> type[psycopg.Error] | None:
        try:
            with self.conn.transaction(force_rollback=True):
                immediate(self.conn)
                action()
        except psycopg.Error as exc:
            return type(exc)
        return None


CASCADE_WHY = ("ON DELETE CASCADE (or SET NULL / SET DEFAULT) turns one delete into the "
               "loss of other facts - here")


# Facts every row must bring. Leaving one out of the INSERT must be refused like a NULL: a
# DEFAULT ('' for a name, 0 for a price) makes up the value NOT NULL demands - a customer
# with an empty email, a line given away for nothing.
REQUIRED = [("customer", "customer_email"), ("customer", "customer_name"),
            ("customer", "customer_city"), ("product", "product_name"),
            ("order line", "unit_price")]


def left_out(db: Conn, w: Writer, found: dict[str, Table], new_customer: dict[str, Any],
             line: Callable[..., Callable[[], None]]
             ) -> list[tuple[str, Callable[[], None], type[psycopg.Error], str]]:
    """A rejection case per REQUIRED fact: a row that leaves that column out."""
    rows: dict[str, dict[str, Any]] = {
        "customer": new_customer, "product": {"product_sku": "SKU-NEW", "product_name": "Thing"}}
    cases: list[tuple[str, Callable[[], None], type[psycopg.Error], str]] = []
    for entity, column in REQUIRED:
        default = db.execute(
            "SELECT column_default FROM information_schema.columns WHERE table_schema = "
            "'public' AND table_name = %s AND column_name = %s",
            [found[entity].name, column]).fetchone()
        made_up = (f"its DEFAULT {default[0]} makes one up" if default and default[0]
                   else "declare it NOT NULL, with no DEFAULT")
        fix = (f"{column} is a fact every {entity} must bring, so NOT NULL must refuse a row "
               f"without it: {made_up}")
        if entity == "order line":
            action = line(omit=column)
        else:
            values = {k: v for k, v in rows[entity].items() if k != column}
            action = cast(Callable[[], None], lambda e=entity, v=values: w.insert(e, **v))
        article = "an" if entity[0] in "aeiou" else "a"
        cases.append((f"{article} {entity} with no {column} given (left out of the INSERT)",
                      action,
                      errors.NotNullViolation, fix))
    return cases


def test_rows_breaking_the_rules_are_rejected(db: Conn, learner: Any) -> None:
    apply_schema(db, learner)
    found = require_homes(read_catalog(db))
    for entity in ENTITIES:
        table = found[entity.name]
        misplaced = [c for c in table.columns
                     if c in ATTRIBUTES and c not in entity.key + entity.decides]
        if misplaced:
            pytest.fail(f"{table.name} also holds {', '.join(misplaced)}, which "
                        f"{fmt(entity.key)} does not decide: fix the decomposition first "
                        f"(see the check on where each fact is stored)", pytrace=False)
    w = Writer(db, found)
    some = ROWS[0]
    order_id, customer_id, email = some[0], some[2], some[3]
    sku_not_in_order = next(r[6] for r in ROWS if r[6] not in
                            {x[6] for x in ROWS if x[0] == order_id})
    new_customer: dict[str, Any] = {"customer_id": 9001, "customer_email": "new@shop.test",
                                    "customer_name": "New Person", "customer_city": "Lisbon"}

    def line(omit: str = "", **over: Any) -> Callable[[], None]:
        values = {"order_id": order_id, "product_sku": sku_not_in_order, "quantity": 2,
                  "unit_price": Decimal("10.00"), **over}
        values.pop(omit, None)
        return lambda: w.insert("order line", **values)

    # Sanity first: well-formed rows go in, so a rejection below is about the rule.
    valid = {
        "a new customer": lambda: w.insert("customer", **new_customer),
        "a new product": lambda: w.insert("product", product_sku="SKU-NEW",
                                          product_name="Thing"),
        "a new order for an existing customer": lambda: w.insert(
            "order", order_id=9001, order_date=dt.date(2024, 6, 1), customer_id=customer_id),
        "a new line on an existing order": line(),
    }
    for what, action in valid.items():
        err = w.outcome(action)
        assert err is None or not issubclass(err, errors.GeneratedAlways), (
            f"inserting {what} that brings its own id, as every row of the original did, was "
            "rejected with GeneratedAlways: a key GENERATED ALWAYS AS IDENTITY refuses any id "
            "it did not make itself. Use GENERATED BY DEFAULT (or serial), so rows that bring "
            "their ids go in and rows without one get the next")
        assert err is None, (
            f"inserting {what} was rejected with {err.__name__ if err else ''}: valid rows "
            f"must be accepted (extra columns need defaults)")

    cases: list[tuple[str, Callable[[], None], type[psycopg.Error], str]] = [
        ("a second customer with an existing email",
         lambda: w.insert("customer", **{**new_customer, "customer_email": email}),
         errors.UniqueViolation, "customer_email must be UNIQUE"),
        ("a customer without an email",
         lambda: w.insert("customer", **{**new_customer, "customer_email": None}),
         errors.NotNullViolation, "customer_email must be NOT NULL"),
        *left_out(db, w, found, new_customer, line),
        ("an order for customer 999999, who does not exist",
         lambda: w.insert("order", order_id=9002, order_date=dt.date(2024, 6, 1),
                          customer_id=999999),
         errors.ForeignKeyViolation, "the order's customer_id needs a FOREIGN KEY"),
        ("a line on order 999999, which does not exist", line(order_id=999999),
         errors.ForeignKeyViolation, "the line's order_id needs a FOREIGN KEY"),
        ("a line for product SKU-NOPE, which does not exist", line(product_sku="SKU-NOPE"),
         errors.ForeignKeyViolation, "the line's product_sku needs a FOREIGN KEY"),
        ("a line with quantity 0", line(quantity=0),
         errors.CheckViolation, "quantity needs CHECK (quantity > 0)"),
        ("a line with quantity -3", line(quantity=-3),
         errors.CheckViolation, "quantity needs CHECK (quantity > 0)"),
        ("a line with unit_price -0.01", line(unit_price=Decimal("-0.01")),
         errors.CheckViolation, "unit_price needs CHECK (unit_price >= 0)"),
        ("the same product twice on one order", line(product_sku=some[6]),
         errors.UniqueViolation, "a line is identified by (order_id, product_sku)"),
        # The references protect the history: deleting a customer or a product must not
        # take the orders and lines that name it along (ON DELETE CASCADE), which would be
        # the delete anomaly normalization removes - one fact deleted, others lost with it.
        # (Deleting an order may take its own lines: they are part of it.)
        (f"deleting customer {customer_id}, who has orders",
         lambda: w.delete("customer", "customer_id", customer_id),
         errors.ForeignKeyViolation,
         f"the orders' reference must refuse it (the default ON DELETE NO ACTION, or "
         f"RESTRICT): {CASCADE_WHY} their orders - the history of what was sold"),
        (f"deleting product {some[6]}, which was sold",
         lambda: w.delete("product", "product_sku", some[6]),
         errors.ForeignKeyViolation,
         f"the order lines' reference must refuse it (the default ON DELETE NO ACTION, or "
         f"RESTRICT): {CASCADE_WHY} the order lines that sold it - quantities and prices "
         f"charged"),
    ]
    problems = []
    for what, action, expected, fix in cases:
        err = w.outcome(action)
        if err is None or not issubclass(err, expected):
            saw = "it was accepted" if err is None else f"it failed with {err.__name__}"
            problems.append(f"{what}: expected {expected.__name__}, {saw} - {fix}")
    assert not problems, "\n".join(problems)


# Valid rows at the edges of the original's domain. The business rules are the README's:
# a quantity is at least 1, a price is never negative, an email is unique. Nothing caps a
# quantity or a price and nothing says what an email looks like: the original columns
# (integer, numeric(10,2), text) hold these values, so the normalized tables must too. The
# test data alone is kind (quantities 1-5, prices under 300, emails customerN@shop.test).
EDGE_CUSTOMER: dict[str, Any] = {
    "customer_id": 2147483647, "customer_email": "Zoe.O'Brien+orders@Mail.Example.COM",
    "customer_name": "Zoë O'Brien-Łukasiewicz " + "von " * 60 + "Ångström",
    "customer_city": "Llanfairpwllgwyngyll"}


def edge_cases(order_id: int, customer_id: int, sku: str
               ) -> list[tuple[str, str, dict[str, Any]]]:
    """(what, entity, values): each a row the original table could hold."""
    line = {"order_id": order_id, "product_sku": sku, "quantity": 2,
            "unit_price": Decimal("10.00")}
    # RFC 5321 2.4: a mailbox's local part is case-sensitive, so an existing customer's
    # email with its local part in capitals is another email: the business's UNIQUE is on
    # the email as it is, not on lower(email).
    local, _, domain = next(r[3] for r in ROWS if r[2] == customer_id).partition("@")
    shouted = f"{local.upper()}@{domain}"
    return [
        ("a line with quantity 2147483647 (the largest integer the original holds)",
         "order line", {**line, "quantity": 2147483647}),
        ("a line with quantity 1000", "order line", {**line, "quantity": 1000}),
        ("a line with unit_price 99999999.99 (the largest numeric(10,2))", "order line",
         {**line, "unit_price": Decimal("99999999.99")}),
        ("a line with unit_price 100000.00", "order line",
         {**line, "unit_price": Decimal("100000.00")}),
        ("a customer whose email has capitals, a '+' tag and an apostrophe "
         f"({EDGE_CUSTOMER['customer_email']}), a long accented name and id 2147483647",
         "customer", EDGE_CUSTOMER),
        ("a customer with the same name and city as another (but their own email)",
         "customer", {"customer_id": 9002, "customer_email": "second.ana@shop.test",
                      "customer_name": "Ana Silva", "customer_city": "Lisbon"}),
        (f"a customer whose email {shouted} differs from customer {customer_id}'s "
         f"({local}@{domain}) only in the case of its local part - another email (RFC 5321 "
         "2.4: the local part is case-sensitive), and the business makes only equal emails "
         "one customer: a UNIQUE on lower(email), or emails lower-cased on the way in, is a "
         "rule it did not state", "customer",
         {"customer_id": 9004, "customer_email": shouted, "customer_name": "Ana Silva",
          "customer_city": "Porto"}),
        ("a product with a long SKU and a name another product has", "product",
         {"product_sku": "SKU-" + "X" * 300 + "/ü 2m", "product_name": "USB-C cable"}),
        ("an order dated 1970-01-01", "order",
         {"order_id": 2147483647, "order_date": dt.date(1970, 1, 1),
          "customer_id": customer_id}),
        ("an order dated 2099-12-31", "order",
         {"order_id": 9003, "order_date": dt.date(2099, 12, 31), "customer_id": customer_id}),
    ]


def test_valid_rows_at_the_edges_of_the_domain_go_in(db: Conn, learner: Any) -> None:
    """A constraint stricter than the business's rules (a "sanity" cap on a quantity or a
    price, an email pattern) is as wrong as a missing one: the next valid order is refused.
    Each row below is one the original table holds; each must go in."""
    apply_schema(db, learner)
    found = require_homes(read_catalog(db))
    w = Writer(db, found)
    some = ROWS[0]
    order_id, customer_id = some[0], some[2]
    sku_not_in_order = next(r[6] for r in ROWS if r[6] not in
                            {x[6] for x in ROWS if x[0] == order_id})
    problems = []
    for what, entity, values in edge_cases(order_id, customer_id, sku_not_in_order):
        try:
            with db.transaction(force_rollback=True):
                immediate(db)
                w.insert(entity, **values)
        except psycopg.Error as exc:
            constraint = exc.diag.constraint_name
            by = f" by constraint {constraint}" if constraint else ""
            problems.append(f"{what}: refused{by} - {describe(exc)}")
    assert not problems, (
        "valid rows were refused: " + "\n".join(problems) + "\n  The business's rules are "
        "the README's (a quantity is at least 1, a price is never negative, one customer per "
        "email): nothing caps a quantity or a price and nothing says what an email or a name "
        "looks like. The original columns hold these values, so a rule stricter than the "
        "business's refuses real orders - declare only the stated rules.")


def test_generated_keys_start_after_the_copied_ones(db: Conn, learner: Any) -> None:
    """A key column may get a generator (serial, identity, DEFAULT nextval), but the
    migration copies the existing ids explicitly, which never moves the sequence: the next
    new row would take an id the migration already used and be refused as a duplicate."""
    apply_schema(db, learner)
    found = require_homes(read_catalog(db))
    w = Writer(db, found)
    some = ROWS[0]
    new_rows: dict[str, dict[str, Any]] = {
        "customer": {"customer_email": "generated@shop.test", "customer_name": "New Person",
                     "customer_city": "Lisbon"},
        "order": {"order_date": dt.date(2024, 6, 1), "customer_id": some[2]},
    }
    problems = []
    for entity in ENTITIES:
        if entity.name not in new_rows:
            continue
        table, (key,) = found[entity.name], entity.key
        generator = db.execute(
            """SELECT coalesce(column_default, CASE WHEN is_identity = 'YES' THEN 'identity '
                                                    || identity_generation END)
               FROM information_schema.columns
               WHERE table_schema = 'public' AND table_name = %s AND column_name = %s""",
            [table.name, key]).fetchone()
        if generator is None or generator[0] is None:
            continue  # no generator: new rows bring their own ids, as the original did
        copied = max(r[ATTRIBUTES.index(key)] for r in ROWS)
        taken: list[Any] = []
        # the defaults bind this pass's entity (a lambda with defaults gets no type from
        # the parameter it is passed to)
        err = w.outcome(cast(Callable[[], None], lambda e=entity.name, k=key, got=taken:
                             got.append(w.insert(e, returning=k, **new_rows[e]))))
        where = (f"{table.name}.{key} has a generator ({generator[0]}) and the migration "
                 f"copied ids up to {copied}")
        fix = (f"after copying the ids, move the sequence past them: SELECT setval("
               f"pg_get_serial_sequence('{table.name}', '{key}'), (SELECT max({key}) FROM "
               f"{table.name})) (is_called true, so the next id is max + 1)")
        if err is not None and issubclass(err, errors.UniqueViolation):
            problems.append(f"{where}, but a new {entity.name} that takes the generated "
                            f"{key} was refused with UniqueViolation: the generator hands "
                            f"out an id the migration already used - {fix}")
        elif err is not None:
            problems.append(f"{where}, but a new {entity.name} that takes the generated "
                            f"{key} was refused with {err.__name__}: a valid row must go in")
        elif taken and taken[0] <= copied:
            guessed = (f" - it started past the ordinary ids but not past {copied}, the "
                       f"id of a {entity.name} an older system left: a start guessed to be "
                       "beyond the data (START WITH, RESTART) is not a move past the ids the "
                       "data has"
                       if taken[0] > max(r[ATTRIBUTES.index(key)] for r in ROWS
                                         if r[ATTRIBUTES.index(key)] != LEGACY_IDS[key])
                       else "")
            problems.append(f"{where}, but a new {entity.name} that takes the generated "
                            f"{key} got {taken[0]}: the generator is behind the copied ids, "
                            f"so new rows collide with them (duplicate key) once it reaches "
                            f"the first copied one{guessed} - {fix}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------
# 3. Nothing was lost: the view gives back the original rows


def test_view_rebuilds_the_original_rows_exactly(db: Conn, learner: Any) -> None:
    apply_schema(db, learner)
    try:
        with db.transaction():
            db.execute("DROP TABLE orders_denormalized")
    except errors.DependentObjectsStillExist:
        pytest.fail(f"{VIEW} still reads orders_denormalized: the view must rebuild the rows "
                    f"from your normalized tables alone (the original table is dropped "
                    f"before the view is read)", pytrace=False)
    except errors.UndefinedTable:
        pass  # the script already dropped it; that is allowed
    columns = sql.SQL(", ").join(map(sql.Identifier, ATTRIBUTES))
    try:
        with db.transaction():
            db.execute(sql.SQL("SELECT {} FROM {} LIMIT 0").format(columns,
                                                                   sql.Identifier(VIEW)))
    except psycopg.Error as exc:
        pytest.fail(f"cannot read the view {VIEW} with the original columns: {describe(exc)}",
                    pytrace=False)

    typed = ", ".join(f"{name} {kind}" for name, kind in ORIGINAL_COLUMNS)
    db.execute(f"CREATE TEMP TABLE expected_rows ({typed})")
    with db.cursor() as cur, cur.copy(f"COPY expected_rows ({', '.join(ATTRIBUTES)}) "
                                      "FROM STDIN") as copy:
        for row in ROWS:
            copy.write_row(row)

    def difference(left: str, right: str) -> list[Row]:
        # EXCEPT ALL keeps multiplicity: a row that appears twice but should appear once
        # shows up as a difference, which a plain EXCEPT would hide.
        query = sql.SQL("SELECT {c} FROM {l} EXCEPT ALL SELECT {c} FROM {r} "
                        "ORDER BY 1, 7").format(c=columns, l=sql.Identifier(left),
                                                r=sql.Identifier(right))
        return db.execute(query).fetchall()

    try:
        missing = difference("expected_rows", VIEW)
        extra = difference(VIEW, "expected_rows")
    except psycopg.Error as exc:
        pytest.fail(f"cannot compare {VIEW} with the original rows: {describe(exc)} "
                    f"(keep the original column types)", pytrace=False)
    if missing or extra:
        lines = [f"{VIEW} differs from the original: {len(missing)} original rows missing, "
                 f"{len(extra)} rows that were not in the original"]
        tidied = tidied_values(missing, extra)
        if tidied:
            lines.insert(0, f"{VIEW} gives back values changed on the way: {tidied[0]}"
                         + (f" (and {len(tidied) - 1} more)" if len(tidied) > 1 else "")
                         + "\n  The migration copies each fact as it was recorded: a trim, "
                         "a squeeze of spaces or a change of case rewrites the business's "
                         "data (and two values that differ only so are two values to it).")
        lines += [f"  missing: {show(r)}" for r in missing[:3]]
        lines += [f"  extra:   {show(r)}" for r in extra[:3]]
        lines.append("  (a value kept per product instead of per order line, or a join on a "
                     "non-key column, changes or multiplies rows)")
        pytest.fail("\n".join(lines), pytrace=False)

    # The view must be the tables, not a copy of them: normalization's point is that a fact
    # changed in its one home shows on every row that names it. A materialized view (or a
    # view over one) equals the original rows the moment it is built and goes stale with
    # the first change.
    found = require_homes(read_catalog(db))
    w = Writer(db, found)
    some = ROWS[0]
    customer_id, sku = some[2], some[6]
    new_email = "moved.on@shop.test"
    db.execute(sql.SQL("UPDATE {} SET customer_email = %s WHERE customer_id = %s").format(
        sql.Identifier(found["customer"].name)), [new_email, customer_id])
    w.insert("order", order_id=9101, order_date=dt.date(2024, 7, 1), customer_id=customer_id)
    w.insert("order line", order_id=9101, product_sku=sku, quantity=7,
             unit_price=Decimal("1.23"))
    expected = sorted(
        [(r[0], r[6], new_email) for r in ROWS if r[2] == customer_id] + [(9101, sku, new_email)])
    seen = sorted(db.execute(
        sql.SQL("SELECT order_id, product_sku, customer_email FROM {} WHERE customer_id = %s")
        .format(sql.Identifier(VIEW)), [customer_id]).fetchall())
    if seen != expected:
        kind = db.execute("SELECT relkind::text FROM pg_class WHERE oid = %s::regclass",
                          [VIEW]).fetchone()
        stale = sum(1 for r in seen if r[2] != new_email)
        new_line = any(r[0] == 9101 for r in seen)
        pytest.fail(
            f"after customer {customer_id}'s email was changed to {new_email} in "
            f"{found['customer'].name} and order 9101 was added with one line, {VIEW} shows "
            f"{len(seen)} rows for the customer, {stale} with an old email, the new line "
            f"{'present' if new_line else 'missing'}; expected {len(expected)} rows, all "
            f"with the new email (relkind of {VIEW}: {kind[0] if kind else '?'}, 'v' is a "
            f"plain view, 'm' a materialized one). {VIEW} must read the normalized tables "
            f"when it is queried (CREATE VIEW over them, no materialized view on the way): "
            f"a snapshot is the denormalized copy again, stale after the first update - the "
            f"update anomaly normalization removes.", pytrace=False)


def tidied_values(missing: list[Row], extra: list[Row]) -> list[str]:
    """Text values of an original row that came back with only their spaces or case
    changed (rows paired by order_id and product_sku), each as "column 'was' as 'now'"."""
    rebuilt = {(r[0], r[6]): r for r in extra}
    changed: list[str] = []
    for row in missing:
        back = rebuilt.get((row[0], row[6]))
        for name, was, now in zip(ATTRIBUTES, row, back or (), strict=False):
            if (isinstance(was, str) and isinstance(now, str) and was != now
                    and " ".join(was.split()).casefold() == " ".join(now.split()).casefold()):
                seen = f"{name} {was!r} came back as {now!r}"
                if seen not in changed:
                    changed.append(seen)
    return changed


def show(row: Row) -> str:
    return ", ".join(f"{name}={value}" for name, value in zip(ATTRIBUTES, row, strict=True))


# --------------------------------------------------------------------------------------
# 4. Every reference can be followed back without reading the whole referencing table


# What each original type holds, and which types a fact's new home may have: the same
# values, or more. (data_type, precision, scale, length) -> a reason it holds less, or None.
WIDER_INTEGERS = {"integer", "bigint"}


def holds_less(original: str, data_type: str, precision: int | None, scale: int | None,
               length: int | None) -> str | None:
    if original == "integer":
        if data_type in WIDER_INTEGERS or (data_type == "numeric" and precision is None):
            return None
        if data_type == "numeric" and precision is not None and precision - (scale or 0) >= 10:
            return None
        return "an integer the original holds (up to 2147483647) would not fit"
    if original == "date":
        return None if data_type == "date" else "the fact is a calendar date, not a " + \
            f"{data_type}: the rebuilt rows would not be the original ones"
    if original == "text":
        if data_type == "text" or (data_type in ("character varying", "citext")
                                   and length is None):
            return None
        if length is not None:
            return (f"a value longer than {length} characters, which the original (text, no "
                    "limit) holds, would be refused or cut")
        return f"{data_type} is not text"
    # numeric(10,2): up to 99999999.99, exact cents
    if data_type != "numeric":
        return (f"{data_type} is not an exact decimal: a price such as 0.10 is stored as a "
                "binary fraction (or in a locale's format) and sums drift")
    if precision is None:
        return None
    if (scale or 0) < 2:
        return f"a scale of {scale or 0} rounds away the cents"
    if precision - (scale or 0) < 8:
        return (f"it holds at most {precision - (scale or 0)} digits before the point: a "
                f"price of {10 ** (precision - (scale or 0)):.2f}, which the original holds "
                "(up to 99999999.99), would be refused")
    return None


def test_every_fact_keeps_its_type(db: Conn, learner: Any) -> None:
    """Normalizing moves a fact, it never changes its domain: a narrower type (numeric(6,2)
    for a price, varchar(50) for a name, smallint for a quantity) refuses values the
    original table holds, so the next order with such a value cannot be stored."""
    apply_schema(db, learner)
    original = dict(ORIGINAL_COLUMNS)
    problems = []
    for table, column, data_type, precision, scale, length in db.execute(
        """SELECT c.table_name, c.column_name,
                  CASE WHEN c.data_type = 'USER-DEFINED' THEN c.udt_name ELSE c.data_type END,
                  CASE WHEN c.data_type = 'numeric' THEN c.numeric_precision END,
                  CASE WHEN c.data_type = 'numeric' THEN c.numeric_scale END,
                  c.character_maximum_length
           FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
           WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'
             AND c.table_name <> 'orders_denormalized'
           ORDER BY c.table_name, c.ordinal_position"""
    ):
        kind = original.get(column)
        if kind is None:
            continue
        why = holds_less(kind.split("(")[0], data_type, precision, scale, length)
        if why is not None:
            shown = data_type + (f"({precision},{scale})" if precision is not None else "") + (
                f"({length})" if length is not None else "")
            problems.append(f"{table}.{column} is {shown}, the original is {kind}: {why}")
    assert not problems, (
        "\n".join(problems) + "\n  Normalizing moves each fact to its home without "
        "changing its domain: keep each column's original type (or a wider one), or valid "
        "rows are refused - a constraint stricter than the business's rules is as wrong as "
        "a missing one.")


# Index methods that do not find the rows of one key (what a foreign key check and a 'rows
# of this parent' query ask): BRIN keeps a min/max per range of blocks, and with keys in no
# order every range spans the key looked for.
NO_KEY_LOOKUP = {"brin"}


def test_every_foreign_key_column_leads_an_index(db: Conn, learner: Any) -> None:
    apply_schema(db, learner)
    tables = read_catalog(db)
    indexed: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for name, cols, method in db.execute(
        """SELECT rel.relname::text,
                  ARRAY(SELECT a.attname::text
                        FROM unnest(ix.indkey::int2[]) WITH ORDINALITY k(n, i)
                        JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.n
                        WHERE k.i <= ix.indnkeyatts ORDER BY k.i),
                  am.amname::text
           FROM pg_index ix JOIN pg_class rel ON rel.oid = ix.indrelid
           JOIN pg_class irel ON irel.oid = ix.indexrelid JOIN pg_am am ON am.oid = irel.relam
           WHERE rel.relnamespace = 'public'::regnamespace AND ix.indpred IS NULL
             AND ix.indisvalid"""
    ):
        indexed.setdefault(name, []).append((tuple(cols), method))
    problems: list[str] = []
    for table in tables.values():
        for cols, ref_table, _ in table.foreign_keys:
            leading = [(ix, method) for ix, method in indexed.get(table.name, [])
                       if set(ix[:len(cols)]) == set(cols)]
            if leading and all(m in NO_KEY_LOOKUP for _, m in leading):
                problems.append(
                    f"{table.name}{fmt(cols)} references {ref_table}, and the only index of "
                    f"{table.name} that starts with {fmt(cols)} is a BRIN index: it does not "
                    "find the rows of one key - BRIN keeps a min/max per range of blocks, "
                    "and with keys in no order every range spans the key looked for, so the "
                    "foreign key check still reads the whole table. Index the column with a "
                    "btree (CREATE INDEX ON <table> (<column>), the default)")
            elif not leading:
                have = ", ".join(fmt(ix) for ix, _ in indexed.get(table.name, [])) or "none"
                problems.append(
                    f"{table.name}{fmt(cols)} references {ref_table} but no index of "
                    f"{table.name} starts with {fmt(cols)} (its indexes: {have})")
    assert not problems, (
        "\n".join(problems) + "\n  Postgres indexes the referenced key, never the referencing "
        "column: without an index that starts with it, every delete or key update in the "
        "parent table (the foreign key check) and every 'rows of this parent' query reads the "
        "whole child table. A composite primary key only serves its leading column: "
        "CREATE INDEX ON <table> (<column>) for each other foreign key column.")
