//! The ledger's ClickHouse tables, applied idempotently at start (`sql/`).

/// `(file, sql)` of every migration the sidecar applies, in order. The Kafka-engine
/// path (`sql/14_control_proto_kafka.sql`) needs brokers and the format schema, so
/// it is applied by operators, not here.
pub const MIGRATIONS: [(&str, &str); 3] = [
    (
        "10_control_ledger.sql",
        include_str!("../../../sql/10_control_ledger.sql"),
    ),
    (
        "11_control_decisions.sql",
        include_str!("../../../sql/11_control_decisions.sql"),
    ),
    (
        "12_tx_sends.sql",
        include_str!("../../../sql/12_tx_sends.sql"),
    ),
];

/// The statements of one SQL file: comments dropped, split at `;` line ends.
pub fn statements(sql: &str) -> Vec<String> {
    let body: Vec<&str> = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    body.join("\n")
        .split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A migration ClickHouse refused (or could not be reached for).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {source}")]
pub struct MigrationError {
    /// The SQL file.
    pub file: &'static str,
    /// ClickHouse's error.
    pub source: clickhouse::error::Error,
}

/// Applies every migration (each is `CREATE ... IF NOT EXISTS`).
pub async fn apply(client: &clickhouse::Client) -> Result<(), MigrationError> {
    for (file, sql) in MIGRATIONS {
        for stmt in statements(sql) {
            client
                .query(&stmt)
                .execute()
                .await
                .map_err(|source| MigrationError { file, source })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn statements_split_and_skip_comments() {
        let s =
            super::statements("-- c\nCREATE TABLE a (x UInt8) ENGINE = Log;\n-- d\nSELECT 1;\n");
        assert_eq!(s, vec!["CREATE TABLE a (x UInt8) ENGINE = Log", "SELECT 1"]);
        for (_, sql) in super::MIGRATIONS {
            assert!(!super::statements(sql).is_empty());
        }
    }
}
