-- WRONG (rename_in_place): renames the column in one step: every old instance breaks at once
SELECT 1;  -- nothing left to contract
