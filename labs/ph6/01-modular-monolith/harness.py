"""Run where the learner's code runs (learner.harness()): records handed out by the shop are
edited in that process, as a caller inside the monolith would edit them, then read again.
Across the grading boundary a returned dict arrives as a copy, so the test cannot do it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def edit_what_is_handed_out(app: Any, sku: str, customer: str
                            ) -> list[tuple[str, Any, Any]]:
    """For each record the shop hands out: edit it, then read the order's total and its
    invoice's amount again; [(what was edited, total_cents, amount_cents)]."""
    app.add_product(sku, "A pen", 300, 5)
    order = app.place_order(customer, sku, 1)
    order_id = order["order_id"]
    seen = []
    get: Callable[[], Any]  # each lambda below returns a record the shop handed out
    for what, get in (("place_order()", lambda: order),
                      ("get_order()", lambda: app.get_order(order_id)),
                      ("invoices_for()", lambda: (app.invoices_for(customer) or [{}])[0])):
        record = get()
        record["total_cents"] = record["amount_cents"] = 1
        again = app.get_order(order_id)
        invoice = (app.invoices_for(customer) or [{}])[0]
        seen.append((what, again.get("total_cents"), invoice.get("amount_cents")))
    return seen
