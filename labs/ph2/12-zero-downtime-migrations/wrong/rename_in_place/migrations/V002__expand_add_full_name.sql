-- WRONG (rename_in_place): renames the column in one step: every old instance breaks at once
ALTER TABLE users RENAME COLUMN name TO full_name;
