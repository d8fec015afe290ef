"""The composition root: the monolith's one entry point, wiring the contexts' public
interfaces (a web layer would sit here). It may import any context's public interface."""

from __future__ import annotations

from typing import Any

from shop import billing, catalog, orders

OrderRejected = orders.OrderRejected


def add_product(sku: str, name: str, price_cents: int, stock: int) -> None:
    catalog.add_product(sku, name, price_cents, stock)


def place_order(customer: str, sku: str, qty: int) -> dict[str, Any]:
    return orders.place_order(customer, sku, qty)


def get_order(order_id: str) -> dict[str, Any]:
    return orders.get_order(order_id)


def invoices_for(customer: str) -> list[dict[str, Any]]:
    return billing.invoices_for(customer)
