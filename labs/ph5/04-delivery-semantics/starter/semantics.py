"""A consume-transform-produce worker in three delivery modes (see README.md).

Run as a program:
    python semantics.py at-least-once --bootstrap B --input IN --output OUT --group G
                        [--crash-after N]

Given: crash_point(), transform() and main(). Yours: run() (and any helpers you like).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

MODES = ("at-most-once", "at-least-once", "exactly-once")


# --- given by the lab: keep these as they are ------------------------------------------

def crash_point(processed: int, crash_after: int | None) -> None:
    """The lab's crash hook: at the ``crash_after``-th record, announce it and die at once with
    SIGKILL - no cleanup, no commit, and nothing the client library still holds in memory is
    sent (no flush, no background delivery): like a power cut. The test then looks at what
    the broker holds. Call it between your two steps for every record."""
    if crash_after is not None and processed == crash_after:
        print(f"CRASH-POINT {processed}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def transform(value: bytes) -> bytes:
    return b"processed:" + value


# --- yours -------------------------------------------------------------------------------

def run(mode: str, bootstrap: str, input_topic: str, output_topic: str, group: str,
        crash_after: int | None = None, ack_timeout: float = 30.0) -> int:
    """Process partition 0 of ``input_topic`` from the group's committed offset to its end,
    writing transform(value) to ``output_topic`` with the same key; return how many records
    this run processed. ``mode`` decides the order of "produce" and "commit". An output the
    broker has not acknowledged within ``ack_timeout`` seconds is not processed: raise, never
    commit its input."""
    raise NotImplementedError(
        f"run({mode!r}): consume partition 0 of the input, produce transform(value) to the "
        "output, commit the offset - in the order the mode requires, with crash_point() "
        "between the two steps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="delivery semantics worker")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    count = run(args.mode, args.bootstrap, args.input, args.output, args.group,
                args.crash_after, args.ack_timeout)
    print(f"processed {count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
