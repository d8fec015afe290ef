-- WRONG (contract_during_backfill): drops the old column while the old version still runs
SELECT 1;  -- already done in V003
