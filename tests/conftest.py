"""Shared fixtures for labrunner's own tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURE_PROJECT = Path(__file__).parent / "fixtures" / "project"
REPO = Path(__file__).resolve().parents[1]


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
