//! The command bus on a real Kafka-protocol broker (tansu 0.6.0) with the real
//! ClickHouse ledger: exact signed bytes keyed by module, per-module consumer groups
//! committing after apply + audit, restart without re-applying, Kafka down → 503 with
//! an audit row and no state change, and the original Kafka-engine SQL ingesting
//! what the sidecar published.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gw_core::command::sign_command;
use gw_core::ledger::{verify_chain, LedgerRow};
use gw_core::{Action, Command, Module};
use gw_sidecar::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use testkit::clickhouse::ClickHouse;
use testkit::fixtures::{command_key, signed_command};
use testkit::kafka::Kafka;

mod common;
use common::{now, row_summary};

const TOPIC: &str = "control-commands-proto";

fn config(dir: &std::path::Path, kafka: &Kafka, ch: &ClickHouse) -> Config {
    let mut cfg = common::config(&dir.join("state"), false);
    let mut k = gw_sidecar::control::bus::KafkaConfig::with_brokers(&kafka.brokers());
    k.message_timeout_ms = 1500;
    cfg.file.kafka = Some(k);
    cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", ch.http_port));
    // The first group join on a fresh broker takes a few seconds.
    cfg.file.apply_wait_ms = 20_000;
    cfg
}

fn post(s: &common::Served, body: Vec<u8>) -> (u16, Value) {
    s.post_command(body)
}

/// Posts `body` and asserts it was applied (200, `applied: true`).
fn post_applied(s: &common::Served, body: Vec<u8>) -> Value {
    let (status, answer) = post(s, body);
    assert_eq!(
        (status, answer["applied"].clone()),
        (200, Value::Bool(true)),
        "{answer}"
    );
    answer
}

fn modules(s: &common::Served) -> Value {
    s.get_json("/api/modules")
}

fn arbitrage_command(nonce: u64, action: Action) -> Vec<u8> {
    let c = Command {
        ts: now(),
        module: Module::Arbitrage.to_proto() as i32,
        action: action.to_proto() as i32,
        args: BTreeMap::new(),
        request_id: format!("req-{nonce}"),
        issuer: "dashboard".into(),
        schema_version: "ctrl-v1".into(),
        nonce,
        ..Default::default()
    };
    sign_command(&c, &command_key(), "op-admin-1")
}

/// Every message on the topic, read by an independent consumer group.
fn read_topic(brokers: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

/// The committed offset of `group` on partition 0.
fn committed(brokers: &str, group: &str) -> Offset {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(TOPIC, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.find_partition(TOPIC, 0).unwrap().offset()
}

fn ledger_rows(ch: &ClickHouse, at_least: usize) -> Vec<LedgerRow> {
    let rows = common::wait_rows(ch, at_least);
    assert!(rows.len() >= at_least, "{} rows shipped", rows.len());
    rows
}

#[test]
fn commands_cross_kafka_to_their_module_agent_once_even_across_a_restart() {
    let d = testkit::TempDir::new("kafka-bus");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let s = common::serve(config(d.path(), &kafka, &ch));

    let throttle = signed_command(
        1,
        Action::Throttle,
        now(),
        "dashboard",
        &[("throttle_pct", "25")],
    );
    let (status, body) = post(&s, throttle.clone());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"], true, "{body}");
    assert!(body["journal_lsn"].as_u64().is_some(), "{body}");
    assert_eq!(body["ledger"]["chain_id"], "node-1", "{body}");
    let start_arb = arbitrage_command(2, Action::Start);
    post_applied(&s, start_arb.clone());
    assert_eq!(post(&s, throttle.clone()).0, 409);

    // The topic holds the exact signed bytes, keyed by module.
    assert_eq!(
        read_topic(&kafka.brokers(), 2),
        vec![
            (b"mev".to_vec(), throttle.clone()),
            (b"arbitrage".to_vec(), start_arb)
        ]
    );
    // Each module's group committed past both messages (its own applied, the other
    // skipped) — only after applying and auditing.
    let deadline = Instant::now() + Duration::from_secs(15);
    for g in ["ctrl-proto-mev", "ctrl-proto-arbitrage"] {
        while committed(&kafka.brokers(), g) != Offset::Offset(2) {
            assert!(Instant::now() < deadline, "{g} did not commit offset 2");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let m = modules(&s);
    assert_eq!(
        (
            m["mev"]["throttle_pct"].clone(),
            m["arbitrage"]["state"].clone()
        ),
        (25.into(), "running".into())
    );

    // Restart: the replay is still refused and nothing is applied twice.
    drop(s);
    let s = common::serve(config(d.path(), &kafka, &ch));
    assert_eq!(post(&s, throttle).1["error"], "replay");
    post_applied(&s, signed_command(3, Action::Kill, now(), "dashboard", &[]));
    let m = modules(&s);
    assert_eq!(m["mev"]["applied"], 2, "{m}");
    assert_eq!(m["mev"]["state"], "killed");
    assert_eq!(m["mev"]["throttle_pct"], 25);
    assert_eq!(m["arbitrage"]["applied"], 1);

    let rows = ledger_rows(&ch, 8);
    assert_eq!(verify_chain(&rows), Ok(8));
    assert_eq!(
        row_summary(&rows),
        vec![
            ("sidecar", "accepted", "", "req-1"),
            ("agent", "applied", "", "req-1"),
            ("sidecar", "accepted", "", "req-2"),
            ("agent", "applied", "", "req-2"),
            ("sidecar", "rejected", "replay", "req-1"),
            ("sidecar", "rejected", "replay", "req-1"),
            ("sidecar", "accepted", "", "req-3"),
            ("agent", "applied", "", "req-3"),
        ]
    );
}

/// With the broker down (frozen with SIGSTOP: it answers nothing, its log intact) a
/// command is still accepted: it is durable in the journal (with its rows and its
/// nonce) and waits there; a resend of the same bytes says so; once the broker is
/// back (SIGCONT) the command is forwarded and applied, once.
#[test]
fn kafka_down_commands_wait_in_the_journal_and_apply_once_it_is_back() {
    let d = testkit::TempDir::new("kafka-down");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.apply_wait_ms = 1500;
    let s = common::serve(cfg);
    let (status, body) = post(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    assert_eq!(status, 200, "{body}");
    // The first group join on a fresh broker can take longer than this test's
    // 1.5 s apply wait on a loaded machine: wait for the apply itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "running" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(100));
    }

    kafka.process.signal("STOP");
    let kill = signed_command(2, Action::Kill, now(), "dashboard", &[]);
    let (status, body) = post(&s, kill.clone());
    assert_eq!(
        (status, body["applied"].clone(), body["pending"].clone()),
        (200, Value::Bool(false), Value::Bool(true)),
        "accepted and durable, not yet applied: {body}"
    );
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["state"].clone(), m["mev"]["applied"].clone()),
        ("running".into(), 1.into())
    );
    // A resend is not applied twice, and says the command is not applied yet.
    let (status, body) = post(&s, kill.clone());
    assert_eq!(
        (status, body["error"].as_str(), body["applied"].clone()),
        (409, Some("replay"), Value::Bool(false)),
        "{body}"
    );
    // A resend whose client hangs up while the sidecar waits for the agent (the
    // answer would come after `apply_wait`) is refused and audited all the same.
    let hung_up = s.rt.block_on(async {
        common::as_admin(s.http.post(format!("{}/api/control/commands", s.base)))
            .header("content-type", "application/x-protobuf")
            .body(kill.clone())
            .timeout(Duration::from_millis(300))
            .send()
            .await
    });
    assert!(hung_up.is_err_and(|e| e.is_timeout()));

    // The broker comes back.
    kafka.process.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(250));
    }
    let m = modules(&s);
    assert_eq!(m["mev"]["applied"], 2, "{m}");
    let (status, body) = post(&s, kill);
    assert_eq!(
        (status, body["applied"].clone()),
        (409, Value::Bool(true)),
        "{body}"
    );
    assert!(body["ledger"]["applied_seq"].as_u64().is_some(), "{body}");

    // Seven rows besides any `duplicate` (which may come between them).
    let a_copy =
        |r: &LedgerRow| r.decision == "duplicate" || r.stage == "agent" && r.code == "replay";
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        let decided = rows.iter().filter(|r| !a_copy(r)).count();
        if decided >= 7 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
    // A forward may reach the topic twice after an outage (its mark lost): the
    // agent refuses the copy by its forward number (an agent `replay` row) or
    // drops it by nonce (a `duplicate` row), never a second `applied`.
    let mut got: Vec<_> = row_summary(&rows)
        .into_iter()
        .filter(|r| r.1 != "duplicate" && !(r.0 == "agent" && r.2 == "replay"))
        .collect();
    got.sort();
    let mut want = vec![
        ("sidecar", "accepted", "", "req-1"),
        ("agent", "applied", "", "req-1"),
        ("sidecar", "accepted", "", "req-2"),
        ("sidecar", "rejected", "replay", "req-2"),
        ("sidecar", "rejected", "replay", "req-2"),
        ("agent", "applied", "", "req-2"),
        ("sidecar", "rejected", "replay", "req-2"),
    ];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn the_original_kafka_engine_sql_ingests_what_the_sidecar_published() {
    let d = testkit::TempDir::new("kafka-engine");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let schemas = d.path().join("clickhouse/format_schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    std::fs::copy(
        testkit::workspace_root().join("proto/control.proto"),
        schemas.join("control.proto"),
    )
    .unwrap();
    let s = common::serve(config(d.path(), &kafka, &ch));
    let policy = signed_command(7, Action::Policy, now(), "dashboard", &[("ev_min", "0.2")]);
    assert_eq!(post(&s, policy).0, 200);
    assert_eq!(post(&s, arbitrage_command(8, Action::Stop)).0, 200);
    // The sidecar applied sql/10 (control_ledger) at start; add the Kafka path.
    ledger_rows(&ch, 4);
    let sql =
        std::fs::read_to_string(testkit::workspace_root().join("sql/14_control_proto_kafka.sql"))
            .unwrap()
            .replace("{kafka_brokers}", &kafka.brokers())
            .replace("{format_schemas}", schemas.to_str().unwrap());
    for stmt in gw_sidecar::ledger::migrations::statements(&sql) {
        ch.query(&stmt);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        let got = ch.query(
            "SELECT module, action, request_id, issuer, args_json, pubkey_id, sig_alg, nonce, length(sig) \
             FROM control_ledger ORDER BY nonce FORMAT TSV",
        );
        if got.lines().count() >= 2 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        got.trim(),
        "MEV\tPOLICY\treq-7\tdashboard\t{\"ev_min\":\"0.2\"}\top-admin-1\ted25519-v1\t7\t64\n\
         ARBITRAGE\tSTOP\treq-8\tdashboard\t{}\top-admin-1\ted25519-v1\t8\t64"
    );
}

/// Creates a one-partition topic.
async fn create_topic(k: &gw_sidecar::control::bus::KafkaConfig, name: &str) {
    k.create_topics(&[rdkafka::admin::NewTopic::new(
        name,
        1,
        rdkafka::admin::TopicReplication::Fixed(1),
    )])
    .await
    .unwrap();
}

/// Produces `n` records at once with the bus's producer settings, commits offset
/// `at` for a group, and returns the first offset a new member of that group reads
/// (`None`: nothing within 10 s).
fn resume_offset(kafka: &Kafka, batch_messages: u32, n: i64, at: i64) -> Option<i64> {
    use rdkafka::consumer::{CommitMode, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut k = gw_sidecar::control::bus::KafkaConfig::with_brokers(&kafka.brokers());
    k.batch_messages = batch_messages;
    let topic = format!("resume-{batch_messages}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        create_topic(&k, &topic).await;
        let p: FutureProducer = k.producer().create().unwrap();
        let sends = (0..n).map(|i| {
            let v = i.to_string();
            let p = &p;
            let topic = &topic;
            async move {
                p.send(
                    FutureRecord::<(), _>::to(topic).payload(&v),
                    Duration::from_secs(5),
                )
                .await
                .map(|d| d.offset)
            }
        });
        let offsets: Vec<i64> = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(offsets.iter().max(), Some(&(n - 1)));
        let group = format!("resume-group-{batch_messages}");
        let c: BaseConsumer = k.client().set("group.id", &group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(at))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
        drop(c);
        let c: StreamConsumer = k
            .client()
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        tokio::time::timeout(Duration::from_secs(10), c.recv())
            .await
            .ok()
            .map(|m| m.unwrap().offset())
    })
}

/// A consumer resumes at any committed offset of what the bus produced. tansu 0.6.0
/// serves a fetch only from a batch's first offset (an offset inside a batch gets
/// nothing, and later the next batch: the rest of the batch is skipped), so the
/// bus writes one record per batch by default (`batch_messages`).
#[test]
fn a_consumer_resumes_inside_what_the_bus_produced() {
    let d = testkit::TempDir::new("kafka-resume");
    let kafka = Kafka::start(d.path());
    assert_eq!(resume_offset(&kafka, 1, 20, 7), Some(7));
}

/// A crash between an agent's checkpoint in Kafka (the commit point) and its
/// ledger row: the checkpoint records the decision of node `node-1`, whose
/// journal does not have it (a fresh state directory stands for the lost write).
/// At start the node writes the `applied` row once, takes the module state from
/// the checkpoint and writes the nonce record the crash also lost; a second start
/// writes nothing again.
#[test]
fn a_decision_the_checkpoint_has_and_the_journal_lost_is_written_at_start() {
    use gw_sidecar::control::kafka_state::{KafkaState, StoredNonce};

    let d = testkit::TempDir::new("kafka-reconcile");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let cfg = config(d.path(), &kafka, &ch);
    let node = cfg.file.node_id.clone();
    let k = cfg.file.kafka.clone().unwrap();
    let kill = signed_command(7, Action::Kill, now(), "dashboard", &[]);
    let nonce = StoredNonce {
        issuer: "dashboard".into(),
        nonce: 7,
        expires: now() + 600,
        chain: node.clone(),
        what: None,
    };
    let cp = checkpoint_after(&node, Action::Kill, 7, kill.clone(), &[7], 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
    // The command was on the topic (offset 0) and its agent had written the
    // checkpoint when the node died.
    rt.block_on(seed(&k, &store, std::slice::from_ref(&kill), &cp));

    let s = common::serve(config(d.path(), &kafka, &ch));
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "{}", modules(&s));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(modules(&s)["mev"]["applied"], 1);
    let rows = ledger_rows(&ch, 1);
    assert_eq!(row_summary(&rows), vec![("agent", "applied", "", "req-7")]);
    // The lost nonce record is back; the resend of the same bytes is a replay.
    let loaded = rt.block_on(store.load(Module::Mev, now(), 0)).unwrap();
    assert_eq!((loaded.nonces, loaded.missing), (vec![nonce], vec![]));

    // A second start: the journal knows it wrote the row.
    drop(s);
    let s = common::serve(config(d.path(), &kafka, &ch));
    assert_eq!(
        post(
            &s,
            signed_command(8, Action::Start, now(), "dashboard", &[])
        )
        .0,
        200
    );
    // Rows ship in journal order: a second req-7 row would come before req-8's.
    let rows = ledger_rows(&ch, 3);
    assert_eq!(verify_chain(&rows), Ok(3));
    assert_eq!(
        row_summary(&rows)
            .into_iter()
            .filter(|r| r.0 == "agent")
            .collect::<Vec<_>>(),
        vec![
            ("agent", "applied", "", "req-7"),
            ("agent", "applied", "", "req-8"),
        ]
    );
    assert_eq!(modules(&s)["mev"]["applied"], 2);
}

/// A module's checkpoint carries the clock floor of the node that wrote it:
/// nonce records expiring before it may have been tombstoned, so a node taking
/// the module over judges commands no earlier than it, whatever its own clock
/// reads. The floor here stands for a writer whose clock read 700 s later than
/// this node's (or this node's clock stepped back since): a command signed now
/// is beyond the agents' memory at the floor (`ts + max_skew_secs +
/// agent_dedup_secs`), and refused `stale` with its row. Before, it was applied
/// (had it been a copy of one whose nonce was tombstoned: applied twice).
#[test]
fn a_node_taking_a_module_over_judges_no_earlier_than_the_checkpoints_clock_floor() {
    use gw_sidecar::control::kafka_state::KafkaState;

    let d = testkit::TempDir::new("kafka-clock-floor");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.agent_dedup_secs = 0;
    let node = cfg.file.node_id.clone();
    let k = cfg.file.kafka.clone().unwrap();
    let first = signed_command(7, Action::Start, now(), "dashboard", &[]);
    let mut cp = checkpoint_after(&node, Action::Start, 7, first.clone(), &[7], 1);
    cp.clock_floor = now() + 700;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
    rt.block_on(seed(&k, &store, std::slice::from_ref(&first), &cp));

    let s = common::serve(cfg);
    let throttle = signed_command(
        8,
        Action::Throttle,
        now(),
        "dashboard",
        &[("throttle_pct", "40")],
    );
    let (status, body) = post(&s, throttle);
    assert_eq!(
        (
            status,
            body["applied"].clone(),
            body["apply_error"]["error"].clone()
        ),
        (200, false.into(), "stale".into()),
        "{body}"
    );
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["state"].clone(), m["mev"]["throttle_pct"].clone()),
        ("running".into(), 100.into()),
        "{m}"
    );
    // And the checkpoint's decision, whose row this fresh journal lacks, once.
    let stored = ledger_rows(&ch, 3);
    let mut rows = row_summary(&stored);
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("agent", "applied", "", "req-7"),
            ("agent", "rejected", "stale", "req-8"),
            ("sidecar", "accepted", "", "req-8"),
        ]
    );
}

/// The same crash with a command larger than a checkpoint keeps
/// (`kafka_state::LAST_PAYLOAD_MAX`, 16 KiB: its arguments here): the row
/// written at start carries the command's signed bytes and its arguments, read
/// back from the command topic at the checkpoint's position (their digest the
/// checkpoint's). It was written with neither, as was its nonce's record of
/// what was applied.
#[test]
fn a_large_decision_the_journal_lost_is_written_at_start_with_its_bytes() {
    use gw_sidecar::control::kafka_state::{KafkaState, LastDecision, LAST_PAYLOAD_MAX};

    let d = testkit::TempDir::new("kafka-reconcile-large");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let cfg = config(d.path(), &kafka, &ch);
    let node = cfg.file.node_id.clone();
    let k = cfg.file.kafka.clone().unwrap();
    let note = "n".repeat(1000);
    let keys: Vec<String> = (0..20).map(|i| format!("note_{i:02}")).collect();
    let args: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), note.as_str())).collect();
    let kill = signed_command(7, Action::Kill, now(), "dashboard", &args);
    assert!(kill.len() > LAST_PAYLOAD_MAX, "{}", kill.len());
    let mut cp = checkpoint_after(&node, Action::Kill, 7, kill.clone(), &[7], 1);
    let last = cp.last.get_mut(&node).unwrap();
    (last.payload, last.omitted) = LastDecision::keep(&kill);
    assert!(last.payload.is_empty() && last.omitted.is_some());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
    rt.block_on(seed(&k, &store, std::slice::from_ref(&kill), &cp));

    let s = common::serve(config(d.path(), &kafka, &ch));
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "{}", modules(&s));
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows = ledger_rows(&ch, 1);
    assert_eq!(row_summary(&rows), vec![("agent", "applied", "", "req-7")]);
    assert_eq!(
        rows[0].raw_hex,
        hex::encode(&kill),
        "the row carries the signed bytes"
    );
    let args: Value = serde_json::from_str(&rows[0].args_json).unwrap();
    assert_eq!(args["note_19"], note.as_str(), "{}", rows[0].args_json);
    assert_eq!(rows[0].pubkey_id, "op-admin-1");
}

/// A command topic deleted and created again starts at offset 0, under a module
/// checkpoint that says 50 commands were handled: the agent finds the topic ends
/// before that, says so (an error log, `outcome="topic_replaced"`), and handles the
/// new topic's commands — an old one already applied comes out a `duplicate` (the
/// applied nonces live in Kafka), a new one is applied. Taken by its offset alone,
/// each would have been "already handled" and never applied.
#[test]
fn a_command_topic_created_again_under_the_checkpoint_is_detected_and_its_commands_applied() {
    let (d, kafka, ch, s) = recreated_topic("kafka-recreated", 50, &[7], &[("req-7", "duplicate")]);
    // Then the node dies between a decision's checkpoint in Kafka (the new topic's
    // offset 2) and its journal entry. At start its journal's last position on the
    // partition is the new topic's offset 1, not the old topic's 49: the row the
    // crash lost is written, once.
    use gw_sidecar::control::kafka_state::KafkaState;
    drop(s);
    let cfg = config(d.path(), &kafka, &ch);
    let (node, k) = (cfg.file.node_id.clone(), cfg.file.kafka.clone().unwrap());
    let kill = signed_command(21, Action::Kill, now(), "dashboard", &[]);
    let mut cp = checkpoint_after(&node, Action::Kill, 21, kill.clone(), &[7, 9, 20, 21], 3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
        let at = produce(&k, TOPIC, "mev", Some(&kill), forwarded(&store, &kill)).await;
        assert_eq!(at, 2);
        // The next checkpoint after the newest, as the agent numbers it.
        let newest = store.load(Module::Mev, now(), 0).await.unwrap().checkpoint;
        cp.generation = newest.unwrap().generation + 1;
        store.save(Module::Mev, &cp).await.unwrap();
    });
    let s = common::serve(cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "{}", modules(&s));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The four rows before (three agent rows, the throttle's `accepted`) and one.
    let rows = ledger_rows(&ch, 5);
    assert_eq!(verify_chain(&rows), Ok(5));
    let agent: Vec<_> = row_summary(&rows)
        .into_iter()
        .filter(|r| r.0 == "agent")
        .skip(3)
        .collect();
    assert_eq!(agent, vec![("agent", "applied", "", "req-21")]);
}

/// The same when the new topic already reaches past the checkpoint's offsets: the
/// record at the offset of the checkpoint's last decision is another command than
/// the one decided there.
#[test]
fn a_command_topic_created_again_and_longer_than_the_old_is_detected_too() {
    let _ = recreated_topic(
        "kafka-recreated-longer",
        2,
        &[7, 10, 11],
        &[
            ("req-7", "duplicate"),
            ("req-10", "applied"),
            ("req-11", "applied"),
        ],
    );
}

/// A checkpoint of module mev that says the old topic was handled up to offset
/// `next` (the last decision there, at `next - 1`, being nonce 9; nonce 7 applied
/// before it), a new topic holding the commands `nonces` (start, in order), then a
/// throttle command sent through the sidecar: the agent's rows are `want` and then
/// the throttle's `applied`. Gives back the running parts.
fn recreated_topic(
    name: &str,
    next: i64,
    nonces: &[u64],
    want: &[(&str, &str)],
) -> (testkit::TempDir, Kafka, ClickHouse, common::Served) {
    use gw_sidecar::control::kafka_state::KafkaState;

    let d = testkit::TempDir::new(name);
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let cfg = config(d.path(), &kafka, &ch);
    let node = cfg.file.node_id.clone();
    let k = cfg.file.kafka.clone().unwrap();
    let last = signed_command(9, Action::Start, now(), "dashboard", &[]);
    let cp = checkpoint_after(&node, Action::Start, 9, last, &[7, 9], next);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
    let commands: Vec<Vec<u8>> = nonces
        .iter()
        .map(|n| signed_command(*n, Action::Start, now(), "dashboard", &[]))
        .collect();
    rt.block_on(seed(&k, &store, &commands, &cp));

    let s = common::serve(config(d.path(), &kafka, &ch));
    let (status, body) = post(
        &s,
        signed_command(
            20,
            Action::Throttle,
            now(),
            "dashboard",
            &[("throttle_pct", "40")],
        ),
    );
    assert_eq!(
        (status, body["applied"].clone()),
        (200, Value::Bool(true)),
        "the new topic's command is applied: {body}"
    );
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["state"].clone(), m["mev"]["throttle_pct"].clone()),
        ("running".into(), 40.into()),
        "{m}"
    );
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_agent_total{module=\"mev\",outcome=\"topic_replaced\"} 1"),
        "{metrics}"
    );
    let rows = ledger_rows(&ch, want.len() + 3);
    assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
    let agent: Vec<_> = row_summary(&rows)
        .into_iter()
        .filter(|r| r.0 == "agent")
        .collect();
    // First the row of the checkpoint's last decision, which this node's (new)
    // journal lacks (written again at start).
    let mut expected = vec![("agent", "applied", "", "req-9")];
    expected.extend(want.iter().map(|(id, decision)| {
        let code = if *decision == "duplicate" {
            "replay"
        } else {
            ""
        };
        ("agent", *decision, code, *id)
    }));
    expected.push(("agent", "applied", "", "req-20"));
    assert_eq!(agent, expected);
    (d, kafka, ch, s)
}

/// Creates the command topic holding module mev's `commands` (offsets 0, 1, ...)
/// and the state topics holding `cp`, before any sidecar starts.
async fn seed(
    k: &gw_sidecar::control::bus::KafkaConfig,
    store: &gw_sidecar::control::kafka_state::KafkaState,
    commands: &[Vec<u8>],
    cp: &gw_sidecar::control::kafka_state::Checkpoint,
) {
    create_topic(k, TOPIC).await;
    for (i, c) in commands.iter().enumerate() {
        let at = produce(k, TOPIC, "mev", Some(c), forwarded(store, c)).await;
        assert_eq!(at, i as i64);
    }
    store.prepare().await.unwrap();
    store.save(Module::Mev, cp).await.unwrap();
}

/// The headers of `mev` command `c` as the node of `store` forwards it (no
/// requester), numbered as from a start long before the node's next (epoch 1),
/// each forward after the one before.
fn forwarded(
    store: &gw_sidecar::control::kafka_state::KafkaState,
    c: &[u8],
) -> rdkafka::message::OwnedHeaders {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    gw_sidecar::control::bus::forward_headers(
        store.signer(),
        TOPIC,
        0,
        b"mev",
        c,
        &gw_core::contract::Requester::default(),
        gw_sidecar::control::bus::ForwardSeq {
            epoch: 1,
            seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        },
    )
}

/// Module mev's checkpoint once `node` decided `action` (the command `last`, nonce
/// `last_nonce`) at offset `next - 1`, with the nonces `applied` remembered.
fn checkpoint_after(
    node: &str,
    action: Action,
    last_nonce: u64,
    last: Vec<u8>,
    applied: &[u64],
    next: i64,
) -> gw_sidecar::control::kafka_state::Checkpoint {
    use gw_sidecar::control::bus::Position;
    use gw_sidecar::control::kafka_state::{Checkpoint, LastDecision, StoredNonce};

    let mut state = gw_core::module_state::ModuleState::default();
    state.apply(
        action,
        &gw_core::args::CommandArgs::default(),
        &format!("req-{last_nonce}"),
    );
    Checkpoint {
        state,
        next: [(0, next)].into_iter().collect(),
        recent: applied
            .iter()
            .map(|nonce| StoredNonce {
                issuer: "dashboard".into(),
                nonce: *nonce,
                expires: now() + 600,
                chain: node.to_owned(),
                what: None,
            })
            .collect(),
        last: [(
            node.to_owned(),
            LastDecision {
                position: Position {
                    partition: 0,
                    offset: next - 1,
                },
                outcome: "applied".into(),
                code: None,
                payload: last,
                requester: gw_core::contract::Requester::default(),
                forwarded_by: None,
                omitted: None,
            },
        )]
        .into_iter()
        .collect(),
        writer: node.to_owned(),
        forwards: BTreeMap::new(),
        generation: 1,
        clock_floor: 0,
    }
}

/// Every record of `topic` (partition 0) as key and value (`None`: a tombstone),
/// read from its start by an independent client.
fn state_records(brokers: &str, topic: &str) -> Vec<(String, Option<Vec<u8>>)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("test-state-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let (low, high) = c
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < high - low && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().map(<[u8]>::to_vec),
            ));
        }
    }
    out
}

/// Writes `value` (`None`: a tombstone) with `headers` under `key` to partition 0
/// of `topic`, as any client allowed to write there can (tansu has no ACLs);
/// returns its offset.
async fn produce(
    k: &gw_sidecar::control::bus::KafkaConfig,
    topic: &str,
    key: &str,
    value: Option<&[u8]>,
    headers: rdkafka::message::OwnedHeaders,
) -> i64 {
    let p: rdkafka::producer::FutureProducer = k.producer().create().unwrap();
    let mut r = rdkafka::producer::FutureRecord::<str, [u8]>::to(topic)
        .key(key)
        .partition(0)
        .headers(headers);
    if let Some(v) = value {
        r = r.payload(v);
    }
    p.send(r, Duration::from_secs(5)).await.unwrap().offset
}

/// [`produce`] without headers.
async fn write_raw(
    k: &gw_sidecar::control::bus::KafkaConfig,
    topic: &str,
    key: &str,
    value: Option<&[u8]>,
) {
    produce(k, topic, key, value, rdkafka::message::OwnedHeaders::new()).await;
}

/// A node's signer with a key no node lists (an attacker's).
fn stranger(node: &str) -> gw_sidecar::control::state_sign::StateSigner {
    gw_sidecar::control::state_sign::StateSigner::new(
        node,
        ed25519_dalek::SigningKey::from_bytes(&[0x42; 32]),
        &BTreeMap::new(),
        None,
    )
    .unwrap()
}

/// The module state in Kafka is taken only as a listed node signed it. A client
/// that may write to the state topics forges records there: for `mev`, before any
/// node ran, a checkpoint alone; for `arbitrage`, after the node's own, a
/// checkpoint claiming 999 commands applied (bare, and signed with a key no node
/// lists) and a used nonce for a command not sent yet. Neither module's agent
/// takes a forged checkpoint: `mev`'s does not load (its command waits, counted
/// and logged), nor does `arbitrage`'s after a restart (the newest checkpoint is
/// forged). The operator decides: `kafka.state_recovery: newest_signed` takes
/// `arbitrage`'s own signed checkpoint (the forged nonce is not taken: the next
/// command applies) and finds nothing signed for `mev`; `adopt_newest` takes `mev`'s
/// as it is and applies the command that waited. Each recovered state is written
/// again signed, and the node loads without the option from then on. A watcher
/// (how the other nodes learn of decisions) never sees a forged checkpoint.
#[test]
fn agent_state_in_kafka_is_taken_only_as_a_listed_node_signed_it() {
    use gw_sidecar::control::kafka_state::{Checkpoint, KafkaState, StoredNonce};
    use gw_sidecar::control::state_sign::{Opened, StateRecovery};

    let d = testkit::TempDir::new("kafka-state-signed");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let serve_with = |recovery: Option<StateRecovery>| {
        let mut cfg = config(d.path(), &kafka, &ch);
        cfg.file.kafka.as_mut().unwrap().state_recovery = recovery;
        if recovery.is_none() {
            // A command is expected to wait: the answer says so after this long.
            cfg.file.apply_wait_ms = 3000;
        }
        common::serve(cfg)
    };
    let cfg = config(d.path(), &kafka, &ch);
    let node = cfg.file.node_id.clone();
    let k = cfg.file.kafka.clone().unwrap();
    let signer = cfg.state_signer().unwrap().unwrap();
    let store = std::sync::Arc::new(KafkaState::new(&k, signer.clone()).unwrap());
    let (mev_topic, arb_topic) = (store.topic(Module::Mev), store.topic(Module::Arbitrage));
    let stranger = stranger(&node);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metric = |s: &common::Served, module: &str| {
        let text = s.get_ops("/metrics");
        let needle =
            format!("gw_sidecar_agent_total{{module=\"{module}\",outcome=\"state_untrusted\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    // The checkpoints of `topic` a listed node signed, oldest first.
    let signed_checkpoints = |topic: &str| -> Vec<Checkpoint> {
        state_records(&kafka.brokers(), topic)
            .into_iter()
            .filter(|(k, _)| k == "state")
            .filter_map(|(_, v)| match signer.open(topic, "state", &v?) {
                Opened::Signed { body, .. } => Some(serde_json::from_slice(body).unwrap()),
                Opened::Unverified { .. } => None,
            })
            .collect()
    };
    let wait_for = |s: &common::Served, what: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !what(&modules(s)) {
            assert!(Instant::now() < deadline, "{}", modules(s));
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // mev's topic holds only a forged checkpoint: killed, 5 commands applied.
    let mut fake = Checkpoint {
        writer: node.clone(),
        ..Checkpoint::default()
    };
    fake.state.applied = 4;
    fake.state
        .apply(Action::Kill, &Default::default(), "req-forged");
    let fake_json = serde_json::to_vec(&fake).unwrap();
    rt.block_on(async {
        store.prepare().await.unwrap();
        write_raw(&k, &mev_topic, "state", Some(&fake_json)).await;
    });

    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.apply_wait_ms = 3000;
    let s = common::serve(cfg);
    post_applied(&s, arbitrage_command(1, Action::Start));
    let (status, body) = post(
        &s,
        signed_command(2, Action::Start, now(), "dashboard", &[]),
    );
    assert_eq!(
        (status, body["applied"].clone(), body["pending"].clone()),
        (200, Value::Bool(false), Value::Bool(true)),
        "mev's agent has no state it trusts: the command waits: {body}"
    );
    let m = modules(&s);
    assert_ne!(m["mev"]["applied"], 5, "{m}");
    assert_ne!(m["mev"]["last_request_id"], "req-forged", "{m}");
    assert!(metric(&s, "mev") >= 1);
    drop(s);

    // What the node wrote is signed; the attacker appends forgeries after it.
    let genuine = signed_checkpoints(&arb_topic);
    assert_eq!(
        genuine.last().map(|c| c.state.applied),
        Some(1),
        "{genuine:?}"
    );
    let mut more = genuine.last().unwrap().clone();
    more.state.applied = 998;
    more.state
        .apply(Action::Kill, &Default::default(), "req-forged");
    let more_json = serde_json::to_vec(&more).unwrap();
    let used = StoredNonce {
        issuer: "dashboard".into(),
        nonce: 3,
        expires: now() + 600,
        chain: node.clone(),
        what: None,
    };
    rt.block_on(async {
        write_raw(&k, &arb_topic, "state", Some(&more_json)).await;
        let sealed = stranger.seal(&arb_topic, "state", &more_json);
        write_raw(&k, &arb_topic, "state", Some(&sealed)).await;
        let used_json = serde_json::to_vec(&used).unwrap();
        write_raw(&k, &arb_topic, &used.key(), Some(&used_json)).await;
    });

    // Without a recovery neither module loads: no forged state shows.
    let s = serve_with(None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&s, "arbitrage") == 0 {
        assert!(
            Instant::now() < deadline,
            "arbitrage's forged checkpoint not refused"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not loaded (an older signed checkpoint is not taken on its own either): a
    // command waits.
    let (status, body) = post(&s, arbitrage_command(10, Action::Restart));
    assert_eq!(
        (status, body["applied"].clone(), body["pending"].clone()),
        (200, Value::Bool(false), Value::Bool(true)),
        "{body}"
    );
    let m = modules(&s);
    assert!(
        m["arbitrage"]["applied"] != 999 && m["mev"]["applied"] != 5,
        "{m}"
    );
    drop(s);

    // newest_signed: arbitrage takes its own signed checkpoint; the forged nonce
    // is not taken. mev has nothing signed: it still waits.
    let s = serve_with(Some(StateRecovery::NewestSigned));
    // The command that waited (nonce 10) is applied after the recovery.
    wait_for(&s, &|m| m["arbitrage"]["applied"] == 2);
    let (status, body) = post(&s, arbitrage_command(3, Action::Kill));
    assert_eq!(
        (status, body["applied"].clone()),
        (200, Value::Bool(true)),
        "the forged used nonce is not taken: {body}"
    );
    let m = modules(&s);
    assert_eq!(
        (m["arbitrage"]["applied"].clone(), m["mev"]["state"].clone()),
        (3.into(), "stopped".into()),
        "{m}"
    );
    drop(s);

    // adopt_newest: mev takes the forged checkpoint the operator chose to adopt,
    // writes it again signed and applies the command that waited.
    let s = serve_with(Some(StateRecovery::AdoptNewest));
    wait_for(&s, &|m| m["mev"]["state"] == "running");
    assert_eq!(modules(&s)["mev"]["applied"], 6);
    drop(s);
    let applied = |topic: &str| -> Vec<u64> {
        signed_checkpoints(topic)
            .iter()
            .map(|c| c.state.applied)
            .collect()
    };
    assert_eq!(
        applied(&mev_topic),
        vec![5, 6],
        "adopted, written again, then the command"
    );
    // arbitrage: its own, its own again at the recovery, the restart that
    // waited, the kill.
    assert_eq!(applied(&arb_topic), vec![1, 1, 2, 3]);

    // Without a recovery: both load.
    let s = common::serve(config(d.path(), &kafka, &ch));
    wait_for(&s, &|m| {
        m["mev"]["applied"] == 6 && m["arbitrage"]["applied"] == 3
    });
    assert_eq!(metric(&s, "mev"), 0);

    // A watcher, reading the topic from its start (the forged records included),
    // sees every checkpoint the node signed and no forged one.
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    rt.spawn(
        store
            .clone()
            .watch(Module::Arbitrage, move |cp| sink.lock().push(cp)),
    );
    post_applied(&s, arbitrage_command(4, Action::Start));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen
        .lock()
        .iter()
        .any(|c: &Checkpoint| c.state.applied == 4)
    {
        assert!(
            Instant::now() < deadline,
            "the watcher saw {:?}",
            seen.lock()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(*seen.lock(), signed_checkpoints(&arb_topic));
    assert!(seen.lock().iter().all(|c| c.state.applied <= 4));
}

/// A genuine checkpoint written again later (by anyone who may write to the
/// state topic, or by a node cut off from its group) is a rollback: the agent
/// does not load it, whether the newer checkpoints are still in the topic or
/// only the node's journal knows of them (the topic compacted: here a second
/// broker whose state topic holds the replay alone; deleting the topic and
/// making it again crashed librdkafka 2.12.1 against tansu, in a metadata
/// update). `newest_signed` takes the highest
/// generation back; `adopt_newest` takes the old state as the operator chose. A
/// watcher skips the replay.
#[test]
fn a_checkpoint_written_again_later_is_a_rollback_and_is_not_loaded() {
    use gw_sidecar::control::kafka_state::{Checkpoint, KafkaState};
    use gw_sidecar::control::state_sign::{Opened, StateRecovery};

    let d = testkit::TempDir::new("kafka-state-rollback");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let serve_on = |kafka: &Kafka, recovery: Option<StateRecovery>| {
        let mut cfg = config(d.path(), kafka, &ch);
        cfg.file.kafka.as_mut().unwrap().state_recovery = recovery;
        cfg.file.apply_wait_ms = 3000;
        common::serve(cfg)
    };
    let cfg = config(d.path(), &kafka, &ch);
    let k = cfg.file.kafka.clone().unwrap();
    let signer = cfg.state_signer().unwrap().unwrap();
    let store = std::sync::Arc::new(KafkaState::new(&k, signer.clone()).unwrap());
    let topic = store.topic(Module::Arbitrage);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = |s: &common::Served| {
        let needle = "gw_sidecar_agent_total{module=\"arbitrage\",outcome=\"state_untrusted\"} ";
        s.get_ops("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(needle))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };
    let wait_refused = |s: &common::Served| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while refused(s) == 0 {
            assert!(Instant::now() < deadline, "the rollback was not refused");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let wait_applied = |s: &common::Served, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while modules(s)["arbitrage"]["applied"] != n {
            assert!(Instant::now() < deadline, "{}", modules(s));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let serve_with = |recovery| serve_on(&kafka, recovery);
    // The checkpoint records of the topic: raw value, and (signed) checkpoint.
    let checkpoints_on = |kafka: &Kafka| -> Vec<(Vec<u8>, Checkpoint)> {
        state_records(&kafka.brokers(), &topic)
            .into_iter()
            .filter(|(k, _)| k == "state")
            .filter_map(|(_, v)| {
                let v = v?;
                let cp = match signer.open(&topic, "state", &v) {
                    Opened::Signed { body, .. } => serde_json::from_slice(body).unwrap(),
                    Opened::Unverified { why, .. } => panic!("{why}"),
                };
                Some((v, cp))
            })
            .collect()
    };
    let checkpoints = || checkpoints_on(&kafka);
    let generations_on = |kafka: &Kafka| -> Vec<(u64, u64)> {
        checkpoints_on(kafka)
            .iter()
            .map(|(_, c)| (c.generation, c.state.applied))
            .collect()
    };
    let generations = || generations_on(&kafka);
    let applied_of = |g: &[(u64, u64)]| -> Vec<u64> { g.iter().map(|(_, a)| *a).collect() };
    let pending = |s: &common::Served, nonce: u64| {
        let (status, body) = post(s, arbitrage_command(nonce, Action::Restart));
        assert_eq!(
            (status, body["applied"].clone(), body["pending"].clone()),
            (200, Value::Bool(false), Value::Bool(true)),
            "{body}"
        );
    };

    let s = common::serve(config(d.path(), &kafka, &ch));
    post_applied(&s, arbitrage_command(1, Action::Start));
    post_applied(&s, arbitrage_command(2, Action::Stop));
    post_applied(&s, arbitrage_command(3, Action::Start));
    drop(s);
    // Numbered from the clock in µs (the topic held none), then one more than
    // the checkpoint each was made from (a node cut off from its group that
    // writes from an older state writes a lower number, whatever its clock).
    let g = generations();
    assert_eq!(applied_of(&g), vec![1, 2, 3]);
    assert!(
        g[0].0 > 1_700_000_000_000_000 && g[1].0 == g[0].0 + 1 && g[2].0 == g[1].0 + 1,
        "{g:?}"
    );
    // The first checkpoint, exactly as the node signed it, written again.
    let first = checkpoints()[0].0.clone();
    rt.block_on(write_raw(&k, &topic, "state", Some(&first)));

    // Not loaded: the module is not rolled back to one command applied, and a
    // command waits.
    let s = serve_with(None);
    wait_refused(&s);
    pending(&s, 4);
    assert_ne!(modules(&s)["arbitrage"]["applied"], 1);
    drop(s);

    // newest_signed: the third back (written again above it), then the command
    // that waited.
    let s = serve_with(Some(StateRecovery::NewestSigned));
    wait_applied(&s, 4);
    drop(s);
    let g = generations();
    assert_eq!(applied_of(&g), vec![1, 2, 3, 1, 3, 4]);
    assert!(
        g[3].0 == g[0].0 && g[4].0 > g[2].0 && g[5].0 == g[4].0 + 1,
        "{g:?}"
    );

    // A watcher reading the topic from its start skips the replay.
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    rt.spawn(
        store
            .clone()
            .watch(Module::Arbitrage, move |cp| sink.lock().push(cp.generation)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().last() != Some(&g[5].0) {
        assert!(
            Instant::now() < deadline,
            "the watcher saw {:?}",
            seen.lock()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let skipping_the_replay: Vec<u64> = [0, 1, 2, 4, 5].iter().map(|i| g[*i].0).collect();
    assert_eq!(*seen.lock(), skipping_the_replay);

    // Compaction leaves the replay alone (the newest record of its key): a
    // broker whose state topic holds only it. The node's journal knows the
    // newest generation.
    let kafka2 = Kafka::start(d.path());
    let k2 = config(d.path(), &kafka2, &ch).file.kafka.unwrap();
    rt.block_on(async {
        let store2 = KafkaState::new(&k2, signer.clone()).unwrap();
        store2.prepare().await.unwrap();
        write_raw(&k2, &topic, "state", Some(&first)).await;
    });
    assert_eq!(generations_on(&kafka2), vec![g[0]]);
    let s = serve_on(&kafka2, None);
    wait_refused(&s);
    pending(&s, 6);
    drop(s);
    // newest_signed has nothing to take; adopt_newest takes the old state as it
    // is, numbered above the journal's, and applies the command that waited.
    let s = serve_on(&kafka2, Some(StateRecovery::NewestSigned));
    wait_refused(&s);
    drop(s);
    let s = serve_on(&kafka2, Some(StateRecovery::AdoptNewest));
    wait_applied(&s, 2);
    drop(s);
    let g2 = generations_on(&kafka2);
    assert_eq!(applied_of(&g2), vec![1, 1, 2]);
    assert!(g2[1].0 > g[5].0 && g2[2].0 > g2[1].0, "{g2:?}");
    // From then on it loads without an option.
    let s = common::serve(config(d.path(), &kafka2, &ch));
    post_applied(&s, arbitrage_command(7, Action::Stop));
    assert_eq!(modules(&s)["arbitrage"]["applied"], 3);
}

/// A command reaches the agents only as a gateway node forwarded it: admitted
/// there (the edge's token and roles, the replay guard) and signed by the node
/// with who sent it. Operator-signed commands published to the command topic by
/// any other client — without the node's headers, with a forwarded record's
/// headers on another command, or signed as the node with a key nobody lists —
/// are refused (`forbidden_peer`) with their audit rows, and the requester they
/// claim is not recorded. `kafka.accept_unforwarded` applies such a command,
/// audited without a requester.
#[test]
fn a_command_no_gateway_node_forwarded_is_refused_and_audited() {
    use gw_core::contract::Requester;
    use gw_sidecar::control::bus::forward_headers;
    use rdkafka::message::{Header, Headers, OwnedHeaders};

    let d = testkit::TempDir::new("kafka-unforwarded");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let cfg = config(d.path(), &kafka, &ch);
    let k = cfg.file.kafka.clone().unwrap();
    let s = common::serve(cfg);
    let (status, body) = post(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    assert_eq!(
        (status, body["applied"].clone()),
        (200, Value::Bool(true)),
        "{body}"
    );

    // What the node forwarded carries its name and signature.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "test-headers")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let genuine: OwnedHeaders = loop {
        assert!(Instant::now() < deadline, "nothing on the topic");
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            break m.headers().unwrap().detach();
        }
    };
    let names: Vec<&str> = genuine.iter().map(|h| h.key).collect();
    assert!(
        ["gw-node", "gw-node-seq", "gw-node-sig"]
            .iter()
            .all(|h| names.contains(h)),
        "{names:?}"
    );
    let first = gw_sidecar::control::bus::ForwardSeq { epoch: 1, seq: 1 };

    let stranger = stranger("node-1");
    let claimed = Requester {
        sub: "mallory".into(),
        roles: "admin".into(),
        token_issuer: "https://idp.example".into(),
    };
    let bare = OwnedHeaders::new().insert(Header {
        key: "gw-requester",
        value: Some("mallory"),
    });
    let kill = |n| signed_command(n, Action::Kill, now(), "dashboard", &[]);
    publish_mev(&k, kill(2), bare);
    publish_mev(&k, kill(3), genuine);
    publish_mev(
        &k,
        kill(4),
        forward_headers(&stranger, TOPIC, 0, b"mev", &kill(4), &claimed, first),
    );

    // Refused, each with its row; the module runs on.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        if rows.iter().filter(|r| r.code == "forbidden_peer").count() >= 3 {
            break rows;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
    let refused: Vec<_> = rows.iter().filter(|r| r.code == "forbidden_peer").collect();
    for r in &refused {
        assert_eq!(
            (r.stage.as_str(), r.decision.as_str()),
            ("agent", "rejected")
        );
        assert_eq!(
            (r.requester.as_str(), r.requester_roles.as_str()),
            ("", ""),
            "{r:?}"
        );
    }
    let mut ids: Vec<&str> = refused.iter().map(|r| r.request_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["req-2", "req-3", "req-4"]);
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["state"].clone(), m["mev"]["applied"].clone()),
        ("running".into(), 1.into()),
        "{m}"
    );
    drop(s);

    // Accepted when the operator says so: applied, audited without a requester.
    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.kafka.as_mut().unwrap().accept_unforwarded = true;
    let s = common::serve(cfg);
    publish_mev(
        &k,
        kill(5),
        forward_headers(&stranger, TOPIC, 0, b"mev", &kill(5), &claimed, first),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let applied = loop {
        if let Some(r) = common::stored(&ch)
            .into_iter()
            .find(|r| r.request_id == "req-5")
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no row of req-5");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        (applied.decision.as_str(), applied.requester.as_str()),
        ("applied", "")
    );
}

/// A forwarded record copied, headers and all, to a later offset of the command
/// topic — by anyone who may write there — is refused as a `replay` by the
/// node's forward sequence, also once the agents forgot its nonce (where it
/// would otherwise be applied again), and also after the node restarted (a new
/// start's forwards are numbered after the old one's). The copy answers nobody
/// and is audited.
#[test]
fn a_forwarded_command_copied_to_a_later_offset_is_refused_even_once_its_nonce_is_forgotten() {
    use rdkafka::message::{Headers, OwnedHeaders};

    let d = testkit::TempDir::new("kafka-copied");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let skew = gw_core::freshness::DEFAULT_MAX_SKEW_SECS;
    let serve = || {
        let mut cfg = config(d.path(), &kafka, &ch);
        // Nonces are forgotten as soon as their commands are stale.
        cfg.file.agent_dedup_secs = 0;
        common::serve(cfg)
    };
    let k = config(d.path(), &kafka, &ch).file.kafka.unwrap();
    let s = serve();
    // A kill that goes stale in 3 s, then a start.
    let kill = signed_command(1, Action::Kill, now() - skew + 3, "dashboard", &[]);
    post_applied(&s, kill.clone());
    post_applied(
        &s,
        signed_command(2, Action::Start, now(), "dashboard", &[]),
    );

    // The two records as forwarded.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "test-copies")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let mut records: Vec<(Vec<u8>, OwnedHeaders)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while records.len() < 2 {
        assert!(Instant::now() < deadline, "{} records", records.len());
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            records.push((
                m.payload().unwrap_or_default().to_vec(),
                m.headers().unwrap().detach(),
            ));
        }
    }
    assert_eq!(records[0].0, kill);
    let seq_of = |h: &OwnedHeaders| {
        h.iter()
            .find(|x| x.key == "gw-node-seq")
            .map(|x| String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
            .unwrap()
    };
    let (e0, s0) = seq_of(&records[0].1)
        .split_once('.')
        .map(|(e, s)| (e.to_owned(), s.to_owned()))
        .unwrap();
    let (e1, s1) = seq_of(&records[1].1)
        .split_once('.')
        .map(|(e, s)| (e.to_owned(), s.to_owned()))
        .unwrap();
    assert_eq!(e0, e1, "one start");
    assert!(s1.parse::<u64>().unwrap() > s0.parse::<u64>().unwrap());

    // Once the kill's nonce is forgotten, its copy: refused, the module runs on.
    std::thread::sleep(Duration::from_secs(4));
    let copied_rows = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = common::stored(&ch);
            let copies: Vec<LedgerRow> = rows
                .iter()
                .filter(|r| {
                    r.stage == "agent"
                        && (r.decision == "duplicate"
                            || r.decision == "rejected"
                                && (r.code == "replay" || r.code == "unavailable"))
                })
                .cloned()
                .collect();
            if copies.len() >= n {
                assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
                return copies;
            }
            assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    publish_mev(&k, kill.clone(), records[0].1.clone());
    let copies = copied_rows(1);
    assert_eq!(
        (copies[0].request_id.as_str(), copies[0].code.as_str()),
        ("req-1", "replay"),
        "a copy of a forward decided on"
    );
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["state"].clone(), m["mev"]["applied"].clone()),
        ("running".into(), 2.into()),
        "{m}"
    );
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_agent_total{module=\"mev\",outcome=\"rejected\"} 1"),
        "{metrics}"
    );
    drop(s);

    // After a restart (a new start, numbered after the old one): the node's
    // next forward is applied, a copy of the old start's start command is not.
    let s = serve();
    let throttle = signed_command(
        3,
        Action::Throttle,
        now(),
        "dashboard",
        &[("throttle_pct", "50")],
    );
    post_applied(&s, throttle.clone());
    publish_mev(&k, records[1].0.clone(), records[1].1.clone());
    let copies = copied_rows(2);
    // From an older start: refused whatever it is (a copy, or a record the later
    // start overtook), and answered — or, while its nonce is still remembered (its
    // command was signed just now: 30 s), a duplicate of the applied command.
    let (id, decision, code) = (
        copies[1].request_id.as_str(),
        copies[1].decision.as_str(),
        copies[1].code.as_str(),
    );
    assert!(
        id == "req-2"
            && matches!(
                (decision, code),
                ("rejected", "unavailable") | ("duplicate", "replay")
            ),
        "{:?}",
        copies[1]
    );
    // A number the old start never used, signed with the node's own key (what a
    // node left running from before its restart would send): its start is over.
    let cfg = config(d.path(), &kafka, &ch);
    let signer = cfg.state_signer().unwrap().unwrap();
    let late = signed_command(4, Action::Kill, now(), "dashboard", &[]);
    let headers = gw_sidecar::control::bus::forward_headers(
        &signer,
        TOPIC,
        0,
        b"mev",
        &late,
        &gw_core::contract::Requester::default(),
        gw_sidecar::control::bus::ForwardSeq {
            epoch: e0.parse().unwrap(),
            seq: 1_000,
        },
    );
    publish_mev(&k, late, headers);
    let copies = copied_rows(3);
    assert_eq!(
        (copies[2].request_id.as_str(), copies[2].code.as_str()),
        ("req-4", "unavailable")
    );
    // A number of this start below the throttle's that was never decided on (what
    // a record overtaken on the topic by a later one of its node carries): refused,
    // so that the module's commands apply in the node's order — and answered.
    let until = Instant::now() + Duration::from_secs(30);
    let throttle_seq = loop {
        assert!(Instant::now() < until, "the throttle's record");
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            if m.payload() == Some(throttle.as_slice()) {
                let h = m.headers().unwrap().detach();
                break seq_of(&h);
            }
        }
    };
    let (epoch, seq) = throttle_seq.split_once('.').unwrap();
    let overtaken = signed_command(5, Action::Kill, now(), "dashboard", &[]);
    let headers = gw_sidecar::control::bus::forward_headers(
        &signer,
        TOPIC,
        0,
        b"mev",
        &overtaken,
        &gw_core::contract::Requester::default(),
        gw_sidecar::control::bus::ForwardSeq {
            epoch: epoch.parse().unwrap(),
            seq: seq.parse::<u64>().unwrap() - 1,
        },
    );
    publish_mev(&k, overtaken, headers);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = common::stored(&ch);
        let row = rows
            .iter()
            .find(|r| r.stage == "agent" && r.request_id == "req-5");
        if let Some(r) = row {
            assert_eq!(
                (r.decision.as_str(), r.code.as_str()),
                ("rejected", "unavailable")
            );
            assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = modules(&s);
    assert_eq!(
        (
            m["mev"]["state"].clone(),
            m["mev"]["applied"].clone(),
            m["mev"]["throttle_pct"].clone()
        ),
        ("running".into(), 3.into(), 50.into()),
        "{m}"
    );
    // A command this node accepted whose forward is overtaken on the topic (here:
    // a later number of this start decided on first) is refused `unavailable`,
    // answered, and a resend of its bytes is told so at once, not left
    // `applied: false` as if it could still apply.
    let later = signed_command(6, Action::Start, now(), "dashboard", &[]);
    let headers = gw_sidecar::control::bus::forward_headers(
        &signer,
        TOPIC,
        0,
        b"mev",
        &later,
        &gw_core::contract::Requester::default(),
        gw_sidecar::control::bus::ForwardSeq {
            epoch: epoch.parse().unwrap(),
            seq: seq.parse::<u64>().unwrap() + 100,
        },
    );
    publish_mev(&k, later, headers);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::stored(&ch)
        .iter()
        .any(|r| r.stage == "agent" && r.request_id == "req-6")
    {
        assert!(Instant::now() < deadline, "req-6 decided");
        std::thread::sleep(Duration::from_millis(200));
    }
    let behind = signed_command(7, Action::Kill, now(), "dashboard", &[]);
    let (status, answer) = post(&s, behind.clone());
    assert_eq!(
        (
            status,
            answer["applied"].clone(),
            answer["apply_error"]["error"].clone()
        ),
        (200, false.into(), "unavailable".into()),
        "{answer}"
    );
    let started = Instant::now();
    let (status, answer) = post(&s, behind);
    assert_eq!(
        (
            status,
            answer["error"].clone(),
            answer["applied"].clone(),
            answer["apply_error"]["error"].clone()
        ),
        (409, "replay".into(), false.into(), "unavailable".into()),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let epoch: u64 = std::fs::read_to_string(
        d.path()
            .join("state")
            .join(gw_sidecar::control::bus::EPOCH_FILE),
    )
    .unwrap()
    .parse()
    .unwrap();
    assert!(epoch > e0.parse::<u64>().unwrap());
}

/// A node whose disk lost its `forwarded` marks sends those commands again after
/// its restart — here its state directory is put back as it was before it
/// forwarded a command, what a crash just after the broker took the record, or a
/// disk that lost its last writes, leaves. The command goes out with the number
/// it had, so its module's agent refuses the copy even once its nonce is
/// forgotten; before (a new number per send), it was applied a second time.
#[test]
fn a_command_forwarded_again_after_its_mark_was_lost_is_not_applied_twice() {
    use rdkafka::message::Headers;

    let d = testkit::TempDir::new("kafka-mark-lost");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let skew = gw_core::freshness::DEFAULT_MAX_SKEW_SECS;
    let serve = |clickhouse: bool| {
        let mut cfg = config(d.path(), &kafka, &ch);
        // Nonces are forgotten as soon as their commands are stale.
        cfg.file.agent_dedup_secs = 0;
        cfg.file.apply_wait_ms = 1500;
        if !clickhouse {
            // Nothing listens there: the run's ledger rows stay in its journal.
            cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", testkit::free_port()));
        }
        common::serve(cfg)
    };
    let wait_for = |s: &common::Served, state: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while modules(s)["mev"]["state"] != state {
            assert!(Instant::now() < deadline, "not {state}: {}", modules(s));
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Run 1: the module starts; with the broker stopped, a kill (stale in 5 s)
    // is accepted and waits in the journal.
    let s = serve(true);
    post(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    wait_for(&s, "running");
    kafka.process.signal("STOP");
    let kill = signed_command(2, Action::Kill, now() - skew + 5, "dashboard", &[]);
    let (status, body) = post(&s, kill.clone());
    assert_eq!(
        (status, body["pending"].clone()),
        (200, Value::Bool(true)),
        "{body}"
    );
    drop(s);
    let state = d.path().join("state");
    let before = d.path().join("state-before");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&state)
        .arg(&before)
        .status()
        .unwrap();
    assert!(cp.success());

    // Run 2, ClickHouse away: the kill is forwarded and applied.
    kafka.process.signal("CONT");
    let s = serve(false);
    wait_for(&s, "killed");
    assert_eq!(modules(&s)["mev"]["applied"], 2);
    drop(s);

    // The disk loses what run 2 wrote, the kill's `forwarded` mark with it.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::rename(&before, &state).unwrap();
    // Past the kill's freshness: no agent remembers its nonce.
    std::thread::sleep(Duration::from_secs(6));

    // Run 3 forwards the kill again, as the same forward.
    let s = serve(true);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "test-mark-lost")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&[TOPIC]).unwrap();
    let mut kills = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while kills.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{} copies of the kill",
            kills.len()
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            if m.payload() == Some(kill.as_slice()) {
                let seq = m
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == "gw-node-seq"))
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                kills.push(seq);
            }
        }
    }
    assert!(kills[0].is_some());
    assert_eq!(kills[0], kills[1], "sent again with its number");

    // The copy is refused and audited; the kill was applied once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = common::stored(&ch);
        let refused = rows.iter().any(|r| {
            (
                r.stage.as_str(),
                r.decision.as_str(),
                r.code.as_str(),
                r.request_id.as_str(),
            ) == ("agent", "rejected", "replay", "req-2")
        });
        if refused {
            break rows;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["state"].clone(), m["mev"]["applied"].clone()),
        ("killed".into(), 2.into()),
        "{m}"
    );
}

/// A module's commands are forwarded to one partition of the command topic. A
/// record of the module found in another (here forwarded, signed, by a node
/// configured with another `kafka.partitions`; a client that may write to the
/// topic can put one there too) is refused `forbidden_peer` with its row, and
/// written in no checkpoint: the agent reading it may not own the module's
/// partition, and its copy of the checkpoint would overwrite the owner's.
#[test]
fn a_module_record_in_another_partition_is_refused_and_checkpoints_nothing() {
    use gw_sidecar::control::bus::{forward_headers, partition_of, ForwardSeq};
    use gw_sidecar::control::kafka_state::KafkaState;

    let d = testkit::TempDir::new("kafka-misplaced");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.kafka.as_mut().unwrap().partitions = 2;
    let k = cfg.file.kafka.clone().unwrap();
    let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
    let state_topic = store.topic(Module::Mev);
    let s = common::serve(cfg);
    post_applied(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    let checkpoints = || {
        state_records(&kafka.brokers(), &state_topic)
            .iter()
            .filter(|(k, _)| k == "state")
            .count()
    };
    let before = checkpoints();
    assert!(before >= 1);

    let elsewhere = 1 - partition_of(b"mev", 2);
    let kill = signed_command(2, Action::Kill, now(), "dashboard", &[]);
    let headers = forward_headers(
        store.signer(),
        TOPIC,
        elsewhere,
        b"mev",
        &kill,
        &gw_core::contract::Requester::default(),
        ForwardSeq {
            epoch: u64::MAX / 2,
            seq: 1,
        },
    );
    s.rt.block_on(async {
        let p: rdkafka::producer::FutureProducer = k.producer().create().unwrap();
        let r = rdkafka::producer::FutureRecord::<str, [u8]>::to(TOPIC)
            .key("mev")
            .partition(elsewhere)
            .payload(&kill)
            .headers(headers);
        p.send(r, Duration::from_secs(5)).await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        if rows.iter().any(|r| r.code == "forbidden_peer") {
            break rows;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    };
    let refused = rows.iter().find(|r| r.code == "forbidden_peer").unwrap();
    assert_eq!(
        (refused.stage.as_str(), refused.decision.as_str()),
        ("agent", "rejected")
    );
    assert_eq!(modules(&s)["mev"]["state"], "running", "not applied");
    assert_eq!(checkpoints(), before, "no checkpoint written for it");
    // The module's own partition goes on.
    post_applied(&s, signed_command(3, Action::Stop, now(), "dashboard", &[]));
    assert_eq!(checkpoints(), before + 1);
}

/// The same signed command admitted at two nodes (a resend to another node
/// while the broker was away) has two forwards, each numbered by its own node:
/// only the nonce tells them apart. The second, arriving once the agents may
/// have forgotten that nonce (`ts + max_skew_secs + agent_dedup_secs`), is
/// refused `stale`, not applied again: the module stays as the later command
/// left it, and the command has one `applied` row.
#[test]
fn the_same_command_forwarded_by_another_node_beyond_the_agents_memory_is_refused_stale() {
    use gw_sidecar::control::bus::{forward_headers, ForwardSeq};
    use gw_sidecar::control::state_sign::{node_key, StateSigner};

    let d = testkit::TempDir::new("kafka-two-nodes");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let mut cfg = config(d.path(), &kafka, &ch);
    // Applied nonces kept max_skew_secs past the stale bound: 5 s here.
    cfg.file.agent_dedup_secs = 0;
    cfg.file.max_skew_secs = 5;
    let other = ed25519_dalek::SigningKey::from_bytes(&[0x24; 32]);
    let mine = node_key(&cfg.file.state_dir).unwrap();
    let keys = &mut cfg.file.kafka.as_mut().unwrap().state_keys;
    keys.insert(
        cfg.file.node_id.clone(),
        hex::encode(mine.verifying_key().as_bytes()),
    );
    keys.insert(
        "node-b".into(),
        hex::encode(other.verifying_key().as_bytes()),
    );
    let k = cfg.file.kafka.clone().unwrap();
    let s = common::serve(cfg);
    // A start whose copies are stale in 2 s, and forgotten in 7, applied here;
    // then a stop.
    let start = signed_command(1, Action::Start, now() - 3, "dashboard", &[]);
    post_applied(&s, start.clone());
    post_applied(&s, signed_command(2, Action::Stop, now(), "dashboard", &[]));
    std::thread::sleep(Duration::from_secs(9));
    // node-b admitted the same bytes, and forwards them now.
    let b = StateSigner::new("node-b", other, &BTreeMap::new(), None).unwrap();
    let headers = forward_headers(
        &b,
        TOPIC,
        0,
        b"mev",
        &start,
        &gw_core::contract::Requester::default(),
        ForwardSeq { epoch: 1, seq: 1 },
    );
    publish_mev(&k, start, headers);
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        let refused = rows
            .iter()
            .any(|r| r.stage == "agent" && r.decision == "rejected" && r.request_id == "req-1");
        if refused {
            break rows;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    };
    let of_start: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.stage == "agent" && r.request_id == "req-1")
        .map(|r| (r.decision.as_str(), r.code.as_str()))
        .collect();
    assert_eq!(of_start, [("applied", ""), ("rejected", "stale")]);
    assert_eq!(verify_chain(&rows), Ok(rows.len() as u64));
    assert_eq!(modules(&s)["mev"]["state"], "stopped");
}

/// A consumer group's committed offset ahead of the module's checkpoint (an
/// operator's `--reset-offsets --to-latest`, a mirror's translation) skips no
/// command: the agent goes back to the checkpoint's next offset and applies
/// what lies between, once each.
#[test]
fn a_group_offset_ahead_of_the_checkpoint_skips_no_command() {
    use rdkafka::consumer::CommitMode;

    let d = testkit::TempDir::new("kafka-group-ahead");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let serve = || {
        let mut cfg = config(d.path(), &kafka, &ch);
        // The commands below are published straight to the topic.
        cfg.file.kafka.as_mut().unwrap().accept_unforwarded = true;
        common::serve(cfg)
    };
    let k = config(d.path(), &kafka, &ch).file.kafka.unwrap();
    let s = serve();
    post_applied(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    drop(s);
    // Two commands at offsets 1 and 2 while no node runs; the group's offset
    // set past the first.
    for (nonce, action) in [(10, Action::Stop), (11, Action::Start)] {
        let c = signed_command(nonce, action, now(), "dashboard", &[]);
        publish_mev(&k, c, rdkafka::message::OwnedHeaders::new());
    }
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "ctrl-proto-mev")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut at = TopicPartitionList::new();
    at.add_partition_offset(TOPIC, 0, Offset::Offset(2))
        .unwrap();
    c.commit(&at, CommitMode::Sync).unwrap();
    drop(c);
    assert_eq!(
        committed(&kafka.brokers(), "ctrl-proto-mev"),
        Offset::Offset(2)
    );

    let s = serve();
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["applied"] != 3 {
        assert!(
            Instant::now() < deadline,
            "{}: {:?}",
            modules(&s),
            row_summary(&common::stored(&ch))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(modules(&s)["mev"]["state"], "running");
    let rows = ledger_rows(&ch, 4);
    let agent: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.stage == "agent")
        .map(|r| (r.decision.as_str(), r.request_id.as_str()))
        .collect();
    assert_eq!(
        agent,
        [
            ("applied", "req-1"),
            ("applied", "req-10"),
            ("applied", "req-11")
        ]
    );
    assert!(
        s.get_ops("/metrics")
            .contains("gw_sidecar_agent_total{module=\"mev\",outcome=\"rewound\"} 1"),
        "{}",
        s.get_ops("/metrics")
    );
}

/// While the broker is away, accepted commands wait in memory for it: at most
/// `kafka.max_outbox_commands`. Beyond that a command is refused 503
/// `unavailable`, with its row, its nonce free: sent again once the broker took
/// the others, it is accepted and applied, once.
#[test]
fn commands_beyond_the_outbox_bound_are_refused_while_the_broker_is_away() {
    let d = testkit::TempDir::new("kafka-outbox-bound");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.apply_wait_ms = 1000;
    cfg.file.kafka.as_mut().unwrap().max_outbox_commands = 2;
    let s = common::serve(cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    post(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    while modules(&s)["mev"]["state"] != "running" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(100));
    }
    kafka.process.signal("STOP");
    for nonce in [2, 3] {
        let (status, body) = post(
            &s,
            signed_command(nonce, Action::Stop, now(), "dashboard", &[]),
        );
        assert_eq!(
            (status, body["pending"].clone()),
            (200, Value::Bool(true)),
            "{body}"
        );
    }
    let third = signed_command(4, Action::Kill, now(), "dashboard", &[]);
    let (status, body) = post(&s, third.clone());
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("has not taken the 2 commands"),
        "{body}"
    );
    // `/readyz` says no command is taken now, and why.
    let bus = |v: &Value| {
        v["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "bus"))
            .cloned()
            .unwrap_or_default()
    };
    let (status, v) = s.get_ops_json("/readyz");
    assert_eq!(
        (status, &bus(&v)["ok"], &bus(&v)["refusing"]),
        (503, &Value::Bool(false), &Value::Bool(true)),
        "{v}"
    );
    assert!(
        bus(&v)["detail"]
            .as_str()
            .is_some_and(|d| d.contains("has not taken the 2 commands")),
        "{v}"
    );
    kafka.process.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = post(&s, third.clone());
        if status == 200 {
            break;
        }
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(modules(&s)["mev"]["applied"], 4);
    // Ready again once the broker took them.
    let (status, v) = s.get_ops_json("/readyz");
    assert_eq!((status, &bus(&v)["ok"]), (200, &Value::Bool(true)), "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        let applied = |r: &&LedgerRow| r.request_id == "req-4" && r.decision == "applied";
        if rows.iter().any(|r| applied(&r)) {
            break rows;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    };
    let of_kill: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| r.request_id == "req-4")
        .map(|r| (r.stage.as_str(), r.decision.as_str(), r.code.as_str()))
        .collect();
    assert_eq!(
        of_kill.first(),
        Some(&("sidecar", "rejected", "unavailable")),
        "{of_kill:?}"
    );
    assert_eq!(
        of_kill.iter().filter(|r| r.1 == "applied").count(),
        1,
        "{of_kill:?}"
    );
}

/// Publishes `mev` command `payload` with `headers` to the command topic.
fn publish_mev(
    k: &gw_sidecar::control::bus::KafkaConfig,
    payload: Vec<u8>,
    headers: rdkafka::message::OwnedHeaders,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(produce(k, TOPIC, "mev", Some(&payload), headers));
}

/// The bus over mutual TLS: the broker's listener requires a client certificate
/// (tansu behind a rustls front that checks it against the CA). Commands cross
/// to their agent and the module state lives in the state topics, all over TLS,
/// across a restart; a client without a certificate, and one speaking plain text,
/// are refused at the handshake.
#[test]
fn the_bus_runs_over_mutual_tls_and_a_client_without_a_certificate_is_refused() {
    use gw_sidecar::control::bus::KafkaConfig;
    use gw_sidecar::tls::ClientTls;
    use std::sync::atomic::Ordering;

    let d = testkit::TempDir::new("kafka-tls");
    let certs_dir = d.path().join("broker-certs");
    std::fs::create_dir_all(&certs_dir).unwrap();
    let certs = testkit::envoy::dev_certs(&certs_dir);
    let kafka = testkit::kafka::TlsKafka::start(d.path(), &certs.ca, &certs.cert, &certs.key);
    let mut k = KafkaConfig::with_brokers(&kafka.brokers());
    k.message_timeout_ms = 3000;
    k.tls = Some(ClientTls {
        ca: certs.ca.clone(),
        cert: Some(certs.edge_cert.clone()),
        key: Some(certs.edge_key.clone()),
    });
    let serve = || {
        let mut cfg = common::config(&d.path().join("state"), false);
        cfg.file.kafka = Some(k.clone());
        cfg.file.apply_wait_ms = 20_000;
        common::serve(cfg)
    };
    let s = serve();
    let (status, body) = post(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    assert_eq!(
        (status, body["applied"].clone()),
        (200, Value::Bool(true)),
        "{body}"
    );
    drop(s);
    let s = serve();
    post_applied(&s, signed_command(2, Action::Kill, now(), "dashboard", &[]));
    let m = modules(&s);
    assert_eq!(
        (m["mev"]["applied"].clone(), m["mev"]["state"].clone()),
        (2.into(), "killed".into()),
        "{m}"
    );
    assert!(kafka.front.accepted.load(Ordering::SeqCst) > 0);
    drop(s);

    // Refused at the handshake, each: a client without a certificate, one in
    // plain text, and one dialling an address the broker's certificate does not
    // name (127.0.0.2: its name is checked, not only its CA).
    let mut bare = k.clone();
    bare.tls = Some(ClientTls {
        ca: certs.ca.clone(),
        cert: None,
        key: None,
    });
    let plain = KafkaConfig::with_brokers(&kafka.brokers());
    let mut misnamed = k.clone();
    misnamed.brokers = format!("127.0.0.2:{}", kafka.front.port);
    for (what, cfg) in [
        ("no certificate", bare),
        ("plain text", plain),
        ("another name", misnamed),
    ] {
        let before = kafka.front.refused.load(Ordering::SeqCst);
        let c: BaseConsumer = cfg.client().create().unwrap();
        assert!(
            c.fetch_metadata(None, Duration::from_secs(5)).is_err(),
            "{what}"
        );
        assert!(
            kafka.front.refused.load(Ordering::SeqCst) > before,
            "{what}: not refused at the front"
        );
    }
}

/// A large record on the command topic that no node forwarded (anyone who can
/// produce to it can write one; Kafka takes up to about 1 MB) is refused with
/// its row, and the module's commands go on: its bytes are not copied whole into
/// the module's checkpoint, which a record of that size made too large to
/// produce — the agent tried again for ever and every later command stayed
/// `pending`. And a record keyed with no module's name is refused once, with its
/// row, where every agent left it unaudited.
#[test]
fn a_large_record_no_node_forwarded_does_not_stop_the_agent() {
    let d = testkit::TempDir::new("kafka-large-record");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let cfg = config(d.path(), &kafka, &ch);
    let k = cfg.file.kafka.clone().unwrap();
    let s = common::serve(cfg);
    let (status, body) = post(
        &s,
        signed_command(1, Action::Start, now(), "dashboard", &[]),
    );
    assert_eq!(
        (status, &body["applied"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    publish_mev(
        &k,
        vec![0x0a; 700_000],
        rdkafka::message::OwnedHeaders::new(),
    );
    let (status, body) = post(&s, signed_command(2, Action::Kill, now(), "dashboard", &[]));
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "killed" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(100));
    }
    // A record keyed with no module's name (here `MEV`): refused once, with its
    // row (no agent took it: it had none).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(produce(
        &k,
        TOPIC,
        "MEV",
        Some(&signed_command(3, Action::Kill, now(), "dashboard", &[])),
        rdkafka::message::OwnedHeaders::new(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = common::stored(&ch);
        let refused = |r: &&LedgerRow| r.stage == "agent" && r.code == "forbidden_peer";
        let named = rows
            .iter()
            .filter(refused)
            .filter(|r| r.request_id == "req-3")
            .count();
        if rows.iter().filter(refused).count() == 2 && named == 1 {
            // Once: the other module's agent leaves it.
            std::thread::sleep(Duration::from_secs(1));
            let again = common::stored(&ch);
            assert_eq!(
                again.iter().filter(refused).count(),
                2,
                "{:?}",
                row_summary(&again)
            );
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", row_summary(&rows));
        std::thread::sleep(Duration::from_millis(200));
    }
    // A large record as the module's newest decision, another module's command
    // after it, a restart: the agent still knows its topic (the record's digest
    // is kept where its bytes are not; compared with no bytes, it took the topic
    // for one deleted and created again, and handled it from offset 0).
    publish_mev(
        &k,
        vec![0x0a; 700_000],
        rdkafka::message::OwnedHeaders::new(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::stored(&ch)
        .iter()
        .filter(|r| r.stage == "agent" && r.code == "forbidden_peer")
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "the second large record decided");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = post(&s, arbitrage_command(4, Action::Start));
    assert_eq!(
        (status, &body["applied"]),
        (200, &Value::Bool(true)),
        "{body}"
    );
    drop(s);
    let s = common::serve(config(d.path(), &kafka, &ch));
    let (status, body) = post(
        &s,
        signed_command(5, Action::Start, now(), "dashboard", &[]),
    );
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while modules(&s)["mev"]["state"] != "running" {
        assert!(Instant::now() < deadline, "never applied: {}", modules(&s));
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = s.get_ops("/metrics");
    assert!(!metrics.contains("outcome=\"topic_replaced\""), "{metrics}");
}

/// An agent's consumer left unpolled past `kafka.max_poll_interval_ms` (an agent
/// retrying one delivery while the broker was away) is taken out of the group by
/// librdkafka, and the other node's consumer gets the partition. Its assignment
/// may still list the partition until its next poll: whenever the other node
/// reads the delivery, the stuck one must not write — `owns` false (the
/// assignment lost) or `poll_overdue` (the agent polls first, after half the
/// interval), else it writes a checkpoint for a command the other applies too.
#[test]
fn a_consumer_unpolled_past_its_interval_owns_nothing_and_the_other_takes_over() {
    use gw_sidecar::control::bus::{Bus, BusConsumer, Delivery, KafkaConfig};
    use gw_sidecar::ops::metrics::GroupMetrics;
    let d = testkit::TempDir::new("kafka-max-poll");
    let kafka = Kafka::start(d.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut k = KafkaConfig::with_brokers(&kafka.brokers());
        k.topic = "max-poll-commands".into();
        k.partitions = 1;
        k.max_poll_interval_ms = 6000;
        create_topic(&k, &k.topic).await;
        let bus = |node: &str, seed: u8| {
            let signer = gw_sidecar::control::state_sign::StateSigner::new(
                node,
                ed25519_dalek::SigningKey::from_bytes(&[seed; 32]),
                &BTreeMap::new(),
                None,
            )
            .unwrap();
            Bus::kafka(k.clone(), signer, 1, &[]).unwrap()
        };
        let (bus_a, bus_b) = (bus("node-a", 1), bus("node-b", 2));
        let groups = [GroupMetrics::default(), GroupMetrics::default()];
        let mut consumers = [
            bus_a.consumer(Module::Mev, groups[0].clone()).unwrap(),
            bus_b.consumer(Module::Mev, groups[1].clone()).unwrap(),
        ];
        async fn poll(c: &mut BusConsumer) -> Option<Delivery> {
            tokio::time::timeout(Duration::from_millis(300), c.next())
                .await
                .ok()
                .map(|r| r.unwrap())
        }
        // Both members joined, one holds the partition.
        let deadline = Instant::now() + Duration::from_secs(40);
        let owner = loop {
            for c in consumers.iter_mut() {
                assert!(poll(c).await.is_none(), "nothing published yet");
            }
            let joined = groups.iter().all(|g| g.rebalances.get() > 0);
            match groups.each_ref().map(|g| g.held.get()) {
                [1, 0] if joined => break 0,
                [0, 1] if joined => break 1,
                now => assert!(
                    Instant::now() < deadline,
                    "the group never settled: {now:?}"
                ),
            }
        };
        let other = 1 - owner;
        let headers = rdkafka::message::OwnedHeaders::new();
        let offset = produce(&k, &k.topic, "mev", Some(b"a command"), headers).await;
        let got: Delivery = loop {
            if let Some(d) = poll(&mut consumers[owner]).await {
                break d;
            }
            assert!(Instant::now() < deadline, "the owner got nothing");
        };
        assert_eq!(got.position.offset, offset);
        assert!(consumers[owner].owns(&got));

        // The owner retries without polling; the other node polls on.
        let [a, b] = &mut consumers;
        let (stuck, live) = if owner == 0 { (a, b) } else { (b, a) };
        // Whenever the other node holds the delivery, the stuck one would not
        // write: librdkafka found its assignment lost (`owns` false), or it went
        // unpolled half the interval (`poll_overdue`: the agent polls first).
        // Which of the two depends on how the group moved the partition: a
        // rebalance already waiting on the stuck member's poll revokes without
        // marking the assignment lost.
        let since = Instant::now();
        let would_write = |c: &BusConsumer| c.owns(&got) && !c.poll_overdue();
        let taken = loop {
            assert!(
                since.elapsed() < Duration::from_secs(40),
                "unpolled {:?}: the other node never read the delivery",
                since.elapsed()
            );
            let before = would_write(stuck);
            if let Some(d) = poll(live).await {
                assert!(
                    !before && !would_write(stuck),
                    "unpolled {:?}: the other node read it while this one would still write",
                    since.elapsed()
                );
                break d.position.offset;
            }
        };
        eprintln!(
            "the other node read it {:?} after the owner stopped polling (max.poll.interval 6 s)",
            since.elapsed()
        );
        assert!(
            since.elapsed() >= Duration::from_secs(3),
            "{:?}",
            since.elapsed()
        );
        assert!(stuck.poll_overdue(), "half the interval passed unpolled");
        assert!(!live.poll_overdue());
        assert_eq!(
            taken, offset,
            "the other node reads the uncommitted delivery"
        );
        assert_eq!(groups[other].held.get(), 1);
    });
}

/// Over Kafka an agent remembers applied nonces for `agent_dedup_secs` past their
/// freshness, far longer than the admission guard: once its memory for an issuer
/// is full, a command the guard let through (it forgot the older ones) is
/// refused `replay_capacity` with its row, not applied with its nonce left
/// unremembered — a copy of it admitted at another node would then have been
/// applied too. The module's state is left as it was. A stop or kill is applied
/// (applied twice, it changes nothing more).
#[test]
fn an_agent_whose_memory_is_full_refuses_rather_than_forget() {
    let d = testkit::TempDir::new("kafka-agent-full");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let mut cfg = config(d.path(), &kafka, &ch);
    cfg.file.replay_max_per_issuer = 64;
    cfg.file.max_skew_secs = 1;
    let s = common::serve(cfg);
    for n in 1..=64u64 {
        let pct = (n % 100).to_string();
        post_applied(
            &s,
            signed_command(
                n,
                Action::Throttle,
                now(),
                "dashboard",
                &[("throttle_pct", &pct)],
            ),
        );
    }
    assert_eq!(modules(&s)["mev"]["applied"], 64);
    // The admission guard forgets within seconds (ts + max_skew_secs); the agent
    // remembers 600 s more.
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused.is_none() {
        assert!(Instant::now() < deadline, "the guard never let one through");
        let (status, body) = post(
            &s,
            signed_command(
                65,
                Action::Throttle,
                now(),
                "dashboard",
                &[("throttle_pct", "99")],
            ),
        );
        if status == 429 && body["error"] == "replay_capacity" {
            // Still the admission guard's own bound: it forgets soon.
            std::thread::sleep(Duration::from_millis(500));
        } else {
            refused = Some((status, body));
        }
    }
    // Accepted, and the agent's refusal answered with it.
    let (status, body) = refused.unwrap();
    assert_eq!(
        (
            status,
            body["applied"].clone(),
            body["apply_error"]["error"].clone()
        ),
        (200, false.into(), "replay_capacity".into()),
        "{body}"
    );
    let m = modules(&s);
    assert_eq!(
        (
            m["mev"]["applied"].clone(),
            m["mev"]["throttle_pct"].clone()
        ),
        (64.into(), 64.into()),
        "{m}"
    );
    let rows = ledger_rows(&ch, 130);
    assert!(
        rows.iter().any(|r| r.stage == "agent"
            && r.decision == "rejected"
            && r.code == "replay_capacity"
            && r.request_id == "req-65"),
        "{:?}",
        row_summary(&rows)
    );
    // A kill is applied all the same: twice, it changes nothing more.
    post_applied(
        &s,
        signed_command(66, Action::Kill, now(), "dashboard", &[]),
    );
    assert_eq!(modules(&s)["mev"]["state"], "killed");
}

/// Over Kafka the checkpoint is where a decision takes effect: other nodes'
/// tables follow it at once. A node whose journal stalls after its agent wrote
/// one (its disk failing) is taken out of the group once its consumer went
/// unpolled past `kafka.max_poll_interval_ms`; the other node takes the
/// partition and applies a kill. When the stalled node's disk heals and its
/// agent finishes the earlier stop, its table keeps the kill: it used to set
/// the state it had computed before the stall over it, and its sender traded
/// on for a killed module until a rebalance gave it the partition again.
#[test]
fn a_node_whose_journal_stalled_keeps_the_kill_another_node_applied_meanwhile() {
    use gw_sidecar::control::state_sign::node_key;
    let d = testkit::TempDir::new("kafka-stalled-journal");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let nodes = ["node-a", "node-b"];
    // Each node's journal on a disk that can fail (whichever ends up holding
    // the partition is failed).
    let disks = nodes.map(|n| {
        testkit::faultfs::FaultFs::mount(&d.path().join(n).join("state/journal"))
            .expect("this test mounts a FUSE filesystem (needs root and /dev/fuse)")
    });
    let mut cfgs = nodes.map(|n| {
        let mut cfg = config(&d.path().join(n), &kafka, &ch);
        cfg.file.node_id = n.into();
        cfg.file.kafka.as_mut().unwrap().max_poll_interval_ms = 6000;
        // (apply_wait_ms stays 20 s: two members' first joins take a while, and
        // the warm-up commands below must be answered applied.)
        cfg
    });
    let keys: Vec<(String, String)> = cfgs
        .iter()
        .map(|c| {
            let pk = node_key(&c.file.state_dir).unwrap().verifying_key();
            (c.file.node_id.clone(), hex::encode(pk.as_bytes()))
        })
        .collect();
    for cfg in &mut cfgs {
        cfg.file
            .kafka
            .as_mut()
            .unwrap()
            .state_keys
            .extend(keys.clone());
    }
    let [cfg_a, cfg_b] = cfgs;
    let served = [common::serve(cfg_a), common::serve(cfg_b)];
    let holds = |s: &common::Served| {
        s.get_ops("/metrics")
            .contains(r#"gw_sidecar_agent_partitions{module="mev"} 1"#)
    };
    let state = |s: &common::Served| modules(s)["mev"]["state"].clone();
    let until = |what: &str, secs: u64, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // A command through each node settles the group; one node holds mev's partition.
    post_applied(
        &served[0],
        signed_command(1, Action::Throttle, now(), "dashboard", &[]),
    );
    post_applied(
        &served[1],
        signed_command(2, Action::Throttle, now(), "dashboard", &[]),
    );
    until("one node holds mev's partition", 40, &|| {
        holds(&served[0]) != holds(&served[1])
    });
    let owner = usize::from(holds(&served[1]));
    let other = 1 - owner;
    let (stalled, live) = (&served[owner], &served[other]);

    // The owner's disk fails: its agent checkpoints a stop in Kafka, then cannot
    // write the stop's row (it retries every 250 ms, unpolled).
    disks[owner].fail_syncs();
    let _ = post(
        live,
        signed_command(3, Action::Stop, now(), "dashboard", &[]),
    );
    until(
        "the stop took effect at the other node (the checkpoint)",
        20,
        &|| state(live) == "stopped",
    );
    // Out of the group past its poll interval: the other node takes the partition
    // and applies a kill, which the stalled node's table follows.
    until("the other node holds the partition", 40, &|| holds(live));
    post_applied(
        live,
        signed_command(4, Action::Kill, now(), "dashboard", &[]),
    );
    until("the stalled node's table follows the kill", 20, &|| {
        state(stalled) == "killed"
    });
    // Healed: the stalled agent writes its stop's row, and keeps the kill.
    disks[owner].heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = common::stored(&ch);
        let stop_rows = rows
            .iter()
            .filter(|r| r.stage == "agent" && r.request_id == "req-3" && r.decision == "applied")
            .count();
        if stop_rows > 0 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the stop's row was not written once the disk healed: {:?}",
            row_summary(&rows)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        disks[owner].syncs_failed() > 0,
        "the disk never failed a sync"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(stalled), "killed", "{:?}", row_summary(&rows));
    assert_eq!(state(live), "killed");
}

/// The bound `max_body_bytes` is held to on the Kafka bus is one the producer
/// and the broker take: a command of `bus::MAX_COMMAND_BYTES` forwarded with
/// the largest requester a token allows (64 KiB of fields) and the node's
/// signature is written; a record past `bus::MESSAGE_MAX_BYTES` is refused
/// for its size (what the outbox would have retried for ever).
#[test]
fn the_largest_command_fits_a_kafka_record_and_a_larger_record_is_refused() {
    use gw_sidecar::control::bus::{
        forward_headers, ForwardSeq, KafkaConfig, MAX_COMMAND_BYTES, MESSAGE_MAX_BYTES,
    };
    let d = testkit::TempDir::new("kafka-largest");
    let kafka = Kafka::start(d.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut k = KafkaConfig::with_brokers(&kafka.brokers());
        k.topic = "largest-commands".into();
        k.partitions = 1;
        create_topic(&k, &k.topic).await;
        let signer = gw_sidecar::control::state_sign::StateSigner::new(
            "node-a",
            ed25519_dalek::SigningKey::from_bytes(&[3; 32]),
            &BTreeMap::new(),
            None,
        )
        .unwrap();
        let requester = gw_core::contract::Requester {
            sub: "s".repeat(32 << 10),
            roles: "r".repeat(16 << 10),
            token_issuer: "i".repeat(16 << 10),
        };
        let payload = vec![7u8; MAX_COMMAND_BYTES];
        let headers = forward_headers(
            &signer,
            &k.topic,
            0,
            b"mev",
            &payload,
            &requester,
            ForwardSeq { epoch: 1, seq: 1 },
        );
        let offset = produce(&k, &k.topic, "mev", Some(&payload), headers).await;
        assert_eq!(offset, 0);
        let p: rdkafka::producer::FutureProducer = k.producer().create().unwrap();
        let big = vec![7u8; MESSAGE_MAX_BYTES + 1];
        let r = rdkafka::producer::FutureRecord::<str, [u8]>::to(&k.topic)
            .key("mev")
            .partition(0)
            .payload(&big);
        let err = p.send(r, Duration::from_secs(5)).await.unwrap_err().0;
        assert!(
            matches!(
                err.rdkafka_error_code(),
                Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
            ),
            "{err}"
        );
    });
}

/// The state topics are made to be compacted while a node runs: a segment
/// rolls every hour or 64 MiB, and is cleaned once a tenth of it is
/// superseded (Kafka's defaults, 7 days and 1 GiB, kept every checkpoint ever
/// written for each load to read). As the broker reports the topic's
/// configuration.
#[test]
fn state_topics_are_created_to_be_compacted_while_the_node_runs() {
    use gw_sidecar::control::kafka_state::KafkaState;
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let d = testkit::TempDir::new("kafka-state-topic-config");
    let kafka = Kafka::start(d.path());
    let ch = ClickHouse::start(d.path());
    let cfg = config(d.path(), &kafka, &ch);
    let k = cfg.file.kafka.clone().unwrap();
    let store = KafkaState::new(&k, cfg.state_signer().unwrap().unwrap()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        store.prepare().await.unwrap();
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            k.client().create().unwrap();
        let topic = store.topic(Module::Mev);
        let got = admin
            .describe_configs(
                &[ResourceSpecifier::Topic(&topic)],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(5))),
            )
            .await
            .unwrap();
        let resource = got.into_iter().next().unwrap().unwrap();
        let value = |name: &str| {
            resource
                .entries
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("cleanup.policy").as_deref(), Some("compact"));
        assert_eq!(value("segment.ms").as_deref(), Some("3600000"));
        assert_eq!(value("segment.bytes").as_deref(), Some("67108864"));
        assert_eq!(value("min.cleanable.dirty.ratio").as_deref(), Some("0.1"));
    });
}
