"""Verification for ph0.1: an iterative resolver with a TTL cache, against three real DNS
servers (root, TLD, authoritative) that this test starts on loopback UDP.

Real DNS puts every nameserver on port 53 and a referral's glue carries only an IP
address, so the three servers share one port and each has its own loopback address
(127.53.N.1-3; all of 127.0.0.0/8 is loopback on Linux). Beside them sit a nameserver
that never answers (.5) and two that answer every query with an error rcode (.6, .7),
each named in a delegation of its own. Each server logs every query it receives: the
walk order and the cache behaviour are read from those logs, never from the resolver's own
account.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dnslib import CNAME, NS, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord
from dnslib.server import DNSLogger, DNSServer

# ---------------------------------------------------------------------------- the zones

API_TTL = 300        # api.shop.test A
CNAME_TTL = 600      # www.shop.test CNAME edge.cdn.test
EDGE_TTL = 120       # edge.cdn.test A (two addresses)
NEGATIVE_TTL = 60    # SOA minimum of shop.test: how long NXDOMAIN may be cached
SHORT_CNAME_TTL = 30  # short.shop.test CNAME edge.cdn.test: the chain's shortest record
CDN_SOA_TTL = 30     # cdn.test's SOA record lives less than its MINIMUM field (60):
                     # its NXDOMAIN may be cached min(30, 60) = 30 s (RFC 2308)
# CNAMEs into negative answers: the answer may not outlive any record it came through
# (RFC 2308 section 5 for the negative part; the chain's rule for the CNAMEs)
GONE_CNAME_TTL = 25   # gone.shop.test CNAME nope.cdn.test (NXDOMAIN, 30 s): 25 s in all
NOTES_CNAME_TTL = 25  # notes.shop.test CNAME info.cdn.test (NODATA, 30 s): 25 s in all
OLD_CNAME_TTL = 300   # old.shop.test CNAME nope.shop.test (NXDOMAIN, 60 s): 60 s in all
TLD_NS_TTL = 172800  # the root's referral to test.
ZONE_NS_TTL = 86400  # the TLD's referrals to shop.test., cdn.test. and backup.test.
FLAKY_ADDRESS = "192.0.2.40"  # www.flaky.test A, from flaky.test.'s second nameserver
# moved.test.'s server follows CNAMEs inside its zone, as BIND, NSD and Knot do (RFC 1034
# 4.3.2): an alias of a name that does not exist gets one reply, rcode NXDOMAIN with the
# chain in its answer section - the rcode is about the chain's last name (RFC 6604).
MOVED_CNAME_TTL = 40  # www.moved.test CNAME old.moved.test (no such name): 40 s in all
# hosted.test. is delegated to ns1.shop.test., a nameserver named in another zone: the
# TLD's referral carries no glue for it (out of the zone's bailiwick), as with any zone
# hosted by a DNS provider. Its address is a lookup of its own.
GLUELESS_NS = "ns1.shop.test."
HOSTED_ADDRESS = "192.0.2.50"  # www.hosted.test A
# spoof.test.'s server answers www.spoof.test (CNAME edge.cdn.test) and adds A records of
# its own for edge.cdn.test and api.shop.test: names of zones it does not serve.
PLANTED_ADDRESS = "203.0.113.66"
# pool.cdn.test has three A records whose TTLs differ, the shortest in the middle: an RRset
# ought to share one TTL, and one that does not is treated as if every record had the
# lowest (RFC 2181 section 5.2).
POOL = [("192.0.2.60", 90), ("192.0.2.61", 45), ("192.0.2.62", 120)]


@dataclass
class Zone:
    """The data one server is authoritative for, plus the child zones it delegates."""

    origin: str
    records: list[RR]
    delegations: dict[str, tuple[list[RR], list[RR]]] = field(default_factory=dict)
    soa_ttl: int = 3600  # the SOA record's own TTL (its MINIMUM field is NEGATIVE_TTL)
    follows_cnames: bool = False  # answer an alias with its whole in-zone chain
    plants: list[RR] = field(default_factory=list)  # added to an alias's answer: forgeries

    @property
    def soa(self) -> RR:
        return RR(self.origin, QTYPE.SOA, ttl=self.soa_ttl, rdata=SOA(
            "ns1." + self.origin, "hostmaster." + self.origin,
            (1, 3600, 600, 86400, NEGATIVE_TTL)))


@dataclass
class QueryLog:
    """Every query any of the three servers received, in arrival order."""

    entries: list[tuple[str, str, bool]] = field(default_factory=list)  # (server, qname, rd)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, server: str, qname: str, rd: bool) -> None:
        with self.lock:
            self.entries.append((server, qname, rd))

    def servers(self) -> list[str]:
        with self.lock:
            return [server for server, _, _ in self.entries]

    def names_asked(self, server: str) -> list[str]:
        with self.lock:
            return [name.rstrip(".") for who, name, _ in self.entries if who == server]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


class ZoneServer:
    """dnslib resolver plug-in: answers like an authoritative server (no recursion)."""

    def __init__(self, label: str, zones: list[Zone], log: QueryLog) -> None:
        self.label = label
        self.zones = zones
        self.log = log
        # Called with (request, handler) before the reply goes out: a test sends stray
        # datagrams to the resolver's port there, so they arrive ahead of the reply.
        self.before_reply: Callable[[DNSRecord, Any], None] | None = None

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname = DNSLabel(str(request.q.qname).lower())
        self.log.add(self.label, str(qname), bool(request.header.rd))
        if self.before_reply is not None:
            self.before_reply(request, handler)
        reply = request.reply()
        reply.header.ra = 0  # we never recurse, whatever the client asks for
        zone = self._zone_for(qname)
        if zone is None:
            reply.header.rcode = RCODE.REFUSED
            return reply
        for child, (ns_rrs, glue) in zone.delegations.items():
            if qname.matchSuffix(child):  # referral: "ask the child zone's servers"
                reply.header.aa = 0
                for rr in ns_rrs:
                    reply.add_auth(rr)
                for rr in glue:
                    reply.add_ar(rr)
                return reply
        reply.header.aa = 1
        seen = set()
        while True:
            owned = [rr for rr in zone.records if rr.rname == qname]
            exact = [rr for rr in owned if rr.rtype == request.q.qtype]
            cnames = [rr for rr in owned if rr.rtype == QTYPE.CNAME]
            for rr in exact or cnames:  # a CNAME to another zone is returned alone
                reply.add_answer(rr)
            seen.add(qname)
            if exact or not cnames:
                break
            target = cnames[0].rdata.label
            if not (zone.follows_cnames and target.matchSuffix(zone.origin)) or target in seen:
                for rr in zone.plants:  # records for other zones' names: not its to give
                    reply.add_answer(rr)
                return reply
            qname = target  # RFC 1034 4.3.2 step 3a: go on with the alias's target
        if not exact:  # NODATA when the name exists, NXDOMAIN when it does not (RFC 6604:
            if not owned:  # about the last name of the chain)
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(zone.soa)
        return reply

    def _zone_for(self, qname: DNSLabel) -> Zone | None:
        matching = [z for z in self.zones if qname.matchSuffix(z.origin) or z.origin == "."]
        return max(matching, key=lambda z: len(z.origin.strip(".")), default=None)


class ErrorServer:
    """A nameserver that is broken or lame: it answers every query with ``rcode`` (SERVFAIL
    when the test says nothing else). With NXDOMAIN it says so as an authoritative server
    of flaky.test. would, its SOA in the authority section (unless ``soa`` is False)."""

    def __init__(self, label: str, log: QueryLog) -> None:
        self.label = label
        self.log = log
        self.rcode = RCODE.SERVFAIL
        self.soa = True

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        self.log.add(self.label, str(request.q.qname).lower(), bool(request.header.rd))
        reply = request.reply()
        reply.header.ra = 0
        reply.header.rcode = self.rcode
        if self.rcode == RCODE.NXDOMAIN:
            reply.header.aa = 1
            if self.soa:
                reply.add_auth(Zone("flaky.test.", []).soa)
        return reply


@dataclass
class Hierarchy:
    """The running servers: ``root``, ``tld``, ``auth`` addresses, a shared ``port``."""

    root: str
    tld: str
    auth: str
    port: int
    log: QueryLog
    servers: dict[str, ZoneServer]  # by label: "root", "tld", "auth"
    silent: str  # backup.test's first nameserver: bound on the shared port, never answers
    failing: dict[str, ErrorServer]  # "bad1", "bad2": answer every query with their rcode


def _zones(tld_ip: str, auth_ip: str, silent_ip: str,
           bad_ips: tuple[str, str]) -> dict[str, list[Zone]]:
    def delegation(zone: str, ns: str, ip: str, ttl: int) -> tuple[list[RR], list[RR]]:
        return ([RR(zone, QTYPE.NS, ttl=ttl, rdata=NS(ns))],
                [RR(ns, QTYPE.A, ttl=ttl, rdata=A(ip))])

    # backup.test. has two nameservers; the first one listed never answers (down, or its
    # replies lost): a resolver must go on to the second.
    backup = ([RR("backup.test.", QTYPE.NS, ttl=ZONE_NS_TTL, rdata=NS(ns))
               for ns in ("ns1.backup.test.", "ns2.backup.test.")],
              [RR("ns1.backup.test.", QTYPE.A, ttl=ZONE_NS_TTL, rdata=A(silent_ip)),
               RR("ns2.backup.test.", QTYPE.A, ttl=ZONE_NS_TTL, rdata=A(auth_ip))])
    # flaky.test.'s first nameserver answers with an error rcode (the test sets which) and
    # its second is the real one; both of dead.test.'s nameservers answer with errors.
    def two_servers(zone: str, first: str, second: str) -> tuple[list[RR], list[RR]]:
        return ([RR(zone, QTYPE.NS, ttl=ZONE_NS_TTL, rdata=NS(f"ns{n}.{zone}")) for n in (1, 2)],
                [RR(f"ns{n}.{zone}", QTYPE.A, ttl=ZONE_NS_TTL, rdata=A(ip))
                 for n, ip in ((1, first), (2, second))])

    root = Zone(".", [], {"test.": delegation("test.", "a.nic.test.", tld_ip, TLD_NS_TTL)})
    tld = Zone("test.", [], {
        "shop.test.": delegation("shop.test.", "ns1.shop.test.", auth_ip, ZONE_NS_TTL),
        "cdn.test.": delegation("cdn.test.", "ns1.cdn.test.", auth_ip, ZONE_NS_TTL),
        "backup.test.": backup,
        "flaky.test.": two_servers("flaky.test.", bad_ips[0], auth_ip),
        "dead.test.": two_servers("dead.test.", *bad_ips),
        "moved.test.": delegation("moved.test.", "ns1.moved.test.", auth_ip, ZONE_NS_TTL),
        "spoof.test.": delegation("spoof.test.", "ns1.spoof.test.", auth_ip, ZONE_NS_TTL),
        "hosted.test.": ([RR("hosted.test.", QTYPE.NS, ttl=ZONE_NS_TTL, rdata=NS(GLUELESS_NS))],
                         []),  # no glue: ns1.shop.test. is shop.test.'s to give
    })
    shop = Zone("shop.test.", [
        RR("api.shop.test.", QTYPE.A, ttl=API_TTL, rdata=A("192.0.2.10")),
        RR("www.shop.test.", QTYPE.CNAME, ttl=CNAME_TTL, rdata=CNAME("edge.cdn.test.")),
        RR("ns1.shop.test.", QTYPE.A, ttl=86400, rdata=A(auth_ip)),
        RR("loop.shop.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("round.shop.test.")),
        RR("round.shop.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("loop.shop.test.")),
        RR("short.shop.test.", QTYPE.CNAME, ttl=SHORT_CNAME_TTL,
           rdata=CNAME("edge.cdn.test.")),
        # Names that exist without an A record: an A query gets NODATA (NOERROR, no
        # answer, the SOA in authority), never NXDOMAIN.
        RR("mail.shop.test.", QTYPE.TXT, ttl=300, rdata=TXT("v=spf1 -all")),
        RR("mx.shop.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("mail.shop.test.")),
        # Aliases of names that do not exist, or exist without an A record.
        RR("gone.shop.test.", QTYPE.CNAME, ttl=GONE_CNAME_TTL, rdata=CNAME("nope.cdn.test.")),
        RR("notes.shop.test.", QTYPE.CNAME, ttl=NOTES_CNAME_TTL,
           rdata=CNAME("info.cdn.test.")),
        RR("old.shop.test.", QTYPE.CNAME, ttl=OLD_CNAME_TTL, rdata=CNAME("nope.shop.test.")),
    ])
    cdn = Zone("cdn.test.", [
        RR("edge.cdn.test.", QTYPE.A, ttl=EDGE_TTL, rdata=A("192.0.2.20")),
        RR("edge.cdn.test.", QTYPE.A, ttl=EDGE_TTL, rdata=A("192.0.2.21")),
        RR("info.cdn.test.", QTYPE.TXT, ttl=300, rdata=TXT("no address here")),  # NODATA
        *[RR("pool.cdn.test.", QTYPE.A, ttl=ttl, rdata=A(ip)) for ip, ttl in POOL],
    ], soa_ttl=CDN_SOA_TTL)
    backup_zone = Zone("backup.test.", [
        RR("www.backup.test.", QTYPE.A, ttl=300, rdata=A("192.0.2.30")),
    ])
    flaky_zone = Zone("flaky.test.", [
        RR("www.flaky.test.", QTYPE.A, ttl=300, rdata=A(FLAKY_ADDRESS)),
    ])
    moved = Zone("moved.test.", [
        RR("www.moved.test.", QTYPE.CNAME, ttl=MOVED_CNAME_TTL, rdata=CNAME("old.moved.test.")),
        RR("app.moved.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("www.moved.test.")),
    ], follows_cnames=True)
    spoof = Zone("spoof.test.", [
        RR("www.spoof.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("edge.cdn.test.")),
        RR("mirror.spoof.test.", QTYPE.CNAME, ttl=300, rdata=CNAME("edge.cdn.test.")),
    ], plants=[RR("edge.cdn.test.", QTYPE.A, ttl=86400, rdata=A(PLANTED_ADDRESS)),
               RR("api.shop.test.", QTYPE.A, ttl=86400, rdata=A(PLANTED_ADDRESS))])
    hosted = Zone("hosted.test.", [
        RR("www.hosted.test.", QTYPE.A, ttl=300, rdata=A(HOSTED_ADDRESS)),
    ])
    return {"root": [root], "tld": [tld],
            "auth": [shop, cdn, backup_zone, flaky_zone, moved, hosted, spoof]}


@pytest.fixture
def dns() -> Iterator[Hierarchy]:
    """Start root, TLD and authoritative servers on 127.53.N.1-3, one shared UDP port."""
    quiet = DNSLogger(logf=lambda _msg: None)
    log = QueryLog()
    for _attempt in range(20):
        block = random.randint(1, 254)  # a random /24 so parallel runs do not collide
        ips = {"root": f"127.53.{block}.1", "tld": f"127.53.{block}.2",
               "auth": f"127.53.{block}.3"}
        silent_ip = f"127.53.{block}.5"
        bad_ips = {"bad1": f"127.53.{block}.6", "bad2": f"127.53.{block}.7"}
        zones = _zones(ips["tld"], ips["auth"], silent_ip, (bad_ips["bad1"], bad_ips["bad2"]))
        servers: list[DNSServer] = []
        plugins = {label: ZoneServer(label, zones[label], log) for label in zones}
        failing = {label: ErrorServer(label, log) for label in bad_ips}
        # A nameserver that is down: its port is bound (so nothing else answers there and
        # no ICMP error comes back), and nothing ever reads or replies.
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            port = 0
            for label in ("root", "tld", "auth"):
                server = DNSServer(plugins[label], address=ips[label],
                                   port=port, logger=quiet)
                port = server.server.server_address[1]  # the root's port, shared by all
                servers.append(server)
            for label, ip in bad_ips.items():
                servers.append(DNSServer(failing[label], address=ip, port=port, logger=quiet))
            silent.bind((silent_ip, port))
        except OSError:  # that port is taken on one of the addresses: try another block
            for server in servers:
                server.server.server_close()
            silent.close()
            continue
        for server in servers:
            # dnslib's start_thread() polls for shutdown every 0.5 s; poll faster so the
            # teardown does not dominate the run time.
            threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.02},
                             daemon=True).start()
        yield Hierarchy(ips["root"], ips["tld"], ips["auth"], port, log, plugins, silent_ip,
                        failing)
        for server in servers:
            server.server.shutdown()
            server.server.server_close()
        silent.close()
        return
    pytest.fail("could not bind three loopback DNS servers on one port", pytrace=False)


class FakeClock:
    """The resolver's injected clock: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(learner: Any, dns: Hierarchy, clock: FakeClock) -> Any:
    cls = learner.load("resolver").Resolver
    return cls([dns.root], port=dns.port, clock=clock, timeout=2.0)


def _bare(name: str) -> str:
    return str(name).lower().rstrip(".")


def _resolve(resolver: Any, dns: Hierarchy, name: str) -> Any:
    try:
        return resolver.resolve(name)
    except NotImplementedError as exc:
        problem = f"resolve() is not implemented yet: {exc}"
    except Exception as exc:  # noqa: BLE001 - report the learner's error with the walk
        problem = (f"resolve({name!r}) raised {type(exc).__name__}: {exc}\n"
                   f"Servers asked so far: {_walk(dns.log)}.")
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback


def _walk(log: QueryLog) -> str:
    return " → ".join(log.servers()) or "no server at all"


def _expect_addresses(answer: Any, want: list[str], name: str) -> None:
    got = sorted(getattr(answer, "addresses", None) or [])
    assert got == sorted(want), (
        f"resolving {name} gave {got}, expected {sorted(want)}\n"
        "The answer must hold the A records the authoritative server returned.")


def _expect_no_queries(log: QueryLog, what: str) -> None:
    count = len(log.servers())
    assert count == 0, (
        f"{what} sent {count} quer{'y' if count == 1 else 'ies'} ({_walk(log)}), "
        "expected none\n"
        "A record set cached with TTL t must be served from the cache for t seconds, "
        "without asking any server.")


# ---------------------------------------------------------------------------- the tests


def test_walks_root_tld_authoritative(resolver: Any, dns: Hierarchy) -> None:
    answer = _resolve(resolver, dns, "api.shop.test")
    walk = dns.log.servers()
    assert walk == ["root", "tld", "auth"], (
        f"the servers were asked in the order {_walk(dns.log)}, expected root → tld → auth\n"
        "A referral (NS records in the authority section, their addresses as glue in the "
        "additional section) means: ask those servers next, until one answers.")
    _expect_addresses(answer, ["192.0.2.10"], "api.shop.test")
    assert _bare(answer.canonical_name) == "api.shop.test", (
        f"canonical_name is {answer.canonical_name!r}, expected 'api.shop.test' "
        "(no CNAME on the way, so the final name is the name asked)")
    assert answer.ttl == API_TTL and not answer.nxdomain, (
        f"a fresh answer has ttl={answer.ttl}, nxdomain={answer.nxdomain}; expected "
        f"ttl={API_TTL} (the record's TTL) and nxdomain=False")


def test_queries_are_iterative(resolver: Any, dns: Hierarchy) -> None:
    _resolve(resolver, dns, "api.shop.test")
    recursive = [server for server, _, rd in dns.log.entries if rd]
    assert not recursive, (
        f"queries to {', '.join(recursive)} had the RD (recursion desired) flag set\n"
        "An iterative resolver does the walk itself and asks each server only what it "
        "knows: set query.header.rd = 0 (DNSRecord.question() sets it to 1).")


def test_cached_repeat_sends_no_query(resolver: Any, dns: Hierarchy,
                                      clock: FakeClock) -> None:
    _expect_addresses(_resolve(resolver, dns, "api.shop.test"), ["192.0.2.10"], "api.shop.test")
    dns.log.clear()
    clock.advance(100)
    answer = _resolve(resolver, dns, "api.shop.test")
    _expect_no_queries(dns.log, "resolving api.shop.test again 100 s later")
    _expect_addresses(answer, ["192.0.2.10"], "api.shop.test (from the cache)")
    assert answer.ttl == API_TTL - 100, (
        f"the cached answer says ttl={answer.ttl}, expected {API_TTL - 100}\n"
        "A cache hands out the remaining lifetime (expiry - now), not the original TTL: "
        "otherwise downstream caches would keep the record longer than its owner allows.")


def test_requeries_after_ttl(resolver: Any, dns: Hierarchy, clock: FakeClock) -> None:
    _expect_addresses(_resolve(resolver, dns, "api.shop.test"), ["192.0.2.10"], "api.shop.test")
    dns.log.clear()
    clock.advance(API_TTL - 1)
    _resolve(resolver, dns, "api.shop.test")
    _expect_no_queries(dns.log, f"resolving again {API_TTL - 1} s later (TTL {API_TTL})")
    clock.advance(1)  # exactly the TTL: the record has 0 s left, it may not be served
    _resolve(resolver, dns, "api.shop.test")
    at_expiry = "api.shop.test" in dns.log.names_asked("auth")
    clock.advance(1)
    answer = _resolve(resolver, dns, "api.shop.test")
    asked = dns.log.names_asked("auth")
    assert at_expiry or "api.shop.test" not in asked, (
        f"exactly {API_TTL} s after the first lookup (TTL {API_TTL}) the cached record was "
        f"still served, with 0 s left; only at {API_TTL + 1} s was the server asked again\n"
        "Off by one at the expiry: a record cached at t with TTL T is valid while "
        "clock() < t + T; at clock() == t + T it has expired (a TTL of 0 means 'do not "
        "reuse'). Compare with >=, not >.")
    assert "api.shop.test" in asked, (
        f"{API_TTL + 1} s after the first lookup (TTL {API_TTL}) the authoritative server "
        f"was not asked again (queries: {_walk(dns.log)})\n"
        "Once clock() passes the expiry the cached record is stale and must be fetched "
        "again: a cache that ignores the TTL serves outdated addresses forever.")
    _expect_addresses(answer, ["192.0.2.10"], "api.shop.test after expiry")


def test_records_for_names_outside_the_answering_zone_are_not_believed(
        resolver: Any, dns: Hierarchy) -> None:
    """spoof.test.'s server answers www.spoof.test with its CNAME to edge.cdn.test, and adds
    A records of its own for edge.cdn.test and api.shop.test. It speaks for spoof.test only
    (its bailiwick): a resolver that takes its word for other zones' names is poisoned, for
    as long as the forged TTL says, for every client (RFC 2181 5.4.1; Kaminsky, 2008)."""
    why = ("A server is believed for names of the zone it was asked as, and nothing else: "
           "a record the answer section holds for a name outside that zone (past a CNAME "
           "that leaves it, or any other name) may be forged - it is how a DNS cache is "
           "poisoned. Follow a CNAME that leaves the zone by asking the target's own "
           "servers (from the root or the closest delegation you hold), and cache only "
           "records inside the zone of the server that answered.")
    answer = _resolve(resolver, dns, "www.spoof.test")
    got = sorted(getattr(answer, "addresses", None) or [])
    assert got == ["192.0.2.20", "192.0.2.21"], (
        f"resolving www.spoof.test gave {got}, expected edge.cdn.test's own addresses "
        f"['192.0.2.20', '192.0.2.21']{' - the forged one' if PLANTED_ADDRESS in got else ''}"
        f": spoof.test.'s server answered 'CNAME edge.cdn.test' and added 'edge.cdn.test A "
        f"{PLANTED_ADDRESS}', a name of cdn.test, which it does not serve\n{why}")
    for name, want in (("edge.cdn.test", ["192.0.2.20", "192.0.2.21"]),
                       ("api.shop.test", ["192.0.2.10"])):
        later = sorted(getattr(_resolve(resolver, dns, name), "addresses", None) or [])
        assert later == want, (
            f"after resolving www.spoof.test, resolving {name} gave {later}, expected {want}"
            f": spoof.test.'s server had added '{name} A {PLANTED_ADDRESS}' to its answer, "
            f"and the cache kept it\n{why}")
    # spoof.test.'s delegation is cached now: a walk that starts at its servers is as much
    # inside spoof.test. as one that came down from the root.
    mirror = sorted(getattr(_resolve(resolver, dns, "mirror.spoof.test"), "addresses", None)
                    or [])
    assert mirror == ["192.0.2.20", "192.0.2.21"], (
        f"resolving mirror.spoof.test (CNAME edge.cdn.test) once spoof.test.'s delegation "
        f"was cached gave {mirror}, expected edge.cdn.test's own addresses: a walk that "
        "starts at a cached delegation's servers took their answer as the root's, which "
        f"speaks for every name - the zone asked is the delegation's\n{why}")


def test_follows_cname_to_another_zone(resolver: Any, dns: Hierarchy) -> None:
    answer = _resolve(resolver, dns, "www.shop.test")
    _expect_addresses(answer, ["192.0.2.20", "192.0.2.21"], "www.shop.test")
    assert "edge.cdn.test" in dns.log.names_asked("auth"), (
        "the CNAME target edge.cdn.test was never asked for\n"
        "www.shop.test answers only 'CNAME edge.cdn.test': resolution restarts with the "
        "target name (its zone cdn.test is delegated by the TLD).")
    assert _bare(answer.canonical_name) == "edge.cdn.test", (
        f"canonical_name is {answer.canonical_name!r}, expected 'edge.cdn.test' "
        "(the name at the end of the CNAME chain)")
    assert answer.ttl == min(CNAME_TTL, EDGE_TTL), (
        f"ttl is {answer.ttl}, expected {min(CNAME_TTL, EDGE_TTL)}: the CNAME lives "
        f"{CNAME_TTL} s and the A records {EDGE_TTL} s, and an answer built from both is "
        "only valid as long as the shorter one")


def test_chain_ttl_is_its_shortest_record(resolver: Any, dns: Hierarchy,
                                          clock: FakeClock) -> None:
    """Here the CNAME is the short-lived record: an answer that reports its final A
    record's TTL alone (or the first record's) says it lives longer than its alias."""
    answer = _resolve(resolver, dns, "short.shop.test")
    _expect_addresses(answer, ["192.0.2.20", "192.0.2.21"], "short.shop.test")
    expected = min(SHORT_CNAME_TTL, EDGE_TTL)
    seen = ("the TTL of the final A records alone" if answer.ttl == EDGE_TTL else
            "the TTL of the first record alone" if answer.ttl == SHORT_CNAME_TTL else
            "neither record's TTL")
    assert answer.ttl == expected, (
        f"short.shop.test (CNAME, TTL {SHORT_CNAME_TTL}) -> edge.cdn.test (A, TTL {EDGE_TTL}) "
        f"was answered with ttl={answer.ttl} ({seen}), expected {expected}\n"
        "An answer built from a CNAME chain is only valid as long as its shortest-lived "
        "record: take the minimum of the remaining TTLs of every link.")
    dns.log.clear()
    clock.advance(SHORT_CNAME_TTL + 1)
    _resolve(resolver, dns, "short.shop.test")
    assert "short.shop.test" in dns.log.names_asked("auth"), (
        f"{SHORT_CNAME_TTL + 1} s later (the CNAME's TTL) short.shop.test was answered from the "
        f"cache without asking for the CNAME again (queries: {_walk(dns.log)})\n"
        "The alias expired: cache each record of the chain with its own TTL.")


def test_nxdomain_is_reported_and_cached(resolver: Any, dns: Hierarchy,
                                         clock: FakeClock) -> None:
    answer = _resolve(resolver, dns, "nope.shop.test")
    assert answer.nxdomain and not answer.addresses, (
        f"nope.shop.test gave nxdomain={answer.nxdomain}, addresses={answer.addresses}; "
        "expected nxdomain=True and no addresses\n"
        "The authoritative server answered NXDOMAIN (rcode 3): the name does not exist.")
    assert dns.log.servers() == ["root", "tld", "auth"], (
        f"the NXDOMAIN walk went {_walk(dns.log)}, expected root → tld → auth: only the "
        "zone's authoritative server can say a name does not exist")
    dns.log.clear()
    clock.advance(NEGATIVE_TTL - 1)
    again = _resolve(resolver, dns, "nope.shop.test")
    _expect_no_queries(dns.log, f"asking for nope.shop.test again {NEGATIVE_TTL - 1} s later")
    assert again.nxdomain, "the cached negative answer must still say nxdomain=True"
    clock.advance(2)
    _resolve(resolver, dns, "nope.shop.test")
    assert "nope.shop.test" in dns.log.names_asked("auth"), (
        f"{NEGATIVE_TTL + 1} s after the NXDOMAIN the name was not asked again\n"
        f"A negative answer is cached for min(SOA TTL, SOA minimum) = {NEGATIVE_TTL} s "
        "(RFC 2308), then it expires like any record.")


def test_negative_ttl_is_the_smaller_of_soa_ttl_and_minimum(
        resolver: Any, dns: Hierarchy, clock: FakeClock) -> None:
    """cdn.test's SOA record has TTL 30 and MINIMUM 60: the NXDOMAIN lives 30 s."""
    answer = _resolve(resolver, dns, "nope.cdn.test")
    assert answer.nxdomain, f"nope.cdn.test gave nxdomain={answer.nxdomain}, expected True"
    dns.log.clear()
    clock.advance(CDN_SOA_TTL - 1)
    _resolve(resolver, dns, "nope.cdn.test")
    _expect_no_queries(dns.log, f"asking for nope.cdn.test again {CDN_SOA_TTL - 1} s later")
    clock.advance(2)
    _resolve(resolver, dns, "nope.cdn.test")
    assert "nope.cdn.test" in dns.log.names_asked("auth"), (
        f"the NXDOMAIN for nope.cdn.test was still served from the cache {CDN_SOA_TTL + 1} s "
        f"later; its SOA record has TTL {CDN_SOA_TTL} and MINIMUM {NEGATIVE_TTL}\n"
        f"A negative answer lives min(SOA TTL, SOA MINIMUM) = {CDN_SOA_TTL} s (RFC 2308 "
        "section 5): the MINIMUM field alone caches it longer than the SOA record itself "
        "may be kept.")


@dataclass(frozen=True)
class NegativeTtlCase:
    """A negative answer and the ttl it must report: min(SOA TTL, SOA MINIMUM) of the SOA
    in its authority section when fresh - and, reached through CNAMEs, no more than any of
    them - the seconds left once it comes from the cache; once that ttl has passed the
    authoritative server is asked for ``asked_again``, the record that expired."""

    name: str
    nxdomain: bool
    ttl: int
    soa: str  # the SOA it came with (and the CNAME it came through), as the message says it
    asked_again: str
    chain: bool = False  # reached through a CNAME


NEGATIVE_TTLS = [
    NegativeTtlCase("nope.shop.test", True, NEGATIVE_TTL,
                    f"shop.test.'s SOA: TTL 3600, MINIMUM {NEGATIVE_TTL}", "nope.shop.test"),
    NegativeTtlCase("nope.cdn.test", True, CDN_SOA_TTL,
                    f"cdn.test.'s SOA: TTL {CDN_SOA_TTL}, MINIMUM {NEGATIVE_TTL}",
                    "nope.cdn.test"),
    NegativeTtlCase("mail.shop.test", False, NEGATIVE_TTL,
                    f"shop.test.'s SOA: TTL 3600, MINIMUM {NEGATIVE_TTL}", "mail.shop.test"),
    NegativeTtlCase("info.cdn.test", False, CDN_SOA_TTL,
                    f"cdn.test.'s SOA: TTL {CDN_SOA_TTL}, MINIMUM {NEGATIVE_TTL}",
                    "info.cdn.test"),
    # Through a CNAME: the alias is the shorter-lived record ...
    NegativeTtlCase("gone.shop.test", True, GONE_CNAME_TTL,
                    f"a CNAME with TTL {GONE_CNAME_TTL} to nope.cdn.test, whose NXDOMAIN "
                    f"lives min({CDN_SOA_TTL}, {NEGATIVE_TTL}) = {CDN_SOA_TTL} s",
                    "gone.shop.test", chain=True),
    NegativeTtlCase("notes.shop.test", False, NOTES_CNAME_TTL,
                    f"a CNAME with TTL {NOTES_CNAME_TTL} to info.cdn.test, whose NODATA "
                    f"lives min({CDN_SOA_TTL}, {NEGATIVE_TTL}) = {CDN_SOA_TTL} s",
                    "notes.shop.test", chain=True),
    # ... or the negative answer is
    NegativeTtlCase("old.shop.test", True, NEGATIVE_TTL,
                    f"a CNAME with TTL {OLD_CNAME_TTL} to nope.shop.test, whose NXDOMAIN "
                    f"lives min(3600, {NEGATIVE_TTL}) = {NEGATIVE_TTL} s",
                    "nope.shop.test", chain=True),
]
NEGATIVE_TTL_LATER = 20  # seconds between the two lookups: inside every case's ttl


@pytest.mark.parametrize("case", NEGATIVE_TTLS, ids=lambda c: c.name)
def test_a_negative_answer_reports_its_remaining_ttl(
        resolver: Any, dns: Hierarchy, clock: FakeClock, case: NegativeTtlCase) -> None:
    """Answer.ttl is how long whoever holds the answer may keep it; for NXDOMAIN and NODATA
    that is the negative TTL (RFC 2308 section 5), counting down like any record's, and no
    longer than a CNAME the answer came through lives (nothing in an answer may outlive a
    record it was built from: the alias may point elsewhere once it expired)."""
    kind = "NXDOMAIN" if case.nxdomain else "NODATA"
    through = (", and reached through a CNAME no longer than the CNAME: the answer lives as "
               "long as its shortest-lived record, positive or negative" if case.chain else "")
    rule = (f"A negative answer may be cached for min(SOA TTL, SOA MINIMUM) "
            f"(RFC 2308 section 5){through}, here {case.ttl} s; Answer.ttl says how long it "
            "may still be kept: "
            f"{case.ttl} fresh, the seconds left (expiry - now) from the cache. A ttl of 0 "
            "tells whoever holds the answer (a stub's cache, an HTTP client) to ask again "
            "every time; a ttl too long or that does not count down lets them keep it past "
            "its expiry.")
    answer = _resolve(resolver, dns, case.name)
    assert bool(answer.nxdomain) == case.nxdomain and not answer.addresses, (
        f"{case.name} gave nxdomain={answer.nxdomain}, addresses={answer.addresses}; "
        f"expected {kind} (nxdomain={case.nxdomain}, no addresses)")
    assert answer.ttl == case.ttl, (
        f"{case.name} is {kind} ({case.soa}) and its answer reported ttl={answer.ttl}, "
        f"expected {case.ttl}\n{rule}")
    dns.log.clear()
    clock.advance(NEGATIVE_TTL_LATER)
    again = _resolve(resolver, dns, case.name)
    _expect_no_queries(dns.log, f"asking for {case.name} again {NEGATIVE_TTL_LATER} s later")
    left = case.ttl - NEGATIVE_TTL_LATER
    assert again.ttl == left, (
        f"{case.name} ({kind}, {case.soa}) came from the cache {NEGATIVE_TTL_LATER} s later "
        f"with ttl={again.ttl}, expected {left} (the seconds it may still be cached)"
        f"{' - the TTL it was first given, not counted down' if again.ttl == case.ttl else ''}"
        f"\n{rule}")
    clock.advance(left + 1)
    _resolve(resolver, dns, case.name)
    assert case.asked_again in dns.log.names_asked("auth"), (
        f"{case.name} ({kind}, {case.soa}) was still answered from the cache {case.ttl + 1} s "
        f"after it was first asked (queries: {_walk(dns.log)}), expected the authoritative "
        f"server asked for {case.asked_again} again: that record expired after {case.ttl} s, "
        f"and every answer built from it with it\n{rule}")


@pytest.mark.parametrize("name, canonical", [
    ("mail.shop.test", "mail.shop.test"),  # exists, holds only a TXT record
    ("mx.shop.test", "mail.shop.test"),    # a CNAME to that name
], ids=["nodata", "cname-to-nodata"])
def test_nodata_is_not_nxdomain(resolver: Any, dns: Hierarchy, name: str,
                                canonical: str) -> None:
    """NOERROR with an empty answer (NODATA) says the name exists, only not with an A."""
    for attempt in ("", " (asked again, from the cache)"):
        answer = _resolve(resolver, dns, name)
        assert not answer.nxdomain and not answer.addresses, (
            f"{name}{attempt} gave nxdomain={answer.nxdomain}, addresses={answer.addresses}; "
            "expected nxdomain=False and no addresses\n"
            f"The authoritative server answered {canonical} with rcode NOERROR, no answer "
            "and its SOA: that is NODATA (the name exists, just without an A record), not "
            "NXDOMAIN. Only rcode 3 says a name does not exist (RFC 2308); an empty answer "
            "or a negative SOA alone does not.")
        assert _bare(answer.canonical_name) == canonical, (
            f"{name} gave canonical_name={answer.canonical_name!r}, expected {canonical!r}")


@dataclass(frozen=True)
class NodataCase:
    """A name with no A record, how long its NODATA answer may be cached, and the name the
    authoritative server must be asked for again once it expired."""

    name: str
    ttl: int
    asked_again: str
    why: str


NODATA_CACHING = [
    NodataCase("mail.shop.test", NEGATIVE_TTL, "mail.shop.test",
               f"shop.test.'s SOA has TTL 3600 and MINIMUM {NEGATIVE_TTL}"),
    NodataCase("mx.shop.test", NEGATIVE_TTL, "mail.shop.test",
               "a CNAME (TTL 300) to mail.shop.test, whose NODATA lives "
               f"min(3600, {NEGATIVE_TTL}) s"),
    NodataCase("info.cdn.test", CDN_SOA_TTL, "info.cdn.test",
               f"cdn.test.'s SOA has TTL {CDN_SOA_TTL} and MINIMUM {NEGATIVE_TTL}"),
]


@pytest.mark.parametrize("case", NODATA_CACHING, ids=lambda c: c.name)
def test_nodata_is_cached_like_nxdomain(resolver: Any, dns: Hierarchy, clock: FakeClock,
                                        case: NodataCase) -> None:
    """RFC 2308 section 5: a NODATA answer is cached like NXDOMAIN, for min(SOA TTL, SOA
    MINIMUM) of the SOA in its authority section."""
    rule = (f"A NODATA answer (the name exists, no record of the type) is a negative answer "
            f"like NXDOMAIN: cache it for min(SOA TTL, SOA MINIMUM) = {case.ttl} s, then ask "
            "again (RFC 2308 section 5). Forgotten, every lookup of a name without an address "
            "(a mail-only domain asked for A) costs a round trip to its zone.")
    _resolve(resolver, dns, case.name)
    dns.log.clear()
    clock.advance(case.ttl - 1)
    again = _resolve(resolver, dns, case.name)
    count = len(dns.log.servers())
    assert count == 0, (
        f"{case.name} has no A record ({case.why}); asked again {case.ttl - 1} s later, "
        f"the resolver sent {count} quer{'y' if count == 1 else 'ies'} ({_walk(dns.log)}), "
        f"expected none: the NODATA answer was not cached\n{rule}")
    assert not again.nxdomain and not again.addresses, (
        f"{case.name} from the cache gave nxdomain={again.nxdomain}, addresses="
        f"{again.addresses}; expected nxdomain=False and no addresses (NODATA, not NXDOMAIN)")
    clock.advance(2)
    _resolve(resolver, dns, case.name)
    assert case.asked_again in dns.log.names_asked("auth"), (
        f"{case.name} has no A record ({case.why}); {case.ttl + 1} s after the NODATA "
        f"answer it was still answered from the cache (queries: {_walk(dns.log)}), expected "
        f"the authoritative server asked for {case.asked_again} again: the SOA record's "
        f"TTL or its MINIMUM alone is not the negative answer's lifetime\n{rule}")


@pytest.mark.parametrize("name, chain", [
    ("www.moved.test", "www.moved.test → old.moved.test"),
    ("app.moved.test", "app.moved.test → www.moved.test → old.moved.test"),
], ids=["one-alias", "two-aliases"])
def test_nxdomain_with_a_chain_is_about_its_last_name(
        resolver: Any, dns: Hierarchy, clock: FakeClock, name: str, chain: str) -> None:
    """moved.test.'s server answers an alias of a missing name in one reply: rcode NXDOMAIN,
    the CNAME chain in the answer section, the SOA in authority. The rcode is about the
    chain's last name (RFC 6604 section 3; RFC 2308 section 2.1's example): the alias exists,
    its target does not."""
    rule = (f"The reply for {name} was rcode NXDOMAIN with the CNAME chain {chain} in its "
            "answer section: the rcode is about the last name of the chain (RFC 6604 section "
            f"3) - {name} exists, as an alias of old.moved.test, which does not. Read the "
            "answer section of an NXDOMAIN reply too: cache the CNAMEs with their TTLs and "
            "the negative answer against the chain's last name, for min(SOA TTL, SOA "
            f"MINIMUM) = {NEGATIVE_TTL} s (RFC 2308).")
    dns.log.clear()
    answer = _resolve(resolver, dns, name)
    assert answer.nxdomain and not answer.addresses, (
        f"{name} gave nxdomain={answer.nxdomain}, addresses={answer.addresses}; expected "
        f"nxdomain=True and no addresses\n{rule}")
    assert _bare(answer.canonical_name) == "old.moved.test", (
        f"{name} gave canonical_name={answer.canonical_name!r}, expected 'old.moved.test': "
        "the NXDOMAIN reply's CNAME chain was not followed, so the alias itself was reported "
        f"as the name that does not exist\n{rule}")
    assert answer.ttl == MOVED_CNAME_TTL, (
        f"{name} (NXDOMAIN, reached through {chain}) reported ttl={answer.ttl}, expected "
        f"{MOVED_CNAME_TTL}: www.moved.test's CNAME lives {MOVED_CNAME_TTL} s, less than the "
        f"negative answer's {NEGATIVE_TTL} s, and the answer may not outlive a record of the "
        f"chain in the NXDOMAIN reply's answer section\n{rule}")
    asked = dns.log.names_asked("auth")
    assert "old.moved.test" not in asked, (
        f"resolving {name} asked moved.test.'s server {asked} (queries: {_walk(dns.log)}), "
        "expected one question, for the name asked: its NXDOMAIN reply already said, "
        "through the chain in its answer section, that old.moved.test does not exist - "
        f"asking for old.moved.test again means that negative answer was not kept\n{rule}")
    dns.log.clear()
    clock.advance(MOVED_CNAME_TTL + 1)
    # The chain has expired, the negative answer for its last name has not.
    end = _resolve(resolver, dns, "old.moved.test")
    left = NEGATIVE_TTL - MOVED_CNAME_TTL - 1
    assert end.nxdomain and "old.moved.test" not in dns.log.names_asked("auth"), (
        f"resolve('old.moved.test') {MOVED_CNAME_TTL + 1} s after the NXDOMAIN reply for "
        f"{name} gave nxdomain={end.nxdomain} (queries: {_walk(dns.log)}), expected "
        f"nxdomain=True from the cache, no query: the negative answer lives {NEGATIVE_TTL} s "
        f"(min(SOA TTL, SOA MINIMUM)), {left} s more, whatever the TTL of the CNAMEs that "
        f"led to it; only the answer for {name}, built through them, expires with them"
        f"\n{rule}")
    assert end.ttl == left, (
        f"resolve('old.moved.test') from the cache {MOVED_CNAME_TTL + 1} s after the "
        f"NXDOMAIN reply reported ttl={end.ttl}, expected {left}: the negative answer's "
        f"{NEGATIVE_TTL} s, counted down\n{rule}")
    dns.log.clear()
    again = _resolve(resolver, dns, name)
    assert _bare(again.canonical_name) == "old.moved.test" and again.nxdomain, (
        f"{name} asked again {MOVED_CNAME_TTL + 1} s later gave canonical_name="
        f"{again.canonical_name!r}, nxdomain={again.nxdomain} (queries: {_walk(dns.log)}); "
        "expected 'old.moved.test', nxdomain=True: the negative answer was cached against "
        f"the alias {name}, not against the chain's last name\n{rule}")
    assert "www.moved.test" in dns.log.names_asked("auth"), (
        f"{name} was still answered from the cache {MOVED_CNAME_TTL + 1} s later (queries: "
        f"{_walk(dns.log)}), expected the authoritative server asked for www.moved.test "
        f"again: its CNAME (TTL {MOVED_CNAME_TTL}) expired, and the answer built through it "
        f"with it\n{rule}")


def test_names_are_case_insensitive(resolver: Any, dns: Hierarchy) -> None:
    _resolve(resolver, dns, "api.shop.test")
    dns.log.clear()
    advice = ("DNS names are case-insensitive (RFC 4343) and the trailing dot is optional: "
              "compare and cache them lower-cased, fully qualified")
    try:
        answer = resolver.resolve("API.Shop.TEST.")
    except Exception as exc:  # noqa: BLE001 - the learner's error, explained below
        problem = f"resolving 'API.Shop.TEST.' raised {type(exc).__name__}: {exc}"
    else:
        problem = ""
    if problem:
        pytest.fail(f"the same name in capitals: {advice}\n({problem})", pytrace=False)
    count = len(dns.log.servers())
    assert count == 0, (
        f"resolving 'API.Shop.TEST.' right after 'api.shop.test' sent {count} queries "
        f"({_walk(dns.log)}), expected none: it is the same name\n{advice}")
    _expect_addresses(answer, ["192.0.2.10"], "API.Shop.TEST.")


def test_referrals_are_cached_too(resolver: Any, dns: Hierarchy) -> None:
    _resolve(resolver, dns, "api.shop.test")
    dns.log.clear()
    _resolve(resolver, dns, "nope.shop.test")
    walk = dns.log.servers()
    assert walk == ["auth"], (
        f"after api.shop.test, looking up nope.shop.test asked {_walk(dns.log)}, expected "
        "the authoritative server alone\nThe referrals on the way (NS of test. and "
        "shop.test., with their glue) have TTLs too: cache them, and start the next walk at "
        "the deepest zone whose servers you know.")


def test_referrals_expire_with_their_ttl(resolver: Any, dns: Hierarchy,
                                        clock: FakeClock) -> None:
    """A delegation is a record set like any other: the root's referral to test. lives
    172800 s, the TLD's referral to shop.test. 86400 s. Past the zone's TTL the walk starts
    again at test.'s servers (still fresh); past test.'s, at the root."""
    _resolve(resolver, dns, "api.shop.test")
    advice = ("Cache each referral (the NS set and its glue) until clock() + the NS "
              "records' TTL, like any record, and start each walk at the deepest zone "
              "whose delegation is still fresh: an expired one is forgotten, the one "
              "above it is not.")
    steps = [
        (ZONE_NS_TTL + 1, "nope.shop.test", ["tld", "auth"],
         f"shop.test.'s delegation (TTL {ZONE_NS_TTL}) has expired, test.'s (TTL "
         f"{TLD_NS_TTL}) has not"),
        (TLD_NS_TTL + 1, "nope.cdn.test", ["root", "tld", "auth"],
         f"test.'s delegation (TTL {TLD_NS_TTL}) has expired too"),
    ]
    for since_first, name, want, why in steps:
        clock.now = 1000.0 + since_first
        dns.log.clear()
        _resolve(resolver, dns, name)
        walk = dns.log.servers()
        if walk == want:
            continue
        seen = ("the cached delegation was used past its TTL" if walk[:1] == ["auth"]
                or (want[0] == "root" and walk[:1] == ["tld"]) else
                "the walk started at the root though a fresh delegation below it was "
                "known" if walk[:1] == ["root"] else "neither")
        pytest.fail(
            f"{since_first} s after resolving api.shop.test, {name} asked {_walk(dns.log)}, "
            f"expected {' → '.join(want)}: {why} ({seen})\n{advice}", pytrace=False)


def test_a_glueless_delegation_is_followed(resolver: Any, dns: Hierarchy) -> None:
    """hosted.test. is delegated to ns1.shop.test., and the TLD's referral carries no glue
    (the nameserver's name is in another zone): the resolver looks that name up on its own
    (a walk to shop.test.'s server) and then asks the address it found."""
    advice = ("A referral may name its nameservers without their addresses (no glue in the "
              "additional section): the usual case when a zone's servers are named in "
              "another zone, as with any DNS host. Resolve the nameserver's name (a lookup "
              "of its own: your cache, or a walk from the root), then ask that address. "
              "Not the operating system's resolver (socket.getaddrinfo, a host name passed "
              "to sendto): the walk is yours.")
    answer, error = _attempt(resolver, "www.hosted.test")
    if error is not None:
        pytest.fail(
            f"www.hosted.test: its zone hosted.test. is delegated to {GLUELESS_NS} with no "
            f"glue, and resolve() raised {type(error).__name__}: {error} (queries: "
            f"{_walk(dns.log)}), expected "
            f"{HOSTED_ADDRESS}: the nameserver's address was never looked up\n{advice}",
            pytrace=False)
    got = sorted(getattr(answer, "addresses", None) or [])
    asked = "www.hosted.test" in dns.log.names_asked("auth")
    assert got == [HOSTED_ADDRESS] and asked, (
        f"www.hosted.test (zone delegated to {GLUELESS_NS} with no glue) resolved to {got}, "
        f"the authoritative server {'was' if asked else 'never'} asked for it (queries: "
        f"{_walk(dns.log)}), expected [{HOSTED_ADDRESS!r}] from {GLUELESS_NS}'s address, "
        f"{dns.auth}\n{advice}")


def test_each_resolver_has_its_own_cache(learner: Any, resolver: Any, dns: Hierarchy,
                                         clock: FakeClock) -> None:
    """Two Resolvers share nothing: a second one, new, knows no record yet and walks from
    its root like the first did."""
    _expect_addresses(_resolve(resolver, dns, "api.shop.test"), ["192.0.2.10"], "api.shop.test")
    dns.log.clear()
    other = learner.load("resolver").Resolver([dns.root], port=dns.port, clock=FakeClock(),
                                              timeout=2.0)
    answer = _resolve(other, dns, "api.shop.test")
    walk = dns.log.servers()
    assert walk == ["root", "tld", "auth"], (
        f"a second, new Resolver resolved api.shop.test asking {_walk(dns.log)}, expected "
        "root → tld → auth: it started out holding the first Resolver's records and "
        "referrals - one cache shared by every instance (a class attribute `_cache = {}`, "
        "or a dict at module level)\nEach Resolver has a cache of its own, made in "
        "__init__ (self._cache = {}): another instance may have other root servers and "
        "reads expiry times on its own clock.")
    _expect_addresses(answer, ["192.0.2.10"], "api.shop.test (second resolver)")


def test_a_silent_nameserver_is_skipped(resolver: Any, dns: Hierarchy) -> None:
    """backup.test. is delegated to ns1 and ns2; ns1 (first in the referral) never
    answers. The zone's other server holds the same data: ask it."""
    try:
        answer = resolver.resolve("www.backup.test")
    except NotImplementedError as exc:
        pytest.fail(f"resolve() is not implemented yet: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - the learner's error, explained below
        problem = f"raised {type(exc).__name__}: {exc}"
    else:
        problem = ""
    asked_second = "www.backup.test" in dns.log.names_asked("auth")
    advice = ("backup.test. is delegated to two nameservers and the first one "
              f"({dns.silent}) never answers, while the second ({dns.auth}) does. A zone "
              "has several nameservers precisely so that one can be down: when a server "
              "does not answer within the timeout (or refuses the connection), ask the "
              "zone's next one, and fail only when none answered.")
    if problem:
        pytest.fail(
            "www.backup.test's first nameserver never answered and resolve() gave up "
            f"({problem}); the zone's second nameserver was "
            f"{'asked' if asked_second else 'never asked'} (queries: {_walk(dns.log)}), "
            f"expected 192.0.2.30 from it\n{advice}", pytrace=False)
    got = sorted(getattr(answer, "addresses", None) or [])
    assert got == ["192.0.2.30"] and asked_second, (
        f"resolving www.backup.test gave {got} (queries: {_walk(dns.log)}), expected "
        f"['192.0.2.30'] from the second nameserver\n{advice}")


# ------------------------------------------------- a nameserver that answers with an error


@dataclass(frozen=True)
class FirstServerSays:
    """What flaky.test.'s first nameserver answers, and whether the zone's second (the real
    one, with www.flaky.test A 192.0.2.40) must be asked then."""

    rcode: int
    retry: bool   # True: a server failure, ask the next; False: an answer, keep it
    means: str


FIRST_SERVER_SAYS = [
    FirstServerSays(RCODE.SERVFAIL, True, "the server failed: it cannot reach its own data, "
                    "or is overloaded"),
    FirstServerSays(RCODE.REFUSED, True, "the server does not serve the zone though the "
                    "delegation names it: a lame delegation"),
    FirstServerSays(RCODE.NOTIMP, True, "the server does not implement the query"),
    FirstServerSays(RCODE.FORMERR, True, "the server could not read the query"),
    FirstServerSays(RCODE.NXDOMAIN, False, "the zone's authoritative answer that the name "
                    "does not exist"),
]
ERROR_REPLY_ADVICE = (
    "A reply's rcode says who failed. SERVFAIL, REFUSED, NOTIMP and FORMERR say the server "
    "failed, not the name: ask the zone's next nameserver, as BIND and Unbound do (RFC 1034 "
    "5.3.3, RFC 1035 7.2), and raise ResolutionError only when every one of them failed. "
    "NXDOMAIN is an answer: every nameserver of a zone holds the same data, so asking the "
    "next one changes nothing and doubles the cost of every miss.")


def _attempt(resolver: Any, name: str) -> tuple[Any, BaseException | None]:
    """resolve(name)'s answer, or the error it raised."""
    try:
        return resolver.resolve(name), None
    except NotImplementedError as exc:
        pytest.fail(f"resolve() is not implemented yet: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - the learner's error, explained by the caller
        return None, exc


@pytest.mark.parametrize("says", FIRST_SERVER_SAYS, ids=lambda c: RCODE[c.rcode])
def test_an_error_reply_is_retried_at_the_zones_next_server(
        resolver: Any, dns: Hierarchy, says: FirstServerSays) -> None:
    """flaky.test. is delegated to ns1 and ns2, in that order; ns1 answers every query with
    one rcode. A server failure sends the resolver on to ns2; NXDOMAIN is the answer."""
    dns.failing["bad1"].rcode = says.rcode
    answer, error = _attempt(resolver, "www.flaky.test")
    code = RCODE[says.rcode]
    first = f"www.flaky.test's first nameserver answered {code} ({says.means})"
    asked_first = "www.flaky.test" in dns.log.names_asked("bad1")
    asked_second = "www.flaky.test" in dns.log.names_asked("auth")
    got = sorted(getattr(answer, "addresses", None) or [])
    if not asked_first:
        pytest.fail(
            f"resolving www.flaky.test never asked the zone's first nameserver (queries: "
            f"{_walk(dns.log)}): ask a zone's nameservers in the order the referral lists "
            "them, the next one only when one failed", pytrace=False)
    if says.retry:
        if error is not None:
            pytest.fail(
                f"{first}, and resolve() gave up: {type(error).__name__}: {error}; the zone's "
                f"second nameserver was {'asked' if asked_second else 'never asked'} "
                f"(queries: {_walk(dns.log)}), expected {FLAKY_ADDRESS} from it\n"
                f"{ERROR_REPLY_ADVICE}", pytrace=False)
        if got != [FLAKY_ADDRESS]:
            seen = ("reported the name as not existing (nxdomain=True)"
                    if getattr(answer, "nxdomain", False) else f"gave addresses {got}")
            pytest.fail(
                f"{first}; resolve() {seen} "
                f"{'after asking' if asked_second else 'without asking'} the zone's second "
                f"nameserver (queries: {_walk(dns.log)}), expected [{FLAKY_ADDRESS!r}] from "
                f"the second: a server's failure says nothing about the name\n"
                f"{ERROR_REPLY_ADVICE}", pytrace=False)
        return
    if error is not None:
        pytest.fail(f"{first}; resolve() raised {type(error).__name__}: {error}, expected "
                    f"nxdomain=True\n{ERROR_REPLY_ADVICE}", pytrace=False)
    if asked_second:
        took = f" and took its answer {got}" if got else ""
        pytest.fail(
            f"{first}, and the resolver asked the zone's second nameserver too{took} "
            f"(queries: {_walk(dns.log)}); expected nxdomain=True from the first reply "
            f"alone\n{ERROR_REPLY_ADVICE}", pytrace=False)
    assert answer.nxdomain and not got, (
        f"{first}; resolve() gave nxdomain={answer.nxdomain}, addresses={got}, expected "
        f"nxdomain=True and no addresses\n{ERROR_REPLY_ADVICE}")


def test_every_nameserver_failing_is_a_resolution_error(resolver: Any, dns: Hierarchy) -> None:
    """dead.test.'s two nameservers answer SERVFAIL and REFUSED: nothing is known about
    www.dead.test, and resolve() says so with ResolutionError."""
    dns.failing["bad1"].rcode = RCODE.SERVFAIL
    dns.failing["bad2"].rcode = RCODE.REFUSED
    answer, error = _attempt(resolver, "www.dead.test")
    asked = [who for who in ("bad1", "bad2") if "www.dead.test" in dns.log.names_asked(who)]
    what = ("both of dead.test.'s nameservers fail (the first answers SERVFAIL, the second "
            "REFUSED)")
    if error is None:
        pytest.fail(
            f"{what}, and resolve('www.dead.test') returned {answer} (queries: "
            f"{_walk(dns.log)}); expected ResolutionError: no server answered, so nothing "
            "is known about the name - neither that it does not exist (nxdomain) nor that "
            f"it has no address\n{ERROR_REPLY_ADVICE}", pytrace=False)
    assert asked == ["bad1", "bad2"], (
        f"{what}: resolve('www.dead.test') raised {type(error).__name__} after asking "
        f"{_walk(dns.log)}, expected both nameservers asked, the first then the second, "
        f"before giving up\n{ERROR_REPLY_ADVICE}")
    assert type(error).__name__ == "ResolutionError", (
        f"{what}: resolve('www.dead.test') raised {type(error).__name__}: {error}, expected "
        "the lab's ResolutionError (the error the README gives for 'no server answered')")


# At most this long may a failure (no server of the zone answered) be remembered: BIND's
# servfail-ttl is 1 s by default and may be raised to 30 s at most; RFC 2308 section 7.1
# forbids more than 5 minutes. A failure is never a negative answer: it says nothing of
# the name.
FAILURE_MEMORY_MAX = 30


def test_a_failure_is_not_cached_as_an_answer(resolver: Any, dns: Hierarchy,
                                              clock: FakeClock) -> None:
    """www.dead.test's two nameservers fail: asked again at once, resolve() still raises
    ResolutionError (it may remember the failure, never turn it into an answer); once
    FAILURE_MEMORY_MAX has passed it asks them again, and sees that the zone recovered."""
    dns.failing["bad1"].rcode = RCODE.SERVFAIL
    dns.failing["bad2"].rcode = RCODE.REFUSED
    rule = ("A failure is not an answer: when no server of the zone answered, nothing is "
            "known about the name. resolve() raises ResolutionError and may remember that "
            f"for a short time, at most {FAILURE_MEMORY_MAX} s (BIND's servfail-ttl limit; "
            "RFC 2308 section 7 allows no more than 5 minutes), but never caches it as a "
            "negative answer, and asks the zone's servers again once that time is over: an "
            "outage that has passed must not go on failing lookups for minutes.")
    _, error = _attempt(resolver, "www.dead.test")
    if error is None or type(error).__name__ != "ResolutionError":
        pytest.fail("both of dead.test.'s nameservers failed and resolve('www.dead.test') "
                    f"{'returned an answer' if error is None else 'raised ' + repr(error)}, "
                    f"expected ResolutionError\n{rule}", pytrace=False)
    dns.log.clear()
    again, error = _attempt(resolver, "www.dead.test")
    if error is None:
        pytest.fail(
            "both of dead.test.'s nameservers failed and resolve('www.dead.test') raised "
            f"ResolutionError; asked again at once it returned {again} (queries: "
            f"{_walk(dns.log)}), expected ResolutionError again: the failure was remembered "
            f"as an answer\n{rule}", pytrace=False)
    assert type(error).__name__ == "ResolutionError", (
        f"asked again at once after a ResolutionError, resolve('www.dead.test') raised "
        f"{type(error).__name__}: {error}, expected ResolutionError again\n{rule}")
    # The outage is over: the first nameserver now answers (the name does not exist).
    dns.failing["bad1"].rcode = RCODE.NXDOMAIN
    dns.log.clear()
    clock.advance(FAILURE_MEMORY_MAX + 1)
    later, error = _attempt(resolver, "www.dead.test")
    asked = "www.dead.test" in dns.log.names_asked("bad1")
    if not asked:
        seen = ("raised " + type(error).__name__ if error is not None
                else f"answered {later}")
        pytest.fail(
            f"{FAILURE_MEMORY_MAX + 1} s after dead.test.'s nameservers failed, "
            f"resolve('www.dead.test') {seen} without asking them again (queries: "
            f"{_walk(dns.log)}); expected its first nameserver asked (it has recovered "
            f"and answers NXDOMAIN now)\n{rule}", pytrace=False)
    assert error is None and later.nxdomain, (
        f"{FAILURE_MEMORY_MAX + 1} s after the failure dead.test.'s first nameserver was "
        "asked again and answered NXDOMAIN; resolve('www.dead.test') "
        f"{'raised ' + type(error).__name__ if error is not None else f'gave {later}'}, "
        f"expected nxdomain=True\n{rule}")


def test_a_negative_answer_without_an_soa_is_not_cached(resolver: Any, dns: Hierarchy,
                                                         clock: FakeClock) -> None:
    """flaky.test.'s first nameserver answers NXDOMAIN with an empty authority section (no
    SOA): the name does not exist, but nothing says for how long - RFC 2308 section 5: such
    an answer SHOULD NOT be cached. It is reported with ttl 0, and asked for again."""
    dns.failing["bad1"].rcode = RCODE.NXDOMAIN
    dns.failing["bad1"].soa = False
    rule = ("A negative answer lives min(SOA TTL, SOA MINIMUM) of the SOA in its authority "
            "section (RFC 2308 section 5); one without an SOA carries no lifetime, and "
            "\"negative responses without SOA records SHOULD NOT be cached\" (RFC 2308 "
            "section 5): use it for this resolve() - nxdomain=True, ttl 0 - and ask again "
            "next time. A default of your own keeps a name dead that the zone never said "
            "was dead for that long.")
    answer = _resolve(resolver, dns, "www.flaky.test")
    assert answer.nxdomain and answer.ttl == 0, (
        f"www.flaky.test's nameserver answered NXDOMAIN without an SOA; resolve() gave "
        f"nxdomain={answer.nxdomain}, ttl={answer.ttl}, expected nxdomain=True, ttl=0: an "
        f"answer that may not be cached has no time left\n{rule}")
    dns.log.clear()
    clock.advance(1)
    _resolve(resolver, dns, "www.flaky.test")
    assert "www.flaky.test" in dns.log.names_asked("bad1"), (
        "www.flaky.test's nameserver answered NXDOMAIN without an SOA, and resolve() a "
        f"second later answered from the cache (queries: {_walk(dns.log)}), expected the "
        f"nameserver asked again: the negative answer had no SOA, so no lifetime\n{rule}")


@pytest.mark.timeout(15)
def test_a_cname_loop_ends_with_an_error(resolver: Any, dns: Hierarchy) -> None:
    outcome: list[Any] = []

    def attempt() -> None:
        try:
            outcome.append(resolver.resolve("loop.shop.test"))
        except RecursionError as exc:
            outcome.append(exc)
        except Exception as exc:  # noqa: BLE001 - any error of the learner's is right here
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5.0)
    assert outcome, (
        "loop.shop.test is a CNAME to round.shop.test, which is a CNAME back to "
        f"loop.shop.test: resolve() was still going after 5 s ({len(dns.log.servers())} "
        "queries sent)\nBound the CNAME chain (real resolvers stop after 8-16 links) and "
        "raise an error instead of following it forever.")
    result = outcome[0]
    assert not isinstance(result, RecursionError), (
        "a CNAME loop ended in RecursionError: bound the chain yourself and raise a "
        "clear error (e.g. ResolutionError) before Python's stack runs out")
    assert isinstance(result, Exception), (
        f"a CNAME loop gave an answer {result!r}: a name whose aliases loop has no address; "
        "raise an error (e.g. ResolutionError)")


# ------------------------------------------------- stray datagrams ahead of the reply

def test_an_rrset_lives_as_long_as_its_shortest_record(resolver: Any, dns: Hierarchy,
                                                        clock: FakeClock) -> None:
    """pool.cdn.test's three A records carry TTLs 90, 45 and 120: the set is cached as if
    all had the lowest (RFC 2181 5.2), whichever record is listed first or last."""
    answer = _resolve(resolver, dns, "pool.cdn.test")
    _expect_addresses(answer, [ip for ip, _ in POOL], "pool.cdn.test")
    ttls = [ttl for _, ttl in POOL]
    shortest = min(ttls)
    seen = ("the first record's" if answer.ttl == ttls[0] else
            "the last record's" if answer.ttl == ttls[-1] else
            "the longest-lived record's" if answer.ttl == max(ttls) else "no record's")
    assert answer.ttl == shortest, (
        f"pool.cdn.test, three A records with TTLs {ttls}, was answered with "
        f"ttl={answer.ttl} ({seen} TTL), expected {shortest}, the lowest\n"
        "The records of one name and type form one set, cached and expired together; a set "
        "whose TTLs differ is treated as if each record had the lowest (RFC 2181 section "
        "5.2): caching it longer keeps an address its owner allowed for 45 s only.")
    dns.log.clear()
    clock.advance(shortest + 1)
    _resolve(resolver, dns, "pool.cdn.test")
    assert "pool.cdn.test" in dns.log.names_asked("auth"), (
        f"{shortest + 1} s later pool.cdn.test (TTLs {ttls}) was answered from the cache "
        f"without asking again (queries: {_walk(dns.log)}), expected a new query\n"
        "A set whose TTLs differ expires with its lowest TTL (RFC 2181 section 5.2).")


def test_each_query_leaves_from_a_port_of_its_own(resolver: Any, dns: Hierarchy) -> None:
    """RFC 5452 section 9.2: a resolver MUST send each query from an unpredictable source
    port. The kernel gives a new socket a random one; a socket kept for every query (or
    bound to one port) gives a poisoner the port after a single look."""
    ports: list[tuple[str, int]] = []
    for label in ("root", "tld", "auth"):
        def note(request: DNSRecord, handler: Any, label: str = label) -> None:
            ports.append((f"{label} for {_bare(request.q.qname)}", handler.client_address[1]))
        dns.servers[label].before_reply = note
    for name in ("api.shop.test", "www.shop.test", "nope.shop.test"):
        _resolve(resolver, dns, name)
    counts = {port: sum(1 for _, p in ports if p == port) for _, port in ports}
    port, most = max(counts.items(), key=lambda item: item[1], default=(0, 0))
    assert most <= 2, (
        f"{most} of the resolver's {len(ports)} queries left from one source port, {port} "
        f"({', '.join(who for who, p in ports if p == port)}); expected a port of each "
        "query's own\n"
        "RFC 5452 section 9.2: a resolver MUST send each query from an unpredictable "
        "source port. With one socket kept for every query (or bound to one port), an "
        "attacker who saw one query knows the port and has only the 16-bit id to guess to "
        "poison the cache; open a new socket per query and let the kernel pick its port.")


FORGED_ADDRESS = "6.6.6.6"
FORGED_TTL = 86400


@dataclass(frozen=True)
class Stray:
    """A datagram that reaches the resolver's port ahead of the authoritative reply and
    differs from it in one of the things that bind a reply to its query (RFC 5452)."""

    what: str           # how it differs, as the failure message says it
    same_id: bool       # does it carry the query's transaction id?
    source: str         # "server": the server's own socket; "server port+1": its address,
                        # another port; "stranger": another address
    question: str       # the question it claims to answer


STRAYS = [
    Stray("carries another transaction id (from the server's own address and port)",
          same_id=False, source="server", question="api.shop.test."),
    Stray("comes from another address (with the query's id and question)",
          same_id=True, source="stranger", question="api.shop.test."),
    Stray("comes from the server's address but another port (with the query's id and "
          "question)", same_id=True, source="other port", question="api.shop.test."),
    Stray("answers another question, other.shop.test (from the server's own address and "
          "port, with the query's id)", same_id=True, source="server",
          question="other.shop.test."),
]


def _forged_reply(request: DNSRecord, stray: Stray) -> bytes:
    """'api.shop.test A 6.6.6.6' for a day: what a poisoner wants cached."""
    forged = DNSRecord.question(stray.question, "A")
    forged.header.id = request.header.id if stray.same_id else (request.header.id + 1) % 65536
    forged.header.qr = 1
    forged.header.aa = 1
    forged.header.rd = request.header.rd
    forged.add_answer(RR("api.shop.test.", QTYPE.A, ttl=FORGED_TTL, rdata=A(FORGED_ADDRESS)))
    packed: bytes = forged.pack()  # dnslib is untyped
    return packed


def _send_stray(dns: Hierarchy, stray: Stray, request: DNSRecord, handler: Any) -> None:
    data = _forged_reply(request, stray)
    if stray.source == "server":
        handler.request[1].sendto(data, handler.client_address)  # the server's own socket
        return
    address = dns.auth if stray.source == "other port" else dns.auth.rsplit(".", 1)[0] + ".4"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        sock.sendto(data, handler.client_address)


@pytest.mark.parametrize("stray", STRAYS, ids=lambda s: s.what.split(" (")[0])
def test_only_the_reply_to_the_query_is_accepted(resolver: Any, dns: Hierarchy,
                                                 stray: Stray) -> None:
    """Over UDP anyone can send to the resolver's port: a datagram is the reply only when
    it comes from the address and port the query went to and carries the query's id and
    question. Anything else is dropped and the wait goes on."""
    sent: list[str] = []

    def before_reply(request: DNSRecord, handler: Any) -> None:
        if not sent and _bare(request.q.qname) == "api.shop.test":
            sent.append(str(handler.client_address))  # first: the stray may win the race
            _send_stray(dns, stray, request, handler)

    dns.servers["auth"].before_reply = before_reply
    advice = (
        "Over UDP anyone can send to the resolver's port: only a datagram from the address "
        "and port the query went to, carrying the query's transaction id and question, is "
        "its reply (RFC 5452). Drop anything else and keep waiting for the reply until the "
        "timeout; a resolver that takes the first datagram caches a forged answer for its "
        "TTL (cache poisoning).")
    try:
        answer = resolver.resolve("api.shop.test")
    except NotImplementedError as exc:
        pytest.fail(f"resolve() is not implemented yet: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - the learner's error, explained below
        problem = (f"resolving api.shop.test raised {type(exc).__name__}: {exc}, after a "
                   f"datagram that {stray.what} reached the resolver's port ahead of the "
                   "reply; expected the real reply's answer, 192.0.2.10\n"
                   "A stray datagram is not the reply, and not a failure of the server "
                   f"either: ignore it.\n{advice}")
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    assert sent, ("the authoritative server was never asked for api.shop.test "
                  f"(queries: {_walk(dns.log)}), so the test could not send its datagram")
    got = sorted(getattr(answer, "addresses", None) or [])
    assert got == ["192.0.2.10"], (
        f"the resolver took a datagram that {stray.what} for the reply: api.shop.test "
        f"resolved to {got}, expected ['192.0.2.10'] (the datagram said "
        f"{FORGED_ADDRESS}, TTL {FORGED_TTL}; the authoritative server's reply came right "
        f"after it)\n{advice}")
