-- WRONG: the composite index has the range column first. The B-tree is sorted by
-- created_at, so "customer_id = 42" cannot seek: Q1 and Q2 read large parts of the index.
CREATE INDEX orders_created_customer_idx ON orders (created_at, customer_id);
CREATE UNIQUE INDEX orders_external_ref_key ON orders (external_ref)
    INCLUDE (status, total_cents);
CREATE INDEX orders_pending_created_idx ON orders (created_at) WHERE status = 'pending';
