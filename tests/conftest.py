"""Shared fixtures for labrunner's own tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURE_PROJECT = Path(__file__).parent / "fixtures" / "project"
REPO = Path(__file__).resolve().parents[1]
SLOW_TESTS = Path(__file__).parent / "slow_tests.txt"


def _known_seconds() -> dict[str, float]:
    seconds = {}
    for line in SLOW_TESTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            took, nodeid = line.split(maxsplit=1)
            seconds[nodeid] = float(took)
    return seconds


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: the known-slow tests first, longest first, so that both workers finish
    together (a long test dealt last keeps one worker busy while the other idles). Without
    xdist the order is left as it is."""
    if not hasattr(config, "workerinput"):
        return
    known = _known_seconds()
    items.sort(key=lambda item: -known.get(item.nodeid, 0.0))


# Tests sharing a costly module fixture: under xdist each worker would make its own, so they
# go to one worker together. (xdist's own xdist_group marks no longer group anything with
# pytest 9.2: pytest-xdist issue 1386.) A test added that uses one of these fixtures belongs
# in its list.
SHARED_FIXTURE_TESTS = {
    "service_attacks": [f"tests/test_grading.py::{name}" for name in (
        "test_services_never_trust_a_connection",
        "test_the_postgres_template_is_out_of_reach_and_checked",
        "test_a_run_cannot_take_its_services_from_the_run_beside_it",
        "test_services_of_a_graded_run_are_never_root",
        "test_private_services_restart_for_the_lab_and_hide_everyone_else")],
    "c_programs": [f"tests/test_grading.py::{name}" for name in (
        "test_c_labs_run_programs_as_the_learner_and_read_their_proc_beside_them",
        "test_learner_programs_and_proxies_cannot_reach_the_tests_process",
        "test_sanitized_c_lab_grades_despite_the_memory_limit")],
    "browser": [f"tests/test_dashboard.py::{name}" for name in (
        "test_dashboard_in_chromium_shows_states_and_updates_live",
        "test_cohort_page_in_chromium")],
}


# Optional: this conftest is also loaded by the pytest a lab runs in when the lab lives under
# tests/ (the fixture projects), where xdist is not loaded and an unknown hook is an error.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadgroup: tests dealt one at a time in the workers' (slowest-first) order,
    each test on its own except the groups of SHARED_FIXTURE_TESTS."""
    if config.getoption("dist", None) != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    group_of = {nodeid: group for group, nodeids in SHARED_FIXTURE_TESTS.items()
                for nodeid in nodeids}

    class SharedFixtureGroups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of.get(nodeid, nodeid)

    return SharedFixtureGroups(config, log)


@pytest.fixture
def fixture_project(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point labrunner at the tiny fixture project (one lab, ph2.5)."""
    monkeypatch.setenv("LABRUNNER_HOME", str(FIXTURE_PROJECT))
    return FIXTURE_PROJECT


@pytest.fixture(scope="session")
def local_services() -> Iterator[object]:
    """One ephemeral set of real local services for the whole test session."""
    from labrunner.services.manager import ServiceSet

    service_set = ServiceSet.ephemeral("local")
    yield service_set
    service_set.stop()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABRUNNER_", "PYTEST_"))}
    # A run keeps what it starts warm for a while by default: these tests expect fresh
    # services and nothing left once a command ends (tests of warm sets set their own).
    env["LABRUNNER_WARM_IDLE"] = "0"
    env.update(extra)
    return env
