"""The reaper of one warm set: ``python -m labrunner.services.reaper WARM_FOLDER``.

Started detached by the run that keeps services warm (see :mod:`labrunner.services.warm`);
sleeps until the set's idle deadline, waits while a live run uses the set, then stops every
service in it, removes its folder and exits. It also exits when the set is gone (``services
down``) or pinned (``services up``). It never outlives the deadline by more than a poll.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL = 1.0  # seconds between looks while a run uses the set


def reap(folder: Path) -> None:
    from .warm import WarmSet

    warm = WarmSet(folder)
    while True:
        if not warm.state_file.is_file() or warm.pinned():
            return
        deadline = warm.deadline()
        if deadline is None:
            return  # nothing to wait for: the set is not on a clock
        now = time.time()
        if deadline is not None and now < deadline:
            time.sleep(min(deadline - now, 60.0))
            continue
        with warm.locked():
            if not warm.state_file.is_file() or warm.pinned():
                return
            if warm.expired():
                warm.stop_all(kill_reaper=False)
                return
        time.sleep(POLL)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is not for us
    folder = Path(sys.argv[1])
    try:
        reap(folder)
    finally:
        pid_file = folder / "reaper.pid"
        try:
            if pid_file.read_text(encoding="ascii").strip() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass


if __name__ == "__main__":
    main()
