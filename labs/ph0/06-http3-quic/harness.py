"""Harness for ph0.6: what runs where the learner's code runs (a process of its own when
grading: learner.harness()), because the learner's coroutines need an event loop there:

* :class:`LearnerServer` runs the learner's ``start_server()`` on a loop in a thread, with
  the application the test asks for, and reports the UDP port;
* :func:`fetch` runs the learner's ``fetch()`` to its end on a loop of its own.

The test's own QUIC peers (its client and its server) stay on the test's side and make the
observations that decide: what was negotiated, what arrived as 0-RTT, in which order."""

from __future__ import annotations

import asyncio
import os
import threading
import traceback
from typing import Any


def _problem(what: str, exc: BaseException, seconds: float) -> str:
    if isinstance(exc, NotImplementedError):
        return f"{what} is not implemented yet: {exc}"
    if isinstance(exc, TimeoutError):
        return f"{what} did not finish within {seconds:.0f} s"
    return f"{what} raised {type(exc).__name__}: {exc}"


class LearnerServer:
    """The learner's HTTP/3 server on 127.0.0.1:<free port>, serving an application in
    which /slow waits until ``release()`` (or gives up after ``wait`` seconds with 504),
    /boom raises, /nothing answers 204 with an empty body and every other path answers
    ``200 b"<path> ok"``. ``problem`` says why the server could not start."""

    def __init__(self, h3: Any, certfile: str, keyfile: str, wait: float) -> None:
        self.h3 = h3
        self.wait = wait
        self.problem: str | None = None
        self.port = 0
        self._server: Any = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._fast_done = asyncio.Event()
        self.called: list[str] = []  # the paths handler() was called with, in order
        self.raised = False  # /boom's handler has raised
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(h3.start_server("127.0.0.1", 0, certfile=certfile,
                                                 keyfile=keyfile, handler=self.handler),
                                 wait), self.loop).result(wait + 1)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.problem = _problem("start_server()", exc, wait)
            return
        transport = getattr(self._server, "_transport", None)
        if transport is None:
            self.problem = "start_server() must return the QuicServer from aioquic's serve()"
            return
        self.port = int(transport.get_extra_info("sockname")[1])

    async def handler(self, path: str) -> tuple[int, bytes]:
        self.called.append(path)
        if path == "/slow":
            try:
                await asyncio.wait_for(self._fast_done.wait(), self.wait)
            except TimeoutError:
                return 504, b"gave up waiting for /fast"
            return 200, b"slow ok"
        if path == "/nothing":  # a response with no body at all
            return 204, b""
        if path == "/boom":
            self.raised = True
            raise RuntimeError("the application failed on purpose (ph0.6's /boom)")
        return 200, f"{path} ok".encode()

    def idle_after_failure(self, paths: list[str], seconds: float) -> bool:
        """Whether /boom's handler has raised, handler() has been called for every one of
        ``paths``, and the server's loop has been idle since (see called_once_idle):
        whatever the server does about the failure - answer 500, reset the stream, close
        the connection, or nothing - and about the other requests, it has done by then."""
        if not self.raised or not set(paths) <= set(self.called):
            return False
        called = self.called_once_idle(seconds)
        return called is not None and set(paths) <= set(called)

    def called_once_idle(self, seconds: float) -> list[str] | None:
        """The paths handler() has been called with, read on the server's loop once that
        loop has nothing left to run, now or within 0.1 s (each task waits for a datagram,
        a future or a later timer): what the server was going to do with what it has
        received, it has done by then. None when the loop was never idle within
        ``seconds``."""
        # asyncio has no public "is idle": BaseEventLoop's run queue and timers are private.
        # A loop without them (another implementation) gives no verdict.
        loop: Any = self.loop
        if not (hasattr(loop, "_ready") and hasattr(loop, "_scheduled")):
            return None
        seen: list[list[str]] = []
        settled = threading.Event()

        def look() -> None:
            if settled.is_set():
                return
            if loop._ready:  # something else is runnable: look again after it
                loop.call_soon(look)
                return
            now = loop.time()
            if any(not timer.cancelled() and timer.when() < now + 0.1
                   for timer in loop._scheduled):  # a timer due soon: after it
                loop.call_later(0.02, look)
                return
            seen.append(list(self.called))
            settled.set()

        loop.call_soon_threadsafe(look)
        settled.wait(seconds)
        settled.set()  # a look still going round stops
        return seen[0] if seen else None

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._fast_done.set)

    def close(self) -> None:
        if self._server is not None:
            self.loop.call_soon_threadsafe(self._server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.wait)


def _raised_in(exc: BaseException | None, learner_file: str) -> str | None:
    """'<exception> at h3.py line N (<code>)' when ``exc`` was raised in the learner's
    file (the innermost such frame), else None."""
    if exc is None:
        return None
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if os.path.abspath(frame.filename) == learner_file:
            return (f"{type(exc).__name__}: {str(exc)[:200]} at "
                    f"{os.path.basename(learner_file)} line {frame.lineno} "
                    f"({(frame.line or '').strip()[:80]})")
    return None


def _idle_until(loop: Any, until: float) -> bool:
    """Whether ``loop`` has nothing runnable but the caller and no timer due before
    ``until``: what it runs next, if anything, is a datagram's arrival. False when the loop
    keeps no such private lists (another implementation): no verdict then."""
    if not (hasattr(loop, "_ready") and hasattr(loop, "_scheduled")):
        return False
    if any(not handle.cancelled() for handle in loop._ready):
        return False
    return not any(not timer.cancelled() and timer.when() < until
                   for timer in loop._scheduled)


def fetch(h3: Any, port: int, paths: list[str], cafile: str, server_name: str,
          ticket: Any, seconds: float) -> tuple[str, Any]:
    """The learner's ``fetch()`` run to its end: ``("ok", FetchResult)``, or
    ``("not implemented" | "timed out" | "error", message)``.

    An exception the learner's code raises outside any task - in quic_event_received(),
    which aioquic calls from the loop's datagram callback - is only logged by asyncio, and
    the request it was handling would then never finish: such an exception ends the fetch
    at once, as an "error" naming it and its line, instead of at ``seconds``."""
    learner_file = os.path.abspath(str(getattr(h3, "__file__", "") or ""))
    raised: list[str] = []
    stuck: list[str] = []

    async def bounded() -> Any:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        deadline = loop.time() + seconds
        # The QUIC connections the learner's fetch() opens: aioquic's connect() makes each
        # one's protocol with this loop's create_datagram_endpoint (this loop's own method
        # wrapped, nothing global).
        protocols: list[Any] = []
        create = loop.create_datagram_endpoint

        async def recording(*args: Any, **kwargs: Any) -> Any:
            transport, protocol = await create(*args, **kwargs)
            protocols.append(protocol)
            return transport, protocol

        loop.create_datagram_endpoint = recording  # type: ignore[method-assign]

        async def watch() -> None:
            """Ends the fetch once it can never finish: every connection it opened has
            ended (aioquic delivered ConnectionTerminated) and the loop has nothing left
            to run before the deadline, yet fetch() still waits."""
            while True:
                await asyncio.sleep(0.05)
                if protocols and all(getattr(p, "_closed", None) is not None
                                     and p._closed.is_set() for p in protocols) \
                        and _idle_until(loop, deadline - 0.1) and main is not None:
                    stuck.append(f"fetch({list(paths)}) was still waiting after its "
                                 "connection had closed (ConnectionTerminated delivered), "
                                 "with nothing left to run: it would have waited until "
                                 f"the {seconds:.0f} s deadline, and for ever without it")
                    main.cancel()
                    return

        def unhandled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            where = _raised_in(context.get("exception"), learner_file)
            if where is not None and not raised and main is not None:
                raised.append(where)
                main.cancel()
            loop.default_exception_handler(context)

        loop.set_exception_handler(unhandled)
        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.wait_for(
                h3.fetch("127.0.0.1", port, list(paths), cafile=cafile,
                         server_name=server_name, session_ticket=ticket), seconds)
        finally:
            watcher.cancel()

    try:
        return "ok", asyncio.run(bounded())
    except asyncio.CancelledError:
        if stuck and not raised:
            return "timed out", stuck[0]
        if not raised:
            raise
        return "error", (f"fetch({list(paths)}) stopped: your client raised {raised[0]} "
                         "while handling a QUIC event (outside any task, so nothing "
                         "awaited it: asyncio only logged it, and the response it was "
                         "handling would never have finished)")
    except NotImplementedError as exc:
        return "not implemented", _problem(f"fetch({list(paths)})", exc, seconds)
    except TimeoutError as exc:
        return "timed out", _problem(f"fetch({list(paths)})", exc, seconds)
    except Exception as exc:  # noqa: BLE001 - refusing a server is an exception too
        return "error", _problem(f"fetch({list(paths)})", exc, seconds)
