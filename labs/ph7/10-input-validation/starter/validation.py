"""ph7.10 - input validation at the trust boundary. The app below trusts its input; make
it check size (413), syntax (400) and an allowlist of fields, types and values (422), so
that no input can make it answer 500. See README.md for the rules.
"""

from __future__ import annotations

import json
from typing import Any


def make_app(max_body: int = 2048) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        doc = json.loads(environ["wsgi.input"].read(length))
        order = {"sku": doc["sku"], "quantity": doc["quantity"], "email": doc["email"]}
        if "note" in doc:
            order["note"] = doc["note"]
        payload = json.dumps(order).encode()
        start_response("201 Created", [("Content-Type", "application/json")])
        return [payload]

    return app
