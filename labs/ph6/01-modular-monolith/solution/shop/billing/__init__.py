"""Billing context: invoices. The public interface."""

from shop.billing.internal.ledger import PaymentDeclined, charge, invoices_for

__all__ = ["PaymentDeclined", "charge", "invoices_for"]
