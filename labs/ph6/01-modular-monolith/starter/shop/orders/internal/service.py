"""How an order is placed: through the catalog's and billing's public interfaces only."""

from __future__ import annotations

from typing import Any


class OrderRejected(Exception):
    pass


def place_order(customer: str, sku: str, qty: int) -> dict[str, Any]:
    # TODO: price and reserve through `shop.catalog`, charge through `shop.billing`
    raise NotImplementedError("place_order(): price, reserve, charge - via the public interfaces")


def get_order(order_id: str) -> dict[str, Any]:
    raise NotImplementedError("get_order()")
