"""The roadmap page, checked where a learner looks at it: in a real browser (Debian's
Chromium, driven by Playwright), on a workspace whose progress store holds known attempts."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from labrunner import dashboard as board
from labrunner.catalog import Catalog, load_catalog
from labrunner.cli import main
from labrunner.grading import gradebook_document
from labrunner.roadmap_page import cohort_page, progress_view
from labrunner.store import Attempt, ProgressStore
from labrunner.workspace import Workspace, init_workspace

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(os.environ.get("LABRUNNER_SCREENSHOTS", REPO / "out" / "screenshots"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def _attempt(concept: str, outcome: str, at: float, duration: float = 2.0) -> Attempt:
    return Attempt(concept, at, outcome, duration, "0" * 16, "")


@pytest.fixture
def workspace(tmp_path: Path, catalog: Catalog) -> Workspace:
    """ph2.5 passed; ph2.6 passed then failed (regressed); ph1.5 failed twice."""
    ws, _, _ = init_workspace(tmp_path / "ws", catalog)
    store = ws.store()
    t = 1_780_000_000.0
    for attempt in (_attempt("ph2.5", "failed", t), _attempt("ph2.5", "passed", t + 60),
                    _attempt("ph2.6", "passed", t + 120), _attempt("ph2.6", "failed", t + 180),
                    _attempt("ph1.5", "failed", t + 240), _attempt("ph1.5", "error", t + 300)):
        store.record(attempt)
    store.close()
    return ws


def test_states_are_earned_from_the_store(workspace: Workspace, catalog: Catalog) -> None:
    store = workspace.store()
    view = progress_view(catalog, store.status(), store.attempts(), lambda lab: None)
    store.close()
    states = {c.id: c.state for p in view.phases for c in p.concepts}
    assert states["ph2.5"] == "done"
    assert states["ph2.6"] == "regressed"
    assert states["ph1.5"] == "failed"
    assert states["ph2.1"] == "not tried"
    no_lab = [c.id for c in catalog.concepts if c.lab is None]
    assert all(states[cid] == "no lab yet" for cid in no_lab)
    assert view.done == 1 and view.total == 80
    assert view.available == sum(1 for c in catalog.concepts if c.lab is not None)
    ph25 = next(c for p in view.phases for c in p.concepts if c.id == "ph2.5")
    assert ph25.attempts == 2 and ph25.time_spent == 4.0


def test_progress_html_writes_a_self_contained_page(workspace: Workspace) -> None:
    result = CliRunner().invoke(main, ["progress", "--workspace", str(workspace.root),
                                       "--html"])
    assert result.exit_code == 0, result.output
    page = (workspace.root / "roadmap.html").read_text(encoding="utf-8")
    assert 'data-concept="ph2.6" data-state="regressed"' in page
    # Self-contained: nothing is fetched from anywhere.
    assert "http://" not in page and "https://" not in page and "<link" not in page
    # The README links are relative to the page, into the workspace's copies.
    assert 'href="ph2/05-isolation-levels/README.md"' in page


def _cohort() -> dict[str, Any]:
    def concept(cid: str, status: str) -> dict[str, Any]:
        return {"id": cid, "slug": cid, "title": cid, "status": status,
                "points": 10 if status == "pass" else 0, "max_points": 10, "tests": []}

    students = [
        {"student": name, "total": 0, "max_total": 30,
         "concepts": [concept("ph2.5", a), concept("ph2.6", b), concept("ph1.5", c)]}
        for name, a, b, c in (("alice", "pass", "pass", "fail"),
                              ("bob", "pass", "fail", "fail"),
                              ("carol", "pass", "timeout", "error"),
                              ("dave", "fail", "pass", "pass"))]
    return gradebook_document([], students)


def test_cohort_rates() -> None:
    page = cohort_page(_cohort())
    assert 'data-concept="ph2.5" data-rate="0.750"' in page
    assert 'data-concept="ph2.6" data-rate="0.500"' in page
    assert 'data-concept="ph1.5" data-rate="0.250"' in page
    assert '<b id="hardest">ph1.5</b>' in page


# --------------------------------------------------------------------------------------
# In Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed: scripts/setup.sh --tests "
                        "installs it")
        pytest.skip("no chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_dashboard_in_chromium_shows_states_and_updates_live(
        browser: Any, workspace: Workspace, catalog: Catalog) -> None:
    page_server = board.Dashboard(catalog, workspace)
    server = board.serve(page_server)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(board.url_of(server))
        state = {cid: page.get_attribute(f'li[data-concept="{cid}"]', "data-state")
                 for cid in ("ph2.5", "ph2.6", "ph1.5", "ph2.1")}
        assert state == {"ph2.5": "done", "ph2.6": "regressed", "ph1.5": "failed",
                         "ph2.1": "not tried"}
        available = sum(1 for c in catalog.concepts if c.lab is not None)
        assert page.inner_text("#done-count") == f"1 of {available} available concepts done"
        assert "regressed" in page.inner_text('li[data-concept="ph2.6"]')  # not colour alone
        no_lab = next((c.id for c in catalog.concepts if c.lab is None), None)
        if no_lab:
            assert page.get_attribute(f'li[data-concept="{no_lab}"]',
                                      "data-state") == "no lab yet"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

        # A run records an attempt: the open page reloads by itself.
        store = workspace.store()
        store.record(_attempt("ph1.5", "passed", time.time()))
        store.close()
        page.wait_for_selector('li[data-concept="ph1.5"][data-state="done"]', timeout=15000)
        assert page.inner_text("#done-count").startswith("2 of ")

        # The README link leads to the lab's README.
        page.click('li[data-concept="ph2.5"] a')
        assert "Isolation" in page.inner_text("pre")

        # Phone width: nothing wider than the screen.
        phone = browser.new_page(viewport={"width": 375, "height": 800})
        phone.goto(board.url_of(server))
        assert phone.evaluate("document.documentElement.scrollWidth") <= 376
        phone.screenshot(path=str(SCREENSHOTS / "dashboard-phone.png"), full_page=True)
    finally:
        board.stop(server, page_server)


def test_cohort_page_in_chromium(browser: Any, tmp_path: Path) -> None:
    target = tmp_path / "cohort.html"
    target.write_text(cohort_page(_cohort()), encoding="utf-8")
    page = browser.new_page(viewport={"width": 900, "height": 600})
    page.goto(target.as_uri())
    rates = {cid: page.inner_text(f'#pass-rates td[data-concept="{cid}"]')
             for cid in ("ph2.5", "ph2.6", "ph1.5")}
    assert rates == {"ph2.5": "75%", "ph2.6": "50%", "ph1.5": "25%"}
    assert page.inner_text("#hardest") == "ph1.5"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "cohort.png"), full_page=True)


def test_store_revision_changes_with_each_attempt(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path / "p.db")
    first = store.revision()
    store.record(_attempt("ph2.5", "failed", time.time()))
    assert store.revision() != first
    store.close()


def test_stopping_while_pages_read_the_store_answers_or_refuses(workspace: Workspace,
                                                                catalog: Catalog) -> None:
    """The dashboard stopped while requests read its store: each request gets its answer, a
    503 or a closed connection, never a query on a closed store. It closed the store under
    requests still reading it, and sqlite crashed the whole process (SIGSEGV: a CI run's
    worker, and this test 3 runs of 3 before the fix)."""
    import http.client
    import threading

    seen: set[object] = set()
    for _ in range(20):
        dash = board.Dashboard(catalog, workspace)
        server = board.serve(dash)
        port = server.server_address[1]
        going = threading.Event()

        def reader(port: int, going: threading.Event) -> None:
            while not going.is_set():
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/state.json")
                    seen.add(conn.getresponse().status)
                    conn.close()
                except OSError as exc:
                    seen.add(type(exc).__name__)

        readers = [threading.Thread(target=reader, args=(port, going)) for _ in range(4)]
        for thread in readers:
            thread.start()
        time.sleep(0.05)
        board.stop(server, dash)
        going.set()
        for thread in readers:
            thread.join(10)
    assert seen <= {200, 503, "ConnectionRefusedError", "ConnectionResetError",
                    "RemoteDisconnected", "BrokenPipeError"}, seen
    assert 200 in seen
