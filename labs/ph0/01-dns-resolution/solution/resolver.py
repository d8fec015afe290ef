"""An iterative DNS resolver with a TTL-honouring cache.

The resolver does what a recursive resolver (your ISP's, 1.1.1.1) does on your behalf:
it starts at a root server, follows referrals down the tree (root -> TLD -> the zone's
authoritative servers), chases CNAMEs, and caches every record set for exactly as long
as its TTL allows. dnslib is used only to encode and decode the wire format; the
sockets, the walk and the cache are ours.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord

MAX_REFERRALS = 16  # a walk deeper than this is a referral loop, not a real zone tree
MAX_CNAMES = 8      # the same guard for CNAME chains
# What the cache holds per name: its addresses, its alias, or a negative answer - NXDOMAIN
# (the name does not exist) or NODATA (it exists, without an A record). RFC 2308 section 5
# caches both negative answers alike, for min(SOA TTL, SOA MINIMUM).
KINDS = ("A", "CNAME", "NX", "NODATA")
# A server that answers with one of these failed, not the name: ask the zone's next
# server, as BIND and Unbound do (RFC 1034 5.3.3, RFC 1035 7.2: a server error or a lame
# delegation is not an answer). NXDOMAIN is an answer: every server of the zone holds the
# same data, and asking the others would only double the cost of every miss.
SERVER_FAILURES = {RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR}


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


@dataclass
class _Entry:
    expires: float          # clock() value at which the entry stops being valid
    values: list[str]       # addresses, a CNAME target, or nameserver addresses


def _inside(name: str, zone: str) -> bool:
    """Whether ``name`` is ``zone`` or below it (both fully qualified)."""
    return zone == "." or name == zone or name.endswith("." + zone)


def _norm(name: str) -> str:
    """Names are case-insensitive and compared fully qualified: 'API.x.test' -> 'api.x.test.'."""
    return name.lower().rstrip(".") + "."


def _bare(name: str) -> str:
    return name.rstrip(".")


class Resolver:
    """Iterative resolver: ``Resolver(["198.41.0.4"]).resolve("example.com")``.

    ``port`` is the UDP port every nameserver listens on (53 on the Internet; the lab's
    servers share another one). ``clock`` returns seconds; it is injected so that cache
    expiry can be tested without waiting.
    """

    def __init__(self, root_servers: Sequence[str], port: int = 53,
                 clock: Callable[[], float] = time.monotonic, timeout: float = 2.0) -> None:
        if not root_servers:
            raise ValueError("at least one root server address is needed")
        self.root_servers = list(root_servers)
        self.port = port
        self.clock = clock
        self.timeout = timeout
        # (name, "A" | "CNAME" | "NS" | "NX") -> entry. "NS" entries hold the nameserver
        # addresses of a delegated zone, so a later walk can skip the servers above it.
        self._cache: dict[tuple[str, str], _Entry] = {}

    # ---------------------------------------------------------------- public API

    def resolve(self, name: str) -> Answer:
        """The A records of ``name``, following CNAMEs, from the cache when still fresh."""
        asked = _norm(name)
        current = asked
        ttl = None  # the answer is only as fresh as the shortest-lived record in the chain
        for _ in range(MAX_CNAMES):
            walked = None
            if all(self._cached(current, kind) is None for kind in KINDS):
                walked = self._walk(current)
            for kind in KINDS:
                entry = self._cached(current, kind)
                if entry is None:
                    continue
                remaining = int(entry.expires - self.clock())
                ttl = remaining if ttl is None else min(ttl, remaining)
                if kind == "CNAME":
                    current = entry.values[0]
                    break
                return Answer(name=_bare(asked), addresses=list(entry.values),
                              canonical_name=_bare(current), ttl=ttl,
                              nxdomain=(kind == "NX"))
            else:
                # A negative answer without an SOA (or with TTL 0) is used once, not cached:
                # ttl 0, whatever the CNAMEs before it still have.
                return Answer(_bare(asked), [], _bare(current), 0, nxdomain=(walked == "NX"))
        raise ResolutionError(f"{name}: CNAME chain longer than {MAX_CNAMES}")

    # ---------------------------------------------------------------- the cache

    def _cached(self, name: str, kind: str) -> _Entry | None:
        entry = self._cache.get((name, kind))
        if entry is None:
            return None
        if self.clock() >= entry.expires:  # expired: forget it, the caller asks again
            del self._cache[(name, kind)]
            return None
        return entry

    def _store(self, name: str, kind: str, ttl: int, values: list[str]) -> None:
        if ttl > 0:  # TTL 0 means "use once, do not cache"
            self._cache[(name, kind)] = _Entry(self.clock() + ttl, values)

    def _closest_servers(self, name: str) -> tuple[str, list[str]]:
        """The deepest zone above ``name`` we hold a fresh delegation for, and its
        nameservers (the root's when we hold none)."""
        labels = name.rstrip(".").split(".")
        for i in range(len(labels)):
            zone = ".".join(labels[i:]) + "."
            entry = self._cached(zone, "NS")
            if entry is not None:
                return zone, entry.values
        return ".", self.root_servers

    # ---------------------------------------------------------------- the walk

    def _walk(self, name: str) -> str | None:
        """Follow referrals from the closest known servers until a server answers for
        ``name``; the answer (or the negative answer) lands in the cache. Returns "NX" or
        "NODATA" for a negative answer, None for records."""
        zone, servers = self._closest_servers(name)
        for _ in range(MAX_REFERRALS):
            reply = self._ask_any(servers, name)
            if reply.header.rcode == RCODE.NXDOMAIN:
                # The answer section may hold the CNAME chain the server followed: the
                # rcode is about the chain's last name, not about the alias asked (RFC 6604).
                last = self._store_answer(name, reply.rr, zone)
                self._store(last, "NX", self._negative_ttl(reply), [])
                return "NX"
            if reply.header.rcode != RCODE.NOERROR:
                raise ResolutionError(f"{name}: server answered {RCODE[reply.header.rcode]}")
            if reply.rr:
                self._store_answer(name, reply.rr, zone)
                return None
            referral = [rr for rr in reply.auth if rr.rtype == QTYPE.NS]
            if not referral:  # NODATA: the name exists without an A record
                self._store(name, "NODATA", self._negative_ttl(reply), [])
                return "NODATA"
            child = _norm(str(referral[0].rname))
            # A referral must lead further down, towards the name; anything else loops.
            if not (name.endswith("." + child) or name == child) or len(child) <= len(zone):
                raise ResolutionError(f"{name}: bad referral from zone {zone} to {child}")
            servers = self._nameserver_addresses(referral, reply.ar)
            self._store(child, "NS", min(rr.ttl for rr in referral), servers)
            zone = child
        raise ResolutionError(f"{name}: more than {MAX_REFERRALS} referrals")

    def _store_answer(self, name: str, answers: list[RR], zone: str, depth: int = 0) -> str:
        """Cache the records the answer section holds for ``name`` and the CNAME chain
        from it, as far as it stays inside ``zone`` (the zone of the server that answered);
        returns the chain's last name (``name`` itself when it is no alias)."""
        addresses = [rr for rr in answers if rr.rtype == QTYPE.A and _norm(str(rr.rname)) == name]
        if addresses:
            self._store(name, "A", min(rr.ttl for rr in addresses),
                        [str(rr.rdata) for rr in addresses])
            return name
        for rr in answers:
            if rr.rtype == QTYPE.CNAME and _norm(str(rr.rname)) == name and depth < MAX_CNAMES:
                self._store(name, "CNAME", rr.ttl, [_norm(str(rr.rdata.label))])
                target = _norm(str(rr.rdata.label))
                # A server speaks for its own zone only (bailiwick, RFC 2181 5.4.1): records
                # it adds for a target elsewhere may be forged (cache poisoning), so the
                # chain goes on from the target's own servers.
                if not _inside(target, zone):
                    return target
                return self._store_answer(target, answers, zone, depth + 1)
        return name

    def _nameserver_addresses(self, referral: list[RR], additional: list[RR]) -> list[str]:
        """The delegated servers' addresses: from glue when present, else resolved."""
        ns_names = {_norm(str(rr.rdata.label)) for rr in referral}
        glue = [str(rr.rdata) for rr in additional
                if rr.rtype == QTYPE.A and _norm(str(rr.rname)) in ns_names]
        if glue:
            return glue
        # Glueless delegation: the nameserver's own name lives elsewhere; resolve it.
        for ns in sorted(ns_names):
            found = self.resolve(ns).addresses
            if found:
                return found
        raise ResolutionError(f"no address for any of the nameservers {sorted(ns_names)}")

    @staticmethod
    def _negative_ttl(reply: DNSRecord) -> int:
        """RFC 2308: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
        for rr in reply.auth:
            if rr.rtype == QTYPE.SOA:
                return int(min(rr.ttl, rr.rdata.times[4]))
        return 0  # no SOA: do not cache the negative answer

    # ---------------------------------------------------------------- the wire

    def _ask_any(self, servers: list[str], name: str) -> DNSRecord:
        errors = []
        for server in servers:
            try:
                reply = self._ask(server, name)
            except (OSError, ResolutionError) as exc:  # try the zone's next server
                errors.append(f"{server}: {exc}")
                continue
            if reply.header.rcode in SERVER_FAILURES:  # that server is broken or lame
                errors.append(f"{server}: {RCODE[reply.header.rcode]}")
                continue
            return reply
        raise ResolutionError(f"{name}: no server answered ({'; '.join(errors)})")

    def _ask(self, server: str, name: str) -> DNSRecord:
        query = DNSRecord.question(name, "A")
        query.header.rd = 0  # iterative: "tell me what you know", not "go and find out"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.sendto(query.pack(), (server, self.port))
            while True:
                data, peer = sock.recvfrom(4096)
                # Only the reply counts: from the address and port we asked, with our id
                # and our question (RFC 5452). Anything else is stale or spoofed: drop it
                # and keep waiting, or a forged answer lands in the cache for its TTL.
                if peer[:2] != (server, self.port):
                    continue
                try:
                    reply = DNSRecord.parse(data)
                except DNSError:  # garbage on our port is not the reply either
                    continue
                if reply.header.id == query.header.id and reply.q == query.q:
                    return reply
