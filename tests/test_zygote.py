"""The pre-forked pytest (labrunner.zygote): a fork must be what ``python -m pytest`` started
the usual way would have been, end as it would, and leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labrunner import zygote

# A test that writes down what its process looks like from inside.
FACTS = '''
import json, os, sys, tempfile, threading

def test_facts():
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    facts = {
        "cwd": os.getcwd(), "path0": sys.path[0], "env": os.environ.get("ZYGOTE_PROBE"),
        "c_env": os.popen("echo $ZYGOTE_PROBE").read().strip(),
        "tmp": tempfile.gettempdir(), "bytecode": sys.dont_write_bytecode,
        "pycache_prefix": sys.pycache_prefix,
        "session_leader": os.getsid(0) == os.getpid(), "threads": threading.active_count(),
        "modules": sorted(m for m in sys.modules if m.startswith("labrunner.")),
        "stdout_fd": sys.stdout.fileno(), "stdin": os.readlink("/proc/self/fd/0"),
    }
    # The descriptor named in the environment is open at that number and is ours.
    given = int(os.environ["ZYGOTE_FD"])
    os.write(given, json.dumps(facts).encode())
    facts["fds"] = [fd for fd in fds if fd > 2 and fd != given]
    print("FACTS", json.dumps(facts))
'''


@pytest.fixture
def lab_folder(tmp_path: Path) -> Path:
    (tmp_path / "test_facts.py").write_text(FACTS)
    (tmp_path / "tmp").mkdir()
    return tmp_path


@pytest.fixture
def zygote_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(zygote.ENV_OFF, raising=False)


def _env(folder: Path, fd: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(ZYGOTE_PROBE="probe", ZYGOTE_FD=str(fd), TMPDIR=str(folder / "tmp"),
               PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    return env


def _facts(args: list[str], folder: Path, forked: bool, **settings: str
           ) -> tuple[dict[str, object], str, int]:
    r, w = os.pipe()
    env = {k: v for k, v in {**_env(folder, w), **settings}.items() if v}
    try:
        if forked:
            proc: zygote.ForkedProcess | subprocess.Popen[bytes] | None = zygote.start(
                args, folder, env, [w])
            assert proc is not None, "the zygote did not fork"
        else:
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=folder,
                                    env=env, pass_fds=[w], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
    finally:
        os.close(w)
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    code = proc.wait(timeout=60)
    with os.fdopen(r, "rb") as reader:
        written = reader.read()
    facts = json.loads(written) if written else {}
    return facts, output, code


ARGS = ["-q", "-s", "-p", "no:cacheprovider", "test_facts.py"]


def test_a_fork_is_what_a_new_pytest_process_would_be(lab_folder: Path, zygote_on: None) -> None:
    spawned, out_spawned, code_spawned = _facts(ARGS, lab_folder, forked=False)
    forked, out_forked, code_forked = _facts(ARGS, lab_folder, forked=True)
    assert code_spawned == code_forked == 0, out_forked
    # The same descriptors (pytest's own, and the one given) at the same numbers: nothing
    # of the zygote's (its control socket, its other forks' status sockets) leaks in.
    fds = [json.loads(out.split("FACTS ", 1)[1].splitlines()[0])["fds"]
           for out in (out_spawned, out_forked)]
    assert fds[1] == fds[0], f"descriptors: forked {fds[1]}, spawned {fds[0]}"
    for key in ("cwd", "path0", "env", "c_env", "tmp", "bytecode", "session_leader",
                "threads", "stdout_fd", "stdin"):
        assert forked[key] == spawned[key], (key, forked[key], spawned[key])
    # labrunner's own modules are imported afresh in each fork, never inherited.
    assert forked["modules"] == spawned["modules"]
    assert "1 passed" in out_forked


def test_a_fork_writes_bytecode_where_its_environment_says(lab_folder: Path,
                                                          zygote_on: None) -> None:
    """dev check's tests processes share a bytecode cache (PYTHONPYCACHEPREFIX, bytecode
    written): a fork takes both from the environment it is given, as a new interpreter
    would, and pytest's rewrite of the tests lands there instead of beside them."""
    for forked in (False, True):
        cache = lab_folder / f"pycache-{forked}"
        facts, out, code = _facts(ARGS, lab_folder, forked, PYTHONDONTWRITEBYTECODE="",
                                  PYTHONPYCACHEPREFIX=str(cache))
        assert code == 0, out
        assert facts["bytecode"] is False and facts["pycache_prefix"] == str(cache), facts
        assert list(cache.rglob("test_facts.*pytest*.pyc")), sorted(cache.rglob("*"))
        assert not (lab_folder / "__pycache__").exists()


def test_exit_codes_are_the_processes_own(lab_folder: Path, zygote_on: None) -> None:
    (lab_folder / "test_fails.py").write_text("def test_no():\n    assert False\n")
    (lab_folder / "test_killed.py").write_text(
        "import os, signal\n\ndef test_die():\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    for name, expected in (("test_fails.py", 1), ("test_killed.py", -signal.SIGKILL)):
        r, w = os.pipe()
        proc = zygote.start(["-q", "-p", "no:cacheprovider", name], lab_folder,
                            _env(lab_folder, w), [w])
        os.close(w)
        os.close(r)
        assert proc is not None and proc.stdout is not None
        proc.stdout.read()
        assert proc.wait(timeout=60) == expected, name
        assert proc.poll() == expected


def test_a_wait_times_out_like_popen(lab_folder: Path, zygote_on: None) -> None:
    (lab_folder / "test_slow.py").write_text("import time\n\ndef test_s():\n    time.sleep(30)\n")
    proc = zygote.start(["-q", "-p", "no:cacheprovider", "test_slow.py"], lab_folder,
                        _env(lab_folder, 2), [])
    assert proc is not None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)   # its own process group, as the runner kills it
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_an_interpreter_setting_it_cannot_take_is_not_forked(lab_folder: Path,
                                                             zygote_on: None) -> None:
    env = _env(lab_folder, 2)
    env["PYTHONPATH"] = "/elsewhere"
    assert zygote.start(ARGS, lab_folder, env, []) is None


def test_the_zygote_and_its_forks_end_with_the_process_that_started_them(
        lab_folder: Path) -> None:
    (lab_folder / "test_slow.py").write_text("import time\n\ndef test_s():\n    time.sleep(60)\n")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from labrunner import zygote\n"
        "folder = Path(sys.argv[1])\n"
        "os.environ.pop('LABRUNNER_NO_ZYGOTE', None)\n"
        "env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD='1')\n"
        "proc = zygote.start(['-q', '-p', 'no:cacheprovider', 'test_slow.py'], folder, env, [])\n"
        "print(zygote._zygote.proc.pid, proc.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", script, str(lab_folder)], capture_output=True,
                          text=True, timeout=60)
    zygote_pid, fork_pid = (int(p) for p in done.stdout.split())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_alive(zygote_pid) or _alive(fork_pid)):
        time.sleep(0.1)
    assert not _alive(zygote_pid), "the zygote outlived the process that started it"
    assert not _alive(fork_pid), "a fork outlived the zygote"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
