"""How an order is placed: through the catalog's and billing's public interfaces only."""

from __future__ import annotations

import itertools
from typing import Any

from shop import billing, catalog


class OrderRejected(Exception):
    pass


_ORDERS: dict[str, dict[str, Any]] = {}
# An id is taken before the order is stored (billing needs it as the reference), and a web
# layer places orders on threads: count them with a counter that never hands an id out twice
# (next() on itertools.count is atomic), not len(_ORDERS) + 1, which two orders placed at once
# both read before either is stored.
_IDS = itertools.count(1)


def place_order(customer: str, sku: str, qty: int) -> dict[str, Any]:
    # Validate the command at the boundary, before any context acts on it: a quantity is a
    # whole number of items, at least 1 (bool is an int subclass: True is no quantity).
    if type(qty) is not int or qty < 1:
        raise OrderRejected(f"order for {qty!r} x {sku} rejected: quantity must be an int >= 1")
    try:
        price = catalog.price_of(sku)
        catalog.reserve(sku, qty)
    except (catalog.UnknownProduct, catalog.OutOfStock) as exc:
        raise OrderRejected(f"order for {qty} x {sku} rejected: {exc}") from exc
    order_id = f"ord-{next(_IDS)}"
    total = price * qty
    # One use case, one consistent outcome: the stock is reserved before billing charges, so
    # if the charge fails (declined, or billing down) the order is not placed and the
    # reservation is given back - a failed order keeps no stock.
    try:
        invoice_id = billing.charge(customer, total, reference=order_id)
    except billing.PaymentDeclined as exc:
        catalog.release(sku, qty)
        raise OrderRejected(f"order for {qty} x {sku} rejected: payment declined") from exc
    except BaseException:
        catalog.release(sku, qty)
        raise
    order = {"order_id": order_id, "customer": customer, "sku": sku, "qty": qty,
             "total_cents": total, "invoice_id": invoice_id}
    _ORDERS[order_id] = order
    return dict(order)


def get_order(order_id: str) -> dict[str, Any]:
    return dict(_ORDERS[order_id])
