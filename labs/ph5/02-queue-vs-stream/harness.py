"""Runs where the learner's code runs (in its process when grading): holds Python's cyclic
garbage collector while the test looks for AMQP connections the learner's code left open.

A pika.BlockingConnection that is never closed is part of reference cycles: it stays open
until a collection happens to free it, and a collection's moment depends on how much the
process allocated meanwhile (the test's own waiting on the management API, in-process). A
leaked connection then vanished before the broker listed it, now and then, and a
rabbit_enqueue that never closes its connection passed. Held, the connections the code
left open stay open until the test has looked."""

from __future__ import annotations

import gc


def hold_collection() -> bool:
    """Stop cyclic garbage collection; whether it was running (for release_collection)."""
    was = gc.isenabled()
    gc.disable()
    return was


def release_collection(was: bool) -> None:
    if was:
        gc.enable()
