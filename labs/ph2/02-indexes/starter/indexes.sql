-- Indexes for the workload in README.md (Q1 history, Q2 count, Q3 lookup by reference,
-- Q4 pending queue). This file runs once after the orders table is filled, before
-- VACUUM ANALYZE and before the queries are explained.
--
-- Write CREATE INDEX statements here (composite, covering with INCLUDE, partial with
-- WHERE), as few as serve the workload: every index costs on every write.

-- TODO: CREATE INDEX ...
