-- Every decision about a command (edge, sidecar, agent; accepted or rejected with its
-- code), hash-chained: row_hash = SHA-256(prev_hash || canonical row), seq without
-- gaps (core/src/ledger.rs). Only these rows say what was verified.
CREATE TABLE IF NOT EXISTS control_decisions
(
    seq        UInt64,
    ts_ms      UInt64,
    stage      LowCardinality(String),
    decision   LowCardinality(String),
    code       LowCardinality(String),
    request_id String,
    issuer     String,
    module     LowCardinality(String),
    action     LowCardinality(String),
    pubkey_id  LowCardinality(String),
    sig_alg    LowCardinality(String),
    nonce      UInt64,
    args_json  String,
    raw_hex    String,
    prev_hash  String,
    row_hash   String
)
ENGINE = ReplacingMergeTree
ORDER BY seq
-- Retried batches carry an insert_deduplication_token: a batch that landed but whose
-- acknowledgement was lost is not stored twice.
SETTINGS non_replicated_deduplication_window = 10000;
