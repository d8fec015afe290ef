"""The catalog's own data: nobody outside shop.catalog reads or writes it."""

from __future__ import annotations

from dataclasses import dataclass


class UnknownProduct(LookupError):
    pass


class OutOfStock(Exception):
    pass


@dataclass
class _Product:
    sku: str
    name: str
    price_cents: int
    stock: int


_PRODUCTS: dict[str, _Product] = {}


def add_product(sku: str, name: str, price_cents: int, stock: int) -> None:
    _PRODUCTS[sku] = _Product(sku, name, price_cents, stock)


def _get(sku: str) -> _Product:
    try:
        return _PRODUCTS[sku]
    except KeyError:
        raise UnknownProduct(sku) from None


def price_of(sku: str) -> int:
    return _get(sku).price_cents


def reserve(sku: str, qty: int) -> None:
    # TODO: the catalog guards its own stock, whoever calls: refuse a quantity that is not
    # an int >= 1 with ValueError, before anything changes (see README)
    product = _get(sku)
    if product.stock < qty:
        raise OutOfStock(f"{sku}: {product.stock} left, {qty} asked")
    product.stock -= qty


def release(sku: str, qty: int) -> None:
    """Give back what reserve(sku, qty) took, when the order it was for is not placed."""
    if type(qty) is not int or qty < 1:
        raise ValueError(f"{sku}: cannot release {qty!r} - a quantity is an int >= 1")
    _get(sku).stock += qty
