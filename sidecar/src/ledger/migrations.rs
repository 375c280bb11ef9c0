//! The ClickHouse tables, applied idempotently (`sql/`): by an administrator once
//! (`gw-sidecar --setup-clickhouse`), and again by the sidecar at each start, which
//! needs no DDL right when the tables exist (its user may hold only `SELECT,
//! INSERT` on [`TABLES`]).

/// One SQL file and the table it creates.
pub struct Migration {
    /// The file under `sql/`.
    pub file: &'static str,
    /// Its text.
    pub sql: &'static str,
    /// The table it creates.
    pub table: &'static str,
    /// The columns the sidecar writes to it (none: it does not write there). A
    /// user that may not create or alter the table needs them all to exist.
    pub columns: &'static [&'static str],
}

/// Every migration, in order. The Kafka-engine path (`sql/14_control_proto_kafka.sql`)
/// needs brokers and the format schema, so it is applied by operators, not here.
pub const MIGRATIONS: [Migration; 4] = [
    Migration {
        file: "10_control_ledger.sql",
        sql: include_str!("../../../sql/10_control_ledger.sql"),
        table: "control_ledger",
        columns: &[],
    },
    Migration {
        file: "11_control_decisions.sql",
        sql: include_str!("../../../sql/11_control_decisions.sql"),
        table: "control_decisions",
        columns: <super::ship::DecisionRow as clickhouse::Row>::COLUMN_NAMES,
    },
    Migration {
        file: "12_tx_sends.sql",
        sql: include_str!("../../../sql/12_tx_sends.sql"),
        table: "tx_sends",
        columns: <crate::sender::audit::SendRow as clickhouse::Row>::COLUMN_NAMES,
    },
    Migration {
        file: "13_control_checkpoints.sql",
        sql: include_str!("../../../sql/13_control_checkpoints.sql"),
        table: "control_checkpoints",
        columns: <super::checkpoint::CheckpointRow as clickhouse::Row>::COLUMN_NAMES,
    },
];

/// The tables the sidecar reads and writes: its ClickHouse user needs `SELECT,
/// INSERT` on these and nothing else (`control_ledger` belongs to the Kafka-engine
/// path).
pub const TABLES: [&str; 3] = ["control_decisions", "tx_sends", "control_checkpoints"];

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
#[error("{file}: {source}{hint}")]
pub struct MigrationError {
    /// The SQL file.
    pub file: &'static str,
    /// ClickHouse's error.
    pub source: clickhouse::error::Error,
    /// What to do about it, when known.
    pub hint: &'static str,
}

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Statements ClickHouse ran.
    pub ran: usize,
    /// Tables this user may not create but that exist and it may read.
    pub existing: Vec<&'static str>,
    /// Tables neither created nor readable that the sidecar does not need.
    pub skipped: Vec<&'static str>,
    /// Tables of [`TABLES`] not ready ([`apply_for`]: outside the ones asked for).
    pub not_ready: Vec<MigrationError>,
}

/// ClickHouse's `ACCESS_DENIED` (code 497).
fn access_denied(e: &clickhouse::error::Error) -> bool {
    let s = e.to_string();
    s.contains("ACCESS_DENIED") || s.contains("Code: 497")
}

/// Applies every migration (each is `CREATE ... IF NOT EXISTS`, then `ALTER ...
/// ADD COLUMN IF NOT EXISTS` for columns added since). Where this user may not
/// create a table, it is enough that the table exists, is readable and has every
/// column the sidecar writes; a table of [`TABLES`] that is missing, or made by an
/// older version and lacking a column, is an error that names the setup command.
pub async fn apply(client: &clickhouse::Client) -> Result<Applied, MigrationError> {
    apply_for(client, &TABLES).await
}

/// As [`apply`], but only a table of `needed` that is not ready is an error; the
/// others are listed in [`Applied::not_ready`] (a shipper of one table does not
/// wait for another's setup).
pub async fn apply_for(
    client: &clickhouse::Client,
    needed: &[&str],
) -> Result<Applied, MigrationError> {
    let mut done = Applied::default();
    for m in &MIGRATIONS {
        match apply_one(client, m, &mut done).await {
            Ok(()) => {}
            Err(e) if !needed.contains(&m.table) => done.not_ready.push(e),
            Err(e) => return Err(e),
        }
    }
    remove_legacy_ttl(client, &mut done).await;
    Ok(done)
}

/// The TTL `control_decisions` had before 2026-12-05, as ClickHouse shows it in
/// `system.tables.engine_full`: rows deleted after 400 days, which made every
/// verify report a gap at row 1 a year on.
pub const LEGACY_TTL: &str = "TTL toDateTime(intDiv(ts_ms, 1000)) + toIntervalDay(400)";

/// Removes [`LEGACY_TTL`] from `control_decisions` — that TTL only: one an operator
/// set (another age, moves to a cold volume) is theirs and stays. A user that may
/// not alter the table leaves it, with a warning that the setup removes it.
async fn remove_legacy_ttl(client: &clickhouse::Client, done: &mut Applied) {
    let engine = client
        .query(
            "SELECT engine_full FROM system.tables \
             WHERE database = currentDatabase() AND name = 'control_decisions'",
        )
        .fetch_optional::<String>()
        .await;
    let Ok(Some(engine)) = engine else { return };
    // That TTL alone (a DELETE, which ClickHouse does not print): not one with more
    // clauses or moves to a volume.
    let old = engine.find(LEGACY_TTL).is_some_and(|at| {
        let rest = engine[at + LEGACY_TTL.len()..].trim_start();
        rest.is_empty() || rest.starts_with("SETTINGS")
    });
    if !old {
        return;
    }
    match client
        .query("ALTER TABLE control_decisions REMOVE TTL")
        .execute()
        .await
    {
        Ok(()) => {
            done.ran += 1;
            tracing::info!("control_decisions: the 400-day TTL of tables made before 2026-12-05 removed (a chain verifies from row 1)");
        }
        Err(e) => {
            tracing::warn!(error = %e, "control_decisions still deletes rows after 400 days (made before 2026-12-05): run `gw-sidecar --setup-clickhouse` as an administrator to keep them");
        }
    }
}

/// One migration's statements.
async fn apply_one(
    client: &clickhouse::Client,
    m: &Migration,
    done: &mut Applied,
) -> Result<(), MigrationError> {
    for stmt in statements(m.sql) {
        match client.query(&stmt).execute().await {
            Ok(()) => done.ran += 1,
            Err(e) if access_denied(&e) => {
                let columns = if m.columns.is_empty() {
                    "count()".to_owned()
                } else {
                    m.columns.join(", ")
                };
                let probe = format!("SELECT {columns} FROM {} WHERE 0", m.table);
                match client.query(&probe).execute().await {
                    Ok(()) => done.existing.push(m.table),
                    Err(_) if !TABLES.contains(&m.table) => done.skipped.push(m.table),
                    // What the probe met (no such table, or a column missing)
                    // says more than the refused `CREATE`.
                    Err(source) => {
                        return Err(MigrationError {
                            file: m.file,
                            source,
                            hint: " (this ClickHouse user may not create or alter the \
                                       table, and it does not exist or was made by an older \
                                       version and lacks a column this one writes: run \
                                       `gw-sidecar --setup-clickhouse` once as an administrator)",
                        })
                    }
                }
                break;
            }
            Err(source) => {
                return Err(MigrationError {
                    file: m.file,
                    source,
                    hint: "",
                })
            }
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
        for m in &super::MIGRATIONS {
            let stmts = super::statements(m.sql);
            assert!(!stmts.is_empty());
            assert!(
                stmts[0].contains(&format!("CREATE TABLE IF NOT EXISTS {}", m.table)),
                "{}",
                m.file
            );
        }
        for t in super::TABLES {
            assert!(super::MIGRATIONS.iter().any(|m| m.table == t));
        }
    }
}
