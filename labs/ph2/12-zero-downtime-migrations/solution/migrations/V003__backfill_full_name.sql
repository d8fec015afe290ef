-- migrate:no-transaction
-- BACKFILL: copy the old column into the new one for rows written before the expand, in
-- batches of 1,000 rows, each committed on its own (so the runner must not wrap this script
-- in its transaction: the first line says so). One UPDATE over the whole table would hold
-- every row's lock until it ends: every write of the application to a row it already
-- passed would wait for the whole backfill, and a big table's backfill takes minutes.
-- Run again after a failure it only does what is left (full_name IS NULL).
DO $$
DECLARE
    done integer;
BEGIN
    LOOP
        UPDATE users SET full_name = name
         WHERE id IN (SELECT id FROM users WHERE full_name IS NULL ORDER BY id LIMIT 1000);
        GET DIAGNOSTICS done = ROW_COUNT;
        EXIT WHEN done = 0;
        COMMIT;   -- this batch's row locks end here
    END LOOP;
END
$$;
