"""Run where the learner's code runs (learner.harness()): records handed out by the shop are
edited in that process, as a caller inside the monolith would edit them, then read again.
Across the grading boundary a returned dict arrives as a copy, so the test cannot do it."""

from __future__ import annotations

import collections
import contextlib
import sys
import types
from collections.abc import Callable
from pathlib import Path
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


CONTEXTS = ("catalog", "billing", "orders")
IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range, frozenset)


def _immutable(obj: Any) -> bool:
    if isinstance(obj, tuple):
        return all(_immutable(item) for item in obj)
    params = getattr(obj, "__dataclass_params__", None)
    return isinstance(obj, IMMUTABLE) or bool(params is not None and params.frozen)


def _kept_by(modules: list[types.ModuleType]) -> dict[int, Any]:
    """Every mutable object the modules keep: their globals, and what those hold (containers,
    objects' attributes, classes' attributes), by id."""
    kept: dict[int, Any] = {}
    todo: list[tuple[Any, int]] = [(v, 0) for m in modules for v in vars(m).values()]
    while todo:
        obj, depth = todo.pop()
        if (id(obj) in kept or depth > 6 or isinstance(obj, types.ModuleType)
                or _immutable(obj) or callable(obj) and not isinstance(obj, type)):
            continue
        if isinstance(obj, type):   # a class: the data it keeps in class attributes
            todo += [(v, depth + 1) for k, v in vars(obj).items() if not k.startswith("__")]
            continue
        kept[id(obj)] = obj
        if isinstance(obj, dict):
            todo += [(v, depth + 1) for v in obj.values()]
        elif isinstance(obj, list | set | tuple | collections.deque):
            todo += [(v, depth + 1) for v in obj]
        elif hasattr(obj, "__dict__"):
            todo += [(v, depth + 1) for v in vars(obj).values()]
    return kept


def live_data_across_boundaries(app: Any, sku: str, customer: str) -> list[str]:
    """Orders placed (one accepted, one rejected) through the composition root while every
    public function of every context records what it returns to code outside its context;
    then: which of those results (or of the names a context's interface offers) is an
    object the context itself keeps - its live data, handed across the boundary.
    ["<what>", ...], empty when every context hands out values and copies only."""
    shop = sys.modules.get("shop")
    if shop is None or not getattr(shop, "__file__", None):
        return []
    # the learner's folder (the one holding the shop package), not the lab's
    package = Path(str(shop.__file__)).resolve().parent
    root = package.parent
    mine = [m for m in list(sys.modules.values()) if isinstance(m, types.ModuleType)
            and getattr(m, "__file__", None) and root in Path(str(m.__file__)).resolve().parents]
    found: list[str] = []
    returned: list[tuple[str, str, str, Any]] = []
    swapped: list[tuple[types.ModuleType, str, Any]] = []

    def recording(ctx: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            caller = str(sys._getframe(1).f_globals.get("__name__", "?"))
            if not caller.startswith(f"shop.{ctx}"):
                returned.append((ctx, name, caller, result))
            return result
        return call

    for ctx in CONTEXTS:
        public = sys.modules.get(f"shop.{ctx}")
        if public is None:
            continue
        names = getattr(public, "__all__", None) or [n for n in vars(public)
                                                     if not n.startswith("_")]
        for name in names:
            obj = getattr(public, name, None)
            if isinstance(obj, types.ModuleType):
                if ".internal" in obj.__name__ or "._" in obj.__name__:
                    found.append(f"shop.{ctx} offers {name}, its internal module "
                                 f"{obj.__name__}: everything in it is one attribute away")
            elif isinstance(obj, types.FunctionType):
                wrapped = recording(ctx, name, obj)
                for module in mine:
                    for key, value in list(vars(module).items()):
                        if value is obj and not (module.__name__.startswith(f"shop.{ctx}")
                                                 and module is not public):
                            swapped.append((module, key, value))
                            setattr(module, key, wrapped)
            elif not callable(obj) and not _immutable(obj):
                returned.append((ctx, name, "its public interface", obj))
    try:
        app.add_product(sku, "A pen", 300, 5)
        order = app.place_order(customer, sku, 2)
        with contextlib.suppress(Exception):
            app.place_order(customer, sku, 50)
        app.get_order(order["order_id"])
        app.invoices_for(customer)
    finally:
        for module, key, value in reversed(swapped):
            setattr(module, key, value)
    kept = {ctx: _kept_by([m for m in mine if m.__name__ == f"shop.{ctx}"
                           or m.__name__.startswith(f"shop.{ctx}.")]) for ctx in CONTEXTS}
    for ctx, name, caller, result in returned:
        parts = [result]
        if isinstance(result, dict):
            parts += list(result.values())
        elif isinstance(result, list | tuple | set):
            parts += list(result)
        for part in parts:
            if id(part) in kept[ctx]:
                what = (f"shop.{ctx} offers {name}" if caller == "its public interface" else
                        f"shop.{ctx}.{name}() returned to {caller}")
                found.append(f"{what}: a {type(part).__name__} the {ctx} context keeps "
                             f"itself ({repr(part)[:80]}), not a copy")
                break
    return found


def reserve_at_the_catalog(sku_prefix: str, quantities: list[Any]) -> list[tuple[str, str, str]]:
    """Each quantity reserved straight through the catalog's public interface (as any caller
    in the monolith could), on a fresh product with 2 in stock, then the stock probed with
    valid reservations: [(repr(qty), what reserve did, the stock afterwards)]. What it did:
    'accepted', 'ValueError'/'TypeError' (or a subclass: named 'ValueError(<class>)'),
    'OutOfStock', or another exception's class name; the stock: 'unchanged', 'less' or
    'more' than the 2 it held."""
    catalog = sys.modules.get("shop.catalog")
    if catalog is None:
        return []
    seen = []
    for n, qty in enumerate(quantities):
        sku = f"{sku_prefix}-{n}"
        catalog.add_product(sku, "A lamp", 2500, 2)
        try:
            catalog.reserve(sku, qty)
            did = "accepted"
        except catalog.OutOfStock:
            did = "OutOfStock"
        except (ValueError, TypeError) as exc:
            base = "ValueError" if isinstance(exc, ValueError) else "TypeError"
            did = base if type(exc).__name__ == base else f"{base}({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - reported to the test as it is
            did = f"{type(exc).__name__}: {exc}"
        try:
            catalog.reserve(sku, 2)
        except catalog.OutOfStock:
            seen.append((repr(qty), did, "less"))
            continue
        try:
            catalog.reserve(sku, 1)
            stock = "more"
        except catalog.OutOfStock:
            stock = "unchanged"
        seen.append((repr(qty), did, stock))
    return seen


def _stand_in_for_charge(billing: types.ModuleType, charge: Any, stand_in: Any
                         ) -> list[tuple[types.ModuleType, str, Any]]:
    """Put ``stand_in`` in place of billing.charge wherever the shop's modules outside
    billing hold it (billing's public interface, an imported name); what was replaced, to
    put back in reverse."""
    package = Path(str(sys.modules["shop"].__file__)).resolve().parent
    swapped: list[tuple[types.ModuleType, str, Any]] = []
    for module in list(sys.modules.values()):
        if not (isinstance(module, types.ModuleType) and getattr(module, "__file__", None)
                and package.parent in Path(str(module.__file__)).resolve().parents):
            continue
        if module.__name__.startswith("shop.billing") and module is not billing:
            continue
        for key, value in list(vars(module).items()):
            if value is charge:
                swapped.append((module, key, value))
                setattr(module, key, stand_in)
    return swapped


def two_orders_at_once(app: Any, sku: str, customers: tuple[str, str]) -> dict[str, Any]:
    """Two orders placed at once, as a threaded web layer places them: the first held inside
    billing.charge (its id taken, nothing stored yet) while the second is placed whole, then
    the first let go. {"ids": [first's id, second's], "kept": [get_order(id)["customer"]
    for each], "errors": [...], "second_waited": the second could not finish while the first
    was held (a lock around the whole order: correct, and no interleaving to see)}."""
    import threading

    billing = sys.modules.get("shop.billing")
    charge = getattr(billing, "charge", None)
    if billing is None or not callable(charge):
        return {"ids": [], "kept": [], "errors": ["shop.billing.charge was not found"],
                "second_waited": False}
    arrived, release = threading.Event(), threading.Event()
    first = threading.Lock()

    def held(*args: Any, **kwargs: Any) -> Any:
        if first.acquire(blocking=False):      # the first call only: held until let go
            arrived.set()
            release.wait(10)
        return charge(*args, **kwargs)

    swapped = _stand_in_for_charge(billing, charge, held)
    app.add_product(sku, "A scarf", 1500, 5)
    results: list[Any] = [None, None]
    errors: list[str] = []

    def place(n: int) -> None:
        try:
            results[n] = app.place_order(customers[n], sku, 1)
        except Exception as exc:  # noqa: BLE001 - reported to the test as it is
            errors.append(f"place_order({customers[n]!r}, {sku!r}, 1) raised "
                          f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=place, args=(n,), daemon=True) for n in (0, 1)]
    try:
        threads[0].start()
        arrived.wait(5)
        threads[1].start()
        threads[1].join(2)
        waited = threads[1].is_alive()
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
        for module, key, value in reversed(swapped):
            setattr(module, key, value)
    ids = [r.get("order_id") if isinstance(r, dict) else None for r in results]
    kept = []
    for order_id in ids:
        try:
            kept.append(app.get_order(order_id).get("customer") if order_id else None)
        except Exception as exc:  # noqa: BLE001 - reported to the test as it is
            kept.append(f"{type(exc).__name__}: {exc}")
    return {"ids": ids, "kept": kept, "errors": errors, "second_waited": waited,
            "held": arrived.is_set()}


def charge_fails(app: Any, sku: str, customer: str, how: str) -> dict[str, Any]:
    """An order placed while billing.charge fails: billing's own PaymentDeclined (how=
    "declined") or an outage (how="down": ConnectionError, as a remote billing call raises).
    The failing charge stands in for billing.charge wherever code outside billing holds it
    (its public interface, orders' imported name). A product with 3 in stock, an order for 2;
    then the stock counted through the catalog's public reserve. {"did": "OrderRejected" |
    "accepted: <order>" | "<Exception>: <message>", "stock": items left (3: nothing kept),
    "invoices": what billing holds for the customer, "charged": the failing charge was
    called, "error": what could not be set up}."""
    billing = sys.modules.get("shop.billing")
    catalog = sys.modules.get("shop.catalog")
    charge = getattr(billing, "charge", None)
    if billing is None or catalog is None or not callable(charge):
        return {"error": "shop.billing.charge or shop.catalog was not found"}
    declined = getattr(billing, "PaymentDeclined", None)
    if how == "declined" and not (isinstance(declined, type)
                                  and issubclass(declined, Exception)):
        return {"error": "shop.billing offers no PaymentDeclined exception (its public "
                         "interface: PaymentDeclined, charge, invoices_for)"}
    called: list[tuple[Any, ...]] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        called.append(args)
        if how == "declined" and isinstance(declined, type):
            raise declined(f"card of {customer} declined")
        raise ConnectionError("billing is down: connection refused")

    swapped = _stand_in_for_charge(billing, charge, failing)
    app.add_product(sku, "A clock", 2000, 3)
    try:
        order = app.place_order(customer, sku, 2)
        did = f"accepted: {order}"
    except app.OrderRejected:
        did = "OrderRejected"
    except Exception as exc:  # noqa: BLE001 - reported to the test as it is
        did = f"{type(exc).__name__}: {exc}"
    finally:
        for module, key, value in reversed(swapped):
            setattr(module, key, value)
    stock = 0
    for qty in (3, 2, 1):           # the most the catalog still lets one reserve
        try:
            catalog.reserve(sku, qty)
        except catalog.OutOfStock:
            continue
        stock = qty
        break
    return {"did": did, "stock": stock, "invoices": app.invoices_for(customer),
            "charged": bool(called), "error": None}
