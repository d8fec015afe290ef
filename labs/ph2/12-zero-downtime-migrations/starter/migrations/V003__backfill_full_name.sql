-- BACKFILL: give the rows written before the expand their full_name.
SELECT 'TODO: V003 backfill';
