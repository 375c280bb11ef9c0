-- Every transaction the sender handled: where it went, whether it was hedged, how
-- long until a route took it, and how it ended. Written by the sidecar in batches
-- (sidecar/src/sender/audit.rs); one row per transaction or bundle.
CREATE TABLE IF NOT EXISTS tx_sends
(
    ts_us        UInt64,
    signature    String,
    source       LowCardinality(String),
    module       LowCardinality(String),
    kind         LowCardinality(String),
    primary      LowCardinality(String),
    route        LowCardinality(String),
    hedged       UInt8,
    outcome      LowCardinality(String),
    latency_us   UInt64,
    leader       String,
    tip          Float64,
    score        Float64,
    -- what gave the score: a model's name@version, 'ev' (the opportunity's own, for
    -- a module without a model), '' (not scored: JSON-RPC)
    scored_by    LowCardinality(String),
    tpu_error    String,
    relay_error  String,
    bytes        UInt32,
    -- who asked for it: the sub of the token the edge verified (JSON-RPC,
    -- opportunities over HTTP), or the QUIC ingest client's base58 identity
    requester    String,
    token_issuer String
)
ENGINE = MergeTree
ORDER BY (ts_us, signature)
TTL toDateTime(intDiv(ts_us, 1000000)) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, fsync_after_insert = 1, fsync_part_directory = 1;

-- Tables made before 2026-12-05.
ALTER TABLE tx_sends ADD COLUMN IF NOT EXISTS scored_by LowCardinality(String) AFTER score;
-- Tables made before 2026-12-06.
ALTER TABLE tx_sends ADD COLUMN IF NOT EXISTS requester String AFTER bytes;
ALTER TABLE tx_sends ADD COLUMN IF NOT EXISTS token_issuer String AFTER requester;
-- Acknowledged only once on disk: the journal lets rows go once acknowledged.
ALTER TABLE tx_sends MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
