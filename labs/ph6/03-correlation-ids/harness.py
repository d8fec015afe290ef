"""Runs where the learner's RpcClient runs (in its process when grading): notes the threads
that die of an exception, so that a test waiting for a reply the client's listener should
hand over learns at once that the listener is gone (and of what, at which line of rpc.py),
instead of waiting out its deadline. The verdict stays the test's: a call that never returns
fails it either way; the note only says why, and sooner."""

from __future__ import annotations

import threading

from confluent_kafka import Consumer

from labrunner.thread_deaths import thread_deaths, unwatch_thread_deaths
from labrunner.thread_deaths import watch_thread_deaths as _watch

__all__ = ["kafka_consumers_open", "thread_deaths", "threads_alive", "unwatch_thread_deaths",
           "watch_thread_deaths"]


def watch_thread_deaths() -> None:
    """Note the client's threads that die from now on, with the line of rpc.py that raised."""
    _watch("rpc.py")


def threads_alive() -> list[tuple[int, str]]:
    """The Python threads of this process, as (ident, name): a client's listener among them.
    The learner host's own threads (labrunner's, serving the test's calls when grading) are
    left out: they come and go with the test's threads."""
    alive = []
    for thread in threading.enumerate():
        run = getattr(thread, "_target", None) or type(thread).run
        if not str(getattr(run, "__module__", "")).startswith(("labrunner.", "rpyc")):
            alive.append((thread.ident or 0, thread.name))
    return alive


def kafka_consumers_open(client: object) -> int:
    """How many confluent_kafka Consumers the client holds (its attributes, and what lists,
    tuples, sets and dicts among them hold) that are not closed: each one keeps librdkafka's
    threads and broker connections until close() (a closed one raises RuntimeError on any
    call). Ask it only when no thread polls them: a call into a consumer another thread is
    polling can wait on that poll."""
    held: dict[int, Consumer] = {}
    for value in getattr(client, "__dict__", {}).values():
        if isinstance(value, dict):
            inner = list(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            inner = list(value)
        else:
            inner = [value]
        held.update((id(obj), obj) for obj in inner if isinstance(obj, Consumer))
    still = 0
    for consumer in held.values():
        try:
            consumer.assignment()
        except RuntimeError:
            continue   # closed
        still += 1
    return still
