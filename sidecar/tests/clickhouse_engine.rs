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
