"""A C10K echo server: hold 10,000 connections at once, at most two threads, small memory
per connection. Prints "listening on <port>", echoes lines until EOF. See README.md.

This version takes a thread per connection: simple, and it does not scale."""

from __future__ import annotations

import socketserver


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096


if __name__ == "__main__":
    with Server(("127.0.0.1", 0), Echo) as srv:
        print(f"listening on {srv.server_address[1]}", flush=True)
        srv.serve_forever()
