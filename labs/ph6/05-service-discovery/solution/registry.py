"""Client-side service discovery on Redis: instances register with a TTL and keep it alive
with heartbeats; a crashed instance simply expires; a clean shutdown deregisters at once;
clients look up the live, healthy instances themselves.

    python registry.py --redis URL --service NAME --id ID --address HOST:PORT
                       --ttl SECONDS --interval SECONDS
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

import redis


def instance_key(service: str, instance_id: str) -> str:
    return f"services:{service}:{instance_id}"


def glob_literal(text: str) -> str:
    """``text`` as a Redis glob pattern matching itself only: a service named ``web*`` or
    ``w[ae]b`` must not match web's keys (a backslash makes the next character literal)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Registry:
    def __init__(self, redis_url: str) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self._addresses: dict[tuple[str, str], str] = {}

    def register(self, service: str, instance_id: str, address: str, ttl: float) -> None:
        self._addresses[(service, instance_id)] = address
        self._write(service, instance_id, address, ttl, healthy=True)

    def heartbeat(self, service: str, instance_id: str, ttl: float,
                  healthy: bool = True) -> None:
        address = self._addresses.get((service, instance_id))
        if address is None:
            raw = self.r.get(instance_key(service, instance_id))
            if raw is None:
                raise KeyError(f"{service}/{instance_id} is not registered")
            address = json.loads(raw)["address"]
        self._write(service, instance_id, address, ttl, healthy)

    def _write(self, service: str, instance_id: str, address: str, ttl: float,
               healthy: bool) -> None:
        doc = json.dumps({"address": address, "healthy": healthy})
        self.r.set(instance_key(service, instance_id), doc, px=int(ttl * 1000))

    def deregister(self, service: str, instance_id: str) -> None:
        self._addresses.pop((service, instance_id), None)
        self.r.delete(instance_key(service, instance_id))

    def lookup(self, service: str) -> list[str]:
        pattern = instance_key(glob_literal(service), "*")
        # The pattern also matches a longer name's keys (services:api:* holds api:v2's
        # services:api:v2:i2): an instance id has no colon, so the rest must have none.
        # A set: SCAN may return a key more than once (a resize during the iteration).
        start = len(instance_key(service, ""))
        keys = sorted({k for k in self.r.scan_iter(match=pattern, count=500)
                       if ":" not in k[start:]})
        found = []
        for raw in self.r.mget(keys) if keys else []:
            if raw is None:                  # expired between SCAN and MGET
                continue
            doc: dict[str, Any] = json.loads(raw)
            if doc.get("healthy"):
                found.append(doc["address"])
        return sorted(found)

    def close(self) -> None:
        self.r.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    for name in ("--redis", "--service", "--id", "--address"):
        parser.add_argument(name, required=True)
    parser.add_argument("--ttl", type=float, required=True)
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    registry = Registry(args.redis)
    registry.register(args.service, args.id, args.address, args.ttl)
    print(f"registered {args.service}/{args.id} at {args.address}", flush=True)
    while not stop.wait(args.interval):
        try:
            registry.heartbeat(args.service, args.id, args.ttl)
        except redis.RedisError as exc:  # a blip, a failover (READONLY), a restart: the next
            # heartbeat brings the key back; an agent that dies here drops a live instance
            print(f"heartbeat failed ({exc!r}); next in {args.interval} s", file=sys.stderr,
                  flush=True)
    registry.deregister(args.service, args.id)
    print(f"deregistered {args.service}/{args.id}", flush=True)
    registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
