-- CONTRACT (the old version is gone by now): full_name NOT NULL, users.name dropped,
-- and nothing left of the machinery that kept the two in sync.
SELECT 'TODO: V004 contract';
