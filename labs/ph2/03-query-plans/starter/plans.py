"""Reading Postgres query plans: a summary of EXPLAIN (ANALYZE, FORMAT JSON), and a fix for
a slow query. See README.md for the exact shape of the summary."""

from __future__ import annotations

from typing import Any, TypedDict

import psycopg

# The query to speed up (fix_slow_query below).
SLOW_QUERY = """
SELECT o.id, o.created_at, o.total_cents
FROM orders o
JOIN customers c ON c.id = o.customer_id
WHERE lower(c.email) = 'user4242@example.com'
ORDER BY o.created_at, o.id
"""


class PlanNode(TypedDict):
    node_type: str  # "Seq Scan", "Index Scan", "Hash Join", "Sort", ...
    relation: str | None  # the table a scan reads, else None
    index: str | None  # the index an index scan uses, else None
    depth: int  # 0 for the root, 1 for its children, ...
    estimated_rows: int  # "Plan Rows": the planner's guess, per loop
    actual_rows: int  # "Actual Rows": what really came out, per loop
    loops: int  # "Actual Loops": how many times the node ran


class WorstEstimate(TypedDict):
    node_type: str
    relation: str | None
    estimated_rows: int
    actual_rows: int
    factor: float  # how far off, >= 1: max(actual/estimated, estimated/actual)


class PlanSummary(TypedDict):
    nodes: list[PlanNode]  # every node, depth first, root first
    join_algorithms: list[str]  # node types of the join nodes, in the same order
    worst_estimate: WorstEstimate
    planning_ms: float
    execution_ms: float


def explain_summary(conn: psycopg.Connection[Any], sql: str) -> PlanSummary:
    """Run EXPLAIN (ANALYZE, FORMAT JSON) on ``sql`` and summarise the plan.

    Careful: EXPLAIN ANALYZE executes the statement. Summarising a DELETE must not delete.
    """
    raise NotImplementedError(
        "explain_summary: run EXPLAIN (ANALYZE, FORMAT JSON) and walk the plan tree")


def fix_slow_query(conn: psycopg.Connection[Any]) -> str:
    """Make SLOW_QUERY fast: create what it needs on ``conn`` (CREATE INDEX ...) and return
    the query to run instead (the same rows, in the same order)."""
    raise NotImplementedError(
        "fix_slow_query: read explain_summary(conn, SLOW_QUERY), then add what it lacks")
