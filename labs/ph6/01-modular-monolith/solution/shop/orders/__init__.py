"""Orders context: placing orders. The public interface."""

from shop.orders.internal.service import OrderRejected, get_order, place_order

__all__ = ["OrderRejected", "get_order", "place_order"]
