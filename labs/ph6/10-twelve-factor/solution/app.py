"""A twelve-factor web app: config from the environment (checked at start), backing services
attached by URL, state only in them, port binding from $PORT, logs as an event stream on
stdout, and a clean exit on SIGTERM.

    PORT=8080 DATABASE_URL=postgresql://... REDIS_URL=redis://... python app.py
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis
    from psycopg_pool import ConnectionPool

REQUIRED = ("PORT", "DATABASE_URL", "REDIS_URL")


def log(event: str, **fields: Any) -> None:
    """One JSON line per event on stdout; the platform collects and routes the stream."""
    line = json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "event": event, **fields})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_config(env: dict[str, str]) -> dict[str, Any]:
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise SystemExit(f"config error: missing environment variable(s) {', '.join(missing)}")
    try:
        port = int(env["PORT"])
    except ValueError:
        raise SystemExit(f"config error: PORT={env['PORT']!r} is not a port number") from None
    if not 0 < port < 65536:
        raise SystemExit(f"config error: PORT={port} is out of range")
    return {"port": port, "database_url": env["DATABASE_URL"], "redis_url": env["REDIS_URL"],
            "host": env.get("BIND_HOST", "127.0.0.1")}


def make_handler(pool: ConnectionPool, cache: redis.Redis) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass                                   # our own log line below

        def reply(self, status: int, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            log("request", method=self.command, path=self.path, status=status)

        def do_GET(self) -> None:
            if self.path == "/visits":
                self.reply(200, {"visits": int(cache.get("visits") or 0)})
            elif self.path == "/notes":
                with pool.connection() as conn:
                    rows = conn.execute("SELECT id, text FROM notes ORDER BY id").fetchall()
                self.reply(200, [{"id": i, "text": t} for i, t in rows])
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path == "/visits":
                self.reply(200, {"visits": int(cache.incr("visits"))})
            elif self.path == "/notes":
                length = int(self.headers.get("Content-Length") or 0)
                text = json.loads(self.rfile.read(length) or b"{}").get("text", "")
                with pool.connection() as conn:
                    (note_id,) = conn.execute("INSERT INTO notes (text) VALUES (%s) RETURNING id",
                                              (text,)).fetchone()
                self.reply(201, {"id": note_id, "text": text})
            else:
                self.reply(404, {"error": "not found"})

    return Handler


def main() -> int:
    config = load_config(dict(os.environ))
    # The drivers are imported only once the config is known good: fail fast means before
    # anything slow.
    import psycopg
    import redis
    from psycopg_pool import ConnectionPool

    with psycopg.connect(config["database_url"], autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id bigserial PRIMARY KEY, text text)")
    pool = ConnectionPool(config["database_url"], min_size=1, max_size=4, open=True)
    cache = redis.Redis.from_url(config["redis_url"])
    server = ThreadingHTTPServer((config["host"], config["port"]), make_handler(pool, cache))
    # Not daemons: server_close() waits for the requests in flight (a graceful stop lets
    # them finish; daemon threads would die with the process, mid-answer).
    server.daemon_threads = False

    def on_sigterm(signum: int, frame: Any) -> None:
        log("shutdown", signal="SIGTERM")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    log("listening", port=config["port"])
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    pool.close()
    cache.close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
