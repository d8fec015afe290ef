-- CONTRACT: only once no running instance reads or writes users.name any more.
SET LOCAL lock_timeout = '2s';

-- NOT NULL without a long exclusive scan: a CHECK added NOT VALID is instant, VALIDATE
-- scans without blocking writes, and SET NOT NULL then trusts the validated CHECK.
-- (In production each of these would be its own migration, so the locks are not held
-- together in one transaction.)
ALTER TABLE users ADD CONSTRAINT users_full_name_not_null CHECK (full_name IS NOT NULL) NOT VALID;
ALTER TABLE users VALIDATE CONSTRAINT users_full_name_not_null;
ALTER TABLE users ALTER COLUMN full_name SET NOT NULL;
ALTER TABLE users DROP CONSTRAINT users_full_name_not_null;

-- Nothing writes name any more: stop syncing, then drop the old column.
DROP TRIGGER users_sync_full_name ON users;
DROP FUNCTION users_sync_full_name();
ALTER TABLE users DROP COLUMN name;
