-- WRONG (no_sync_trigger): adds and backfills the column but nothing keeps the two in sync
ALTER TABLE users ADD COLUMN full_name text;
