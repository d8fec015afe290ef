"""TLS endpoints made in the process their context lives in (the learner's own, when grading)."""

from __future__ import annotations

import socket
import threading
from typing import Any

from .beside import _beside


class TlsOnce:
    """A loopback TLS server for one connection: it accepts with ``ctx``, reads one message
    and answers ``b"pong:" + message``. ``error`` says how the handshake or exchange failed
    on the server's side (None: it completed)."""

    def __init__(self, ctx: Any, timeout: float) -> None:
        self._ctx = ctx
        self._timeout = timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(timeout)
        self.port: int = self._listener.getsockname()[1]
        self.error: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import ssl

        try:
            conn, _ = self._listener.accept()
            conn.settimeout(self._timeout)
            with self._ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"pong:" + tls.recv(1024))
        except (OSError, ssl.SSLError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def wait(self) -> str | None:
        """Wait for the connection to end; the server's error, if any."""
        self._thread.join(self._timeout)
        return self.error

    def close(self) -> None:
        self.wait()
        self._listener.close()


def serve_tls_once(ctx: Any, timeout: float = 5.0) -> TlsOnce:
    """A :class:`TlsOnce` server with ``ctx``, started in the process ``ctx`` lives in (the
    learner's own when grading), so the context's handshake runs with its own sockets."""
    return _beside(ctx, TlsOnce, timeout)  # type: ignore[no-any-return]


def _tls_exchange_here(ctx: Any, port: int, server_hostname: str, message: bytes,
                       timeout: float) -> dict[str, Any]:
    import ssl

    seen: dict[str, Any] = {"version": None, "cipher": None, "error": None, "reply": b""}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                suite = tls.cipher()
                seen["version"], seen["cipher"] = tls.version(), suite[0] if suite else None
                tls.sendall(message)
                seen["reply"] = tls.recv(1024)
        except (OSError, ssl.SSLError) as exc:
            seen["error"] = f"{type(exc).__name__}: {exc}"
    return seen


def tls_exchange(ctx: Any, port: int, server_hostname: str, message: bytes = b"ping",
                 timeout: float = 5.0) -> dict[str, Any]:
    """Connect to 127.0.0.1:``port`` with the client context ``ctx`` (in the process it
    lives in), send ``message``, read the reply. Returns plain data: ``version`` and
    ``cipher`` negotiated (None if the handshake failed), ``error``, ``reply``."""
    return _beside(ctx, _tls_exchange_here, port, server_hostname, message,  # type: ignore[no-any-return]
                   timeout)
