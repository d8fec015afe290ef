"""Client-side service discovery on Redis. See README.md.

    python registry.py --redis URL --service NAME --id ID --address HOST:PORT
                       --ttl SECONDS --interval SECONDS
"""

from __future__ import annotations

import sys

import redis


def instance_key(service: str, instance_id: str) -> str:
    return f"services:{service}:{instance_id}"


class Registry:
    def __init__(self, redis_url: str) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)

    def register(self, service: str, instance_id: str, address: str, ttl: float) -> None:
        raise NotImplementedError("register(): the instance key, with a TTL")

    def heartbeat(self, service: str, instance_id: str, ttl: float,
                  healthy: bool = True) -> None:
        raise NotImplementedError("heartbeat(): renew the TTL, record the health")

    def deregister(self, service: str, instance_id: str) -> None:
        raise NotImplementedError("deregister()")

    def lookup(self, service: str) -> list[str]:
        raise NotImplementedError("lookup(): addresses of live, healthy instances")

    def close(self) -> None:
        self.r.close()


def main(argv: list[str] | None = None) -> int:
    # TODO: register, heartbeat every --interval, deregister and exit 0 on SIGTERM
    raise NotImplementedError("main()")


if __name__ == "__main__":
    sys.exit(main())
