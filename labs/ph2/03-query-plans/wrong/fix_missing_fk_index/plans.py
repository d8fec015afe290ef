"""WRONG (only the expression index: the join column orders.customer_id stays unindexed)

Reading Postgres query plans: a summary of EXPLAIN (ANALYZE, FORMAT JSON), and a fix for
a slow query."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypedDict

import psycopg

JOIN_NODES = ("Nested Loop", "Hash Join", "Merge Join")

# The query to speed up (fix_slow_query below): every order of one customer, found by a
# case-insensitive email match.
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

    EXPLAIN ANALYZE really executes the statement, so it runs in a transaction that is
    always rolled back: summarising a DELETE must not delete anything.
    """
    query = f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"
    with conn.transaction(force_rollback=True):
        row = conn.execute(query).fetchone()
    assert row is not None
    document = row[0][0]  # one statement, one plan
    nodes = [_node(plan, depth) for plan, depth in _walk(document["Plan"], 0)]
    return PlanSummary(
        nodes=nodes,
        join_algorithms=[n["node_type"] for n in nodes if n["node_type"] in JOIN_NODES],
        worst_estimate=_worst(nodes),
        planning_ms=float(document["Planning Time"]),
        execution_ms=float(document["Execution Time"]),
    )


def _walk(plan: dict[str, Any], depth: int) -> Iterator[tuple[dict[str, Any], int]]:
    """Every node, root first. Children of every kind (join inputs, the Hash under a Hash
    Join, InitPlans and SubPlans) are all listed under "Plans"."""
    yield plan, depth
    for child in plan.get("Plans", []):
        yield from _walk(child, depth + 1)


def _node(plan: dict[str, Any], depth: int) -> PlanNode:
    return PlanNode(
        node_type=plan["Node Type"],
        relation=plan.get("Relation Name"),
        index=plan.get("Index Name"),
        depth=depth,
        estimated_rows=int(plan["Plan Rows"]),
        actual_rows=int(plan["Actual Rows"]),
        loops=int(plan["Actual Loops"]),
    )


def _factor(node: PlanNode) -> float:
    # Zero rows on either side would divide by zero; one row is the planner's own floor.
    estimated = max(node["estimated_rows"], 1)
    actual = max(node["actual_rows"], 1)
    return max(actual / estimated, estimated / actual)


def _worst(nodes: list[PlanNode]) -> WorstEstimate:
    worst = max(nodes, key=_factor)  # max() keeps the first of equals: root-most wins
    return WorstEstimate(
        node_type=worst["node_type"],
        relation=worst["relation"],
        estimated_rows=worst["estimated_rows"],
        actual_rows=worst["actual_rows"],
        factor=_factor(worst),
    )


def fix_slow_query(conn: psycopg.Connection[Any]) -> str:
    """Make SLOW_QUERY fast: create what it needs and return the query to run instead.

    The summary of SLOW_QUERY shows two sequential scans:
    * customers, filtered on lower(email): an index on email cannot be used for an
      expression of it, but an index on the expression itself can;
    * orders, joined on customer_id: a foreign key gets no index by itself, so finding one
      customer's orders reads all of them.
    With both indexes the plan becomes a Nested Loop of two index scans. The query text
    can stay as it is.
    """
    conn.execute("CREATE INDEX IF NOT EXISTS customers_lower_email_idx "
                 "ON customers (lower(email))")
    # WRONG: the customer is found by index, but orders.customer_id has none, so the
    # join still reads all 100,000 orders.
    # Fresh statistics: ANALYZE also gathers statistics on the indexed expression.
    conn.execute("ANALYZE customers")
    conn.execute("ANALYZE orders")
    return SLOW_QUERY
