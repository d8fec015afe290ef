"""The verification's load generator, one process per share of the clients (a process may
hold 20,000 open files here, so 10,000 connections plus the server's 10,000 cannot live in
one process). Driven over stdin/stdout by the test:

    python clients.py PORT N
      -> "connected N"             once all N connections are established (or "error ...")
      <- "go"                      each connection sends one line and reads its echo
      -> "echoed K"                once all N got their line back, or at "stop" (K so far)
      <- "stop"                    stop waiting for echoes (the test saw the server stuck)
      <- "close"                   close everything and exit

An echo is counted as soon as its bytes are read: while this process sleeps, every echo that
reached its sockets has been counted (the test relies on it to tell "not yet" from "never").
"""

from __future__ import annotations

import asyncio
import sys


async def main(port: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)  # connects in flight: a burst, not a SYN flood
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connect() -> None:
        async with gate:
            conns.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60))

    try:
        await asyncio.gather(*(connect() for _ in range(n)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        print(f"error connecting: {len(conns)} of {n} connected, then {exc!r}", flush=True)
        return
    print(f"connected {len(conns)}", flush=True)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.readline()  # go
    echoed = 0

    async def ping(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal echoed
        line = f"ping {i}\n".encode()
        writer.write(line)
        try:
            if await reader.readline() == line:
                echoed += 1
        except (ConnectionError, OSError, ValueError):
            pass   # reset, or not a line: not echoed

    pings = asyncio.ensure_future(asyncio.gather(*(ping(i, r, w)
                                                   for i, (r, w) in enumerate(conns))))
    command = asyncio.ensure_future(stdin.readline())
    await asyncio.wait({pings, command}, return_when=asyncio.FIRST_COMPLETED)
    pings.cancel()
    print(f"echoed {echoed}", flush=True)
    while (await command).strip() not in (b"close", b""):
        command = asyncio.ensure_future(stdin.readline())
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
