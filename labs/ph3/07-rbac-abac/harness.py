"""Harness for ph3.7: several decisions asked in turn with the SAME subject, resource,
policy and context objects, where the learner's engine runs (a process of its own when
grading: learner.harness()).

Across the process boundary every argument is copied for each call, so a learner's in-place
edit of the caller's data (the subject's roles list popped as a work list, a role's
permissions list extended with inherited ones) would never show there: a web app asks
several questions about one loaded user, and an admin tool keeps one live policy. Here the
objects stay the same between calls, as they do in such an app, and what each call changed
is reported back: the decisions and the changes are what the test judges."""

from __future__ import annotations

import copy
from typing import Any


def decide_in_turn(module: Any, subject: dict[str, Any], actions: list[str],
                   resource: dict[str, Any], policy: dict[str, Any],
                   context: dict[str, Any] | None) -> list[dict[str, Any]]:
    """For each action in turn: the decision (or the error's text) and, for each argument
    the call changed in place, its value before and after."""
    args = {"subject": subject, "resource": resource, "policy": policy, "context": context}
    seen = []
    for action in actions:
        before = copy.deepcopy(args)
        try:
            decision: Any = module.is_allowed(subject, action, resource, policy, context)
        except Exception as exc:  # noqa: BLE001 - reported to the test as text
            decision = f"raised {type(exc).__name__}: {exc}"
        changed = [change for name, value in args.items()
                   for change in _differences(name, before[name], value)]
        seen.append({"action": action, "decision": decision, "changed": changed})
    return seen


def _differences(path: str, before: Any, after: Any) -> list[str]:
    """Where ``after`` differs from ``before``: "policy['roles']['editor']['permissions']:
    ['doc:write'] became ['doc:write', 'doc:read']", down to the innermost dict key."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in [*before, *(k for k in after if k not in before)]
                for change in _differences(f"{path}[{key!r}]", before.get(key, "(none)"),
                                           after.get(key, "(none)"))]
    return [f"{path}: {before!r} became {after!r}"]
