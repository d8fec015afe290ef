"""A pytest plugin for ``dev check`` (``-p labrunner.first_tests``): the tests named by
``--lab-first`` run before the others, in the order pytest collected the rest.

A wrong solution is judged by its first failure (pytest -x). Run first, the test that
failed it the last time ends its check at once, instead of after every test before it
passed again: about a third of a wrong solution's check went to those. If it no longer
fails that wrong solution (the verification changed), the other tests still run after it,
and ``dev check`` runs the check again in the usual order before it calls it passed."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("labrunner").addoption(
        "--lab-first", action="append", default=[],
        help="a test's name (with its parameters) to run before the others; repeatable")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    first = set(config.getoption("--lab-first"))
    if first:
        items.sort(key=lambda item: item.name not in first)   # stable: the rest keep order
