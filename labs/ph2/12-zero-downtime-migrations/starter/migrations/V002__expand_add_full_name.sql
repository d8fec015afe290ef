-- EXPAND: add users.full_name so that the old version (writing users.name) keeps working,
-- and keep the two columns equal whichever of them a running version writes.
SELECT 'TODO: V002 expand';
