"""Billing context: invoices. The public interface."""

from shop.billing.internal.ledger import charge, invoices_for

__all__ = ["charge", "invoices_for"]
