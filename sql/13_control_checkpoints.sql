-- Signed checkpoints of each chain (core/src/checkpoint.rs), also kept in a local
-- file by the sidecar: `gwctl ledger verify --checkpoint` detects a chain cut or
-- rewritten after them.
CREATE TABLE IF NOT EXISTS control_checkpoints
(
    chain_id LowCardinality(String),
    size     UInt64,
    head     String,
    note     String,
    ts_ms    UInt64
)
ENGINE = MergeTree
ORDER BY (chain_id, size)
SETTINGS non_replicated_deduplication_window = 1000, fsync_after_insert = 1, fsync_part_directory = 1;

-- A table made by an older version: its inserts are acknowledged on disk too, and
-- an insert sent again after a lost answer (its token) is stored once.
ALTER TABLE control_checkpoints MODIFY SETTING non_replicated_deduplication_window = 1000, fsync_after_insert = 1, fsync_part_directory = 1;
