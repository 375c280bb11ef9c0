-- Only where a `hot_cold` storage policy with a `cold` volume is configured
-- (e.g. S3-backed): move ledger parts to cold storage after 14 days.
ALTER TABLE control_ledger MODIFY SETTING storage_policy = 'hot_cold';
ALTER TABLE control_ledger MODIFY TTL ts + INTERVAL 14 DAY TO VOLUME 'cold', ts + INTERVAL 400 DAY DELETE;
