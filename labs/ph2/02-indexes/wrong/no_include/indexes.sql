-- WRONG: the lookup index enforces uniqueness but does not carry status and total_cents,
-- so Q3 finds the row in the index and then still has to visit the table (Index Scan,
-- not Index Only Scan).
CREATE INDEX orders_customer_created_idx ON orders (customer_id, created_at);
CREATE UNIQUE INDEX orders_external_ref_key ON orders (external_ref);
CREATE INDEX orders_pending_created_idx ON orders (created_at) WHERE status = 'pending';
