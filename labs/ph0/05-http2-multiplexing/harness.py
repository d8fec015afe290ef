"""Harness for ph0.5: the asyncio server the learner's HTTP/2 handler runs on, and the
application it serves. It runs where the learner's code runs (a process of its own when
grading: learner.harness()), because the learner's coroutine and the application's share
one event loop and its streams. The test's HTTP/2 client talks to it over TCP, from the
test's side."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any, cast

SETTLE_ROUNDS = 200  # event-loop rounds a correct server needs to act on bytes it has read
FRAME = 16_384  # the default SETTINGS_MAX_FRAME_SIZE: DATA frames are at most this long
# path -> (status, body length): no body at all, and a body of exactly two full frames.
ENDINGS = {"/no-content": (204, 0), "/empty": (200, 0), "/two-frames": (200, 2 * FRAME)}


class _CountingReader(asyncio.StreamReader):
    """The StreamReader handed to the learner, counting the bytes that reached it: the test
    knows when everything its client sent is in the learner's hands."""

    fed = 0
    ended = False  # EOF or a reset reached the reader

    def feed_data(self, data: Any) -> None:
        self.fed += len(data)
        super().feed_data(data)

    def feed_eof(self) -> None:
        self.ended = True
        super().feed_eof()

    def set_exception(self, exc: Exception) -> None:
        self.ended = True
        super().set_exception(exc)


class ServerThread:
    """asyncio.start_server on 127.0.0.1:0 in its own loop/thread; every connection is
    handed to the learner's handle_connection() with the application's handler."""

    def __init__(self, module: Any, big: int, headers: list[tuple[str, str]],
                 wait: float) -> None:
        self.module = module
        self.big = big
        self.headers = [tuple(h) for h in headers]
        self.wait = wait
        self.connections = 0
        self.finished = 0  # connections whose handle_connection() has returned
        self.errors: list[str] = []
        self.cancelled: list[str] = []  # paths whose handler was cancelled (stream reset)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.loop.set_exception_handler(self._unhandled)
        self.port: int = self._call(self._start())

    def _unhandled(self, loop: Any, context: dict[str, Any]) -> None:
        """A task of the learner's that died with an exception nobody awaited."""
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else context.get("message")
        self.errors.append(f"a task of your server failed with {what}")

    def cancelled_paths(self) -> list[str]:
        return list(self.cancelled)

    def problems(self) -> list[str]:
        """What went wrong where the learner's code runs (collected tasks included)."""
        gc.collect()  # a failed task is reported when it is collected
        return list(self.errors)

    def _call(self, coro: Any, wait: float = 0.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(wait or self.wait)

    async def _start(self) -> int:
        self.gate = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[_CountingReader] = []
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.StreamReaderProtocol:  # what start_server does, counting
            reader = _CountingReader(limit=2 ** 16, loop=loop)
            self.readers.append(reader)
            return asyncio.StreamReaderProtocol(reader, self._connection)

        self.server = await loop.create_server(protocol, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.module.handle_connection(reader, writer, self.handler)
        except NotImplementedError as exc:
            self.errors.append(f"handle_connection() is not implemented yet: {exc}")
        except Exception as exc:  # noqa: BLE001 - surfaced in the test's failure message
            self.errors.append(f"handle_connection() raised {type(exc).__name__}: {exc}")
        finally:
            self.finished += 1
            writer.close()

    async def handler(self, request: Any) -> Any:
        """The application the learner's server runs."""
        response = self.module.Response
        if request.path in ("/slow", "/held"):
            try:
                await asyncio.wait_for(self.gate.wait(), self.wait * 3)
            except asyncio.CancelledError:
                self.cancelled.append(request.path)
                raise
            return response(200, [("content-type", "text/plain")], b"slow done")
        if request.path == "/big":
            return response(200, [("content-type", "application/octet-stream")],
                            bytes(range(256)) * (self.big // 256) + b"x" * (self.big % 256))
        if request.path == "/boom":
            raise RuntimeError("the application failed on purpose (ph0.5's /boom)")
        if request.path in ENDINGS:  # bodies whose end is easy to miss
            status, size = ENDINGS[request.path]
            return response(status, [], b"f" * size)
        if request.path == "/note":  # the x-note header's value as the handler got it
            return response(200, [], ascii(request.headers.get("x-note")).encode())
        if request.path == "/fields":  # a field sent three times, as the handler got it
            return response(200, [], ascii(request.headers.get("x-tag")).encode())
        if request.path == "/names":  # the header names the handler got
            return response(200, [], ",".join(sorted(request.headers)).encode())
        if request.path == "/echo":
            return response(200, [("content-type", "application/octet-stream")],
                            request.body)
        return response(200, list(self.headers), f"{request.path} ok".encode())

    def settle(self, sent: int, ended: bool = False) -> dict[str, Any]:
        """Once the last connection's reader has got all ``sent`` bytes (and its EOF or
        reset, if ``ended``), let the event loop
        run up to SETTLE_ROUNDS rounds (no waiting on anything outside: a round is CPU, not
        time, so a loaded machine changes nothing) until /held's handler is cancelled and
        the connection closed. What was seen, for the test to judge."""
        return cast(dict[str, Any], self._call(self._settle(sent, ended), self.wait * 2))

    async def _settle(self, sent: int, ended: bool) -> dict[str, Any]:
        reader, writer = self.readers[-1], self.writers[-1]
        deadline = asyncio.get_running_loop().time() + self.wait
        while (reader.fed < sent or (ended and not reader.ended)) \
                and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.001)  # the bytes are still on their way in
        rounds = 0
        while rounds < SETTLE_ROUNDS and not ("/held" in self.cancelled
                                              and writer.is_closing()):
            await asyncio.sleep(0)
            rounds += 1
        return {"fed": reader.fed, "sent": sent, "rounds": rounds, "ended": reader.ended,
                "cancelled": "/held" in self.cancelled, "closing": writer.is_closing()}

    def release_slow(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.set)

    async def _stop(self) -> None:
        """Close the connections so the learner's loops see EOF and return by themselves;
        cancel only what is still running after that."""
        self.server.close()
        self.gate.set()
        for writer in self.writers:
            writer.close()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            _, pending = await asyncio.wait(others, timeout=0.5)
            for task in pending:
                task.cancel()

    def close(self) -> None:
        try:
            self._call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(self.wait)
