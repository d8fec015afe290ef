"""One product catalog, three data models: relational, JSONB document, Redis key-value.

All three classes answer the same access patterns with the same results; what differs is
how the data is laid out and which structure serves each query:

* relational: one row per product, tags and attributes normalised into their own tables,
  B-tree indexes on the lookup columns;
* document: one JSONB document per product, one GIN index that serves every containment
  query (``doc @> '{"tags": ["eco"]}'``) whatever the nesting;
* Redis: one hash per product, and a set per category / tag / attribute value holding the
  ids: the secondary indexes are kept by hand, in the same MULTI as the product itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import psycopg
import redis
from psycopg.types.json import Jsonb

Product = dict[str, Any]


def _product(pid: int, name: str, category: str, price_cents: int,
             tags: Iterable[str], attributes: dict[str, str]) -> Product:
    """The one shape every model returns: tags sorted, attributes a plain dict."""
    return {"id": pid, "name": name, "category": category, "price_cents": price_cents,
            "tags": sorted(tags), "attributes": dict(attributes)}


# --------------------------------------------------------------------------------------
# Relational


class RelationalCatalog:
    """Third normal form: a product row, a row per tag, a row per attribute."""

    def __init__(self, dsn: str) -> None:
        # autocommit: every statement is its own transaction, no idle-in-transaction
        # sessions holding locks between calls. add_products opens an explicit one.
        self.conn = psycopg.connect(dsn, autocommit=True)

    def create_schema(self) -> None:
        self.conn.execute("""
            CREATE TABLE IF NOT EXISTS products (
                id          integer PRIMARY KEY,
                name        text    NOT NULL,
                category    text    NOT NULL,
                price_cents integer NOT NULL CHECK (price_cents >= 0)
            );
            CREATE INDEX IF NOT EXISTS products_category_idx ON products (category, id);
            CREATE TABLE IF NOT EXISTS product_tags (
                product_id integer NOT NULL REFERENCES products (id) ON DELETE CASCADE,
                tag        text    NOT NULL,
                PRIMARY KEY (product_id, tag)
            );
            -- the primary key serves "tags of a product"; this one serves "products of a tag"
            CREATE INDEX IF NOT EXISTS product_tags_tag_idx ON product_tags (tag, product_id);
            CREATE TABLE IF NOT EXISTS product_attributes (
                product_id integer NOT NULL REFERENCES products (id) ON DELETE CASCADE,
                name       text    NOT NULL,
                value      text    NOT NULL,
                PRIMARY KEY (product_id, name)
            );
            CREATE INDEX IF NOT EXISTS product_attributes_value_idx
                ON product_attributes (name, value, product_id);
        """)

    def add_products(self, products: Iterable[Product]) -> None:
        items = list(products)
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO products (id, name, category, price_cents) VALUES (%s, %s, %s, %s)",
                [(p["id"], p["name"], p["category"], p["price_cents"]) for p in items])
            cur.executemany(
                "INSERT INTO product_tags (product_id, tag) VALUES (%s, %s)",
                [(p["id"], tag) for p in items for tag in p["tags"]])
            cur.executemany(
                "INSERT INTO product_attributes (product_id, name, value) VALUES (%s, %s, %s)",
                [(p["id"], k, v) for p in items for k, v in p["attributes"].items()])

    def get(self, product_id: int) -> Product | None:
        row = self.conn.execute(
            "SELECT name, category, price_cents FROM products WHERE id = %s",
            (product_id,)).fetchone()
        if row is None:
            return None
        tags = [t for (t,) in self.conn.execute(
            "SELECT tag FROM product_tags WHERE product_id = %s", (product_id,))]
        attributes: dict[str, str] = dict(self.conn.execute(
            "SELECT name, value FROM product_attributes WHERE product_id = %s",
            (product_id,)).fetchall())
        return _product(product_id, row[0], row[1], row[2], tags, attributes)

    def _ids(self, sql: str, params: tuple[Any, ...]) -> list[int]:
        return [pid for (pid,) in self.conn.execute(sql, params)]

    def ids_in_category(self, category: str) -> list[int]:
        return self._ids("SELECT id FROM products WHERE category = %s ORDER BY id", (category,))

    def ids_with_tag(self, tag: str) -> list[int]:
        return self._ids(
            "SELECT product_id FROM product_tags WHERE tag = %s ORDER BY product_id", (tag,))

    def ids_with_attribute(self, name: str, value: str) -> list[int]:
        return self._ids(
            "SELECT product_id FROM product_attributes WHERE name = %s AND value = %s "
            "ORDER BY product_id", (name, value))

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------------------
# Document (JSONB)


class DocumentCatalog:
    """A whole product per JSONB document; a GIN index answers containment queries."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    def create_schema(self) -> None:
        # jsonb_path_ops: a smaller, faster GIN index that supports exactly @> (containment),
        # the one operator the queries below use.
        self.conn.execute("""
            CREATE TABLE IF NOT EXISTS product_documents (
                id  integer PRIMARY KEY,
                doc jsonb   NOT NULL
            );
            CREATE INDEX IF NOT EXISTS product_documents_doc_gin
                ON product_documents USING gin (doc jsonb_path_ops);
        """)

    def add_products(self, products: Iterable[Product]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO product_documents (id, doc) VALUES (%s, %s)",
                [(p["id"], Jsonb({k: v for k, v in p.items() if k != "id"})) for p in products])

    def get(self, product_id: int) -> Product | None:
        row = self.conn.execute(
            "SELECT doc FROM product_documents WHERE id = %s", (product_id,)).fetchone()
        if row is None:
            return None
        doc = row[0]
        return _product(product_id, doc["name"], doc["category"], doc["price_cents"],
                        doc["tags"], doc["attributes"])

    def _containing(self, fragment: dict[str, Any]) -> list[int]:
        # Always "doc @> fragment": the GIN index can serve it. doc->>'category' = ... or
        # doc->'tags' ? ... would read every document (or need an index of their own).
        return [pid for (pid,) in self.conn.execute(
            "SELECT id FROM product_documents WHERE doc @> %s ORDER BY id", (Jsonb(fragment),))]

    def ids_in_category(self, category: str) -> list[int]:
        return self._containing({"category": category})

    def ids_with_tag(self, tag: str) -> list[int]:
        return self._containing({"tags": [tag]})

    def ids_with_attribute(self, name: str, value: str) -> list[int]:
        return self._containing({"attributes": {name: value}})

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------------------
# Key-value (Redis)


def _attribute_key(name: str, value: str) -> str:
    """index:attribute:<name>:<value>, each part percent-encoded (":" -> %3A, "%" -> %25).

    Parts joined as they are can collide: attribute a = "b:c" and attribute "a:b" = "c"
    would both be index:attribute:a:b:c. Escaping each part, as a URL escapes its path
    segments (RFC 3986 2.1), makes the key say where each part ends.
    """
    return f"index:attribute:{quote(name, safe='')}:{quote(value, safe='')}"


class RedisCatalog:
    """product:<id> is a hash; index:<kind>:<value> sets are the secondary indexes.

    Redis has no query planner: every access pattern needs a structure built for it
    when the data is written. Reads are then O(1) (HGETALL) or O(N of the answer)
    (SMEMBERS), never a scan of the keyspace."""

    def __init__(self, redis_url: str) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)

    def create_schema(self) -> None:
        """Nothing to create: Redis structures appear with their first write."""

    def add_products(self, products: Iterable[Product]) -> None:
        # One MULTI/EXEC per batch: a product and its index entries appear together.
        pipe = self.r.pipeline(transaction=True)
        for p in products:
            pid = p["id"]
            fields = {"name": p["name"], "category": p["category"],
                      "price_cents": p["price_cents"]}
            fields.update({f"attribute:{k}": v for k, v in p["attributes"].items()})
            pipe.hset(f"product:{pid}", mapping=fields)
            if p["tags"]:
                pipe.sadd(f"product:{pid}:tags", *p["tags"])
            pipe.sadd(f"index:category:{p['category']}", pid)
            for tag in p["tags"]:
                pipe.sadd(f"index:tag:{tag}", pid)
            for k, v in p["attributes"].items():
                pipe.sadd(_attribute_key(k, v), pid)
        pipe.execute()

    def get(self, product_id: int) -> Product | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(f"product:{product_id}")
        pipe.smembers(f"product:{product_id}:tags")
        fields, tags = pipe.execute()
        if not fields:
            return None
        attributes = {k.removeprefix("attribute:"): v for k, v in fields.items()
                      if k.startswith("attribute:")}
        return _product(product_id, fields["name"], fields["category"],
                        int(fields["price_cents"]), tags, attributes)

    def _members(self, key: str) -> list[int]:
        return sorted(int(m) for m in self.r.smembers(key))

    def ids_in_category(self, category: str) -> list[int]:
        return self._members(f"index:category:{category}")

    def ids_with_tag(self, tag: str) -> list[int]:
        return self._members(f"index:tag:{tag}")

    def ids_with_attribute(self, name: str, value: str) -> list[int]:
        return self._members(_attribute_key(name, value))

    def close(self) -> None:
        self.r.close()
