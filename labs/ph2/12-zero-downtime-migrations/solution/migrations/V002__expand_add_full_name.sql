-- EXPAND: add the new column next to the old one. Old code keeps working untouched.
-- Never fail a deploy on a busy table: give up quickly rather than queue every query
-- behind this ALTER's lock.
SET LOCAL lock_timeout = '2s';

-- Nullable, no default: adding it is a catalog change only, no table rewrite, and the
-- existing rows are not made to look as if they had a value.
ALTER TABLE users ADD COLUMN full_name text;

-- Until every instance runs the new version, both columns are written by someone:
-- old code writes name, new code writes full_name. Keep them equal, on every write.
CREATE FUNCTION users_sync_full_name() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.full_name := COALESCE(NEW.full_name, NEW.name);
        NEW.name := COALESCE(NEW.name, NEW.full_name);
    ELSIF NEW.full_name IS DISTINCT FROM OLD.full_name THEN
        NEW.name := NEW.full_name;          -- new code changed the name
    ELSIF NEW.name IS DISTINCT FROM OLD.name THEN
        NEW.full_name := NEW.name;          -- old code changed the name
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_sync_full_name
    BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION users_sync_full_name();
