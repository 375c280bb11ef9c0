//! The real ClickHouse the ledger will use starts from the project's own script and
//! has the features the ledger DDL needs (Map, toJSONString, ReplacingMergeTree, TTL,
//! query parameters).

#[test]
fn clickhouse_26_9_runs_from_the_project_script() {
    let d = testkit::TempDir::new("clickhouse");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    assert!(ch.query("SELECT version()").starts_with("26.9"));
    ch.query(
        "CREATE TABLE t (ts DateTime, args Map(String, String), request_id String) \
         ENGINE = ReplacingMergeTree ORDER BY (ts, request_id) TTL ts + INTERVAL 400 DAY DELETE",
    );
    ch.query("INSERT INTO t VALUES (now(), {'throttle_pct': '40'}, 'r1'), (now(), {}, 'r2')");
    assert_eq!(
        ch.query("SELECT toJSONString(args) FROM t ORDER BY request_id FORMAT TSV")
            .trim(),
        "{\"throttle_pct\":\"40\"}\n{}"
    );
    assert_eq!(
        ch.query("SELECT count() FROM t WHERE request_id = 'r1'")
            .trim(),
        "1"
    );
}

/// Applies every `sql/*.sql` file (statements split on `;` at line ends).
fn apply_migrations(
    ch: &testkit::clickhouse::ClickHouse,
    brokers: &str,
    schemas: &std::path::Path,
) -> usize {
    let dir = testkit::workspace_root().join("sql");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "sql")
                && p.file_name().is_some_and(|n| n != "queries.sql")
        })
        .collect();
    files.sort();
    let mut n = 0;
    for f in files {
        let text = std::fs::read_to_string(&f)
            .unwrap()
            .replace("{kafka_brokers}", brokers)
            .replace("{format_schemas}", schemas.to_str().unwrap());
        let body: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for stmt in body.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            ch.query(stmt.trim_end_matches(';'));
            n += 1;
        }
    }
    n
}

#[test]
fn migrations_apply_idempotently_and_the_queries_run() {
    let d = testkit::TempDir::new("clickhouse-ddl");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    // ProtobufSingle needs the schema under format_schema_path.
    let schemas = d.path().join("clickhouse/format_schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    std::fs::write(schemas.join("control.proto"), gw_core_proto()).unwrap();
    // No broker is needed to create the Kafka engine table (it connects lazily).
    let brokers = format!("127.0.0.1:{}", testkit::free_port());
    let first = apply_migrations(&ch, &brokers, &schemas);
    assert!(first >= 4);
    assert_eq!(
        apply_migrations(&ch, &brokers, &schemas),
        first,
        "second run applies cleanly"
    );
    // The tables whose rows the sidecar's journal lets go once ClickHouse
    // acknowledged them: acknowledged only once on disk.
    for t in ["control_decisions", "tx_sends", "control_checkpoints"] {
        let engine = ch.query(&format!(
            "SELECT engine_full FROM system.tables WHERE name = '{t}' FORMAT TSV"
        ));
        assert!(
            engine.contains("fsync_after_insert = 1")
                && engine.contains("fsync_part_directory = 1"),
            "{t}: {engine}"
        );
    }
    ch.query(
        "INSERT INTO control_ledger (ts, module, action, request_id, issuer, args_json, pubkey_id, sig_alg, nonce, sig, raw) \
         VALUES (now(), 'MEV', 'POLICY', 'r1', 'dashboard', '{\"ev_min\":\"0.2\"}', 'op-admin-1', 'ed25519-v1', 7, 'x', 'y')",
    );
    let q = std::fs::read_to_string(testkit::workspace_root().join("sql/queries.sql")).unwrap();
    let stmts: Vec<&str> = q
        .lines()
        .filter(|l| !l.starts_with("--") && !l.trim().is_empty())
        .collect();
    assert_eq!(stmts.len(), 3);
    assert!(ch.query(stmts[0]).contains("r1"));
    let by_id = stmts[1].replace("{request_id:String}", "'r1'");
    assert!(ch.query(&by_id).contains("op-admin-1"));
    assert!(ch.query(stmts[2]).trim().ends_with("\t1"));
}

/// A `control_decisions` made before 2026-12-05 deleted rows after 400 days, and
/// a chain verifies from its first row: the sidecar's migrations (as
/// `--setup-clickhouse` runs them) take that TTL away, and run again on a table
/// without one they still succeed. A TTL an operator chose stays.
#[test]
fn ledger_tables_made_with_a_ttl_lose_it() {
    let d = testkit::TempDir::new("clickhouse-ttl");
    let ch = testkit::clickhouse::ClickHouse::start(d.path());
    let old =
        std::fs::read_to_string(testkit::workspace_root().join("sql/11_control_decisions.sql"))
            .unwrap();
    let create = gw_sidecar::ledger::migrations::statements(&old)
        .into_iter()
        .next()
        .unwrap()
        .replace(
            "ORDER BY (chain_id, seq)",
            "ORDER BY (chain_id, seq)\nTTL toDateTime(intDiv(ts_ms, 1000)) + INTERVAL 400 DAY DELETE",
        );
    ch.query(&create);
    let engine = || {
        ch.query(
            "SELECT engine_full FROM system.tables WHERE name = 'control_decisions' FORMAT TSV",
        )
    };
    assert!(engine().contains("TTL"), "{}", engine());
    let client = clickhouse::Client::default().with_url(ch.url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..2 {
        rt.block_on(gw_sidecar::ledger::migrations::apply(&client))
            .unwrap();
        assert!(!engine().contains("TTL"), "{}", engine());
    }
    for chosen in [
        "toDateTime(intDiv(ts_ms, 1000)) + INTERVAL 800 DAY",
        "toDateTime(intDiv(ts_ms, 1000)) + INTERVAL 400 DAY DELETE, \
         toDateTime(intDiv(ts_ms, 1000)) + INTERVAL 30 DAY RECOMPRESS CODEC(ZSTD(3))",
    ] {
        ch.query(&format!(
            "ALTER TABLE control_decisions MODIFY TTL {chosen}"
        ));
        rt.block_on(gw_sidecar::ledger::migrations::apply(&client))
            .unwrap();
        assert!(
            engine().contains("TTL"),
            "an operator's TTL was removed: {}",
            engine()
        );
    }
}

fn gw_core_proto() -> String {
    std::fs::read_to_string(testkit::workspace_root().join("proto/control.proto")).unwrap()
}
