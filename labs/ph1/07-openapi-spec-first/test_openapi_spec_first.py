"""Verification for ph1.7 openapi-spec-first.

Three independent judges, none of them the learner's code:
- openapi-spec-validator says whether openapi.yaml is a valid OpenAPI document, and the test
  checks that it states the contract the README describes;
- openapi-core checks real request/response pairs, sent over HTTP to the learner's app (a
  threaded wsgiref server on 127.0.0.1:0), against the learner's spec;
- schemathesis generates requests from the spec, valid and invalid ones (hypothesis,
  derandomised so every run sends the same requests), and no answer may be a 5xx.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from labrunner.testing import http_request, serve_wsgi, wait_until

SCHEMA = """
CREATE TABLE users (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name  text NOT NULL,
    email text NOT NULL UNIQUE
);
"""
# operationId -> (method, path) the contract asks for
OPERATIONS = {
    "listUsers": ("get", "/users"),
    "createUser": ("post", "/users"),
    "getUser": ("get", "/users/{userId}"),
    "deleteUser": ("delete", "/users/{userId}"),
}
EXAMPLES_PER_OPERATION = 15  # per generation mode (valid data, invalid data)


# ---- requests to the learner's app (served with labrunner.testing.serve_wsgi) ------------

@dataclass
class Exchange:
    """One real request and its response, as sent and received."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes | None
    content_type: str
    status: int
    headers: dict[str, str]
    data: bytes

    def label(self) -> str:
        query = "?" + "&".join(f"{k}={v}" for k, v in self.query.items()) if self.query else ""
        return f"{self.method} {self.path}{query} -> {self.status}"


def exchange(host: str, method: str, path: str, *, query: dict[str, str] | None = None,
             document: Any = None, raw: bytes | None = None,
             content_type: str = "application/json") -> Exchange:
    body = raw if raw is not None else (None if document is None else json.dumps(document).encode())
    target = path + ("?" + "&".join(f"{k}={v}" for k, v in (query or {}).items()) if query else "")
    reply = http_request(host, method, target, body, content_type=content_type)
    return Exchange(method, path, query or {}, body, content_type, reply.status,
                    dict(reply.headers.items()), reply.body)


# ---- reading the learner's spec ---------------------------------------------------------

def short(exc: BaseException) -> str:
    """The gist of a validator's error: its first line, without the document it quotes."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(" within {", 1)[0][:300]


def load_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        pytest.fail(f"openapi.yaml is not valid YAML: {exc}", pytrace=False)
    if not isinstance(spec, dict):
        pytest.fail(f"openapi.yaml must be a mapping (openapi:, info:, paths:), saw {spec!r}",
                    pytrace=False)
    return spec


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow local $refs (#/components/...) until a node that is not a reference."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node and seen < 20:
        ref = str(node["$ref"])
        assert ref.startswith("#/"), f"openapi.yaml: only local $refs are checked here, saw {ref}"
        node = spec
        for part in ref[2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) \
                if isinstance(node, dict) else {}
        seen += 1
    return node


def operation(spec: dict[str, Any], operation_id: str) -> dict[str, Any]:
    method, path = OPERATIONS[operation_id]
    op = (spec.get("paths") or {}).get(path, {}).get(method)
    assert isinstance(op, dict), (
        f"openapi.yaml has no {method.upper()} {path}: the contract needs operation "
        f"{operation_id} there")
    assert op.get("operationId") == operation_id, (
        f"openapi.yaml: {method.upper()} {path} must have operationId {operation_id}, saw "
        f"{op.get('operationId')!r}: generated clients name their methods after it")
    return op


def undeclared(spec: dict[str, Any], ex: Exchange, sent: str = "") -> None:
    """Fail if the operation the exchange called does not declare the status it got."""
    route = "/users" if ex.path == "/users" else "/users/{userId}"
    name = next((op for op, (method, path) in OPERATIONS.items()
                 if method == ex.method.lower() and path == route), None)
    if name is None:
        return
    declared = {str(code) for code in operation(spec, name).get("responses", {})}
    family = f"{str(ex.status)[0]}XX"
    assert str(ex.status) in declared or family in declared or "default" in declared, (
        f"{ex.label()}{f' ({sent})' if sent else ''}: the code answered {ex.status}, a status "
        f"openapi.yaml does not declare for {name} (it declares {sorted(declared)}): every "
        "status the code can send belongs in the spec, or generated clients cannot handle it")


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def spec_path(learner: Any) -> Path:
    return Path(learner.path("openapi.yaml"))


@pytest.fixture
def host(learner: Any, postgres: Any) -> Iterator[str]:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    make_app = learner.function("users_service", "make_app")
    try:
        app = make_app(postgres.dsn)
    except Exception as exc:  # noqa: BLE001 - e.g. a spec the app loads that does not load
        pytest.fail(f"make_app(dsn) raised {type(exc).__name__}: {short(exc)}", pytrace=False)
    with serve_wsgi(app) as address:
        yield address


# ---- the verification -------------------------------------------------------------------

def test_spec_is_valid_openapi(spec_path: Path) -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.readers import read_from_filename

    spec = load_spec(spec_path)
    version = str(spec.get("openapi", ""))
    assert version.startswith(("3.0.", "3.1.")), (
        f"openapi.yaml: expected openapi: 3.0.x or 3.1.x, saw {version!r}")
    document, _ = read_from_filename(str(spec_path))
    try:
        validate(document)
    except Exception as exc:  # noqa: BLE001 - the validator's own error says what is wrong
        pytest.fail(f"openapi.yaml is not a valid OpenAPI {version} document: {short(exc)}",
                    pytrace=False)


def test_spec_states_the_contract(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    ops = {name: operation(spec, name) for name in OPERATIONS}

    get_200 = ops["getUser"].get("responses", {}).get("200", {})
    schema = resolve(spec, get_200).get("content", {}).get("application/json", {}).get("schema")
    assert isinstance(schema, dict) and schema.get("$ref") == "#/components/schemas/User", (
        f"getUser 200: expected the schema to be $ref: '#/components/schemas/User' (one "
        f"reusable definition, not a copy per operation), saw {schema!r}")
    user = resolve(spec, schema)
    missing = {"id", "name", "email"} - set(user.get("required", []))
    assert not missing, (
        f"components.schemas.User must require id, name and email; missing {sorted(missing)}")

    def statuses(name: str) -> set[str]:
        return {str(code) for code in ops[name].get("responses", {})}

    wanted = {"listUsers": {"200"}, "createUser": {"201", "409"},
              "getUser": {"200", "404"}, "deleteUser": {"204", "404"}}
    for name, codes in wanted.items():
        assert codes <= statuses(name), (
            f"openapi.yaml: {name} must declare responses {sorted(codes)}, declares "
            f"{sorted(statuses(name))}")
    assert statuses("createUser") & {"400", "422"}, (
        "openapi.yaml: createUser must declare how an invalid body is answered (400 or 422)")
    created = resolve(spec, ops["createUser"]["responses"]["201"])
    assert "Location" in (created.get("headers") or {}), (
        "openapi.yaml: createUser 201 must declare the Location header of the new user")
    for name, op in ops.items():
        for code, response in op.get("responses", {}).items():
            if str(code).startswith("4"):
                content = resolve(spec, response).get("content") or {}
                assert "application/problem+json" in content, (
                    f"openapi.yaml: {name} {code} must be described as "
                    f"application/problem+json (RFC 7807), saw {sorted(content) or 'no body'}")


class Contract:
    """The learner's openapi.yaml as a judge of real exchanges: the status must be one the
    operation declares, and the response must validate (openapi-core)."""

    def __init__(self, spec_path: Path) -> None:
        from openapi_core import Config, OpenAPI

        self.spec = load_spec(spec_path)
        # openapi-core parses application/json itself; problem documents are JSON too.
        config = Config(extra_media_type_deserializers={"application/problem+json": json.loads})
        try:
            self.api = OpenAPI.from_file_path(str(spec_path), config=config)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"openapi-core cannot load openapi.yaml: {short(exc)}", pytrace=False)

    def judge(self, ex: Exchange, sent: str = "") -> None:
        """Fail unless the response is one openapi.yaml declares for what was sent."""
        from openapi_core.testing import MockRequest, MockResponse

        what = f" ({sent})" if sent else ""
        undeclared(self.spec, ex, sent)
        request = MockRequest("http://127.0.0.1", ex.method.lower(), ex.path, args=ex.query,
                              data=ex.body, content_type=ex.content_type)
        response = MockResponse(ex.data, status_code=ex.status, headers=ex.headers,
                                content_type=ex.headers.get("Content-Type", ""))
        try:
            self.api.validate_response(request, response)
        except Exception as exc:  # noqa: BLE001 - openapi-core says what does not match
            reason = str(exc.__cause__ or exc)
            pytest.fail(f"{ex.label()}{what}: the real response does not match openapi.yaml: "
                        f"{type(exc).__name__}: {reason[:400]}; body {ex.data[:200]!r} - "
                        "every answer the code gives, errors included, is part of the "
                        "contract", pytrace=False)


@pytest.fixture
def contract(spec_path: Path) -> Contract:
    return Contract(spec_path)


def test_real_responses_match_the_spec(contract: Contract, host: str) -> None:
    created = exchange(host, "POST", "/users",
                       document={"name": "Ada Lovelace", "email": "ada@example.com"})
    assert created.status == 201, (
        f"POST /users with a valid NewUser: expected 201, saw {created.status} "
        f"{created.data[:200]!r}")
    user_id = json.loads(created.data).get("id")
    location = created.headers.get("Location")
    assert location, (
        f"POST /users -> 201 came without a Location header, which openapi.yaml declares for "
        f"createUser 201: the code must send what the spec promises (Location: "
        f"/users/{user_id})")
    target = location.split("://", 1)[-1]
    target = target[target.index("/"):] if "://" in location else target
    followed = exchange(host, "GET", target)
    assert followed.status == 200 and json.loads(followed.data).get("id") == user_id, (
        f"the new user's Location {location!r} does not lead to it: GET {target} -> "
        f"{followed.status} {followed.data[:150]!r}")
    script = [
        created,
        exchange(host, "GET", f"/users/{user_id}"),
        exchange(host, "GET", "/users", query={"limit": "10"}),
        exchange(host, "GET", "/users"),
        exchange(host, "GET", "/users/987654"),
        exchange(host, "POST", "/users", document={"name": "Ada", "email": "ada@example.com"}),
        exchange(host, "POST", "/users", document={"name": "No Email"}),
        exchange(host, "POST", "/users", raw=b'{"name": "Broken"'),
        exchange(host, "GET", "/users/abc"),
        exchange(host, "DELETE", "/users/0"),
        exchange(host, "DELETE", f"/users/{user_id}"),
        exchange(host, "DELETE", f"/users/{user_id}"),
    ]
    expected = [201, 200, 200, 200, 404, 409, None, 400, "4xx", "4xx", 204, 404]
    for ex, status in zip(script, expected, strict=True):
        if status is None:
            assert ex.status in (400, 422), (
                f"{ex.label()}: a body without the required email must be refused with 400 or "
                f"422, saw {ex.status}")
        elif status == "4xx":
            assert 400 <= ex.status < 500, (
                f"{ex.label()}: a userId that is not a positive integer names no user: "
                f"expected a 4xx the spec declares, saw {ex.status} {ex.data[:150]!r}")
        else:
            assert ex.status == status, (
                f"{ex.method} {ex.path}: expected {status}, saw {ex.status} {ex.data[:150]!r}")
        contract.judge(ex)


def test_the_code_enforces_the_bounds_its_spec_declares(spec_path: Path, host: str,
                                                        contract: Contract) -> None:
    """What the spec forbids, the code refuses: the bounds are read from the learner's own
    openapi.yaml, and one request just beyond each is sent."""
    spec = load_spec(spec_path)
    probes: list[tuple[str, Exchange]] = []
    new_user = resolve(spec, (resolve(spec, operation(spec, "createUser").get("requestBody", {}))
                              .get("content", {}).get("application/json", {}).get("schema")))
    fields = (new_user or {}).get("properties") or {}
    for name in ("name", "email"):
        field_schema = resolve(spec, fields.get(name)) or {}
        longest = field_schema.get("maxLength")
        if isinstance(longest, int) and 0 < longest < 10_000:
            value = "x" * (longest + 1) if name == "name" else \
                "a" * (longest + 1 - len("@example.com")) + "@example.com"
            other = {"name": "Bounded", "email": "bounded@example.com"}
            probes.append((f"a {name} of {longest + 1} characters (openapi.yaml: maxLength "
                           f"{longest})", exchange(host, "POST", "/users",
                                                   document={**other, name: value})))
        shortest = field_schema.get("minLength")
        if isinstance(shortest, int) and shortest > 0:
            probes.append((f"an empty {name} (openapi.yaml: minLength {shortest})",
                           exchange(host, "POST", "/users", document={
                               "name": "Short", "email": "short@example.com", name: ""})))
    for param in operation(spec, "listUsers").get("parameters", []):
        param = resolve(spec, param)
        schema = resolve(spec, param.get("schema")) or {}
        if param.get("in") != "query" or schema.get("type") != "integer":
            continue
        for bound, beyond in (("maximum", 1), ("minimum", -1)):
            if isinstance(schema.get(bound), int):
                value = schema[bound] + beyond
                probes.append((f"{param.get('name')}={value} (openapi.yaml: {bound} "
                               f"{schema[bound]})", exchange(host, "GET", "/users", query={
                                   str(param.get("name")): str(value)})))
    assert probes, (
        "openapi.yaml declares no bounds: give NewUser's strings maxLength/minLength and "
        "listUsers' limit and offset a minimum and maximum")
    for what, ex in probes:
        assert 400 <= ex.status < 500, (
            f"{ex.label()}: the code accepted {what}, a request its own spec forbids: "
            "validate every request against openapi.yaml (openapi_core unmarshal_request) "
            "and refuse it with the error the spec declares, rather than checking by hand")
        contract.judge(ex, what)


BIGINT_MAX = 9223372036854775807  # Postgres' bigint, the users table's id


def largest_allowed(schema: dict[str, Any]) -> tuple[int, str]:
    """The largest integer an integer schema allows, or one past bigint when it declares
    no maximum (any integer is then allowed), and how the spec says so."""
    high, above = schema.get("maximum"), schema.get("exclusiveMaximum")
    if isinstance(high, int | float) and not isinstance(high, bool):
        if above is True:  # OpenAPI 3.0's boolean form
            return math.ceil(high) - 1, f"maximum {high}, exclusive"
        return math.floor(high), f"maximum {high}"
    if isinstance(above, int | float) and not isinstance(above, bool):  # 3.1's number form
        return math.ceil(above) - 1, f"exclusiveMaximum {above}"
    return BIGINT_MAX + 1, "no maximum"


def test_the_largest_integers_the_spec_allows_get_no_5xx(spec_path: Path, host: str,
                                                        contract: Contract) -> None:
    """Each integer parameter at the largest value openapi.yaml allows - its maximum, or
    one past Postgres' bigint where it declares none - is a request the contract admits:
    it must be answered (2xx or 4xx, as declared), not crash in the database."""
    spec = load_spec(spec_path)
    probes: list[tuple[str, str, str, dict[str, str], str]] = []
    for param in operation(spec, "listUsers").get("parameters", []):
        param = resolve(spec, param)
        schema = resolve(spec, param.get("schema")) or {}
        if param.get("in") == "query" and schema.get("type") == "integer":
            value, how = largest_allowed(schema)
            probes.append((f"{param.get('name')}={value}", "GET", "/users",
                           {str(param.get("name")): str(value)}, how))
    for name in ("getUser", "deleteUser"):
        op = operation(spec, name)
        params = [*(spec["paths"]["/users/{userId}"].get("parameters") or []),
                  *(op.get("parameters") or [])]
        for param in map(lambda p: resolve(spec, p), params):
            schema = resolve(spec, param.get("schema")) or {}
            if param.get("name") == "userId" and schema.get("type") == "integer":
                value, how = largest_allowed(schema)
                probes.append((f"userId {value}", OPERATIONS[name][0].upper(),
                               f"/users/{value}", {}, how))
    for what, method, path, query, how in probes:
        ex = exchange(host, method, path, query=query)
        assert ex.status < 500, (
            f"{ex.label()}: {what}, a value openapi.yaml allows (it declares {how}), got a "
            f"server error {ex.data[:120]!r}: Postgres' bigint ends at {BIGINT_MAX}, so a "
            "bound the spec leaves open - or one the code's arithmetic goes past (LIMIT "
            "limit + 1) - crashes in the database. Declare a maximum the code and the "
            "database can take")
        contract.judge(ex, f"{what}, the largest the spec allows")


def raw_reply(host: str, method: str, target: str) -> tuple[int, bytes]:
    """One HTTP/1.0 request on a socket of the test's own, read to the connection's end:
    the status and every byte after the head (http.client reads no body of a 204)."""
    address, port = host.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=15) as sock:
        sock.sendall(f"{method} {target} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_204_has_no_body(host: str) -> None:
    """204 No Content ends at its headers (RFC 9110 15.3.5: it cannot contain content), and
    the spec declares no content for deleteUser's 204: what the server sends after the
    headers is read - on a kept-alive connection - as the start of the next response."""
    created = exchange(host, "POST", "/users",
                       document={"name": "Short Lived", "email": "short.lived@example.com"})
    assert created.status == 201, (
        f"{created.label()}: expected 201, saw {created.status} {created.data[:150]!r}")
    user_id = json.loads(created.data).get("id")
    status, body = raw_reply(host, "DELETE", f"/users/{user_id}")
    assert status == 204, f"DELETE /users/{user_id}: expected 204, saw {status} {body[:150]!r}"
    assert body == b"", (
        f"DELETE /users/{user_id} -> 204 came with a {len(body)}-byte body {body[:120]!r}: a "
        "204 No Content has no body (RFC 9110 15.3.5), and openapi.yaml declares none for "
        "deleteUser's 204. A client stops reading at the 204's headers, so on a kept-alive "
        "connection these bytes are taken for the next response. Send the status and "
        "headers only, and no body")


def test_a_name_as_long_as_the_spec_allows_is_created(spec_path: Path, host: str,
                                                      contract: Contract) -> None:
    """maxLength counts characters (JSON Schema: code points), not UTF-8 bytes nor UTF-16
    units: a name of exactly maxLength characters, some of them two bytes long in UTF-8
    (ë) and some four (𝄞, two UTF-16 units), is one the spec allows and must be created
    and read back as sent."""
    spec = load_spec(spec_path)
    new_user = resolve(spec, (resolve(spec, operation(spec, "createUser").get("requestBody", {}))
                              .get("content", {}).get("application/json", {}).get("schema")))
    name_schema = resolve(spec, ((new_user or {}).get("properties") or {}).get("name")) or {}
    if {"pattern", "enum", "format"} & set(name_schema):
        return  # names the spec itself narrows: this name may be one it forbids
    longest = name_schema.get("maxLength")
    length = longest if isinstance(longest, int) and 8 <= longest < 10_000 else 64
    name = ("Zoë 𝄞 " * length)[:length]
    what = (f"a name of {length} characters, {len(name.encode())} bytes in UTF-8 and "
            f"{len(name.encode('utf-16-le')) // 2} UTF-16 units (openapi.yaml: maxLength "
            f"{longest})")
    created = exchange(host, "POST", "/users",
                       document={"name": name, "email": "long.name@example.com"})
    assert created.status == 201, (
        f"{created.label()}: the code refused {what}, a name its own spec allows: expected "
        f"201, saw {created.status} {created.data[:150]!r}. maxLength counts characters "
        "(code points), not UTF-8 bytes or UTF-16 units: leave the bounds to the spec's "
        "validation (openapi_core unmarshal_request) rather than measuring by hand")
    contract.judge(created, what)
    user_id = json.loads(created.data).get("id")
    fetched = exchange(host, "GET", f"/users/{user_id}")
    got = json.loads(fetched.data).get("name") if fetched.status == 200 else None
    assert got == name, (
        f"GET /users/{user_id} after creating {what}: expected that name back, saw "
        f"{fetched.status} {str(got)[:80]!r}")


def listed_ids(doc: Any) -> list[Any] | None:
    """The ids of the users a listUsers page holds, whatever its design: the first list of
    objects with an "id" found in the document (a bare list, {"data": [...]}, ...)."""
    if isinstance(doc, list) and doc and all(isinstance(u, dict) and "id" in u for u in doc):
        return [u["id"] for u in doc]
    values = doc if isinstance(doc, list) else doc.values() if isinstance(doc, dict) else []
    for value in values:
        if isinstance(value, list | dict) and (found := listed_ids(value)) is not None:
            return found
    return None


def test_the_code_uses_the_defaults_its_spec_declares(spec_path: Path, host: str,
                                                      postgres: Any, contract: Contract) -> None:
    """A default stated in openapi.yaml is part of the contract: a generated client that
    omits the parameter relies on it. Omitting every listUsers query parameter must list the
    same users as sending each one's declared default."""
    spec = load_spec(spec_path)
    defaults = {}
    for param in operation(spec, "listUsers").get("parameters", []):
        param = resolve(spec, param)
        schema = resolve(spec, param.get("schema")) or {}
        if param.get("in") == "query" and "default" in schema:
            defaults[str(param.get("name"))] = schema["default"]
    limit = defaults.get("limit")
    if not defaults or not isinstance(limit, int) or isinstance(limit, bool):
        return  # no default page size declared: nothing the code could contradict
    with postgres.connect(autocommit=True) as conn:  # more users than any page it could mean
        conn.execute("INSERT INTO users (name, email) SELECT 'User ' || n, 'u' || n || "
                     "'@example.com' FROM generate_series(1, %s) AS n",
                     (min(limit, 1000) + 5,))
    explicit = {name: json.dumps(value) if not isinstance(value, str) else value
                for name, value in defaults.items()}
    omitted, sent = exchange(host, "GET", "/users"), exchange(host, "GET", "/users",
                                                              query=explicit)
    pages = []
    for ex in (omitted, sent):
        assert ex.status == 200, (
            f"{ex.label()}: expected 200, saw {ex.status} {ex.data[:150]!r}")
        contract.judge(ex)
        doc = json.loads(ex.data)
        pages.append(listed_ids(doc) if listed_ids(doc) is not None else doc)
    query = "&".join(f"{k}={v}" for k, v in explicit.items())
    assert pages[0] == pages[1], (
        f"with {min(limit, 1000) + 5} users, GET /users listed "
        f"{len(pages[0]) if isinstance(pages[0], list) else 'a page'} "
        f"({str(pages[0])[:80]}) but GET /users?{query} - the defaults openapi.yaml declares "
        f"for listUsers - listed {len(pages[1]) if isinstance(pages[1], list) else 'another'}"
        f" ({str(pages[1])[:80]}): expected the same page. A default in the spec and another "
        "in the code is spec/code drift: a generated client that omits limit expects "
        f"{limit} per page. Take the values from the unmarshalled request "
        "(request.parameters.query, defaults filled in from the spec), not from the raw "
        "query string with a fallback of your own")


def page_size(spec_path: Path, contract: Contract) -> int:
    """3, or the nearest limit the spec's listUsers allows."""
    limit = 3
    for param in operation(load_spec(spec_path), "listUsers").get("parameters", []):
        schema = resolve(contract.spec, resolve(contract.spec, param).get("schema")) or {}
        if resolve(contract.spec, param).get("name") == "limit":
            low, high = schema.get("minimum"), schema.get("maximum")
            limit = max(limit, low) if isinstance(low, int) else limit
            limit = min(limit, high) if isinstance(high, int) else limit
    return limit


def walk_pages(host: str, contract: Contract, limit: int, total: int,
               between: Callable[[list[Any]], object] = lambda ids: None
               ) -> tuple[list[Any], str]:
    """GET /users at offset 0, limit, 2 * limit, ... past ``total``, each page judged by the
    spec; ``between(ids)`` runs after each page. Returns every id listed, in order, and the
    pages as text for a message."""
    pages: list[tuple[int, list[Any]]] = []
    for offset in range(0, total + limit, limit):
        ex = exchange(host, "GET", "/users", query={"limit": str(limit), "offset": str(offset)})
        assert ex.status == 200, (
            f"{ex.label()}: expected 200 (a page, empty past the end), saw {ex.status} "
            f"{ex.data[:150]!r}")
        contract.judge(ex, f"a page at offset {offset}")
        ids = listed_ids(json.loads(ex.data)) or []
        pages.append((offset, ids))
        between(ids)
    shown = "; ".join(f"offset {offset}: {ids}" for offset, ids in pages)
    return [user for _, ids in pages for user in ids], shown


def listed_wrong(everyone: list[Any], walked: list[Any]) -> str:
    """What a walk over every user got wrong ("" when each came exactly once)."""
    repeated = sorted({user for user in walked if walked.count(user) > 1})
    missing = sorted(set(everyone) - set(walked))
    return "; ".join([f"users {repeated} came on more than one page"] * bool(repeated)
                     + [f"users {missing} on none"] * bool(missing))


def test_offset_walks_the_whole_list(spec_path: Path, host: str, postgres: Any,
                                     contract: Contract) -> None:
    """offset says how many users to skip: the pages at offset 0, limit, 2 * limit, ... hold
    every user exactly once. A request with an offset past 0 is what a client that pages
    sends; none of the other checks sends one."""
    limit = page_size(spec_path, contract)
    total = 2 * limit + 1
    with postgres.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO users (name, email) SELECT 'Pager ' || n, 'pager' || n || "
                     "'@example.com' FROM generate_series(1, %s) AS n", (total,))
        everyone = [row[0] for row in conn.execute("SELECT id FROM users ORDER BY id")]
    walked, shown = walk_pages(host, contract, limit, total)
    wrong = listed_wrong(everyone, walked)
    assert not wrong and len(walked) == total, (
        f"with {total} users (ids {everyone}), GET /users?limit={limit}&offset=N for N = 0, "
        f"{limit}, {2 * limit}, ... listed {shown}: {wrong}"
        " - offset is how many users to skip (the spec's listUsers parameter): pass it to "
        "the query as OFFSET, not as a page number, and do not drop it")


def test_pages_keep_one_order_while_users_change(spec_path: Path, host: str, postgres: Any,
                                                contract: Contract) -> None:
    """Offset paging is only sound over a total order: SQL returns rows in no particular
    order without ORDER BY (PostgreSQL, LIMIT and OFFSET: "use an ORDER BY clause that
    constrains the result rows into a unique order. Otherwise you will get an unpredictable
    subset"), and an order on a column with ties (name) leaves the ties to chance. A small
    table that nobody touches comes back in insertion order all the same, so the walk here
    is what happens in production: between two pages, the users just listed edit their
    profile (an UPDATE writes a new row version, at the end of the table), and several
    users share a name. Every user must still be listed exactly once."""
    limit = page_size(spec_path, contract)
    total = 2 * limit + 1
    with postgres.connect(autocommit=True) as conn:
        # two names for everyone: ties for any order on the name
        conn.execute("INSERT INTO users (name, email) SELECT (ARRAY['Ana Lima', 'Bo Chen'])"
                     "[1 + n %% 2], 'namesake' || n || '@example.com' "
                     "FROM generate_series(1, %s) AS n", (total,))
        everyone = [row[0] for row in conn.execute("SELECT id FROM users ORDER BY id")]
        # the users just listed edit their profile: new row versions, moved in the heap
        walked, shown = walk_pages(host, contract, limit, total, lambda ids: conn.execute(
            "UPDATE users SET name = name WHERE id = ANY(%s)", (ids,)))
    wrong = listed_wrong(everyone, walked)
    assert not wrong and len(walked) == total, (
        f"with {total} users (ids {everyone}; two names among them), GET /users?limit="
        f"{limit}&offset=N for N = 0, {limit}, {2 * limit}, ..., the users of each page "
        f"updating their row (UPDATE users SET name = name) before the next, listed "
        f"{shown}: {wrong}; expected each user exactly once\nOffset paging needs one total "
        "order for every page: without ORDER BY, PostgreSQL returns rows in whatever order "
        "it finds them (an updated row moves to the end of the table), and ORDER BY a column "
        "with ties (name) leaves the order of the ties to chance - order by a unique key "
        "(ORDER BY id, or name, id).")


def at_once(host: str, postgres: Any, method: str, path: str,
            document: Any = None) -> tuple[list[Any], list[Exchange]]:
    """Send the same request twice, at once. The test holds a SHARE lock on users (reads
    pass, writes wait) until both requests wait on it, so both have done whatever they do
    before writing - a check (SELECT) before the write has checked - and then lets them
    write together: the database decides. Return both statuses (an exception where a
    request failed) and the exchanges."""
    statuses: list[Any] = [None, None]
    exchanges: list[Exchange] = []

    def send(i: int) -> None:
        try:
            exchanges.append(exchange(host, method, path,
                                      document=None if document is None else dict(document)))
            statuses[i] = exchanges[-1].status
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            statuses[i] = exc

    with postgres.connect(autocommit=True) as holder, postgres.connect(autocommit=True) as look:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE users IN SHARE MODE")
        threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()

        def both_waiting_or_done() -> bool:
            (waiting,) = look.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'users'::regclass "
                "AND NOT granted").fetchone()
            return bool(waiting + sum(not th.is_alive() for th in threads) >= 2)

        try:
            wait_until(both_waiting_or_done, f"both {method} {path} to reach the users table")
        finally:
            holder.execute("COMMIT")
        for thread in threads:
            thread.join(30)
    return statuses, exchanges


def test_concurrent_creates_of_one_email_get_201_and_409(host: str, postgres: Any,
                                                         contract: Contract) -> None:
    """Two POST /users with the same new email, at once (at_once): the database's UNIQUE
    constraint decides, and the spec's 409 must come out of it."""
    document = {"name": "Racer", "email": "race@example.com"}
    statuses, exchanges = at_once(host, postgres, "POST", "/users", document)
    seen = sorted(s if isinstance(s, int) else -1 for s in statuses)
    assert seen == [201, 409], (
        f"two concurrent POST /users with the same new email {document['email']!r}: expected "
        f"one 201 and one 409, saw {[s if isinstance(s, int) else repr(s) for s in statuses]}"
        + (": both requests found the email free, then both INSERTed and the second hit the "
           "UNIQUE constraint - a check (SELECT) before the INSERT cannot see a concurrent "
           "request's row; let the INSERT decide and map its UniqueViolation to the spec's 409"
           if 500 in seen else ""))
    for ex in exchanges:
        contract.judge(ex, "one of two concurrent creates of one email")


def test_concurrent_deletes_of_one_user_get_204_and_404(host: str, postgres: Any,
                                                        contract: Contract) -> None:
    """Two DELETE /users/{userId} of the same user, at once (at_once): one deletes it
    (204), and for the other there is no such user any more (404) - as for a DELETE sent
    after the first. Only the DELETE's own count of deleted rows can say which is which: a
    SELECT before it found the user for both, a transaction around the two included."""
    with postgres.connect(autocommit=True) as conn:
        row = conn.execute("INSERT INTO users (name, email) VALUES ('Doomed', "
                           "'doomed@example.com') RETURNING id").fetchone()
    assert row is not None
    statuses, exchanges = at_once(host, postgres, "DELETE", f"/users/{row[0]}")
    shown = [s if isinstance(s, int) else repr(s) for s in statuses]
    seen = sorted(s if isinstance(s, int) else -1 for s in statuses)
    assert seen == [204, 404], (
        f"two concurrent DELETE /users/{row[0]} of one existing user: expected one 204 and "
        f"one 404, saw {shown}"
        + (": both requests reported deleting the user, but only one row was deleted - "
           "each found the user with a check (SELECT) before its DELETE, and the check "
           "cannot see the other request's DELETE (a transaction around the two, at READ "
           "COMMITTED, does not change that). Let the DELETE decide: its rowcount is 1 for "
           "the request that deleted the user and 0 for the other, which gets the spec's 404"
           if seen == [204, 204] else ""))
    for ex in exchanges:
        contract.judge(ex, "one of two concurrent deletes of one user")


# The media types a POST /users may come with, and what the contract makes of them: JSON
# with a charset parameter is JSON (the spec's application/json matches it), a document
# in another media type is the client's error - with a status the spec declares for it.
# (content type, what it is, the body, the status expected: 201 or "4xx")
MEDIA_TYPES: list[tuple[str, str, bytes, Any]] = [
    ("application/json; charset=utf-8", "JSON with a charset parameter",
     b'{"name": "Charset", "email": "charset@example.com"}', 201),
    ("text/plain", "a JSON document sent as text/plain",
     b'{"name": "Plain", "email": "plain@example.com"}', "4xx"),
    ("application/x-www-form-urlencoded", "a form instead of JSON",
     b"name=Form&email=form%40example.com", "4xx"),
]


def test_the_request_media_type_is_the_specs(host: str, contract: Contract) -> None:
    """createUser's body is application/json: JSON with a charset parameter is created,
    anything else is refused with a 4xx the spec declares for createUser (a generated
    client handles only those), as a problem document."""
    for content_type, what, body, expected in MEDIA_TYPES:
        ex = exchange(host, "POST", "/users", raw=body, content_type=content_type)
        sent = f"{what}, Content-Type: {content_type}"
        if expected == 201:
            assert ex.status == 201, (
                f"{ex.label()} ({sent}): expected 201, saw {ex.status} {ex.data[:150]!r}: "
                "application/json; charset=utf-8 is application/json - a media type has "
                "parameters, and the spec's application/json covers them. Let openapi-core "
                "match the request's media type against the spec instead of comparing the "
                "header by hand")
        else:
            assert 400 <= ex.status < 500, (
                f"{ex.label()} ({sent}): expected a 4xx (415 Unsupported Media Type), saw "
                f"{ex.status} {ex.data[:150]!r}: createUser takes application/json only")
        contract.judge(ex, f"{sent}; every status the code sends for createUser, this "
                           "refusal's too, is declared for it in openapi.yaml")


def test_a_create_without_a_body_is_refused(host: str, contract: Contract) -> None:
    """A POST /users with no body at all is the client's error (4xx). In OpenAPI a
    requestBody is optional unless it says 'required: true', so a spec that leaves that
    out lets the request past openapi-core, and a handler that counts on a NewUser meets
    None."""
    ex = exchange(host, "POST", "/users")
    assert 400 <= ex.status < 500, (
        f"{ex.label()} (no body, no Content-Type): expected a 4xx (422 or 400), saw "
        f"{ex.status} {ex.data[:150]!r}: createUser cannot create a user from nothing. "
        "A requestBody is OPTIONAL in OpenAPI unless it says 'required: true' - without "
        "it openapi-core accepts the missing body and hands the handler None; declare "
        "createUser's requestBody 'required: true', so the spec refuses it (a handler "
        "that checks for None by hand keeps the code and the contract apart)")
    contract.judge(ex, "no body; every status the code sends for createUser is declared")


def test_text_postgres_cannot_store_is_refused(host: str, contract: Contract) -> None:
    """JSON strings may hold a NUL character or a lone surrogate, and a string schema allows
    both; Postgres text stores neither. The request is the client's error (4xx), not a
    crash (5xx)."""
    bad = (("a NUL character (\\u0000)", "\x00"),
           ("a lone surrogate (\\ud800, not encodable as UTF-8)", "\ud800"))
    for field in ("name", "email"):   # every string of the request, the formatted one too
        for n, (what, char) in enumerate(bad):
            document = {"name": f"Text {n}", "email": f"text{n}.{field}@example.com"}
            document[field] = (f"Nul{char}Name" if field == "name"
                               else f"text{n}{char}x@example.com")
            ex = exchange(host, "POST", "/users", document=document)
            assert ex.status != 409, (
                f"POST /users with {'an' if field == 'email' else 'a'} {field} holding "
                f"{what} got 409 (email taken), but no user has that email: the INSERT "
                "failed because Postgres text cannot store the value, and a failure caught "
                "as a conflict tells the client something false. Expected 422 (or 400): "
                "check every string before the INSERT, and answer 409 only for the UNIQUE "
                "violation (psycopg.errors.UniqueViolation)")
            assert 400 <= ex.status < 500, (
                f"POST /users with {'an' if field == 'email' else 'a'} {field} holding {what}: "
                f"expected a 4xx (422), saw {ex.status} {ex.data[:120]!r}: it is valid JSON "
                "and the schema allows it (format: email checks little more than an @), but "
                "Postgres text cannot store it - check every string before the INSERT, not "
                "only the free-text ones, and refuse them with 422")
            contract.judge(ex, f"{'an' if field == 'email' else 'a'} {field} holding {what}")


def test_property_based_run_finds_no_5xx(spec_path: Path, host: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.core.result import Err

    try:
        schema = schemathesis.openapi.from_path(str(spec_path))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"schemathesis cannot load openapi.yaml: {short(exc)}", pytrace=False)
    base_url = f"http://{host}"
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation the spec describes badly
            pytest.fail(f"schemathesis cannot use an operation of openapi.yaml: "
                        f"{short(result.err())}", pytrace=False)
        try:
            op = result.ok()
        except Exception as exc:  # noqa: BLE001 - an operation the spec describes badly
            pytest.fail(f"schemathesis cannot use an operation of openapi.yaml: {short(exc)}",
                        pytrace=False)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      derandomize=True, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def probe(case: Any) -> None:
                nonlocal calls
                calls += 1
                response = case.call(base_url=base_url, timeout=15)
                if response.status_code >= 500:
                    sent = response.request  # what really went over the wire
                    body = f" body {sent.body[:150]!r}" if sent.body else ""
                    failures.append(f"{sent.method} {sent.path_url[:200]}{body} -> "
                                    f"{response.status_code} {response.text[:120]!r}")
                    raise AssertionError(failures[-1])

            try:
                probe()
            except AssertionError:
                pass
            if failures:
                break
        if failures:
            break
    assert calls > 0, (
        "openapi.yaml describes no operation, so the property-based run had nothing to call")
    if failures:
        pytest.fail(f"a request generated from openapi.yaml got a server error: {failures[0]}: "
                    "every input the spec allows - and every one it forbids - must get a "
                    "2xx/4xx, never a 5xx", pytrace=False)
