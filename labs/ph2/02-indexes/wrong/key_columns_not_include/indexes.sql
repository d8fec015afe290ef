-- WRONG: a covering index built from key columns. Q3 gets its Index Only Scan, but
-- status and total_cents widen the key (and the inner pages) for nothing, and the index
-- cannot be UNIQUE on external_ref alone - so nothing enforces one order per reference.
CREATE INDEX orders_customer_created_idx ON orders (customer_id, created_at);
CREATE INDEX orders_external_ref_cover_idx ON orders (external_ref, status, total_cents);
CREATE INDEX orders_pending_created_idx ON orders (created_at) WHERE status = 'pending';
