"""Runs where the learner's render() runs (in its process when grading): the families are
rendered twice, as a /metrics endpoint renders the same families at every scrape, and what
the caller's data looks like afterwards is sent back. Across a process boundary the test's
own copy of the families never changes, so a render() that edits the families it was given
(a counter's name suffixed in place) can only be seen here."""

from __future__ import annotations

import copy
import json
from types import ModuleType
from typing import Any


def render_twice(module: ModuleType, families_json: str) -> str:
    families: list[dict[str, Any]] = json.loads(families_json)
    given = copy.deepcopy(families)
    texts = [module.render(families) for _ in range(2)]
    return json.dumps({
        "texts": [t if isinstance(t, str) else None for t in texts],
        "type": type(texts[0]).__name__,
        "given": given,
        "after": families,
    }, default=repr)
