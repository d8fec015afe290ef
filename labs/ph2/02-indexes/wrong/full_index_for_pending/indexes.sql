-- WRONG: Q4 is served, but by an index over all 100,000 rows although only ~1% are
-- pending; every shipped or cancelled order pays to maintain it.
CREATE INDEX orders_customer_created_idx ON orders (customer_id, created_at);
CREATE UNIQUE INDEX orders_external_ref_key ON orders (external_ref)
    INCLUDE (status, total_cents);
CREATE INDEX orders_status_created_idx ON orders (status, created_at);
