-- WRONG: one index per filtered column, "to be safe". Q1 needs both columns in one
-- index to avoid the sort, Q3 is not covered, Q4 scans a full-table index, and each
-- index slows every INSERT.
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX orders_created_idx ON orders (created_at);
CREATE UNIQUE INDEX orders_external_ref_key ON orders (external_ref);
CREATE INDEX orders_status_idx ON orders (status);
CREATE INDEX orders_total_idx ON orders (total_cents);
