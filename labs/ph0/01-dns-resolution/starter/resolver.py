"""An iterative DNS resolver with a TTL-honouring cache.

Fill in Resolver.resolve(): start at the root servers, follow referrals down to the
zone's authoritative server, chase CNAMEs, and cache what you learn for as long as each
record's TTL allows. Use dnslib only to build and parse messages (DNSRecord.question,
.pack(), DNSRecord.parse); the UDP socket, the walk and the cache are yours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    """The outcome of resolving one name."""

    name: str               # the name that was asked, without the trailing dot
    addresses: list[str]    # the IPv4 addresses of the final name ([] for NXDOMAIN)
    canonical_name: str     # the final name after following CNAMEs (== name if none)
    ttl: int                # seconds this answer may still be cached
    nxdomain: bool = False  # True when the name does not exist


class ResolutionError(Exception):
    """No server gave a usable reply (timeouts, loops, a broken delegation)."""


class Resolver:
    """Iterative resolver: ``Resolver(["198.41.0.4"]).resolve("example.com")``.

    ``port`` is the UDP port every nameserver listens on (53 on the Internet; the lab's
    servers share another one). ``clock`` returns seconds; use it, never time.time(),
    so that cache expiry can be tested without waiting.
    """

    def __init__(self, root_servers: Sequence[str], port: int = 53,
                 clock: Callable[[], float] = time.monotonic, timeout: float = 2.0) -> None:
        self.root_servers = list(root_servers)
        self.port = port
        self.clock = clock
        self.timeout = timeout

    def resolve(self, name: str) -> Answer:
        """The A records of ``name``, following CNAMEs, from the cache when still fresh."""
        # TODO 1: send a query (RD=0) to a root server; follow each referral (NS in the
        #         authority section, glue A records in the additional section) until a
        #         server answers.
        # TODO 2: an answer holding only a CNAME: resolve the target instead.
        # TODO 3: NXDOMAIN: return Answer(..., addresses=[], nxdomain=True).
        # TODO 4: cache answers, referrals and negative answers until clock() + ttl.
        # TODO 5: a server that times out or answers SERVFAIL/REFUSED/NOTIMP/FORMERR:
        #         ask the zone's next nameserver (README.md).
        raise NotImplementedError(
            "walk root → TLD → authoritative over UDP, following referrals, and cache "
            "each answer for its TTL")
