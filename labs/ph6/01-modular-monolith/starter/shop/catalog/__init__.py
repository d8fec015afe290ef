"""Catalog context: products, prices and stock. The public interface."""

from shop.catalog.internal.store import (
    OutOfStock,
    UnknownProduct,
    add_product,
    price_of,
    release,
    reserve,
)

__all__ = ["OutOfStock", "UnknownProduct", "add_product", "price_of", "release", "reserve"]
