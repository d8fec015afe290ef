"""``python -m labrunner.learner host|factory FD``: a learner host, or the factory."""

from __future__ import annotations

import signal
import socket
import sys

from ..parent_death import die_with_parent
from .factory import serve_factory
from .host import serve_host


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("host", "factory") or not argv[1].isdigit():
        print("usage: python -m labrunner.learner host|factory FD", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    if argv[0] == "factory":
        serve_factory(sock)
    else:
        die_with_parent(signal.SIGKILL)
        serve_host(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
