"""ph7.10 - input validation at the trust boundary: size first, then syntax, then an
allowlist of fields, types and values. Whatever a client sends, the answer is a 4xx that
names the problem, never a 500.

Order matters: the size limit is checked on Content-Length before a byte of the body is
read (a client announcing 10 MB gets 413 at once, the server never buffers it); then the
body must be UTF-8 JSON (400 if not, including nesting too deep for the parser, and an
object naming a key twice); then the document must match the allowlist exactly (422
listing every field that does not).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

SKU = re.compile(r"[A-Z]{3}-[0-9]{4}")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+")
ALLOWED = {"sku", "quantity", "email", "note"}
REQUIRED = {"sku", "quantity", "email"}


def validate(doc: Any) -> list[dict[str, str]]:
    """Every problem with the document, as {field, problem}; [] when it is valid."""
    if not isinstance(doc, dict):
        return [{"field": "", "problem": "the body must be a JSON object"}]
    errors = [{"field": k, "problem": "unknown field"} for k in sorted(set(doc) - ALLOWED)]
    errors += [{"field": k, "problem": "required"} for k in sorted(REQUIRED - set(doc))]
    sku = doc.get("sku")
    if "sku" in doc and not (isinstance(sku, str) and SKU.fullmatch(sku)):
        errors.append({"field": "sku", "problem": "must look like ABC-1234"})
    qty = doc.get("quantity")
    # bool is a subclass of int in Python: True must not pass as 1
    if "quantity" in doc and not (type(qty) is int and 1 <= qty <= 100):
        errors.append({"field": "quantity", "problem": "must be an integer from 1 to 100"})
    email = doc.get("email")
    if "email" in doc and not (isinstance(email, str) and len(email) <= 254
                               and EMAIL.fullmatch(email)):
        errors.append({"field": "email", "problem": "must be an e-mail address"})
    note = doc.get("note")
    if "note" in doc and not (isinstance(note, str) and len(note) <= 200 and not any(
            unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in note)):
        errors.append({"field": "note", "problem": "at most 200 printable characters"})
    return errors


def make_app(max_body: int = 2048) -> Any:
    def reply(start_response: Any, status: str, body: Any) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(payload)))])
        return [payload]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if (environ["REQUEST_METHOD"], environ.get("PATH_INFO")) != ("POST", "/orders"):
            return reply(start_response, "404 Not Found", {"error": "not found"})
        raw_length = environ.get("CONTENT_LENGTH") or "0"
        if not (raw_length.isascii() and raw_length.isdigit()):  # 1*DIGIT, not "²" or "+5"
            return reply(start_response, "400 Bad Request", {"error": "bad Content-Length"})
        if int(raw_length) > max_body:  # before reading anything
            return reply(start_response, "413 Content Too Large",
                         {"error": f"the body may be at most {max_body} bytes"})
        ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return reply(start_response, "415 Unsupported Media Type",
                         {"error": "send application/json"})
        body = environ["wsgi.input"].read(int(raw_length))
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=_no_constants,
                             object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):  # bad UTF-8, bad JSON, NaN, too deep, dup key
            return reply(start_response, "400 Bad Request", {"error": "the body is not JSON"})
        errors = validate(doc)
        if errors:
            return reply(start_response, "422 Unprocessable Content", {"errors": errors})
        order = {k: doc[k] for k in ("sku", "quantity", "email", "note") if k in doc}
        return reply(start_response, "201 Created", order)

    return app


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"quantity": true, "quantity": 1}: json.loads keeps the last, a WAF or gateway may
    # check the first (a parser differential). Names SHOULD be unique (RFC 8259 4), MUST
    # be in I-JSON (RFC 7493 2.3): refuse the document, whatever the values.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("an object names a key twice")
    return doc
