"""Billing's own ledger: only shop.billing touches it."""

from __future__ import annotations

from typing import Any

_INVOICES: list[dict[str, Any]] = []


class PaymentDeclined(Exception):
    """The customer's payment was refused (a card declined): nothing was charged."""


def charge(customer: str, amount_cents: int, reference: str) -> str:
    # A real billing calls a payment provider here: it may raise PaymentDeclined (or fail
    # like any remote call), and then nothing is charged.
    invoice_id = f"inv-{len(_INVOICES) + 1}"
    _INVOICES.append({"invoice_id": invoice_id, "customer": customer,
                      "amount_cents": amount_cents, "reference": reference})
    return invoice_id


def invoices_for(customer: str) -> list[dict[str, Any]]:
    return [dict(i) for i in _INVOICES if i["customer"] == customer]
