"""Services start together, each lab starts when its own services are ready, and a run's
services stay warm for its workspace: reference-counted, stopped after an idle deadline, and
nothing left after Ctrl-C (one or three) or ``services down``. Real processes throughout;
orders are read from events and /proc, never from wall-clock thresholds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labrunner.catalog import load_catalog
from labrunner.runner import LabResult
from labrunner.services import manager
from labrunner.services.base import Endpoint, ServiceError
from labrunner.services.local import LocalBackend
from labrunner.session import verify

from .conftest import FIXTURE_PROJECT, cli_env
from .test_cli import LABRUNNER, _processes_mentioning

# Generous bounds for conditions polled on a loaded machine: a pass never waits them out.
PATIENCE = 240.0


def _until(check: Callable[[], bool], what: str, patience: float = PATIENCE) -> None:
    deadline = time.monotonic() + patience
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="lr-cold-", dir="/tmp"))
    os.chmod(folder, 0o755)
    monkeypatch.setenv("LABRUNNER_RUNTIME_DIR", str(folder))
    yield folder
    subprocess.run([*LABRUNNER, "services", "down"], capture_output=True, timeout=300,
                   env=cli_env(LABRUNNER_RUNTIME_DIR=str(folder),
                               LABRUNNER_HOME=str(FIXTURE_PROJECT)))
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def _cli(runtime: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABRUNNER, *args], capture_output=True, text=True, timeout=600,
                          env=cli_env(LABRUNNER_RUNTIME_DIR=str(runtime),
                                      LABRUNNER_HOME=str(FIXTURE_PROJECT), **env))


def _lab_test(name: str) -> str:
    """A fixture lab's test file by its full path: other checkouts run the same labs."""
    return str(next(FIXTURE_PROJECT.glob(f"labs/*/*/{name}")))


def _ran(done: subprocess.CompletedProcess[str]) -> None:
    """The run verified its lab against its services (whether the fixture lab's 4 s test
    passes on a loaded machine is not what these tests are about)."""
    assert done.returncode in (0, 1), done.stdout + done.stderr
    assert "ph2.5" in done.stdout and "could not start" not in done.stdout, done.stdout


def _left(runtime: Path) -> list[str]:
    """Folders of runs and warm sets, and processes naming the runtime dir."""
    folders = [p.name for p in runtime.iterdir() if p.name.startswith(("run-", "warm-"))
               and p.is_dir()]
    return folders + _processes_mentioning(str(runtime))


class HeldBackend(LocalBackend):
    """The local backend, except that RabbitMQ and Kafka do not start until the test says
    so (and then fail): what a slow service looks like to the scheduler."""

    held = ("rabbitmq", "kafka")

    def __init__(self, release: threading.Event, tied_to_parent: bool = True) -> None:
        super().__init__(tied_to_parent)
        self.release = release

    def start(self, service: str, workdir: Path) -> Endpoint:
        if service in self.held:
            self.release.wait(PATIENCE)
            raise ServiceError(f"{service} held back by the test")
        return super().start(service, workdir)


def test_a_postgres_lab_does_not_wait_for_rabbitmq(runtime: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABRUNNER_HOME", str(FIXTURE_PROJECT))
    catalog = load_catalog(FIXTURE_PROJECT)
    # The RabbitMQ lab first: a run that went in order, or waited for every service, would
    # give no result before RabbitMQ is released.
    labs = [catalog.lab("ph5.1"), catalog.lab("ph2.5")]
    release = threading.Event()
    monkeypatch.setattr(manager, "make_backend",
                        lambda name, tied_to_parent=True: HeldBackend(release, tied_to_parent))
    events: list[str] = []

    def on_event(kind: str, name: str) -> None:
        events.append(f"{kind}:{name}")

    def on_result(result: LabResult) -> None:
        events.append(f"result:{result.lab.id}")
        release.set()  # only now may the held services go on (and fail)

    outcome = verify(labs, {lab.id: lab.solution_dir for lab in labs}, "local",
                     show_progress=False, on_result=on_result, on_event=on_event)
    by_lab = {r.lab.id: r for r in outcome.results}
    # Ran against its Postgres (its outcome is the lab's business: a loaded machine may time
    # its 4 s test out), not failed for want of a service.
    assert by_lab["ph2.5"].tests, by_lab["ph2.5"].message
    assert "could not start" not in by_lab["ph2.5"].message
    # Every service began starting before any lab result: they start together.
    first_result = events.index("result:ph2.5")
    assert {"start:postgres", "start:rabbitmq", "start:kafka"} <= set(events[:first_result]), \
        events
    assert events.index("ready:postgres") < first_result < events.index("failed:rabbitmq"), \
        f"the Postgres lab should finish while RabbitMQ is still starting; events: {events}"
    assert by_lab["ph5.1"].outcome == "error"
    assert "could not start" in by_lab["ph5.1"].message
    assert "held back by the test" in by_lab["ph5.1"].message
    assert _left(runtime) == []


def test_warm_set_is_the_workspaces_and_down_keeps_a_set_in_use(runtime: Path) -> None:
    keep = {"LABRUNNER_WARM_IDLE": "600"}
    env = cli_env(LABRUNNER_RUNTIME_DIR=str(runtime), LABRUNNER_HOME=str(FIXTURE_PROJECT),
                  **keep)
    proc = subprocess.Popen([*LABRUNNER, "run", "ph2.6", "--solutions", "--backend", "local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        # This run's verification (its pytest.ini is in this runtime folder), not another
        # test's run of ph2.6 at the same moment.
        _until(lambda: any(str(runtime) in p
                           for p in _processes_mentioning(_lab_test("test_deadlocks.py"))),
               "the ph2.6 verification runs")
        down = _cli(runtime, "services", "down")
        assert down.returncode == 0, down.stderr
        assert "stopped 0 service(s)" in down.stdout, down.stdout
        assert "kept" in down.stdout and f"pid {proc.pid}" in down.stdout, down.stdout
        out, _ = proc.communicate(timeout=PATIENCE)
        assert proc.returncode in (0, 1) and "ph2.6" in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    status = json.loads(_cli(runtime, "services", "status", "--json").stdout)
    rows = {r["service"]: r for r in status["services"]}
    assert set(rows) == {"postgres", "redis"}, rows
    assert all(r["alive"] and r["kind"] == "warm" and r["users"] == [] for r in rows.values())
    assert rows["postgres"]["owner"] == str(FIXTURE_PROJECT.resolve())
    assert rows["postgres"]["idle_deadline"] > time.time(), rows["postgres"]
    # The next run of the same owner reuses them: nothing starts.
    again = _cli(runtime, "run", "ph2.5", "--solutions", "--backend", "local", **keep)
    _ran(again)
    assert "starting" not in again.stderr, again.stderr
    # Another workspace gets a set of its own.
    workspace = runtime / "ws"
    assert _cli(runtime, "init", str(workspace)).returncode == 0
    other = _cli(runtime, "run", "ph2.5", "--workspace", str(workspace), "--backend", "local",
                 **keep)
    assert "starting postgres" in other.stderr, other.stderr
    owners = {r["owner"] for r in json.loads(
        _cli(runtime, "services", "status", "--json").stdout)["services"]}
    assert owners == {str(FIXTURE_PROJECT.resolve()), str(workspace.resolve())}, owners
    down = _cli(runtime, "services", "down")
    assert "stopped 3 service(s)" in down.stdout, down.stdout
    assert "kept" not in down.stdout and "cleared" not in down.stdout, down.stdout
    assert _left(runtime) == []


def test_idle_deadline_stops_the_warm_set_and_leaves_nothing(runtime: Path) -> None:
    run = _cli(runtime, "run", "ph2.5", "--solutions", "--backend", "local",
               LABRUNNER_WARM_IDLE="1")
    _ran(run)
    # The reaper (a detached process) stops the set once it has been idle a second.
    _until(lambda: _left(runtime) == [], "the idle warm set is gone")
    assert [p for p in runtime.iterdir() if p.name.startswith("warm-")] == []
    down = _cli(runtime, "services", "down")
    assert "stopped 0 service(s)" in down.stdout and "cleared" not in down.stdout, down.stdout


def test_no_keep_leaves_nothing_after_the_run(runtime: Path) -> None:
    run = _cli(runtime, "run", "ph2.5", "--solutions", "--backend", "local", "--no-keep",
               LABRUNNER_WARM_IDLE="600")
    _ran(run)
    assert _left(runtime) == []


def test_expired_set_whose_reaper_was_killed_goes_at_the_next_command(runtime: Path) -> None:
    run = _cli(runtime, "run", "ph2.5", "--solutions", "--backend", "local",
               LABRUNNER_WARM_IDLE="600")
    _ran(run)
    [folder] = [p for p in runtime.iterdir() if p.name.startswith("warm-") and p.is_dir()]
    reaper = int((folder / "reaper.pid").read_text())
    os.kill(reaper, signal.SIGKILL)
    _until(lambda: not Path(f"/proc/{reaper}").exists() or
           Path(f"/proc/{reaper}/stat").read_text().split(") ")[1][0] == "Z", "reaper gone")
    state = json.loads((folder / "state.json").read_text())
    state["warm"]["deadline"] = time.time() - 1   # as if the idle time had passed
    (folder / "state.json").write_text(json.dumps(state))
    status = _cli(runtime, "services", "status", "--json")
    assert json.loads(status.stdout)["services"] == []
    assert _left(runtime) == []


@pytest.mark.parametrize("presses", [1, 3])
def test_ctrl_c_during_start_leaves_nothing_and_no_false_report(runtime: Path,
                                                                presses: int) -> None:
    env = cli_env(LABRUNNER_RUNTIME_DIR=str(runtime), LABRUNNER_HOME=str(FIXTURE_PROJECT),
                  LABRUNNER_WARM_IDLE="600")
    proc = subprocess.Popen([*LABRUNNER, "run", "ph5.1", "--solutions", "--backend", "local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    # Mid-start: the RabbitMQ node (its script and epmd) and the Kafka JVM have been spawned
    # (their pid files are written), the lab's own pytest has not started.
    pid_files = ("kafka/kafka.pid", "rabbitmq/epmd.pid", "rabbitmq/server.pid")

    def spawned() -> list[int]:
        found = []
        for folder in runtime.glob("warm-*"):
            for name in pid_files:
                try:
                    found.append(int((folder / name).read_text()))
                except (OSError, ValueError):
                    pass
        return found

    _until(lambda: len(spawned()) == len(pid_files), "the services spawn")
    pids = spawned()
    assert not _processes_mentioning(_lab_test("test_why_events.py"))
    for _ in range(presses):
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, _ = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    # Nothing announced after the interrupt (no stale "starting ..." lines).
    after = out.split("interrupted", 1)[1]
    assert "starting" not in after and "ready in" not in after, out
    _until(lambda: _left(runtime) == [], "nothing of the run is left")
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"]
    assert alive == [], f"service processes left running: {alive}"
    down = _cli(runtime, "services", "down")
    assert down.stdout.strip() == "stopped 0 service(s)", down.stdout
