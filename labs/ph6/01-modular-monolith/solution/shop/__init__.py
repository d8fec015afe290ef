"""The shop: one deployable, three bounded contexts (catalog, billing, orders). Each context
is a package whose __init__ is its public interface; everything in <context>/internal is its
own business. Orders uses catalog and billing; catalog and billing know nothing of orders or
of each other."""
