-- WRONG (no_sync_trigger): adds and backfills the column but nothing keeps the two in sync
ALTER TABLE users ALTER COLUMN full_name SET NOT NULL;
ALTER TABLE users DROP COLUMN name;
