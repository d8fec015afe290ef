"""ph2.7 verification: one catalog in three models, same answers, the right structures.

What is measured, and where:
* the schemas are read from Postgres' catalog (information_schema, pg_index, pg_am);
* "the JSONB query uses the GIN index" is read from the server's own counters
  (pg_stat_user_tables.seq_scan, pg_stat_user_indexes.idx_scan) around each learner query:
  they count the scans the learner's session really did, whatever SQL it sent. A backend
  flushes its counters when it exits, so the test ends the learner's sessions before reading;
* what the Redis model does for a query is read with MONITOR on a separate connection,
  keeping only the commands sent to this test's own logical database.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import methodcaller
from types import ModuleType
from typing import Any

import pytest

from labrunner.testing import redis_commands

Product = dict[str, Any]

CATEGORIES = ["books", "shirts", "mugs", "lamps", "chairs", "bags", "pens", "plants"]
RARE_CATEGORY = "globes"
ADJECTIVES = ["eco", "gift", "sale", "new", "handmade", "vintage", "premium", "compact",
              "travel", "kids"]
NOUNS = ["home", "office", "garden", "kitchen", "desk", "outdoor", "winter", "summer",
         "school", "party", "sport", "bath", "car", "pet", "art"]
TAGS = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]  # 150 tags: each one is selective
COLORS = ["red", "blue", "green", "black", "white", "grey"]
# Tags are the seller's free text: a model that joins or splits them on a separator, or
# builds a key from them without care, returns other tags than it was given.
# A double quote, a backslash and an apostrophe too: a JSON fragment or an SQL literal
# built by pasting the tag into text breaks on them (or says something else).
AWKWARD_TAGS = ["gift, wrapped", "size:xl", "red|blue", "après ski", 'say "cheese"',
                "back\\slash", "kids' room"]
QUOTED_FINISH = 'matte "soft-touch" \\ it\'s'  # an attribute value with the same characters
MODELS = ("RelationalCatalog", "DocumentCatalog", "RedisCatalog")


def make_products(count: int, seed: int = 7) -> list[Product]:
    """A deterministic catalog with the awkward cases: no tags, a quote and non-ASCII in a
    name, attributes that only some categories have."""
    rnd = random.Random(seed)
    products: list[Product] = []
    for pid in range(1, count + 1):
        category = CATEGORIES[pid % len(CATEGORIES)]
        if pid % 100 == 50:  # a rare category (1%): a lookup an index can serve
            category = RARE_CATEGORY
        tags = [] if pid % 97 == 0 else sorted(rnd.sample(TAGS, rnd.randint(1, 4)))
        if pid % 89 == 0:  # a seller's own tags: a comma, a colon, a pipe, a space, an
            tags = sorted(tags + AWKWARD_TAGS)  # accent, quotes, a backslash
        attributes = {"color": rnd.choice(COLORS), "brand": f"brand-{rnd.randint(0, 99):02d}"}
        if category == "books":
            attributes["author"] = rnd.choice(["Le Guin", "Borges", "Calvino", "Lem"])
        if category == "shirts":
            attributes["size"] = rnd.choice(["S", "M", "L", "XL"])
        # Attribute names are the seller's: some are also names of the product's own
        # fields (a plant's botanical name, a bag's sub-category).
        if category == "plants":
            attributes["name"] = ["Ficus lyrata", "Monstera deliciosa", "Pilea"][pid % 3]
        if category == "bags":
            attributes["category"] = ["tote", "backpack"][pid % 2]
        if pid % 89 == 0:
            attributes["finish"] = QUOTED_FINISH
        name = f"{category[:-1].title()} no. {pid}"
        if pid == 42:
            name = 'Crème brûlée "deluxe" mug'
        products.append({"id": pid, "name": name, "category": category,
                         "price_cents": rnd.randint(99, 99_999), "tags": tags,
                         "attributes": attributes})
    return products


def ids_where(products: list[Product], keep: Callable[[Product], bool]) -> list[int]:
    return [p["id"] for p in products if keep(p)]


def tag_counts(products: list[Product]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in products:
        for tag in p["tags"]:
            counts[tag] = counts.get(tag, 0) + 1
    return counts


# --------------------------------------------------------------------------------------
# The learner's classes


def catalog_class(module: ModuleType, name: str) -> type:
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        pytest.fail(f"catalog.py: define a class {name} (see the README for its methods)",
                    pytrace=False)
    return cls


def open_model(module: ModuleType, name: str, postgres: Any, redis_db: Any) -> Any:
    cls = catalog_class(module, name)
    return cls(redis_db.url) if name == "RedisCatalog" else cls(postgres.dsn)


def load_model(module: ModuleType, name: str, postgres: Any, redis_db: Any,
               products: list[Product]) -> Any:
    """The products go in out of id order, each with its tags in reverse: ids in ascending
    order and sorted tags must come from the queries (ORDER BY, sorted()), not from the order
    the rows happen to be stored in."""
    store = open_model(module, name, postgres, redis_db)
    store.create_schema()
    shuffled = sorted(products, key=lambda p: (p["id"] * 7919) % 10007)
    store.add_products([dict(p, tags=list(reversed(p["tags"])),
                             attributes=dict(p["attributes"])) for p in shuffled])
    return store


# --------------------------------------------------------------------------------------
# Postgres: catalog and scan counters


def user_tables(conn: Any) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {name for (name,) in rows}


def columns_of(conn: Any, tables: set[str]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = ANY(%s) ORDER BY 1, 2",
        (sorted(tables),)).fetchall()
    return rows


def gin_indexes(conn: Any, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "WHERE i.indrelid = %s::regclass AND am.amname = 'gin'", (table,))
    return [name for (name,) in rows]


def end_learner_sessions(conn: Any) -> None:
    """End every other session on this database and wait until they are gone: a backend
    writes its scan counters to the shared statistics as it exits."""
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (left,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
        if left == 0:
            return
        time.sleep(0.02)
    pytest.fail("the learner's database sessions did not end within 10 s", pytrace=False)


def scan_counts(conn: Any, table: str) -> tuple[int, dict[str, int]]:
    """(sequential scans of the table, index scans per index) as the server counted them.
    This session's own scans (the test's count(*)) are flushed first: a backend sends its
    counters at most once a second, so they would otherwise land in a later reading."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    (seq,) = conn.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relid = %s::regclass",
                          (table,)).fetchone()
    per_index = dict(conn.execute(
        "SELECT indexrelid::regclass::text, idx_scan FROM pg_stat_user_indexes "
        "WHERE relid = %s::regclass", (table,)).fetchall())
    return seq, per_index


# --------------------------------------------------------------------------------------
# The checks


def test_relational_model_is_normalised(learner: Any, postgres: Any) -> None:
    module = learner.load("catalog")
    with postgres.connect(autocommit=True) as conn:
        before = user_tables(conn)
        store = catalog_class(module, "RelationalCatalog")(postgres.dsn)
        store.create_schema()
        store.close()
        tables = user_tables(conn) - before
        assert len(tables) >= 2, (
            f"RelationalCatalog.create_schema() created {sorted(tables) or 'no tables'}: "
            "a product has many tags, so in a relational model the tags get a table of "
            "their own (product_id, tag) next to the products table")
        nested = [f"{t}.{c} ({d})" for t, c, d in columns_of(conn, tables)
                  if d in ("json", "jsonb", "ARRAY", "USER-DEFINED")]
        assert not nested, (
            f"the relational model stores nested data in {', '.join(nested)}: normalise "
            "tags and attributes into rows of their own tables; JSONB is the document model")
        (foreign_keys,) = conn.execute(
            "SELECT count(*) FROM information_schema.table_constraints "
            "WHERE table_schema = 'public' AND constraint_type = 'FOREIGN KEY' "
            "AND table_name = ANY(%s)", (sorted(tables),)).fetchone()
        assert foreign_keys >= 1, (
            f"no FOREIGN KEY among {sorted(tables)}: the tag and attribute rows must "
            "reference their product, so that no tag can point at a missing product")


def test_document_model_has_a_gin_index(learner: Any, postgres: Any) -> None:
    module = learner.load("catalog")
    with postgres.connect(autocommit=True) as conn:
        before = user_tables(conn)
        store = catalog_class(module, "DocumentCatalog")(postgres.dsn)
        store.create_schema()
        store.close()
        tables = user_tables(conn) - before
        jsonb_tables = sorted({t for t, _, d in columns_of(conn, tables) if d == "jsonb"})
        assert jsonb_tables, (
            f"DocumentCatalog.create_schema() created {sorted(tables) or 'no tables'} with no "
            "jsonb column: the document model keeps each product as one JSONB document")
        with_gin = {t: gin_indexes(conn, t) for t in jsonb_tables}
        assert any(with_gin.values()), (
            f"{', '.join(jsonb_tables)} has no GIN index: a B-tree cannot answer 'documents "
            "containing tag X'; CREATE INDEX ... USING gin (doc jsonb_path_ops) can")


def test_same_answers_in_all_three_models(learner: Any, postgres: Any, redis_db: Any) -> None:
    module = learner.load("catalog")
    products = make_products(600)
    by_id = {p["id"]: p for p in products}
    counts = tag_counts(products)
    common_tag = max(counts, key=lambda t: (counts[t], t))
    rare_tag = min(counts, key=lambda t: (counts[t], t))
    untagged = next(p["id"] for p in products if not p["tags"])

    cases: list[tuple[str, Callable[[Any], Any], Any]] = [
        ("get(1)", methodcaller("get", 1), by_id[1]),
        ("get(42)", methodcaller("get", 42), by_id[42]),
        (f"get({untagged})", methodcaller("get", untagged), by_id[untagged]),
        ("get(7) (a plant with a 'name' attribute)", methodcaller("get", 7), by_id[7]),
        ("get(5) (a bag with a 'category' attribute)", methodcaller("get", 5), by_id[5]),
        ("get(999999)", methodcaller("get", 999_999), None),
        (f"get(89) (tags {AWKWARD_TAGS})", methodcaller("get", 89), by_id[89]),
    ]
    for category in ("books", "plants", RARE_CATEGORY, "spaceships"):
        cases.append((f"ids_in_category({category!r})",
                      methodcaller("ids_in_category", category),
                      [p["id"] for p in products if p["category"] == category]))
    for tag in (common_tag, rare_tag, "no-such-tag", *AWKWARD_TAGS, "gift"):
        cases.append((f"ids_with_tag({tag!r})", methodcaller("ids_with_tag", tag),
                      [p["id"] for p in products if tag in p["tags"]]))
    for name, value in (("color", "red"), ("brand", "brand-07"), ("size", "XL"),
                        ("author", "Borges"), ("author", "Nobody"), ("category", "tote"),
                        ("name", "Pilea"), ("finish", QUOTED_FINISH)):
        cases.append((f"ids_with_attribute({name!r}, {value!r})",
                      methodcaller("ids_with_attribute", name, value),
                      [p["id"] for p in products if p["attributes"].get(name) == value]))

    problems: list[str] = []
    for model in MODELS:
        store = load_model(module, model, postgres, redis_db, products)
        try:
            for label, call, want in cases:
                try:
                    got = call(store)
                except Exception as exc:  # noqa: BLE001 - the learner's error, named below
                    problems.append(
                        f"{model}.{label} raised {type(exc).__name__}: {str(exc)[:200]} - a "
                        "value is data, never text pasted into a query: pass it as a "
                        "parameter (Jsonb({'tags': [tag]}), %s), so quotes, backslashes and "
                        "apostrophes in it mean nothing")
                    continue
                if isinstance(got, tuple):
                    got = list(got)
                if got != want:
                    problems.append(describe_difference(model, label, got, want))
                elif mistyped := numbers_mistyped(got, want):
                    problems.append(f"{model}.{label}: {mistyped}")
        finally:
            store.close()
    assert not problems, (
        f"{problems[0]}\n" + "\n".join(problems[1:6])
        + ("\nthe three models must give the same answer to the same access pattern"))


def numbers_mistyped(got: Any, want: Any) -> str | None:
    """A product whose numbers equal the expected ones under == but are not ints: 1299.0 and
    Decimal('1299') compare equal to 1299, and are still not the shape get() returns."""
    if not isinstance(want, dict) or not isinstance(got, dict):
        return None
    for field in ("id", "price_cents"):
        value = got.get(field)
        if type(value) is not int:
            return (f"{field}={value!r}, a {type(value).__name__}, expected the int "
                    f"{want[field]!r}: equal under ==, but not the same value to a caller - "
                    "JSON writes a float with its '.0' and cannot write a Decimal at all, and "
                    "money kept in floats drifts; store and return whole cents as an integer "
                    "(an integer column, int() of what Redis hands back)")
    return None


def stored_wrongly(store: Any, batch: list[Product]) -> list[str]:
    """What get() shows of `batch` that is not what was added."""
    wrong = []
    for p in batch:
        got = store.get(p["id"])
        if got is None:
            wrong.append(f"product {p['id']} not stored")
        elif got != p:
            parts = [k for k in p if got.get(k) != p[k]]
            wrong.append(f"product {p['id']} stored with "
                         + ", ".join(f"{k}={got.get(k)!r} (expected {p[k]!r})"
                                     for k in parts[:2]))
    return wrong


@pytest.mark.parametrize("model", MODELS)
def test_add_products_takes_any_batch(learner: Any, postgres: Any, redis_db: Any,
                                      model: str) -> None:
    """add_products takes an Iterable: an empty one, one whose products have no tag, and a
    generator (walked once: a second pass over it finds nothing)."""
    module = learner.load("catalog")
    products = make_products(12, seed=5)
    untagged = [dict(p, tags=[]) for p in products[:3]]
    rest = products[3:]
    steps: list[tuple[str, Callable[[], Any], list[Product], str]] = [
        ("[] (an empty batch)", lambda: [], [],
         "an empty batch adds nothing and raises nothing; a multi-row INSERT ... VALUES "
         "with no rows is not SQL"),
        ("a list of 3 products, none with a tag", lambda: list(untagged), untagged,
         "a batch without a single tag (or attribute) row is still a batch: an INSERT built "
         "for its rows must not be sent with none (executemany of [] sends nothing)"),
        ("a generator of 9 products", lambda: (dict(p) for p in rest), rest,
         "products is an Iterable, and a generator is spent after one pass: walk it once "
         "(items = list(products)) - a second loop over it for the tags or the attributes "
         "finds nothing"),
    ]
    store = open_model(module, model, postgres, redis_db)
    try:
        store.create_schema()
        for label, make, batch, why in steps:
            try:
                store.add_products(make())
            except Exception as exc:  # noqa: BLE001 - the learner's error, named below
                pytest.fail(f"{model}.add_products({label}) raised {type(exc).__name__}: "
                            f"{str(exc)[:200]} - {why}", pytrace=False)
            wrong = stored_wrongly(store, batch)
            assert not wrong, (
                f"{model}.add_products({label}) returned, yet afterwards get() shows "
                f"{'; '.join(wrong[:3])} ({len(wrong)} of {len(batch)} products wrong): {why}")
    finally:
        store.close()


@dataclass(frozen=True)
class LookAlikes:
    """Two different (attribute name, value) pairs that read as one text when a model joins
    the parts with a separator, or makes them 'safe' by a lossy rewrite."""

    first: tuple[str, str]
    second: tuple[str, str]
    alike_when: str


LOOK_ALIKE_ATTRIBUTES = [
    LookAlikes(("a", "b:c"), ("a:b", "c"), "joined with ':' (index:attribute:a:b:c)"),
    LookAlikes(("a", "b=c"), ("a=b", "c"), "joined with '=' (a=b=c)"),
    LookAlikes(("a", "b|c"), ("a|b", "c"), "joined with '|' (a|b|c)"),
    LookAlikes(("ratio", "1:2"), ("ratio", "1%3A2"),
               "':' escaped by hand as %3A while '%' itself is left as it is"),
    LookAlikes(("fit:cut", "slim"), ("fit_cut", "slim"), "':' replaced by '_'"),
    # A length says where a part ends only when what comes before it is unambiguous: put
    # after the raw name, the value's (or the name's own) length can be part of a name.
    LookAlikes(("a", "1:b"), ("a:3", "b"),
               "the value's length stands between the raw name and the value (a:3:1:b)"),
    LookAlikes(("a", "3:b"), ("a:1", "b"),
               "the name's length stands after the raw name (a:1:3:b)"),
]
LOOK_ALIKE_FIRST_ID = 9001


@pytest.mark.parametrize("model", MODELS)
def test_look_alike_attributes_are_told_apart(learner: Any, postgres: Any, redis_db: Any,
                                              model: str) -> None:
    """Each pair of products differs only in where its attribute's name ends and its value
    begins (or in a ':' against what a lossy rewrite makes of it): each lookup must find
    its own product alone. A key joined from raw parts gives both pairs one key."""
    products: list[Product] = []
    for n, case in enumerate(LOOK_ALIKE_ATTRIBUTES):
        for k, (name, value) in enumerate((case.first, case.second)):
            pid = LOOK_ALIKE_FIRST_ID + 2 * n + k
            products.append({"id": pid, "name": f"Look-alike no. {pid}", "category": "misc",
                             "price_cents": 100, "tags": [], "attributes": {name: value}})
    module = learner.load("catalog")
    store = load_model(module, model, postgres, redis_db, products)
    problems: list[str] = []
    try:
        for n, case in enumerate(LOOK_ALIKE_ATTRIBUTES):
            pairs = (case.first, case.second)
            for k, (name, value) in enumerate(pairs):
                pid = LOOK_ALIKE_FIRST_ID + 2 * n + k
                other_name, other_value = pairs[1 - k]
                label = f"ids_with_attribute({name!r}, {value!r})"
                try:
                    got = list(store.ids_with_attribute(name, value))
                except Exception as exc:  # noqa: BLE001 - the learner's error, named below
                    problems.append(f"{model}.{label} raised {type(exc).__name__}: "
                                    f"{str(exc)[:200]}")
                    continue
                if got != [pid]:
                    mixed = (f": product {LOOK_ALIKE_FIRST_ID + 2 * n + 1 - k} has "
                             f"{other_name!r} = {other_value!r}, another pair, which reads "
                             f"the same when {case.alike_when}"
                             if LOOK_ALIKE_FIRST_ID + 2 * n + 1 - k in got else "")
                    problems.append(f"{model}.{label} returned {got}, expected [{pid}]{mixed}")
                stored = store.get(pid)
                want = {name: value}
                if stored is None or stored.get("attributes") != want:
                    problems.append(
                        f"{model}.get({pid}) returned attributes "
                        f"{None if stored is None else stored.get('attributes')!r}, expected "
                        f"{want!r}")
    finally:
        store.close()
    assert not problems, (
        f"{problems[0]}\n" + "\n".join(problems[1:5])
        + "\nA name and a value are the seller's text: they may hold ':' (or '=', '|', '%') "
        "themselves. A key built by joining them raw gives two different pairs one key, and "
        "a lossy rewrite (':' -> '_') merges pairs too: escape each part of the key "
        "(urllib.parse.quote(part, safe=''): ':' -> %3A, '%' -> %25) or length-prefix it, "
        "so that the key says where each part ends (a length read after a raw part can be "
        "part of that part: <len(name)>:<name>:<value>, never <name>:<len>:<value>).")


# Values alike but for their letters' case: the sellers' text, told apart by every model.
CASE_PAIRS: list[Product] = [
    {"id": 9101, "name": "Atlas", "category": "Books", "price_cents": 100,
     "tags": ["Eco-Home"], "attributes": {"color": "Red"}},
    {"id": 9102, "name": "atlas", "category": "books", "price_cents": 100,
     "tags": ["eco-home"], "attributes": {"color": "red"}},
]


@pytest.mark.parametrize("model", MODELS)
def test_lookups_tell_letter_case_apart(learner: Any, postgres: Any, redis_db: Any,
                                        model: str) -> None:
    """A category, tag or attribute value is compared exactly, as '=' in SQL and '@>' in
    JSONB compare it: 'Books' and 'books' are two categories in all three models."""
    store = load_model(learner.load("catalog"), model, postgres, redis_db, CASE_PAIRS)
    problems: list[str] = []
    try:
        for product, other in (CASE_PAIRS, CASE_PAIRS[::-1]):
            for label, call in (
                    (f"ids_in_category({product['category']!r})",
                     methodcaller("ids_in_category", product["category"])),
                    (f"ids_with_tag({product['tags'][0]!r})",
                     methodcaller("ids_with_tag", product["tags"][0])),
                    (f"ids_with_attribute('color', {product['attributes']['color']!r})",
                     methodcaller("ids_with_attribute", "color",
                                  product["attributes"]["color"]))):
                got = list(call(store))
                if got != [product["id"]]:
                    problems.append(
                        f"{model}.{label} returned {got}, expected [{product['id']}]"
                        + (f": product {other['id']} has {other['category']!r} / "
                           f"{other['tags'][0]!r} / {other['attributes']['color']!r}, alike "
                           "only when lower-cased" if other["id"] in got else ""))
            got_product = store.get(product["id"])
            if got_product != product:
                problems.append(f"{model}.get({product['id']}) returned {got_product!r}, "
                                f"expected {product!r}")
    finally:
        store.close()
    assert not problems, (
        f"{problems[0]} - a category, tag or attribute value is the seller's text, compared "
        "exactly ('=' in SQL, '@>' in JSONB): a key or a comparison that folds case (lower(), "
        "casefold(), ILIKE) merges two values the other models keep apart\n"
        + "\n".join(problems[1:4]))


def describe_difference(model: str, label: str, got: Any, want: Any) -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        diff = [k for k in want if got.get(k) != want[k]]
        if diff == ["tags"] and sorted(got.get("tags") or []) == want["tags"]:
            return (f"{model}.{label} returned tags {got['tags']}, expected them sorted: "
                    f"{want['tags']} - the products were added with their tags in another "
                    f"order; sort them when reading (ORDER BY tag, sorted())")
        if diff:
            shown = "; ".join(f"{k}={got.get(k)!r} (expected {want[k]!r})" for k in diff[:3])
            clash = sorted(set(want.get("attributes", {})) & (set(want) - {"attributes"}))
            if clash:
                shown += (f" - this product has an attribute named {', '.join(map(repr, clash))}"
                          ", like one of the product's own fields: an attribute must never "
                          "overwrite (or be read back as) a field; keep attributes apart "
                          "(a prefix such as attribute:<name>, or a key of their own)")
            return f"{model}.{label}: {shown}"
    if isinstance(want, list) and isinstance(got, list):
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        order = "" if set(got) != set(want) else (
            " (same ids, not in ascending order: the products were added out of id order - "
            "ORDER BY the id, or sort the ids as numbers, not as strings)")
        return (f"{model}.{label} returned {len(got)} ids, expected {len(want)}{order}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else ""))
    return f"{model}.{label} returned {got!r}, expected {want!r}"


def test_document_queries_use_the_gin_index(learner: Any, postgres: Any) -> None:
    """On 4000 documents, with fresh statistics, a selective containment query is cheaper
    through the GIN index: the planner picks it when the query is written so it can."""
    module = learner.load("catalog")
    products = make_products(4000, seed=11)
    counts = tag_counts(products)
    tag = min(counts, key=lambda t: (abs(counts[t] - 40), t))  # ~1% of the documents
    # (lookup, call, expected ids, whether only the GIN index may serve it): the category
    # may also have an index of its own on the expression the query filters by.
    queries: list[tuple[str, Callable[[Any], Any], list[int], bool]] = [
        (f"ids_with_tag({tag!r})", lambda s: s.ids_with_tag(tag),
         ids_where(products, lambda p: tag in p["tags"]), True),
        ("ids_with_attribute('brand', 'brand-07')",
         lambda s: s.ids_with_attribute("brand", "brand-07"),
         ids_where(products, lambda p: p["attributes"]["brand"] == "brand-07"), True),
        (f"ids_in_category({RARE_CATEGORY!r})", lambda s: s.ids_in_category(RARE_CATEGORY),
         ids_where(products, lambda p: p["category"] == RARE_CATEGORY), False),
    ]
    with postgres.connect(autocommit=True) as conn:
        before = user_tables(conn)
        load_model(module, "DocumentCatalog", postgres, None, products).close()
        tables = user_tables(conn) - before
        jsonb_tables = sorted({t for t, _, d in columns_of(conn, tables) if d == "jsonb"})
        if not jsonb_tables:
            pytest.fail("DocumentCatalog created no table with a jsonb column", pytrace=False)
        # the documents live in the jsonb table holding the most rows
        table = max(jsonb_tables, key=lambda t: conn.execute(
            f'SELECT count(*) FROM "{t}"').fetchone()[0])
        gins = gin_indexes(conn, table)
        assert gins, (
            f"{table} has no GIN index: DocumentCatalog.create_schema() must create one "
            "(CREATE INDEX ... USING gin (doc jsonb_path_ops))")
        end_learner_sessions(conn)
        # what autovacuum would do after a bulk load: statistics for the planner, and the
        # GIN pending list merged into the index proper
        conn.execute(f'VACUUM ANALYZE "{table}"')
        for label, call, want, gin_only in queries:
            seq_before, idx_before = scan_counts(conn, table)
            store = catalog_class(module, "DocumentCatalog")(postgres.dsn)
            got = call(store)
            store.close()
            end_learner_sessions(conn)
            assert list(got) == want, (
                f"DocumentCatalog.{label} returned {len(got)} ids, expected {len(want)}")
            seq_after, idx_after = scan_counts(conn, table)
            gin_used = sum(idx_after.get(i, 0) - idx_before.get(i, 0) for i in gins)
            seq_used = seq_after - seq_before
            if not gin_only:
                used = sum(n - idx_before.get(i, 0) for i, n in idx_after.items())
                assert seq_used == 0 and used > 0, (
                    f"DocumentCatalog.{label} read {table} with {seq_used} sequential "
                    f"scan(s) and {used} index scan(s), for the ~1% of the documents in that "
                    "category: the filter is not one an index serves. doc->>'category' = v "
                    "(or doc->'category' = ...) is an expression the GIN index cannot use; "
                    "write it as containment, doc @> '{\"category\": \"x\"}', which the "
                    "GIN index serves (or give that expression an index of its own)")
                continue
            assert seq_used == 0 and gin_used > 0, (
                f"DocumentCatalog.{label} read {table} with {seq_used} sequential scan(s) "
                f"and {gin_used} scan(s) of its GIN index {', '.join(gins)}: expected the "
                "GIN index only. Write the filter as containment, "
                "doc @> '{\"tags\": [\"x\"]}', which GIN serves; doc->>'k' = v, or ? with "
                "a jsonb_path_ops index, cannot use it")


REFUSED_TAG = "refused-by-the-test"
REFUSE_ROWS = """
    CREATE OR REPLACE FUNCTION refuse_marked_rows() RETURNS trigger AS $$
    BEGIN
        IF to_jsonb(NEW)::text LIKE '%%' || %(marker)s || '%%' THEN
            RAISE EXCEPTION 'the test refuses a row holding the tag %%', %(marker)s;
        END IF;
        RETURN NEW;
    END $$ LANGUAGE plpgsql
"""


def stored_state(store: Any, product: Product) -> str | None:
    """None when nothing of ``product`` is stored, else what get() shows of it."""
    got = store.get(product["id"])
    if got is None:
        return None
    missing = [part for part in ("tags", "attributes") if not got.get(part)]
    return (f"product {product['id']} stored WITHOUT its {' and '.join(missing)}" if missing
            else f"product {product['id']} stored")


@pytest.mark.parametrize("model", ["RelationalCatalog", "DocumentCatalog"])
def test_a_refused_add_stores_nothing_of_its_batch(learner: Any, postgres: Any,
                                                   model: str) -> None:
    """The database refuses one row of a batch (a trigger the test puts on every table the
    model created refuses any row holding the tag REFUSED_TAG, which the batch's last product
    carries). add_products must raise and leave nothing of that call behind: a product, its
    tags and its attributes are one fact over several rows (a batch: several facts), written
    in one transaction - as the Redis model writes them in one MULTI/EXEC. Then the same
    batch without that tag must load on the same object."""
    module = learner.load("catalog")
    batch = make_products(6)
    marked = [*batch[:-1], dict(batch[-1], tags=sorted([*batch[-1]["tags"], REFUSED_TAG]))]
    with postgres.connect(autocommit=True) as conn:
        before = user_tables(conn)
        store = catalog_class(module, model)(postgres.dsn)
        try:
            store.create_schema()
            conn.execute(REFUSE_ROWS % {"marker": f"'{REFUSED_TAG}'"})
            for table in sorted(user_tables(conn) - before):
                conn.execute(f'CREATE TRIGGER refuse_marked BEFORE INSERT OR UPDATE ON "{table}" '
                             "FOR EACH ROW EXECUTE FUNCTION refuse_marked_rows()")
            refused: BaseException | None = None
            try:
                store.add_products(marked)
            except Exception as exc:  # noqa: BLE001 - any error: the database refused a row
                refused = exc
            assert refused is not None, (
                f"{model}.add_products returned normally although the database refused the "
                f"row carrying product {batch[-1]['id']}'s tag {REFUSED_TAG!r}: let the "
                "database's error out")
            left_open = sessions_in_a_transaction(conn)
            assert not left_open, (
                f"{model}.add_products raised ({type(refused).__name__}: the database refused "
                f"product {batch[-1]['id']}'s tag row) and left its session {left_open[0]} "
                "(pg_stat_activity): the failed transaction was never rolled back, so every "
                "later statement on that connection is refused (or holds its locks) - end it "
                "with ROLLBACK on the error path (with conn.transaction(): ... does)")
            left = [state for p in batch if (state := stored_state(store, p)) is not None]
            assert not left, (
                f"{model}.add_products raised ({type(refused).__name__}: the database refused "
                f"product {batch[-1]['id']}'s tag row), yet afterwards get() shows "
                f"{'; '.join(left)}: the rows written before the refusal were committed one "
                f"statement at a time. Write a call's products, tags and attributes in ONE "
                f"transaction (with conn.transaction(): ...) so a refused row rolls back all "
                f"of it - expected nothing of the failed batch to be stored")
            try:
                store.add_products(batch)
            except Exception as exc:  # noqa: BLE001 - named below
                pytest.fail(
                    f"{model}.add_products of the same batch without the refused tag raised "
                    f"{type(exc).__name__}: {exc} - after a failed call the object must be "
                    "usable again (the failed transaction rolled back, not left open)",
                    pytrace=False)
            got = [store.get(p["id"]) for p in batch]
            assert got == batch, (
                f"{model}: after the batch was added again without the refused tag, get() "
                f"returned {got!r}, expected {batch!r}")
        finally:
            store.close()


EARLIER_ID_OFFSET = 500


def lost_from_redis(store: Any, products: list[Product]) -> list[str]:
    """What get() and the lookups no longer show of products stored before."""
    lost = stored_wrongly(store, products)
    for p in products:
        lookups: list[tuple[str, Callable[..., Any], tuple[str, ...]]] = [
            (f"ids_in_category({p['category']!r})", store.ids_in_category, (p["category"],))]
        lookups += [(f"ids_with_tag({t!r})", store.ids_with_tag, (t,)) for t in p["tags"]]
        lookups += [(f"ids_with_attribute({k!r}, {v!r})", store.ids_with_attribute, (k, v))
                    for k, v in p["attributes"].items()]
        lost += [f"{label} lacks product {p['id']}" for label, lookup, args in lookups
                 if p["id"] not in lookup(*args)]
    return lost


def test_a_refused_redis_write_is_reported(learner: Any, redis_db: Any) -> None:
    """Redis refuses one write of a batch: the test makes index:tag:<REFUSED_TAG> a string,
    so the SADD of the batch's last product into it fails inside EXEC with WRONGTYPE.
    Redis has no rollback - the other commands of the MULTI/EXEC are applied (redis.io,
    "Errors inside a transaction") - so add_products cannot store nothing; it must raise,
    never return as if the batch were stored, and what it does on that error must leave
    alone what an earlier call stored (an index set is shared by every product in it) and
    the key another writer left. Then, the database emptied, the same batch loads on the
    same object."""
    module = learner.load("catalog")
    batch = make_products(6, seed=5)
    marked = [*batch[:-1], dict(batch[-1], tags=sorted([*batch[-1]["tags"], REFUSED_TAG]))]
    # Stored by an earlier call: the same categories, tags and attribute values as the
    # refused batch, so they share its index sets.
    earlier = [dict(p, id=p["id"] + EARLIER_ID_OFFSET)
               for p in make_products(12, seed=9)]
    taken = f"index:tag:{REFUSED_TAG}"
    client = redis_db.client(decode_responses=True)
    store = catalog_class(module, "RedisCatalog")(redis_db.url)
    try:
        store.add_products(earlier)
        client.set(taken, "a string another writer left at a key of the catalog's")
        refused: BaseException | None = None
        try:
            store.add_products(marked)
        except Exception as exc:  # noqa: BLE001 - any error: the failure was reported
            refused = exc
        assert refused is not None, (
            f"RedisCatalog.add_products returned normally although Redis refused the SADD of "
            f"product {batch[-1]['id']} into {taken} (WRONGTYPE: the test made that key a "
            "string); expected the call to raise\nInside EXEC a failing command gets an "
            "error reply and Redis applies the others - it has no rollback - so the batch is "
            "stored in part: report it (redis-py's pipeline.execute() raises the first error "
            "reply; never raise_on_error=False or an except that swallows it)")
        lost = lost_from_redis(store, earlier)
        assert not lost, (
            f"RedisCatalog.add_products raised ({type(refused).__name__}) for the refused "
            f"batch, and afterwards {'; '.join(lost[:3])} ({len(lost)} problems): products "
            "stored by an EARLIER call, which the refused batch never touched, lost data - "
            "the error path deleted keys those products share with the batch (a category's, "
            "a tag's, an attribute's index set holds every product that has it). Redis has "
            "no rollback; undoing a batch by hand may remove only what that batch added "
            "(SREM its own ids, DEL its own products' keys), or simply report the error")
        kind = client.type(taken)
        assert kind == "string", (
            f"after RedisCatalog.add_products raised, {taken} is "
            f"{'gone' if kind == 'none' else f'a {kind}'} (it was a string "
            "another writer left there): the error path deleted or overwrote a key the "
            "catalog did not write - not the catalog's to undo")
        client.flushdb()  # what Redis applied of the refused batch goes too: no rollback
        store.add_products(batch)
        got = [store.get(p["id"]) for p in batch]
        assert got == batch, (
            f"RedisCatalog: after the batch was added again to an emptied database, get() "
            f"returned {got!r}, expected {batch!r}")
    finally:
        store.close()
        client.close()


@pytest.mark.parametrize("model", ["RelationalCatalog", "DocumentCatalog"])
def test_calls_leave_no_transaction_open(learner: Any, postgres: Any, model: str) -> None:
    """Between calls the catalog's sessions are not inside a transaction: a read on a
    connection with autocommit off begins one that nobody ends (it holds its locks, so an
    ALTER TABLE or a VACUUM waits behind it), and a later add_products() inside it is only a
    savepoint - committed to no one else. What a call wrote is seen by another session as
    soon as it returns."""
    module = learner.load("catalog")
    first, second = make_products(4, seed=11)[:2], make_products(8, seed=11)[4:6]
    store = catalog_class(module, model)(postgres.dsn)
    other = catalog_class(module, model)(postgres.dsn)
    try:
        store.create_schema()
        store.add_products(first)
        calls = [("get", (first[0]["id"],)), ("ids_in_category", (first[0]["category"],)),
                 ("ids_with_tag", ("eco-home",)), ("ids_with_attribute", ("color", "red"))]
        with postgres.connect(autocommit=True) as conn:
            for name, args in calls:
                getattr(store, name)(*args)
                left_open = sessions_in_a_transaction(conn)
                assert not left_open, (
                    f"{model}.{name}({', '.join(map(repr, args))}) returned and left its "
                    f"session {left_open[0]} "
                    "(pg_stat_activity): a statement on a connection with autocommit off "
                    "begins a transaction that lasts until a commit - after a read, nobody "
                    "sends one, so the session holds its locks (DDL and VACUUM wait behind "
                    "it) and a later add_products() joins it instead of committing on its "
                    "own (with conn.transaction() inside it: a savepoint, committed to no "
                    "one); open the connection with autocommit=True (and a transaction "
                    "only around the writes), or end every call's transaction")
        store.add_products(second)
        unseen = [p["id"] for p in second if other.get(p["id"]) != p]
        assert not unseen, (
            f"{model}.add_products returned, yet another session (a second {model}) does "
            f"not see products {unseen}: the call's writes were not committed when it "
            "returned - a transaction begun earlier on the same connection (by a read) was "
            "still open, and the writes only joined it")
    finally:
        store.close()
        other.close()


def sessions_in_a_transaction(conn: Any) -> list[str]:
    """The state of the other sessions on this database that are inside a transaction,
    watched for a moment: a backend reports its state just before it says it is ready."""
    sql = ("SELECT state FROM pg_stat_activity WHERE datname = current_database() "
           "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'")
    deadline = time.monotonic() + 2
    while (states := [state for (state,) in conn.execute(sql)]) and (
            time.monotonic() < deadline):
        time.sleep(0.05)
    return [f"'{state}'" for state in states]


def tables_holding(conn: Any, tables: set[str], value: str) -> list[str]:
    """The tables (of `tables`) with a text column holding `value`: where a lookup of it
    must go."""
    found: list[str] = []
    for table, column, kind in columns_of(conn, tables):
        if kind in ("text", "character varying") and table not in found:
            hit = conn.execute(f'SELECT EXISTS (SELECT 1 FROM "{table}" WHERE "{column}" = %s)',
                               (value,)).fetchone()
            if hit and hit[0]:
                found.append(table)
    return found


def test_relational_lookups_use_an_index(learner: Any, postgres: Any) -> None:
    """On 4000 products, "products with tag X" and "products with attribute a=v" (each ~1%
    of the rows) are index lookups in the relational model too: the primary key of a
    (product_id, tag) table serves "tags of a product" only."""
    module = learner.load("catalog")
    products = make_products(4000, seed=11)
    counts = tag_counts(products)
    tag = min(counts, key=lambda t: (abs(counts[t] - 40), t))
    queries: list[tuple[str, str, Callable[[Any], Any], list[int], str]] = [
        (f"ids_with_tag({tag!r})", tag, lambda s: s.ids_with_tag(tag),
         ids_where(products, lambda p: tag in p["tags"]), "(tag, product_id)"),
        ("ids_with_attribute('brand', 'brand-07')", "brand-07",
         lambda s: s.ids_with_attribute("brand", "brand-07"),
         ids_where(products, lambda p: p["attributes"]["brand"] == "brand-07"),
         "(name, value, product_id)"),
    ]
    with postgres.connect(autocommit=True) as conn:
        before = user_tables(conn)
        load_model(module, "RelationalCatalog", postgres, None, products).close()
        tables = user_tables(conn) - before
        end_learner_sessions(conn)
        for table in sorted(tables):
            conn.execute(f'VACUUM ANALYZE "{table}"')
        for label, value, call, want, columns in queries:
            holders = tables_holding(conn, tables, value)
            counted = {t: scan_counts(conn, t)[0] for t in holders}
            store = catalog_class(module, "RelationalCatalog")(postgres.dsn)
            got = call(store)
            store.close()
            end_learner_sessions(conn)
            assert list(got) == want, (
                f"RelationalCatalog.{label} returned {len(got)} ids, expected {len(want)}")
            scanned = {t: scan_counts(conn, t)[0] - n for t, n in counted.items()}
            full = [f"{t} ({n} sequential scan(s))" for t, n in scanned.items() if n]
            assert not full, (
                f"RelationalCatalog.{label} read the whole of {', '.join(full)} for one "
                f"value that ~1% of its rows hold: no index starts with the looked-up "
                f"column(s). A primary key (product_id, ...) serves 'the rows of a product' "
                f"only; 'the products with this value' needs an index that starts with the "
                f"value, e.g. CREATE INDEX ON <table> {columns}")


WRITES = {"HSET", "HMSET", "HSETNX", "SADD", "SET", "RPUSH", "LPUSH", "ZADD"}


def writes_not_atomic(commands: list[list[str]]) -> str | None:
    """What is wrong with how add_products wrote: every write inside MULTI ... EXEC, and a
    product's hash in the same transaction as the index sets that list its id."""
    block = -1
    in_multi = False
    outside: list[list[str]] = []
    hash_block: dict[str, int] = {}
    index_block: list[tuple[str, str, int]] = []
    for command in commands:
        name = command[0]
        if name == "MULTI":
            in_multi, block = True, block + 1
        elif name in ("EXEC", "DISCARD"):
            in_multi = False
        elif name in WRITES:
            if not in_multi:
                outside.append(command)
                continue
            key = command[1] if len(command) > 1 else ""
            if name.startswith("H") and key.rsplit(":", 1)[-1].isdigit():
                hash_block[key.rsplit(":", 1)[-1]] = block
            elif name == "SADD":
                index_block += [(key, member, block) for member in command[2:]]
    if outside:
        shown = ", ".join(" ".join(c[:2]) for c in outside[:3])
        return (f"RedisCatalog.add_products sent {len(outside)} write(s) outside MULTI ... EXEC "
                f"(first: {shown}): a product's hash and its index sets must appear together, "
                "or a reader finds an id in index:tag:<t> whose product:<id> is not written "
                "yet (and a crash between them leaves the index and the data disagreeing) - "
                "write them in one transaction: pipeline(transaction=True) sends MULTI/EXEC")
    split = [(key, member) for key, member, b in index_block
             if member in hash_block and hash_block[member] != b]
    if split:
        key, member = split[0]
        return (f"RedisCatalog.add_products added product {member} to {key} in another "
                "MULTI ... EXEC than its hash: the product and its index entries must be "
                "written in the same transaction")
    return None


def test_redis_model_uses_hashes_and_index_sets(learner: Any, redis_db: Any) -> None:
    module = learner.load("catalog")
    products = make_products(600)
    with redis_commands(redis_db) as written:
        store = load_model(module, "RedisCatalog", None, redis_db, products)
    counts = tag_counts(products)
    tag = max(counts, key=lambda t: (counts[t], t))
    client = redis_db.client(decode_responses=True)
    try:
        keys = list(client.scan_iter(count=1000))  # the test may scan; the learner may not
        types = {k: client.type(k) for k in keys}
        hashes = [k for k, t in types.items() if t == "hash"]
        named = [k for k in hashes if 'Crème brûlée "deluxe" mug' in client.hvals(k)]
        assert named, (
            f"no Redis hash holds product 42's name (key types found: "
            f"{sorted(set(types.values()))}): store each product as a hash, product:<id>")
        want = {str(pid) for pid in ids_where(products, lambda p: tag in p["tags"])}
        sets = [k for k, t in types.items() if t == "set" and client.scard(k) == len(want)]
        index = [k for k in sets if client.smembers(k) == want]
        assert index, (
            f"no Redis set holds exactly the {len(want)} ids tagged {tag!r}: keep a set per "
            "tag (and per category, per attribute value) as the secondary index, "
            "updated together with the product")

        problem = writes_not_atomic(written)
        assert problem is None, problem

        lookups: list[tuple[str, Callable[[], Any]]] = [
            (f"ids_with_tag({tag!r})", lambda: store.ids_with_tag(tag)),
            ("ids_in_category('books')", lambda: store.ids_in_category("books")),
            ("ids_with_attribute('color', 'red')",
             lambda: store.ids_with_attribute("color", "red")),
        ]
        for label, call in lookups:
            with redis_commands(redis_db) as sent:
                call()
            scans = [c for c in sent if c[0] in ("KEYS", "SCAN")]
            assert not scans and len(sent) <= 5, (
                f"RedisCatalog.{label} sent {len(sent)} commands "
                f"({', '.join(sorted({c[0] for c in sent}))}): a secondary-index lookup is "
                "one SMEMBERS (or SINTER) of the index set, never a walk over the keys")
    finally:
        client.close()
        store.close()
