"""Verification for ph7.10 input-validation.

The learner's app runs behind a real HTTP server (labrunner.testing.serve_wsgi) and gets
property-based payloads from Hypothesis (derandomized, so every run sends the same ones):
arbitrary JSON values, near-valid orders with one field wrong in a typical way, arbitrary
bytes. The test holds its own statement of the rules (an oracle) and checks every answer
against it: never a 500, 201 exactly for the valid orders, 422 naming the field for the
invalid ones, 400 for bodies that are not UTF-8 JSON (also a valid order in UTF-16, UTF-32,
Latin-1: an API that takes UTF-8 takes nothing else), and 413 from Content-Length alone, before
the body is read (a client announcing more than it sends must get its 413 at once).
"""

from __future__ import annotations

import json
import re
import socket
import string
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from labrunner.testing import http_request, serve_wsgi

MAX_BODY = 2048
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    report_multiple_bugs=False,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))

# ---- the rules, stated independently of any implementation ------------------------------

ALLOWED = {"sku", "quantity", "email", "note"}


def problems(doc: Any) -> set[str]:
    """The fields that make ``doc`` invalid ("" for the document itself)."""
    if not isinstance(doc, dict):
        return {""}
    bad = {k for k in doc if k not in ALLOWED}
    bad |= {k for k in ("sku", "quantity", "email") if k not in doc}
    if "sku" in doc and not (isinstance(doc["sku"], str)
                             and re.fullmatch(r"[A-Z]{3}-[0-9]{4}", doc["sku"], re.ASCII)):
        bad.add("sku")
    q = doc.get("quantity")
    if "quantity" in doc and not (type(q) is int and 1 <= q <= 100):
        bad.add("quantity")
    e = doc.get("email")
    if "email" in doc and not (isinstance(e, str) and len(e) <= 254 and re.fullmatch(
            r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+", e, re.ASCII)):
        bad.add("email")
    n = doc.get("note")
    if "note" in doc and not (isinstance(n, str) and len(n) <= 200 and not any(
            unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in n)):
        bad.add("note")
    return bad


# ---- payloads ---------------------------------------------------------------------------

letters = st.text(string.ascii_uppercase, min_size=3, max_size=3)
digits = st.text(string.digits, min_size=4, max_size=4)
good_sku = st.builds(lambda a, b: f"{a}-{b}", letters, digits)
local = st.text(string.ascii_letters + string.digits + "._%+-", min_size=1, max_size=20)
label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
LOCAL_CHARS = string.ascii_letters + string.digits + "._%+-"
DOMAIN_CHARS = string.ascii_letters + string.digits + "-"
good_email = st.builds(lambda a, b, c: f"{a}@{b}.{c}", local, label, label)
good_note = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs")), max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

# the usual ways a field is wrong
BAD = {"sku": ["abc-1234", "ABC-123", "ABC-1234\n", " ABC-1234", "ABC_1234",
                "ABC-１２３４", "", "ABC-1234; DROP TABLE orders", 1234, None,
                # capitals and digits, but not ASCII ones: str.isupper()/isdigit(), \w, \d
                "ÄBC-1234", "ABC-12٣4"],
       "quantity": [True, False, 0, -1, 101, 10**30, 5.0, 2.5, "5", None, [5]],
       "email": ["", "no-at-sign", "a@b", "a@@b.io", "a@b.io\n", "<a@b.io>",
                             "a" * 250 + "@b.io", 42, None,
                             # characters outside the pattern's ASCII sets that \w (Unicode
                             # letters and digits, "_"), [A-z] ("[\\]^_`" lie between Z and
                             # a) or [^@\s] let through
                             "jürgen@shop.example", "ana@shöp.example", "ana@shop_1.example",
                             "ana@shop.exampl٣", "a^b@shop.example", "a`b@shop.example",
                             "[ana]@shop.example", "ana@shop.ex\\ample", "ana\u00a0x@shop.io",
                             # every part within the pattern's bounds, 255 characters in all
                             "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 62],
       "note": ["x" * 201, "line\nbreak", "nul\x00byte", "bidi\u202etxt", "c1\x85next",
                "zero\u200bwidth", 7, [],
                # optional is not nullable: a note that is there is a string
                None,
                # lone surrogates (Cs), sent as the JSON escapes \ud800..., which are valid
                # UTF-8 bytes: only the decoded value holds them. High, low, and a pair in
                # the wrong order (two lone halves, not a character)
                "x\ud800", "\udfffend", "swap\ude00\ud83d"]}
# the longest address the rules allow: 254 characters, every part at its bound
EMAIL_254 = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 61
EXTRA = [("is_admin", True), ("price", 0), ("__proto__", {}), ("Sku", "ABC-1234"),
         ("role", None)]
extra_field = st.sampled_from(EXTRA)
BASE = {"sku": "KEY-0042", "quantity": 3, "email": "ana@shop.example", "note": "ring twice"}

valid_orders = st.fixed_dictionaries(
    {"sku": good_sku, "quantity": st.integers(1, 100), "email": good_email},
    optional={"note": good_note})


@st.composite
def near_valid_orders(draw: Any) -> dict[str, Any]:
    """A valid order with one or two fields replaced by a typical mistake."""
    order = dict(draw(valid_orders))
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["sku", "quantity", "email", "note", "extra", "drop"]))
        if kind == "extra":
            key, value = draw(extra_field)
            order[key] = value
        elif kind == "drop":
            order.pop(draw(st.sampled_from(["sku", "quantity", "email"])), None)
        else:
            order[kind] = draw(st.sampled_from(BAD[kind]))
    return order


# ---- the checks -------------------------------------------------------------------------

@pytest.fixture
def host(learner: Any) -> Any:
    make_app = learner.function("validation", "make_app")
    with serve_wsgi(make_app(max_body=MAX_BODY)) as address:
        yield address


def post(host: str, body: bytes, content_type: str = "application/json") -> Any:
    return http_request(host, "POST", "/orders", body, content_type=content_type)


def no_500(reply: Any, sent: bytes) -> None:
    assert reply.status < 500, (
        f"the app answered {reply.status} to a client's payload {sent[:150]!r}, expected a "
        f"4xx\nA 5xx says the server is broken; hostile or malformed input is the "
        "client's fault and must be refused at the boundary (400 not JSON, 413 too big, "
        "422 invalid), never reach code that crashes on it.")


def why_accepted(doc: Any, bad: set[str]) -> str:
    if not isinstance(doc, dict):
        return "Accepted a body that is not a JSON object: check the document's type first."
    unknown = sorted(bad - {"sku", "quantity", "email", "note"})
    if unknown:
        return (f"Accepted unknown field(s) {unknown}: an allowlist rejects every field it "
                "does not name (mass assignment: is_admin, price), not a list of bad ones.")
    if isinstance(doc.get("quantity"), bool) and "quantity" in bad:
        return ("Accepted quantity = true: bool is a subclass of int in Python, so "
                "isinstance(True, int) holds. Check type(q) is int.")
    text = [f for f in ("sku", "email", "note") if f in bad and isinstance(doc.get(f), str)]
    if any(doc[f].endswith("\n") for f in text):
        return ("Accepted a value ending in a newline: '$' matches before a trailing "
                "newline; use re.fullmatch (or \\Z).")
    missing = [f for f in ("sku", "quantity", "email") if f not in doc]
    if missing:
        return f"Accepted an order without {missing}: required fields must be present."
    nulls = sorted(f for f in bad if f in doc and doc[f] is None)
    if nulls:
        return (f"Accepted {', '.join(f'{f} = null' for f in nulls)}: a field that may be "
                "left out (note) is not a field that may be null - when it is there it must "
                "be of its type (a string), or the code behind calls len(None) or stores a "
                "NULL nobody expects. Check \"note\" in doc, not doc.get(\"note\") is not "
                "None, and do not drop nulls before validating.")
    email = doc.get("email")
    address = email if isinstance(email, str) else ""
    local_part, _, domain = address.partition("@")
    odd = sorted({c for c in local_part if c not in LOCAL_CHARS}
                 | {c for c in domain if c not in DOMAIN_CHARS + "."})
    if "email" in bad and odd and address.count("@") == 1 and len(address) <= 254:
        return (f"Accepted the email {email!r}, which holds {', '.join(map(repr, odd))}: the "
                "pattern's sets are ASCII, exactly [A-Za-z0-9._%+-] before the @ and "
                "[A-Za-z0-9-] in each label - \\w also matches every Unicode letter and "
                "digit (ü, ٣) and '_', [A-z] spans '[\\]^_`' between Z and a, and "
                "str.isalnum() is Unicode too. Spell the sets out (or use re.ASCII).")
    sku = doc.get("sku")
    if "sku" in bad and isinstance(sku, str) and not sku.isascii():
        return (f"Accepted the sku {sku!r}: [A-Z] and [0-9] are ASCII only - \\d, "
                "str.isdigit() and str.isupper() take other scripts' digits and capitals.")
    if "email" in bad and isinstance(email, str) and len(email) > 254:
        return (f"Accepted an email of {len(email)} characters: the pattern bounds each part "
                "(local part 64, each label 63) but not the whole; an address is at most 254 "
                "characters - check len(email) <= 254 as well.")
    note = doc.get("note")
    if "note" in bad and isinstance(note, str) and len(note) <= 200:
        odd = sorted({f"U+{ord(c):04X} ({unicodedata.category(c)})" for c in note
                      if unicodedata.category(c) in ("Cc", "Cf", "Cs")})
        if any(unicodedata.category(c) == "Cs" for c in note):
            return (f"Accepted a note holding {', '.join(odd)}: a lone UTF-16 surrogate. "
                    "The body was valid UTF-8, but the JSON escape \\ud800 decodes to "
                    "one, and the next layer (a UTF-8 encoder, the database driver, the log) "
                    "raises UnicodeEncodeError on it - refuse Cc, Cf AND Cs in the decoded "
                    "value (an escaped pair such as \\ud834\\udd1e is one valid "
                    "character).")
        if odd:
            return (f"Accepted a note holding {', '.join(odd)}: control (Cc: C0 AND C1, "
                    "e.g. U+0085), format (Cf: U+202E right-to-left override, U+200B zero "
                    "width) and surrogate (Cs) characters are all refused - test "
                    "unicodedata.category(ch), not ord(ch) < 32.")
    return ("Accepted a value outside the rules: check every field's exact type, range "
            "(1 <= quantity <= 100) and length (note <= 200, email <= 254), and forbid "
            "control characters.")


def check_against_rules(reply: Any, doc: Any, sent: bytes) -> None:
    no_500(reply, sent)
    bad = problems(doc)
    if not bad:
        assert reply.status == 201, (
            f"a valid order {doc!r} was answered {reply.status} {reply.body[:150]!r}, "
            "expected 201\nAn allowlist must let everything valid through, not only what "
            "was easy to check.")
        assert reply.json() == doc, (
            f"a valid order {doc!r} came back as {reply.json()!r}: answer with the order")
        return
    assert reply.status == 422, (
        f"an invalid order {doc!r} (wrong: {sorted(bad)}) was answered {reply.status} "
        f"{reply.body[:150]!r}, expected 422"
        + (": " + why_accepted(doc, bad) if reply.status < 300 else "\n" +
           "422 Unprocessable Content is for a body that is well-formed JSON whose content "
           "breaks the rules; 400 is for a body that is not JSON at all."))
    body = reply.json()
    named = {e.get("field") for e in body.get("errors", [])} if isinstance(body, dict) else set()
    missing = bad - named - {""}
    assert not missing, (
        f"the 422 for {doc!r} names fields {sorted(f for f in named if f)}, but not "
        f"{sorted(missing)}: list every field that is wrong ({{\"errors\": [{{\"field\": "
        "..., \"problem\": ...}]}), so the client can fix them all at once")


def test_valid_orders_are_accepted(host: str) -> None:
    @SETTINGS
    @given(valid_orders)
    def prop(doc: dict[str, Any]) -> None:
        sent = json.dumps(doc).encode()
        check_against_rules(post(host, sent), doc, sent)
    prop()


ONE_MISTAKE = ([(f"{field}={value!r}", {**BASE, field: value})
                for field, values in BAD.items() for value in values]
               + [(f"extra {key}", {**BASE, key: value}) for key, value in EXTRA]
               + [(f"no {field}", {k: v for k, v in BASE.items() if k != field})
                  for field in ("sku", "quantity", "email")])


def test_each_typical_mistake_is_a_422(host: str) -> None:
    check_against_rules(post(host, json.dumps(BASE).encode()), BASE, json.dumps(BASE).encode())
    longest = {**BASE, "email": EMAIL_254}
    # json.dumps escapes U+1D11E as the pair \ud834\udd1e: one valid character, not two
    # lone surrogates
    astral = {**BASE, "note": "clef \U0001d11e"}
    for doc in (longest, astral):
        check_against_rules(post(host, json.dumps(doc).encode()), doc, json.dumps(doc).encode())
    for _, doc in ONE_MISTAKE:
        sent = json.dumps(doc).encode()
        check_against_rules(post(host, sent), doc, sent)


def test_near_valid_orders_are_refused_with_422(host: str) -> None:
    @SETTINGS
    @given(near_valid_orders())
    def prop(doc: dict[str, Any]) -> None:
        sent = json.dumps(doc).encode()
        if len(sent) <= MAX_BODY:
            check_against_rules(post(host, sent), doc, sent)
    prop()


def test_arbitrary_json_never_500(host: str) -> None:
    @SETTINGS
    @given(json_values)
    @example([])
    @example("ABC-1234")
    @example({"sku": None, "quantity": None, "email": None})
    def prop(doc: Any) -> None:
        sent = json.dumps(doc).encode()
        if len(sent) <= MAX_BODY:
            check_against_rules(post(host, sent), doc, sent)
    prop()


# The same valid order, as bytes that are not UTF-8 JSON: each must be refused with 400.
# (body, Content-Type, what it is, how an app comes to accept it)
GUESSED = "json.loads(raw bytes) guesses UTF-16/UTF-32 from the first bytes"
LAX = "decode(errors='replace' or 'ignore') or decode('latin-1') never fails"
UNICODE_ORDER = {**BASE, "note": "café ☕ für 𝄞"}
OTHER_ENCODINGS = [
    (json.dumps(BASE).encode("utf-16"), "application/json", "UTF-16 with a byte order mark",
     GUESSED),
    (json.dumps(BASE).encode("utf-16-be"), "application/json", "UTF-16BE, no byte order mark",
     GUESSED),
    (json.dumps(BASE).encode("utf-32"), "application/json", "UTF-32 with a byte order mark",
     GUESSED),
    (json.dumps({**BASE, "note": "café"}, ensure_ascii=False).encode("latin-1"),
     "application/json", "Latin-1 (the note's é is the single byte E9)", LAX),
    (json.dumps({**BASE, "note": "bad ? surrogate"}).encode().replace(b"?", b"\xed\xa0\x80"),
     "application/json", "CESU-8 (a UTF-16 surrogate as the 3 bytes ED A0 80)",
     "json.loads(raw bytes) decodes UTF-8 with surrogatepass"),
    (json.dumps(BASE).encode("utf-16-le"), "application/json; charset=utf-16le",
     "UTF-16LE, with a charset parameter saying so",
     "the client's charset parameter was obeyed"),
]


def test_the_body_is_utf8_whatever_else_it_could_be(host: str) -> None:
    sent = json.dumps(UNICODE_ORDER, ensure_ascii=False).encode()
    reply = post(host, sent)
    assert reply.status == 201 and reply.json() == UNICODE_ORDER, (
        f"a valid order whose note is {UNICODE_ORDER['note']!r}, sent as UTF-8 "
        f"({sent[-30:]!r}), was answered {reply.status} {reply.body[:150]!r}, expected 201 "
        "with the same note\nThe body is UTF-8: decode it as UTF-8 (strictly), not as "
        "Latin-1 or ASCII.")
    for body, content_type, what, how in OTHER_ENCODINGS:
        reply = post(host, body, content_type=content_type)
        no_500(reply, body)
        assert reply.status in ((400, 415) if ";" in content_type else (400,)), (
            f"a body in {what} was answered {reply.status}, expected 400: it is not UTF-8 "
            f"JSON, and {how} (sent {body[:24]!r}..., Content-Type: {content_type}; "
            f"answer {reply.body[:100]!r})\nThe API takes UTF-8 only (RFC 8259): decode "
            "with body.decode('utf-8'), strict, before json.loads. A body another component "
            "(a proxy, a WAF, the log) reads differently from the app is a parser "
            "differential: what was checked is not what runs.")


# An object naming a key twice: json.loads keeps the last value, a WAF, a gateway or another
# service's parser may keep the first (or refuse) - a parser differential: what was checked
# is not what runs. RFC 8259 4: names SHOULD be unique; I-JSON (RFC 7493 2.3) MUST NOT
# repeat them; validation at the boundary refuses the document (400), whatever the values.
# (body, what it is, what an app that reads it sees)
VALID_FIELDS = '"sku": "KEY-0042", "email": "ana@shop.example"'
DUPLICATE_KEYS = [
    ('{"quantity": true, "quantity": 1, ' + VALID_FIELDS + '}',
     "quantity = true, then quantity = 1",
     "the last value (1) passes, while a component keeping the first sees true"),
    ('{"quantity": 1, "quantity": true, ' + VALID_FIELDS + '}',
     "quantity = 1, then quantity = true",
     "a parser keeping the first value checks 1; json.loads keeps true"),
    ('{"quantity": 2, "quantity": 2, ' + VALID_FIELDS + '}',
     "quantity = 2 twice, the same value",
     "the values agree here, but a duplicate is refused whatever they are (I-JSON)"),
    ('{"quantity": 3, "quantit\\u0079": 3, ' + VALID_FIELDS + '}',
     'quantity twice, the second spelled "quantit\\u0079" (the same name once decoded)',
     "the names differ as bytes only: compare the decoded names, as the parser does"),
    ('{"quantity": 4, ' + VALID_FIELDS + ', "sku": "KEY-0043"}',
     "sku twice, two valid values far apart",
     "which order is filled, KEY-0042 or KEY-0043, depends on the parser"),
]


def test_an_object_naming_a_key_twice_is_400(host: str) -> None:
    for text, what, seen in DUPLICATE_KEYS:
        body = text.encode()
        reply = post(host, body)
        no_500(reply, body)
        assert reply.status == 400, (
            f"an order naming a key twice ({what}: {text}) was answered {reply.status} "
            f"{reply.body[:120]!r}, expected 400 - {seen}\njson.loads keeps the last "
            "value of a repeated name, a WAF, a gateway or the next service may keep the "
            "first: what was checked is not what runs. RFC 8259 says names SHOULD be "
            "unique and I-JSON (RFC 7493) that they MUST: refuse the document whatever "
            "the values (True == 1 in Python, so comparing them lets true/1 through) - "
            "json.loads(..., object_pairs_hook=...) sees every pair, decoded.")


# The same at any depth (I-JSON: every object of a message): nested, in arrays. (body, what)
NESTED_DUPLICATES = [
    ('{"quantity": 2, ' + VALID_FIELDS + ', "meta": {"id": 1, "id": 2}}',
     "an extra field whose object names id twice"),
    ('{"quantity": 2, ' + VALID_FIELDS + ', "note": {"text": "a", "text": "b"}}',
     "note sent as an object naming text twice"),
    ('{"quantity": 2, ' + VALID_FIELDS + ', "meta": {"a": {"b": 1, "b": true}}}',
     "an object two levels down naming b twice"),
    ('{"quantity": 2, ' + VALID_FIELDS + ', "note": [{"x": 1, "x": 1}]}',
     "an object inside an array naming x twice, the same value"),
    ('{"quantity": 2, ' + VALID_FIELDS + ', "meta": [1, [{"role": "user", "role": "admin"}]]}',
     "an object inside an array inside an array naming role twice"),
    ('[{"quantity": 1, "quantity": true}]',
     "the body an array whose object names quantity twice"),
]


def test_a_key_named_twice_at_any_depth_is_400(host: str) -> None:
    for text, what in NESTED_DUPLICATES:
        reply = post(host, text.encode())
        no_500(reply, text.encode())
        assert reply.status == 400, (
            f"a body with a nested object naming a key twice ({what}: {text}) was "
            f"answered {reply.status} {reply.body[:120]!r}, expected 400 - duplicate "
            "names are refused in every object of the document, not only in the order's "
            "own fields\nI-JSON (RFC 7493 2.3) forbids them in any object: the next "
            "service or a log reading a nested one may keep the first where json.loads "
            "keeps the last. object_pairs_hook is called for every object, at every "
            "depth and inside arrays: check there, not once on the outer object.")


def test_bytes_that_are_not_json_get_400(host: str) -> None:
    @SETTINGS
    @given(st.binary(max_size=300))
    @example(b"\xff\xfe{}")                           # not UTF-8
    @example(b'{"sku": "ABC-1234", "quantity": NaN}')  # not JSON (Python's json allows it)
    @example(b"[" * 1024 + b"]" * 1024)                # nested deeper than the parser's stack
    @example(b'{"sku": "ABC-1234", "quantity": 1e999}')
    @example(b"")
    def prop(body: bytes) -> None:
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=lambda c: 1 / 0)
        except (ValueError, RecursionError, ZeroDivisionError):
            doc = ...  # not JSON
        reply = post(host, body)
        no_500(reply, body)
        if doc is ...:
            assert reply.status == 400, (
                f"a body that is not JSON ({body[:80]!r}) was answered {reply.status}, "
                "expected 400 Bad Request\nParse errors are ValueError (bad UTF-8 is a "
                "UnicodeDecodeError, not a JSONDecodeError), nesting too deep raises "
                "RecursionError, and Python's json accepts NaN/Infinity unless told not to "
                "(parse_constant).")
        elif depth(doc) > 100:  # a parser may give up on such nesting: 400 or 422 both refuse
            assert reply.status in (400, 422), (
                f"JSON nested {depth(doc)} deep was answered {reply.status}, expected 400 or "
                "422")
        else:
            check_against_rules(reply, doc, body)
    prop()


def depth(doc: Any) -> int:
    level = 0
    while isinstance(doc, list | dict) and doc:
        doc = doc[0] if isinstance(doc, list) else next(iter(doc.values()))
        level += 1
    return level


def test_too_large_is_413_before_the_body_is_read(host: str) -> None:
    order = {"sku": "ABC-1234", "quantity": 1, "email": "a@b.io", "note": ""}
    fits = json.dumps({**order, "note": "x" * 10}).encode()
    padded = fits + b" " * (MAX_BODY - len(fits))  # whitespace is valid JSON padding
    assert len(padded) == MAX_BODY
    at_limit = post(host, padded)
    assert at_limit.status == 201, (
        f"a valid order of exactly {MAX_BODY} bytes (the limit) was answered "
        f"{at_limit.status} {at_limit.body[:120]!r}, expected 201: the limit is inclusive")
    over = post(host, padded + b" ")
    assert over.status == 413, (
        f"a body of {MAX_BODY + 1} bytes with max_body={MAX_BODY} was answered {over.status},"
        " expected 413 Content Too Large")
    # A client announcing 50 MB and sending 10 bytes: the 413 must come from the header
    # alone. A server that reads first waits for bytes that never come.
    port = int(host.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n{\"sku\": 1")
        try:
            head = sock.recv(200)
        except TimeoutError:
            head = b""
    assert head.startswith(b"HTTP/1.") and b" 413 " in head.split(b"\r\n")[0], (
        f"a request announcing Content-Length: 50000000 (and sending 10 bytes) got "
        f"{head[:60]!r} within 5 s, expected an immediate 413\nCheck Content-Length "
        "against the limit BEFORE reading the body: reading first lets any client make the "
        "server buffer (or wait for) as much as it announces.")
    valid = json.dumps(BASE).encode()
    n = str(len(valid)).encode()
    # Content-Length = 1*DIGIT (RFC 9110): int() also takes a sign, blanks and "_" - a
    # length the proxy in front refuses or reads otherwise (request smuggling). Each comes
    # with a valid order of that length, so a lenient parser answers 201.
    for bad_length in (b"abc", b"-1", b"+" + n, n[:1] + b"_" + n[1:], n + b"\xb2"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                         b"\r\nContent-Length: " + bad_length + b"\r\n\r\n" + valid)
            try:
                head = sock.recv(200)
            except TimeoutError:
                head = b"(nothing within 5 s)"
        status = head.split(b"\r\n")[0]
        assert re.match(rb"HTTP/1\.\d 4\d\d ", status), (
            f"Content-Length: {bad_length.decode('latin-1')!r} was answered {status!r}, "
            "expected a 4xx (400): the header is client input too; "
            + ("a negative length passes a 'length > max_body' check, and read(-1) then "
               "reads until the client closes - accept only the ASCII digits 0-9, not "
               "whatever int() takes" if bad_length.startswith(b"-") else
               "int() of it raises - check it is digits first" if bad_length == b"abc" else
               "int() accepts a sign and '_', and str.isdigit() takes '\\xb2' (superscript "
               "two) that int() then refuses; RFC 9110 takes neither (Content-Length = "
               "1*DIGIT, ASCII 0-9 only): a proxy in front that reads it otherwise frames "
               "the request differently - check every character is 0-9"))
