-- The original audit queries (served by the sidecar as endpoints).
-- Operator history (last 24 h)
SELECT ts, issuer, module, action, request_id FROM control_ledger WHERE ts > now() - INTERVAL 1 DAY ORDER BY ts DESC;
-- Change audit by request_id
SELECT * FROM control_ledger WHERE request_id = {request_id:String};
-- Frequency of policy updates
SELECT toStartOfFiveMinute(ts) AS w, count() FROM control_ledger WHERE action = 'POLICY' GROUP BY w ORDER BY w;
