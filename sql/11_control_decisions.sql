-- Every decision about a command (edge, sidecar, agent; accepted or rejected with its
-- code, with who asked), hash-chained per gateway node: row_hash = SHA-256(prev_hash
-- || canonical row), seq from 1 without gaps within each chain_id
-- (core/src/ledger.rs). Only these rows say what was verified.
--
-- MergeTree, not ReplacingMergeTree: two rows claiming one (chain_id, seq) must both
-- stay visible (the verifier reports them), never be merged into one. A retried batch
-- carries an insert_deduplication_token, so a batch that landed but whose
-- acknowledgement was lost is not stored twice; the token names the batch's last
-- row_hash, so a batch of other rows on the same positions (another writer on this
-- chain_id) is stored, not dropped as a retry.
--
-- fsync_after_insert: an insert is acknowledged only once its part is on disk. The
-- sidecar lets its journal drop rows ClickHouse acknowledged; a part still in the
-- page cache when ClickHouse's machine lost power would be a hole in the chain.
--
-- No TTL: a chain verifies from its first row, so rows deleted at its start by age
-- would make every later verify report a gap. Deleting old rows is an operator's
-- decision (docs/configuration.md, "Retention"), not the table's.
CREATE TABLE IF NOT EXISTS control_decisions
(
    chain_id        LowCardinality(String),
    seq             UInt64,
    ts_ms           UInt64,
    stage           LowCardinality(String),
    decision        LowCardinality(String),
    code            LowCardinality(String),
    request_id      String,
    issuer          String,
    module          LowCardinality(String),
    action          LowCardinality(String),
    pubkey_id       LowCardinality(String),
    sig_alg         LowCardinality(String),
    nonce           UInt64,
    args_json       String,
    raw_hex         String,
    requester       String,
    requester_roles String,
    token_issuer    String,
    route           String,
    prev_hash       String,
    row_hash        String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(ts_ms, 1000)))
ORDER BY (chain_id, seq)
SETTINGS non_replicated_deduplication_window = 10000, fsync_after_insert = 1, fsync_part_directory = 1;

-- Columns added after the table's first release: a table made by an older version
-- gains them (run by the administrator's setup; the sidecar's user may not ALTER).
ALTER TABLE control_decisions ADD COLUMN IF NOT EXISTS requester String AFTER raw_hex;
ALTER TABLE control_decisions ADD COLUMN IF NOT EXISTS requester_roles String AFTER requester;
ALTER TABLE control_decisions ADD COLUMN IF NOT EXISTS token_issuer String AFTER requester_roles;
ALTER TABLE control_decisions ADD COLUMN IF NOT EXISTS route String AFTER token_issuer;
ALTER TABLE control_decisions MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
-- A table made before 2026-12-05 deleted rows after 400 days: the sidecar's setup
-- removes that TTL, and only that one (ledger/migrations.rs, LEGACY_TTL; a TTL an
-- operator chose stays).
