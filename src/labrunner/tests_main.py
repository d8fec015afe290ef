"""``python -m labrunner.tests_main PYTEST_ARGS``: a lab's tests process as the runner starts it.

pytest's own main, then an end that skips tearing the interpreter down. The learner's code
runs inside this process and may keep clients of C libraries in module globals for the
life of the process (the ph5.1 reference keeps a librdkafka producer per cluster, as the
client is meant to be used). Freeing such a client while the interpreter finalizes runs
its destructor, and with it the library's callbacks into Python, when modules and
threads are half gone: a librdkafka producer whose proxy had gone away crashed the tests
process with SIGSEGV after its session had finished, once in a CI run, and a crash scores
the whole lab as failed. Everything the process still owes is done first (the threads it
must wait for, exit functions, its output); freeing the objects it leaves is the kernel's
job at exit.

The zygote's forks (``dev check``) end the same way; for them it also keeps pages shared.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def end_process(code: int) -> None:
    """What the interpreter does as it exits (non-daemon threads waited for, exit functions
    run, streams flushed), short of freeing every object."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main() -> None:
    import pytest

    end_process(int(pytest.main(sys.argv[1:])))


if __name__ == "__main__":
    main()
