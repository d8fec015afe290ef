"""ph6.1 - a modular monolith: bounded contexts as packages with public interfaces.

The boundaries are declared as import-linter contracts (contracts.ini beside this file: the
learner's copy cannot weaken them) and checked on the learner's `shop` package with
lint-imports, which builds the import graph with grimp (every import statement, including
those inside functions and `from package import submodule`). A broken contract fails naming
the import, its module and its line. The monolith must also work: orders placed through the
composition root (app.py) price and reserve through the catalog and charge through billing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

CONTRACTS = Path(__file__).parent / "contracts.ini"


def test_import_contracts_are_kept(learner: Any, tmp_path: Path) -> None:
    learner.path("shop/__init__.py")
    shutil.copy(CONTRACTS, tmp_path / "contracts.ini")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(learner.dir), "NO_COLOR": "1"}
    done = subprocess.run([str(lint), "contracts.ini", "--no-cache", "--no-logo"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    if done.returncode == 0:
        return
    if "Broken contracts" not in out:
        pytest.fail("lint-imports could not check the shop package: "
                    f"{out.strip().splitlines()[-1] if out.strip() else done.returncode}\n"
                    f"{out[-1500:]}")
    report = out.split("Broken contracts", 1)[1].strip("-\n ")
    contract = report.splitlines()[0].strip()
    imports = [line.lstrip("- ").strip() for line in report.splitlines()
               if "->" in line]
    first = imports[0] if imports else "(see the report)"
    pytest.fail(
        f"the import {first} breaks the boundary \"{contract}\": a context may use another "
        "only through its public interface (its package's __init__), and only in the "
        "direction declared (orders -> catalog, orders -> billing; never back, never "
        "catalog <-> billing). Move the need behind a public function of the owning context, "
        f"or drop the dependency.\nimport-linter's report:\n{report}")


@pytest.fixture
def app(learner: Any) -> Any:
    return learner.load("app")


def tag() -> str:
    return uuid.uuid4().hex[:8]


def test_an_order_is_priced_reserved_and_charged(app: Any) -> None:
    sku, customer = f"book-{tag()}", f"ada-{tag()}"
    app.add_product(sku, "A book", 1250, 5)
    order = app.place_order(customer, sku, 3)
    assert order.get("total_cents") == 3750, (
        f"place_order({customer!r}, {sku!r}, 3) returned {order}: expected total_cents 3750 "
        "(3 x the catalog's price 1250)")
    invoices = app.invoices_for(customer)
    assert [(i.get("amount_cents"), i.get("reference")) for i in invoices] == [
        (3750, order.get("order_id"))], (
        f"billing holds {invoices} for {customer}: expected one invoice of 3750 cents whose "
        f"reference is the order id {order.get('order_id')!r}")
    assert app.get_order(order["order_id"]).get("invoice_id") == invoices[0].get("invoice_id"), (
        "get_order() does not carry the invoice id billing returned")


def test_a_rejected_order_charges_nothing(app: Any) -> None:
    sku, customer = f"lamp-{tag()}", f"bob-{tag()}"
    app.add_product(sku, "A lamp", 4000, 2)
    for bad_sku, qty, why in ((sku, 3, "only 2 in stock"), (f"nope-{tag()}", 1, "no product")):
        with pytest.raises(app.OrderRejected):
            app.place_order(customer, bad_sku, qty)
        assert app.invoices_for(customer) == [], (
            f"ordering {qty} x {bad_sku} ({why}) was rejected, yet billing charged: "
            f"{app.invoices_for(customer)}")
    order = app.place_order(customer, sku, 2)
    assert order.get("total_cents") == 8000, (
        f"after a rejected order for 3, ordering the 2 in stock gave {order}: the rejected "
        "order must not have reserved anything")
