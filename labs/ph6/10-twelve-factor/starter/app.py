"""A twelve-factor web app. See README.md.

    PORT=8080 DATABASE_URL=postgresql://... REDIS_URL=redis://... python app.py
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VISITS = 0   # TODO: state belongs in a backing service, not in the process


class Handler(BaseHTTPRequestHandler):
    def reply(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.reply(200, {"visits": VISITS})

    def do_POST(self) -> None:
        global VISITS
        VISITS += 1
        self.reply(200, {"visits": VISITS})


def main() -> int:
    # TODO: config from the environment (fail fast), Postgres and Redis by URL, $PORT,
    # logs on stdout, SIGTERM
    server = ThreadingHTTPServer(("127.0.0.1", 8000), Handler)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
