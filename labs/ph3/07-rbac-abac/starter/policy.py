"""A deny-by-default authorization engine: roles grant permissions (RBAC, coarse), rules
over attributes narrow or extend them (ABAC, fine). The policy is data; see README.md."""

from __future__ import annotations

from typing import Any


def is_allowed(subject: dict[str, Any], action: str, resource: dict[str, Any],
               policy: dict[str, Any], context: dict[str, Any] | None = None) -> bool:
    """True when the policy allows subject to do action on resource; False otherwise."""
    raise NotImplementedError("is_allowed(): evaluate roles, then the rules (README.md)")
