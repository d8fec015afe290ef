-- Indexes for the four queries of the workload (see README.md), and no more: every index
-- is written on every INSERT and on every UPDATE of its columns (write amplification).

-- Q1 (history) and Q2 (count) share one composite index. Q1 seeks customer_id = ? and
-- walks created_at in order, so it needs no Sort; Q2 uses only the left prefix
-- (customer_id), which a B-tree on (customer_id, created_at) serves just as well.
-- An extra index on (customer_id) alone would be redundant.
CREATE INDEX orders_customer_created_idx ON orders (customer_id, created_at);

-- Q3 looks an order up by its reference and reads two more columns. The key is
-- external_ref alone, so UNIQUE enforces "one order per reference"; status and
-- total_cents ride along in the leaf pages (INCLUDE) so the answer comes from the index
-- without visiting the table: an Index Only Scan.
CREATE UNIQUE INDEX orders_external_ref_key ON orders (external_ref)
    INCLUDE (status, total_cents);

-- Q4 reads the oldest pending orders. About 1% of rows are pending; a partial index holds
-- only those, ordered by created_at: a fraction of the size of a full index, and cheap to
-- keep up to date for the 99% of rows that never match.
CREATE INDEX orders_pending_created_idx ON orders (created_at)
    WHERE status = 'pending';
