"""The verification's load generator, one process per share of the clients (a process may
hold 20,000 open files here, so 10,000 connections plus the server's 10,000 cannot live in
one process). Driven over stdin/stdout by the test:

    python clients.py PORT N EARLY
      -> "connected EARLY"         the first EARLY connections are established
      <- "go"                      every connection sends one line and reads its echo
      -> "echoed K"                once all got their line back, or at "stop" (K so far)
      <- "stop"                    stop waiting for echoes (the test saw the server stuck)
      <- "more"                    connect the rest, up to N
      -> "connected N"             (or "error ..." when a connection fails)
      <- "go" ... as above
      <- "cycle K"                 K short-lived connections (200 at a time): each connects,
                                   sends a line, reads its echo and closes
      -> "cycled E"                E of them got their echo (or "error ..." on a failure)
      <- "close"                   close everything and exit

An echo is counted as soon as its bytes are read: while this process sleeps, every echo that
reached its sockets has been counted (the test relies on it to tell "not yet" from "never").
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any


async def main(port: int, n: int, early: int) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)  # connects in flight: a burst, not a SYN flood
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connect_one() -> None:
        async with gate:
            conns.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60))

    async def connect(upto: int) -> bool:
        try:
            await asyncio.gather(*(connect_one() for _ in range(upto - len(conns))))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            print(f"error connecting: {len(conns)} of {upto} connected, then {exc!r}",
                  flush=True)
            return False
        print(f"connected {len(conns)}", flush=True)
        return True

    async def short_lived(i: int) -> bool:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 60)
            line = f"short {i}\n".encode()
            writer.write(line)
            try:
                return await asyncio.wait_for(reader.readline(), 60) == line
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

    async def cycle(k: int) -> None:
        try:
            echoed = sum(await asyncio.gather(*(short_lived(i) for i in range(k))))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            print(f"error in a short-lived connection: {exc!r}", flush=True)
            return
        print(f"cycled {echoed}", flush=True)

    if not await connect(early):
        return
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    rounds = 0
    while True:
        word = (await stdin.readline()).strip()
        if word in (b"close", b""):
            break
        if word == b"more" and not await connect(n):
            return
        if word.startswith(b"cycle "):
            await cycle(int(word.split()[1]))
            continue
        if word != b"go":
            continue   # "stop" after the round had ended by itself
        rounds += 1
        echoed = 0

        async def ping(line: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
            nonlocal echoed
            writer.write(line)
            try:
                if await reader.readline() == line:
                    echoed += 1
            except (ConnectionError, OSError, ValueError):
                pass   # reset, or not a line: not echoed

        # Any: waited on in one set with the stdin read (a set of two result types)
        pings: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(
            *(ping(f"ping {rounds} {i}\n".encode(), r, w) for i, (r, w) in enumerate(conns))))
        command = asyncio.ensure_future(stdin.readline())
        await asyncio.wait({pings, command}, return_when=asyncio.FIRST_COMPLETED)
        pings.cancel()
        print(f"echoed {echoed}", flush=True)
        if not command.done():
            command.cancel()   # and let it end: one reader of stdin at a time
            with contextlib.suppress(asyncio.CancelledError):
                await command
        elif command.result().strip() in (b"close", b""):
            break
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
