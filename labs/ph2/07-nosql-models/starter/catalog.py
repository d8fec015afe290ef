"""One product catalog, three data models: relational, JSONB document, Redis key-value.

Implement the three classes below so that they give the same answers to the same access
patterns. See README.md for the product shape and what each method returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg  # noqa: F401 - you will need it
import redis  # noqa: F401 - you will need it
from psycopg.types.json import Jsonb  # noqa: F401 - wraps a dict as a jsonb parameter

Product = dict[str, Any]


class RelationalCatalog:
    """Tables in third normal form: products, one row per tag, one row per attribute."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def create_schema(self) -> None:
        raise NotImplementedError("RelationalCatalog.create_schema: create the tables")

    def add_products(self, products: Iterable[Product]) -> None:
        raise NotImplementedError("RelationalCatalog.add_products: insert the rows")

    def get(self, product_id: int) -> Product | None:
        raise NotImplementedError("RelationalCatalog.get")

    def ids_in_category(self, category: str) -> list[int]:
        raise NotImplementedError("RelationalCatalog.ids_in_category")

    def ids_with_tag(self, tag: str) -> list[int]:
        raise NotImplementedError("RelationalCatalog.ids_with_tag")

    def ids_with_attribute(self, name: str, value: str) -> list[int]:
        raise NotImplementedError("RelationalCatalog.ids_with_attribute")

    def close(self) -> None:
        pass


class DocumentCatalog:
    """One JSONB document per product, and a GIN index that serves the lookups."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def create_schema(self) -> None:
        raise NotImplementedError("DocumentCatalog.create_schema: a jsonb table + GIN index")

    def add_products(self, products: Iterable[Product]) -> None:
        raise NotImplementedError("DocumentCatalog.add_products")

    def get(self, product_id: int) -> Product | None:
        raise NotImplementedError("DocumentCatalog.get")

    def ids_in_category(self, category: str) -> list[int]:
        raise NotImplementedError("DocumentCatalog.ids_in_category")

    def ids_with_tag(self, tag: str) -> list[int]:
        raise NotImplementedError("DocumentCatalog.ids_with_tag")

    def ids_with_attribute(self, name: str, value: str) -> list[int]:
        raise NotImplementedError("DocumentCatalog.ids_with_attribute")

    def close(self) -> None:
        pass


class RedisCatalog:
    """A hash per product; a set per category, tag and attribute value as secondary index."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    def create_schema(self) -> None:
        """Redis needs no schema; keep this method so the three classes look alike."""

    def add_products(self, products: Iterable[Product]) -> None:
        raise NotImplementedError("RedisCatalog.add_products: hashes and index sets")

    def get(self, product_id: int) -> Product | None:
        raise NotImplementedError("RedisCatalog.get")

    def ids_in_category(self, category: str) -> list[int]:
        raise NotImplementedError("RedisCatalog.ids_in_category")

    def ids_with_tag(self, tag: str) -> list[int]:
        raise NotImplementedError("RedisCatalog.ids_with_tag")

    def ids_with_attribute(self, name: str, value: str) -> list[int]:
        raise NotImplementedError("RedisCatalog.ids_with_attribute")

    def close(self) -> None:
        pass
