"""The verification's load generator, one process per share of the clients (a process may
hold 20,000 open files here, so 10,000 connections plus the server's 10,000 cannot live in
one process). Driven over stdin/stdout by the test:

    python clients.py PORT N
      -> "connected N"             once all N connections are established (or "error ...")
      <- "go"                      each connection sends one line and reads its echo
      -> "echoed K"                K connections got their line back
      <- "close"                   close everything and exit
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

    async def ping(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        line = f"ping {i}\n".encode()
        writer.write(line)
        try:
            return await asyncio.wait_for(reader.readline(), 60) == line
        except (TimeoutError, ConnectionError):
            return False

    oks = await asyncio.gather(*(ping(i, r, w) for i, (r, w) in enumerate(conns)))
    print(f"echoed {sum(oks)}", flush=True)
    await stdin.readline()  # close
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
