"""A strangler-fig gateway: paths move one prefix at a time from the legacy system to the new
service, switched at run time; everything else still goes to the legacy system.
See README.md."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class Gateway:
    def __init__(self, legacy_url: str, new_url: str) -> None:
        self.upstreams = {"legacy": legacy_url, "new": new_url}

    def route_to_new(self, prefix: str) -> None:
        raise NotImplementedError("route_to_new(): send this prefix to the new service")

    def route_to_legacy(self, prefix: str) -> None:
        raise NotImplementedError("route_to_legacy(): send this prefix (back) to legacy")

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        # TODO: pick the upstream by the longest matching prefix and forward the request
        start_response("501 Not Implemented", [("Content-Type", "text/plain")])
        return [b"the gateway forwards nothing yet"]
