-- Typed ledger of control commands (the original 15_control_ledger.sql, fixed):
-- no mandatory storage policy (see optional/16_hot_cold.sql), and every row keeps
-- `sig` and the raw message so it can be re-verified later.
CREATE TABLE IF NOT EXISTS control_ledger
(
    dt         DateTime DEFAULT now(),
    ts         DateTime,
    module     LowCardinality(String),
    action     LowCardinality(String),
    request_id String,
    issuer     String,
    args_json  String,
    pubkey_id  LowCardinality(String),
    sig_alg    LowCardinality(String),
    nonce      UInt64,
    sig        String,
    raw        String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, request_id)
TTL ts + INTERVAL 400 DAY DELETE;
