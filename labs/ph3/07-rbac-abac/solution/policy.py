"""A deny-by-default authorization engine: roles grant permissions (RBAC, coarse), rules
over attributes narrow or extend them (ABAC, fine). The policy is data; see README.md."""

from __future__ import annotations

from typing import Any

_MISSING = object()
# 'in' is membership in a list: a string, a dict or a number on the right never matches
# (Python's `in` would search text and dict keys). Cedar's contains() is defined on a set
# only, the same way; the decision must not hang on how a value happens to be stored.
_OPERATORS = {
    "==": lambda a, b: type(a) is type(b) and a == b,
    "!=": lambda a, b: not (type(a) is type(b) and a == b),
    "in": lambda a, b: isinstance(b, list) and any(type(a) is type(x) and a == x for x in b),
    "<=": lambda a, b: _numbers(a, b) and a <= b,
    ">=": lambda a, b: _numbers(a, b) and a >= b,
}


def _numbers(a: Any, b: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))


def _value(operand: Any, request: dict[str, dict[str, Any]]) -> Any:
    """'subject.dept' reads an attribute; anything else is a literal, dots or not
    ('hospital.example', '1.2'): only the three scopes name attributes."""
    if isinstance(operand, str):
        scope, dot, name = operand.partition(".")
        if dot and scope in request:
            return request[scope].get(name, _MISSING)
    return operand


def _condition(cond: list[Any], request: dict[str, dict[str, Any]]) -> bool | None:
    """True, False, or None (unknown): an attribute it needs is missing, or its
    operator is none of the five."""
    left, op, right = cond
    a, b = _value(left, request), _value(right, request)
    if a is _MISSING or b is _MISSING:
        return None
    check = _OPERATORS.get(op)
    return bool(check(a, b)) if check else None


def _permissions(roles: list[str], policy: dict[str, Any]) -> set[str]:
    defined = policy.get("roles", {})
    granted: set[str] = set()
    seen: set[str] = set()
    todo = [r for r in roles if isinstance(r, str)]
    while todo:  # inheritance is transitive; cycles are walked once
        role = todo.pop()
        if role in seen or role not in defined:
            continue
        seen.add(role)
        granted.update(defined[role].get("permissions", []))
        todo.extend(defined[role].get("inherits", []))
    return granted


def is_allowed(subject: dict[str, Any], action: str, resource: dict[str, Any],
               policy: dict[str, Any], context: dict[str, Any] | None = None) -> bool:
    request = {"subject": subject, "resource": resource, "context": context or {}}
    rules = [r for r in policy.get("rules", []) if action in r.get("actions", [])]

    def results(rule: dict[str, Any]) -> list[bool | None]:
        return [_condition(c, request) for c in rule.get("when", [])]

    # deny wins over everything; an unknown condition counts as met (fail closed)
    for rule in rules:
        if rule.get("effect") == "deny" and all(r is not False for r in results(rule)):
            return False
    # every require rule must hold; unknown is not met
    for rule in rules:
        if rule.get("effect") == "require" and not all(r is True for r in results(rule)):
            return False
    if action in _permissions(list(subject.get("roles", [])), policy):
        return True
    return any(rule.get("effect") == "allow" and all(r is True for r in results(rule))
               for rule in rules)
