"""ph7.10 verification, valid orders at the edges of what the rules allow: a Content-Type
spelled as RFC 9110 lets a client spell it, a note of exactly 200 characters that are not
ASCII, the limit each app was made with, and a body read to its Content-Length (not to an
end of file). A validator must refuse what breaks the rules and nothing else: a client
whose valid order is refused cannot fix it. (The lab's folders are not packages: the test
files cannot import each other, so the few helpers this one needs are its own.)
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


def padded(size: int) -> bytes:
    """The valid ORDER as JSON of exactly ``size`` bytes: blanks after it are JSON too."""
    body = json.dumps(ORDER).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def send(host: str, body: bytes) -> Any:
    """POST ``body`` to /orders, the connection left open for the answer as clients do; no
    answer within 5 s fails the test naming the likely cause."""
    try:
        return http_request(host, "POST", "/orders", body, timeout=5)
    except TimeoutError:
        pass  # failed below, outside the handler: the message is the finding, not the trace
    pytest.fail(
        f"a POST of {len(body)} bytes (Content-Length: {len(body)}), the connection left "
        "open for the answer: no answer within 5 s - the app is still reading "
        "wsgi.input past Content-Length, waiting for an end of file the client never "
        "sends (read() or readlines() with no size). Read exactly int(CONTENT_LENGTH) "
        "bytes: PEP 3333 does not promise an EOF after them, and each such request "
        "holds a worker until the client gives up.", pytrace=False)


def test_each_app_keeps_the_limit_it_was_given(learner: Any) -> None:
    """Two apps in one process, made one after the other with limits of their own (100 bytes
    and 4096): each decides by its own ``max_body``, not by the default nor by the last
    app made."""
    make_app = learner.function("validation", "make_app")
    small, large = make_app(max_body=100), make_app(max_body=4096)
    with serve_wsgi(small) as small_host, serve_wsgi(large) as large_host:
        for host, limit, size, status in ((small_host, 100, 100, 201),
                                          (small_host, 100, 101, 413),
                                          (large_host, 4096, 3000, 201),
                                          (large_host, 4096, 4096, 201),
                                          (large_host, 4096, 4097, 413)):
            reply = send(host, padded(size))
            assert reply.status == status, (
                f"an app made with make_app(max_body={limit}) (beside one made with "
                f"max_body={100 if limit != 100 else 4096}) answered a valid order of "
                f"{size} bytes (padded with blanks) {reply.status} {reply.body[:100]!r}, "
                f"expected {status}: the limit is the max_body the app was made with - not "
                "the default 2048 kept in a constant, nor a module global the last "
                "make_app() call overwrote (two apps, two limits).")


def test_the_body_is_read_to_its_length_not_to_the_end(learner: Any) -> None:
    """A client that sent its Content-Length bytes keeps its connection open for the answer
    (keep-alive, or just waiting): the app must read exactly CONTENT_LENGTH bytes. PEP 3333
    lets a server hand wsgi.input over without an end of file after them (wsgiref does)."""
    make_app = learner.function("validation", "make_app")
    body = json.dumps(ORDER).encode()
    with serve_wsgi(make_app(max_body=2048)) as host:
        reply = send(host, body)
    assert reply.status == 201, (
        f"a valid order of {len(body)} bytes was answered {reply.status} "
        f"{reply.body[:120]!r}, expected 201")
