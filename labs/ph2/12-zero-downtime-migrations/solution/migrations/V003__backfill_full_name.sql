-- BACKFILL: copy the old column into the new one for rows written before the expand.
-- On a big table do this in batches (UPDATE ... WHERE id BETWEEN x AND y, committed one
-- at a time) so no single transaction locks millions of rows.
SET LOCAL lock_timeout = '2s';

UPDATE users SET full_name = name WHERE full_name IS NULL;
