//! Every metric `docs/configuration.md` names is what `/metrics` exports, and every
//! family `/metrics` exports is named there.

use std::collections::BTreeSet;

use serde_json::json;

mod common;

/// The sidecar metric names in the docs' metrics table.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(testkit::workspace_root().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    doc.lines()
        .filter(|l| {
            l.starts_with("| `gw_sidecar_")
                || l.starts_with("| `gw_se")
                || l.starts_with("| `gw_strategy_")
        })
        .filter_map(|l| l.split('`').nth(1).map(str::to_owned))
        .collect()
}

/// The families in an OpenMetrics text: a counter `x` is exported as `x_total`.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap_or_default();
            match parts.next() {
                Some("counter") => format!("{name}_total"),
                _ => name.to_owned(),
            }
        })
        .collect()
}

#[test]
fn every_documented_metric_is_exported_and_every_exported_one_documented() {
    let docs = documented();
    assert!(docs.len() >= 11, "the table was not found: {docs:?}");
    let d = testkit::TempDir::new("metrics-docs");
    let models = d.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let mut cfg = common::config(d.path(), true);
    // Every capability on, pointed at peers that are not there: the metrics exist
    // from the start.
    cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", testkit::free_port()));
    cfg.file.kafka = Some(gw_sidecar::control::bus::KafkaConfig::with_brokers(
        &format!("127.0.0.1:{}", testkit::free_port()),
    ));
    cfg.file.models = Some(serde_json::from_value(json!({"dir": models})).expect("models section"));
    let sender = json!({
        "tpu": {},
        "relay": {"url": format!("http://127.0.0.1:{}", testkit::free_port())},
        "leaders": {"static": [{"tpu_quic": format!("127.0.0.1:{}", testkit::free_port())}]},
        "rpc_node": {"url": format!("http://127.0.0.1:{}", testkit::free_port())},
        "strategy": {"ingest": {
            "bind": "127.0.0.1:0",
            "allow": [bs58::encode([6u8; 32]).into_string()],
        }},
    });
    cfg.file.sender = Some(serde_json::from_value(sender).expect("sender section"));
    cfg.tpu_identity = Some(ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
    let s = common::serve(cfg);
    let text = s.get_ops("/metrics");
    let got = exported(&text);
    for name in &docs {
        assert!(
            got.contains(name),
            "documented but not exported: {name}\n{text}"
        );
    }
    for name in &got {
        assert!(docs.contains(name), "exported but not documented: {name}");
    }
    // Every histogram series ends in the bucket Prometheus requires, `le="+Inf"`
    // (prometheus-client writes it only for an upper bound of f64::MAX).
    let histograms: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    assert!(
        histograms.contains(&"gw_sidecar_journal_batch_seconds")
            && histograms.contains(&"gw_strategy_decision_latency_us"),
        "{text}"
    );
    for name in histograms {
        let series = |suffix: &str, le: Option<&str>| {
            let prefix = format!("{name}_{suffix}");
            text.lines()
                .filter(|l| l.starts_with(&prefix))
                .filter(|l| le.is_none_or(|le| l.contains(&format!("le=\"{le}\""))))
                .count()
        };
        assert_eq!(
            series("bucket", Some("+Inf")),
            series("count", None),
            "{name}: a series without its +Inf bucket\n{text}"
        );
    }
}
