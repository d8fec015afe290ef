"""ph7.10 verification, valid orders at the edges of what the rules allow: a Content-Type
spelled as RFC 9110 lets a client spell it, and a note of exactly 200 characters that are
not ASCII. A validator must refuse what breaks the rules and nothing else: a client whose
valid order is refused cannot fix it. (The lab's folders are not packages: the test files
cannot import each other, so the few helpers this one needs are its own.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from labrunner.testing import http_request, serve_wsgi

ORDER = {"sku": "KEY-0042", "quantity": 3, "email": "ana@shop.example"}


@pytest.fixture
def host(learner: Any) -> Any:
    make_app = learner.function("validation", "make_app")
    with serve_wsgi(make_app(max_body=2048)) as address:
        yield address


def post(host: str, doc: dict[str, Any], content_type: str = "application/json") -> Any:
    body = json.dumps(doc, ensure_ascii=False).encode()
    return http_request(host, "POST", "/orders", body, content_type=content_type)


# Content-Type = type "/" subtype *( OWS ";" OWS parameter ) (RFC 9110 8.3.1); "the type
# and subtype tokens are case-insensitive", and so is the charset's value. application/json
# defines no charset parameter, but "adding one really has no effect on compliant
# recipients" (RFC 8259 11). (Content-Type, what a learner's comparison gets wrong)
MEDIA_TYPES = [
    ("Application/JSON", "the type and subtype are case-insensitive: compare them lower-cased"),
    ("application/json; charset=utf-8", "a parameter follows the ';': compare the media type "
     "before it, not the whole header"),
    ("application/json;charset=UTF-8", "a parameter follows the ';', with no blank: compare "
     "the media type before it"),
    ("APPLICATION/JSON ; charset=utf-8", "blanks (OWS) may come before the ';': strip the "
     "media type, and compare it lower-cased"),
]


def test_a_content_type_spelled_as_the_rfc_allows_is_accepted(host: str) -> None:
    for content_type, how in MEDIA_TYPES:
        reply = post(host, ORDER, content_type)
        assert reply.status == 201 and reply.json() == ORDER, (
            f"a valid order sent with Content-Type: {content_type!r} was answered "
            f"{reply.status} {reply.body[:120]!r}, expected 201 with the order - {how} "
            "(RFC 9110 8.3.1)\nThe media type is application/json however a client spells "
            "it: case, parameters and the blanks around ';' are the client's choice. "
            "environ['CONTENT_TYPE'].split(';')[0].strip().lower() == 'application/json'.")


# 200 characters (code points, what len() of the decoded string counts) that are not ASCII:
# (note, what it is)
LONG_NOTES = [
    ("é" * 200, "200 x 'é': 400 bytes in UTF-8"),
    ("𝄞" * 200, "200 x U+1D11E (a musical symbol): 800 bytes in UTF-8, 400 UTF-16 units"),
    ("ok 👍 " * 40, "'ok 👍 ' 40 times: 320 bytes in UTF-8, 240 UTF-16 units"),
]


def test_a_note_of_200_characters_not_ascii_is_accepted(host: str) -> None:
    for note, what in LONG_NOTES:
        assert len(note) == 200
        doc = {**ORDER, "note": note}
        reply = post(host, doc)
        assert reply.status == 201 and reply.json() == doc, (
            f"a valid order whose note is 200 characters ({what}) was answered "
            f"{reply.status} {reply.body[:120]!r}, expected 201 with the note unchanged: "
            "the bound is 200 characters, len() of the decoded string - not its UTF-8 bytes "
            "(len(note.encode())) nor UTF-16 code units (JavaScript's length)\nA bound "
            "counted in bytes refuses a valid order from every client who writes in another "
            "script than English.")
    over = {**ORDER, "note": "é" * 201}
    reply = post(host, over)
    assert reply.status == 422, (
        f"an order whose note is 201 x 'é' was answered {reply.status} "
        f"{reply.body[:120]!r}, expected 422: 201 characters are one too many")
