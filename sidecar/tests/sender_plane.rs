//! The data plane inside a running sidecar: control commands steer the hot path
//! (kill → no sends, throttle 50 % → half, policy → EV floor and tip rung), Solana
//! clients send real transactions (built by `solders`) through the JSON-RPC endpoint
//! and they arrive byte-identical at a protocol-enforcing TPU receiver, and every
//! send is audited in ClickHouse.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{config, serve, Served};
use ed25519_dalek::SigningKey;
use gw_sidecar::sender::txwire;
use serde_json::{json, Value};
use testkit::clickhouse::ClickHouse;
use testkit::relay::Relay;
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A signed example transaction (distinct per `i`).
fn tx(i: u32) -> Vec<u8> {
    let mut bh = [0u8; 32];
    bh[..4].copy_from_slice(&i.to_le_bytes());
    txwire::example_tx(&SigningKey::from_bytes(&[77u8; 32]), bh, 64)
}

/// A runtime and, on it, the protocol-enforcing TPU receiver (identity `[1; 32]`).
fn receiver() -> (tokio::runtime::Runtime, TpuReceiver) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rx = rt
        .block_on(async {
            TpuReceiver::start(
                ReceiverConfig::default(),
                &SigningKey::from_bytes(&[1u8; 32]),
            )
        })
        .unwrap();
    (rt, rx)
}

fn command(s: &Served, spec: &str, body: Value) {
    let (status, r) = s.post_json(&format!("/api/control/module/{spec}"), &body);
    assert_eq!(status, 200, "{spec}: {r}");
    assert_eq!(r["applied"], true, "{spec}: {r}");
}

fn offer(s: &Served, opps: Vec<Value>) -> Value {
    let (status, r) = s.post_json("/api/opportunities", &json!({ "opportunities": opps }));
    assert_eq!(status, 200, "{r}");
    r
}

fn settle(rx: &TpuReceiver, rt: &tokio::runtime::Runtime, want: u64) -> u64 {
    let n = rt.block_on(rx.wait_for(want, Duration::from_secs(10)));
    // Nothing more may trickle in.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.count(), n, "late arrivals");
    n
}

/// Asserts nothing more arrives: the receiver still holds `n` after a while.
fn nothing_more(rx: &TpuReceiver, n: u64) {
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(rx.count(), n);
}

/// A sidecar shipping its ledger to `ch`, its TPU route sending to `rx` (from
/// identity `[2; 32]`), with `more` of the sender's configuration.
fn sending_to(state: &std::path::Path, ch: &ClickHouse, rx: &TpuReceiver, more: Value) -> Served {
    let mut cfg = config(state, true);
    cfg.file.clickhouse_url = Some(ch.url());
    let mut sender = json!({
        "tpu": {},
        "leaders": {"static": [{
            "tpu_quic": rx.addr.to_string(),
            "identity": bs58::encode(rx.identity).into_string(),
        }]},
    });
    for (k, v) in more.as_object().expect("an object") {
        sender[k] = v.clone();
    }
    cfg.file.sender = Some(serde_json::from_value(sender).unwrap());
    cfg.tpu_identity = Some(SigningKey::from_bytes(&[2u8; 32]));
    serve(cfg)
}

fn rpc(s: &Served, body: Value) -> Value {
    let (status, r) = s.post_json("/api/rpc", &body);
    assert_eq!(status, 200, "JSON-RPC answers HTTP 200: {r}");
    r
}

#[test]
fn control_commands_steer_the_hot_path_and_solana_clients_send_through_rpc() {
    let d = testkit::TempDir::new("sender-plane");
    let ch = ClickHouse::start(d.path());
    let relay = Relay::start(None);
    let (rrt, rx) = receiver();
    let mut cfg = config(&d.path().join("state"), true);
    cfg.file.clickhouse_url = Some(format!("http://127.0.0.1:{}", ch.http_port));
    cfg.file.sender = Some(
        serde_json::from_value(json!({
            "tpu": {},
            "relay": {"url": relay.url},
            "leaders": {"static": [{
                "tpu_quic": rx.addr.to_string(),
                "identity": bs58::encode(rx.identity).into_string(),
            }]},
            "hedge_delay_ms": 200,
            "adaptive": false,
            "strategy": {"ring_capacity": 16, "batch": 8},
        }))
        .unwrap(),
    );
    let identity = SigningKey::from_bytes(&[2u8; 32]);
    cfg.tpu_identity = Some(identity.clone());
    let s = serve(cfg);

    // Stopped (the initial state): nothing goes.
    let opp = |i: u32, ev: f64| json!({"module": "mev", "ev": ev, "txs": [b64(&tx(i))]});
    let r = offer(&s, (0..8).map(|i| opp(i, 1.0)).collect());
    assert_eq!(r["accepted"], 8);
    nothing_more(&rx, 0); // a stopped module sends nothing

    // Running: every opportunity goes, byte-identical, from our identity.
    command(&s, "mev:start", json!({}));
    let mut sent = Vec::new();
    for batch in 0..5 {
        let opps: Vec<Value> = (0..8).map(|i| opp(100 + batch * 8 + i, 1.0)).collect();
        assert_eq!(offer(&s, opps)["accepted"], 8);
        sent.extend((0..8).map(|i| tx(100 + batch * 8 + i)));
    }
    assert_eq!(settle(&rx, &rrt, 40), 40);
    let mut got: Vec<Vec<u8>> = rx.received().iter().map(|r| r.bytes.clone()).collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    assert!(rx
        .received()
        .iter()
        .all(|r| r.peer == identity.verifying_key().to_bytes()));

    // throttle_pct = 50: exactly half of a counted window goes.
    command(&s, "mev:throttle", json!({"throttle_pct": 50}));
    for batch in 0..5 {
        let opps: Vec<Value> = (0..8).map(|i| opp(200 + batch * 8 + i, 1.0)).collect();
        assert_eq!(offer(&s, opps)["accepted"], 8);
    }
    assert_eq!(settle(&rx, &rrt, 60), 60, "40 offered at 50 % → 20 sent");

    // policy: EV floor and tip ladder; the highest tip the score covers picks the variant.
    command(&s, "mev:throttle", json!({"throttle_pct": 100}));
    command(
        &s,
        "mev:policy",
        json!({"ev_min": 1.0, "tip_ladder": [0.5, 1.5, 3.0]}),
    );
    let variants = [tx(300), tx(301), tx(302)];
    let rungs = json!({"module": "mev", "ev": 2.0, "txs": variants.iter().map(|t| b64(t)).collect::<Vec<_>>()});
    let below = json!({"module": "mev", "ev": 0.9, "txs": [b64(&tx(303))]});
    offer(&s, vec![rungs, below]);
    assert_eq!(settle(&rx, &rrt, 61), 61);
    let last = rx.received().last().unwrap().bytes.clone();
    assert_eq!(last, variants[1], "EV 2.0 affords the 1.5 tip, not 3.0");
    // Fewer variants than rungs: EV 5.0 affords the 3.0 tip, but the searcher signed
    // one variant: it goes, audited with the tip it carries (its rung's, 0.5).
    let single = tx(304);
    offer(
        &s,
        vec![json!({"module": "mev", "ev": 5.0, "txs": [b64(&single)]})],
    );
    assert_eq!(settle(&rx, &rrt, 62), 62);
    assert_eq!(rx.received().last().unwrap().bytes, single);
    // A ladder out of order (refused in commands now; a state kept from before
    // may hold one): with fewer variants than rungs, the signed variant that goes
    // is one whose tip the score covers — not variant 1's 5.0 for a score of 4.
    let table = s.running.control().modules();
    let mut legacy = table.get(gw_core::Module::Mev);
    let kept = legacy.clone();
    legacy.tip_ladder = vec![1.0, 5.0, 3.0];
    table.set(gw_core::Module::Mev, legacy);
    let (cheap, dear) = (tx(305), tx(306));
    offer(
        &s,
        vec![json!({"module": "mev", "ev": 4.0, "txs": [b64(&cheap), b64(&dear)]})],
    );
    assert_eq!(settle(&rx, &rrt, 63), 63);
    assert_eq!(rx.received().last().unwrap().bytes, cheap);
    table.set(gw_core::Module::Mev, kept);

    // kill: zero sends.
    command(&s, "mev:kill", json!({}));
    let r = offer(&s, (0..8).map(|i| opp(400 + i, 5.0)).collect());
    assert_eq!(r["accepted"], 8);
    nothing_more(&rx, 63); // a killed module sends nothing
    let st = s.get_json("/api/sender");
    assert_eq!(st["strategy"]["skipped"]["killed"], 8, "{st}");
    assert_eq!(st["strategy"]["skipped"]["throttled"], 20, "{st}");
    assert_eq!(st["strategy"]["skipped"]["below_ev_min"], 1, "{st}");
    assert_eq!(st["strategy"]["skipped"]["stopped"], 8, "{st}");

    // The ring is bounded: a burst larger than it is cut, and the rest counted.
    let r = offer(&s, (0..64).map(|i| opp(500 + i, 5.0)).collect());
    assert_eq!(
        r["accepted"].as_u64().unwrap() + r["dropped"].as_u64().unwrap(),
        64
    );
    assert!(r["dropped"].as_u64().unwrap() >= 48, "{r}");
    let burst = r["accepted"].as_u64().unwrap();
    // A transaction that does not verify is refused before the ring.
    let mut bad = tx(600);
    let n = bad.len();
    bad[n - 1] ^= 1;
    let (status, r) = s.post_json(
        "/api/opportunities",
        &json!({"opportunities": [{"module": "mev", "ev": 1.0, "txs": [b64(&bad)]}]}),
    );
    assert_eq!(status, 400, "{r}");
    assert!(r["detail"].as_str().unwrap().contains("signature"), "{r}");
    // The same behind 64 good ones (a body decoded off the runtime's workers):
    // nothing of it reaches the ring.
    let mut opps: Vec<Value> = (0..64).map(|i| opp(700 + i, 5.0)).collect();
    opps.push(json!({"module": "mev", "ev": 1.0, "txs": [b64(&bad)]}));
    let body = json!({ "opportunities": opps });
    assert!(body.to_string().len() > 16 << 10);
    let offered = s.get_json("/api/sender")["strategy"]["offered"].clone();
    let (status, r) = s.post_json("/api/opportunities", &body);
    assert_eq!(status, 400, "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("opportunity 64 tx 0"),
        "{r}"
    );
    assert_eq!(s.get_json("/api/sender")["strategy"]["offered"], offered);
    // A body past a route's bound is answered in the gateway's error shape (axum's
    // own answer was plain text).
    for (path, limit) in [("/api/rpc", 1usize << 20), ("/api/opportunities", 8 << 20)] {
        let (status, r) = s.rt.block_on(async {
            let resp = common::as_role(s.http.post(format!("{}{path}", s.base)), "operator")
                .header("content-type", "application/json")
                .body(vec![b' '; limit + 1])
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        });
        assert_eq!(
            (status, r["error"].as_str()),
            (413, Some("too_large")),
            "{path}: {r}"
        );
    }

    // JSON-RPC: real transactions from solders, base58 and base64, legacy and v0.
    let out = testkit::run_python(
        &[
            testkit::workspace_root()
                .join("sidecar/tests/py/solana_txs.py")
                .to_str()
                .unwrap(),
            "2",
        ],
        b"",
    );
    let txs: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(txs.len(), 4);
    // The RPC gate follows its module (arbitrage): stopped → refused, nothing sent.
    let before = rx.count();
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction", "params": [txs[0]["b58"]]}),
    );
    assert_eq!(r["error"]["code"], -32005, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("stopped"),
        "{r}"
    );
    nothing_more(&rx, before);
    command(&s, "arbitrage:start", json!({}));
    let before = rx.count();
    for (i, t) in txs.iter().enumerate() {
        let (enc, field) = if i % 2 == 0 {
            ("base58", "b58")
        } else {
            ("base64", "b64")
        };
        let mut opts =
            json!({"skipPreflight": true, "preflightCommitment": "processed", "maxRetries": 0});
        if enc == "base64" {
            opts["encoding"] = json!("base64");
        }
        let r = rpc(
            &s,
            json!({"jsonrpc": "2.0", "id": i, "method": "sendTransaction", "params": [t[field], opts]}),
        );
        assert_eq!(r["result"], t["signature"], "{} {enc}: {r}", t["kind"]);
        assert_eq!(r["id"], i);
    }
    assert_eq!(settle(&rx, &rrt, before + 4), before + 4);
    let arrived: Vec<String> = rx
        .received()
        .iter()
        .map(|r| hex::encode(&r.bytes))
        .collect();
    for t in &txs {
        assert!(
            arrived.contains(&t["hex"].as_str().unwrap().to_owned()),
            "{} arrived byte-identical",
            t["kind"]
        );
    }
    // Bundles go to the relay.
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 9, "method": "sendBundle",
        "params": [[txs[0]["b64"], txs[2]["b64"]], {"encoding": "base64"}]}),
    );
    assert_eq!(r["result"].as_str().map(str::len), Some(64), "{r}");
    let calls = relay.calls();
    assert_eq!(calls.last().unwrap().method, "sendBundle");
    assert_eq!(
        hex::encode(&calls.last().unwrap().txs[1]),
        txs[2]["hex"].as_str().unwrap()
    );
    // A client that gives up mid-send (here its request times out while the relay
    // takes 800 ms, and the HTTP/2 stream is reset) cancels neither the send nor its
    // audit row: the bundle still reaches the relay, and is audited below.
    relay.set_mode(testkit::relay::Mode::Delay(Duration::from_millis(800)));
    let abandoned = s.rt.block_on(async {
        common::as_role(s.http.post(format!("{}/api/rpc", s.base)), "operator")
            .json(&json!({"jsonrpc": "2.0", "id": 10, "method": "sendBundle",
                "params": [[txs[1]["b64"]], {"encoding": "base64"}]}))
            .timeout(Duration::from_millis(150))
            .send()
            .await
    });
    assert!(abandoned.is_err_and(|e| e.is_timeout()));
    relay.set_mode(testkit::relay::Mode::Accept);
    // Errors a Solana client understands.
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction", "params": ["not base58!"]}),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    let mut tampered = hex::decode(txs[1]["hex"].as_str().unwrap()).unwrap();
    tampered[1] ^= 1; // its signature
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction", "params": [b64(&tampered), {"encoding": "base64"}]}),
    );
    // Solana's TransactionSignatureVerificationFailure.
    assert_eq!(r["error"]["code"], -32003, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Transaction signature verification failure"),
        "{r}"
    );
    // One Agave would not sanitize (its fee payer called as a program): refused
    // in Agave's words, not sent.
    let unsanitary = {
        use ed25519_dalek::Signer;
        let k = SigningKey::from_bytes(&[77u8; 32]);
        let mut msg = vec![1u8, 0, 0, 1];
        msg.extend_from_slice(&k.verifying_key().to_bytes());
        msg.extend_from_slice(&[9u8; 32]);
        msg.extend_from_slice(&[1, 0, 0, 0]); // program 0, no accounts, no data
        let mut w = vec![1u8];
        w.extend_from_slice(&k.sign(&msg).to_bytes());
        w.extend_from_slice(&msg);
        w
    };
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction", "params": [b64(&unsanitary), {"encoding": "base64"}]}),
    );
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().starts_with(
            "invalid transaction: Transaction failed to sanitize accounts offsets correctly"
        ),
        "{r}"
    );
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "getBalance", "params": []}),
    );
    assert_eq!(r["error"]["code"], -32601, "{r}");
    let r = rpc(
        &s,
        json!([{"jsonrpc": "2.0", "id": 1, "method": "getHealth"}, {"jsonrpc": "2.0", "id": 2, "method": "nope"}]),
    );
    assert_eq!(
        (r[0]["result"].as_str(), r[1]["error"]["code"].as_i64()),
        (Some("ok"), Some(-32601))
    );
    let (status, _) = s.post_json("/api/rpc", &json!("x"));
    assert_eq!(status, 200);
    // A full batch (a body decoded off the runtime's workers): each request
    // answered in its place, the one that does not verify refused, the others sent.
    let batch: Vec<Vec<u8>> = (0..63).map(|i| tx(900 + i)).collect();
    let mut calls: Vec<Value> = batch
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"jsonrpc": "2.0", "id": i, "method": "sendTransaction",
            "params": [b64(t), {"encoding": "base64", "skipPreflight": true}]})
        })
        .collect();
    calls.insert(
        7,
        json!({"jsonrpc": "2.0", "id": "bad", "method": "sendTransaction",
            "params": [b64(&tampered), {"encoding": "base64"}]}),
    );
    let body = Value::Array(calls);
    assert!(body.to_string().len() > 16 << 10);
    let before = rx.count();
    let r = rpc(&s, body);
    let answers = r.as_array().expect("a batch's answer is a list");
    assert_eq!(answers.len(), 64, "{r}");
    assert_eq!(answers[7]["id"], "bad");
    assert_eq!(answers[7]["error"]["code"], -32003, "{r}");
    let sent: Vec<&Value> = answers.iter().filter(|a| a["id"] != "bad").collect();
    for (i, (a, t)) in sent.iter().zip(&batch).enumerate() {
        assert_eq!(a["id"], i, "answers keep the batch's order: {r}");
        assert_eq!(
            a["result"].as_str(),
            Some(bs58::encode(&t[1..65]).into_string().as_str()),
            "{a}"
        );
    }
    assert_eq!(settle(&rx, &rrt, before + 63), before + 63);
    // The RPC gate follows its module (arbitrage): killed → refused, nothing sent.
    command(&s, "arbitrage:kill", json!({}));
    let n_before = rx.count();
    let r = rpc(
        &s,
        json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction", "params": [txs[0]["b58"]]}),
    );
    assert_eq!(r["error"]["code"], -32005, "{r}");
    nothing_more(&rx, n_before);

    // Every send is audited.
    let strategy_sends = s.get_json("/api/sender")["strategy"]["sent"]
        .as_u64()
        .unwrap();
    assert_eq!(strategy_sends, 63, "the burst came while killed");
    let total = strategy_sends + 4 + 2 + 63;
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows: Vec<Value> = loop {
        let rows: Vec<Value> = if ch.query("EXISTS TABLE tx_sends").trim() == "1" {
            ch.query("SELECT * FROM tx_sends ORDER BY ts_us FORMAT JSONEachRow")
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        } else {
            Vec::new()
        };
        if rows.len() as u64 >= total || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(rows.len() as u64, total, "one row per send");
    let batched: Vec<String> = batch
        .iter()
        .map(|t| bs58::encode(&t[1..65]).into_string())
        .collect();
    let (batch_rows, rpc_rows): (Vec<&Value>, Vec<&Value>) =
        rows.iter().filter(|r| r["source"] == "rpc").partition(|r| {
            r["signature"]
                .as_str()
                .is_some_and(|s| batched.iter().any(|b| b == s))
        });
    assert_eq!(rpc_rows.len(), 6);
    assert_eq!(batch_rows.len(), 63, "one row per batched send");
    assert!(batch_rows.iter().all(|r| r["outcome"] == "landed"));
    for (r, t) in rpc_rows.iter().zip(&txs) {
        assert_eq!(r["signature"], t["signature"]);
        assert_eq!(
            (
                r["route"].as_str(),
                r["outcome"].as_str(),
                r["hedged"].as_u64()
            ),
            (Some("tpu"), Some("landed"), Some(0))
        );
        assert_eq!(r["leader"], rx.addr.to_string());
    }
    assert_eq!(rpc_rows[4]["kind"], "bundle");
    let late = rpc_rows[5];
    assert_eq!(
        (late["kind"].as_str(), late["outcome"].as_str()),
        (Some("bundle"), Some("landed")),
        "the abandoned bundle: {late}"
    );
    let bundles = relay
        .calls()
        .iter()
        .filter(|c| c.method == "sendBundle")
        .count();
    assert_eq!(bundles, 2, "both bundles reached the relay");
    let tipped = rows
        .iter()
        .find(|r| r["tip"].as_f64() == Some(1.5))
        .expect("the tipped send");
    assert_eq!(tipped["module"], "mev");
    assert_eq!(tipped["score"].as_f64(), Some(2.0));
    // Each row names who asked: the token the edge verified (here, as the test's
    // helpers stamp it), for JSON-RPC and for opportunities over HTTP alike.
    for r in &rows {
        assert_eq!(
            (r["requester"].as_str(), r["token_issuer"].as_str()),
            (Some("operator-1"), Some("tests")),
            "{r}"
        );
    }
    // No model here: the hot path's sends were scored by their own `ev`; JSON-RPC's
    // by nothing.
    for r in &rows {
        let by = if r["source"] == "strategy" { "ev" } else { "" };
        assert_eq!(r["scored_by"], by, "{r}");
    }
    let cheap_sig = txwire::parse(&cheap, false).unwrap().signature_b58();
    let row = rows
        .iter()
        .find(|r| r["signature"] == cheap_sig.as_str())
        .expect("the out-of-order ladder's send");
    assert_eq!(
        (row["tip"].as_f64(), row["score"].as_f64()),
        (Some(1.0), Some(4.0)),
        "{row}"
    );
    let single_sig = txwire::parse(&single, false).unwrap().signature_b58();
    let row = rows
        .iter()
        .find(|r| r["signature"] == single_sig.as_str())
        .expect("the single variant's send");
    assert_eq!(
        (row["tip"].as_f64(), row["score"].as_f64()),
        (Some(0.5), Some(5.0)),
        "{row}"
    );
    let metrics = s.get_ops("/metrics");
    let killed = format!(
        "gw_strategy_opportunities_total{{outcome=\"killed\"}} {}",
        8 + burst
    );
    assert!(metrics.contains(&killed), "{metrics}");
    assert!(
        metrics.contains("gw_sender_tpu_total{event=\"delivered\"}"),
        "{metrics}"
    );
    // Every row shipped: none pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .get_ops("/metrics")
        .contains("gw_sidecar_send_audit_pending_rows 0")
    {
        assert!(Instant::now() < deadline, "{}", s.get_ops("/metrics"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The two JSON-RPC sends refused above (module stopped, then killed); none
    // running now.
    for line in [
        "gw_sender_rpc_refused_total{reason=\"module\"} 2",
        "gw_sender_rpc_refused_total{reason=\"busy\"} 0",
        "gw_sender_rpc_coalesced_total{reason=\"in_flight\"} 0",
        "gw_sender_rpc_in_flight 0",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    drop(rx);
}

/// `sendTransaction` of each of `wires` at once to the sidecar at `port`
/// (skipPreflight, maxRetries 0): their signatures, once each was sent.
fn send_all(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    port: u16,
    wires: &[Vec<u8>],
) -> Vec<String> {
    rt.block_on(async {
        let calls = wires.iter().map(|w| {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction",
                "params": [b64(w), {"encoding": "base64", "skipPreflight": true, "maxRetries": 0}]});
            let req = common::as_role(
                client.post(format!("https://127.0.0.1:{port}/api/rpc")),
                "operator",
            )
            .json(&body);
            async move {
                let r: Value = req.send().await.unwrap().json().await.unwrap();
                r["result"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned()
            }
        });
        futures_util::future::join_all(calls).await
    })
}

/// A sidecar asked to stop (SIGTERM) right after its sends went out audits every
/// one: the sends running end, their rows reach the journal before the process
/// exits, and the next start ships them, each once. (Before, the rows still in the
/// audit queue — its last 20 ms — were lost with the process.) Then, ClickHouse
/// frozen, the rows of more sends wait and `gw_sidecar_send_audit_pending_rows`
/// counts them until it is back. Last, a backlog shipped while the journal's disk
/// refuses the marks that it was (`testkit::faultfs`): a kill and a restart store
/// no row twice.
#[test]
fn a_sidecar_stopped_right_after_its_sends_audits_every_one() {
    let d = testkit::TempDir::new("sender-stop");
    let ch = ClickHouse::start(d.path());
    let (rrt, rx) = receiver();
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // The journal on a disk that can fail (`testkit::faultfs`), for the end.
    let disk = testkit::faultfs::FaultFs::mount(&state.join("journal"))
        .expect("the test mounts a FUSE filesystem (needs root and /dev/fuse)");
    let certs = common::certs(&state);
    let (port, ops) = (testkit::free_port(), testkit::free_port());
    let cfg = json!({
        "listen": format!("127.0.0.1:{port}"),
        "tls": {"cert": certs.sidecar_cert, "key": certs.sidecar_key,
                "client_ca": certs.ca, "edge_identities": ["envoy.local"]},
        "ops_listen": format!("127.0.0.1:{ops}"),
        "node_id": "stop-1",
        "command_keys": {"keys": [{"id": "op-admin-1",
            "public_key_hex": hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes()),
            "issuers": ["dashboard"]}]},
        "state_dir": state,
        "clickhouse_url": ch.url(),
        "sender": {
            "tpu": {},
            "leaders": {"static": [{
                "tpu_quic": rx.addr.to_string(),
                "identity": bs58::encode(rx.identity).into_string(),
            }]},
            "route_policy": "tpu_first",
            "rpc_allow_stopped": true,
        },
    });
    let config = d.path().join("sidecar.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let start = |n: u32| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gw-sidecar"));
        cmd.arg("--config")
            .arg(&config)
            .env_remove("GW_KAFKA_BROKERS")
            .env_remove("GW_CLICKHOUSE_URL")
            .env("GW_EDGE_KEY_HEX", testkit::fixtures::EDGE_KEY_HEX);
        let p = testkit::ProcessGuard::spawn(
            "gw-sidecar",
            &mut cmd,
            &d.path().join(format!("sidecar-{n}.log")),
        );
        let url = format!("http://127.0.0.1:{ops}/healthz");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !rrt.block_on(async {
            reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
        }) {
            assert!(Instant::now() < deadline, "sidecar not up:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    };
    let mut sidecar = start(0);
    // Sends at once through JSON-RPC, each answered once the TPU took it.
    let client = certs.edge_client();
    let wires: Vec<Vec<u8>> = (0..60).map(|i| tx(900 + i)).collect();
    let mut sigs = send_all(&rrt, &client, port, &wires);
    drop(client);
    // Asked to stop at once: the last rows are still in the audit queue.
    sidecar.signal("TERM");
    let status = sidecar.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}:\n{}",
        sidecar.log()
    );
    // The next start ships whatever the last one had not.
    let mut sidecar = start(1);
    let count = || {
        if ch.query("EXISTS TABLE tx_sends").trim() != "1" {
            return 0;
        }
        ch.query("SELECT count() FROM tx_sends")
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() < sigs.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    // ClickHouse frozen: the rows of 10 more sends wait, and the gauge says so.
    ch.process.signal("STOP");
    let client = certs.edge_client();
    let more: Vec<Vec<u8>> = (0..10).map(|i| tx(990 + i)).collect();
    sigs.extend(send_all(&rrt, &client, port, &more));
    let metrics = || rrt.block_on(common::get_text(&format!("http://127.0.0.1:{ops}/metrics")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().contains("gw_sidecar_send_audit_pending_rows 10") {
        assert!(Instant::now() < deadline, "{}", metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    ch.process.signal("CONT");
    // Once nothing waits: every send of `sigs` stored, once.
    let each_stored_once = |sigs: &[String], when: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(count() >= sigs.len() && metrics().contains("gw_sidecar_send_audit_pending_rows 0"))
        {
            assert!(
                Instant::now() < deadline,
                "{} rows:\n{}",
                count(),
                metrics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(500));
        let stored: Vec<String> = ch
            .query("SELECT signature FROM tx_sends ORDER BY signature")
            .lines()
            .map(str::to_owned)
            .collect();
        let mut want = sigs.to_vec();
        want.sort();
        assert!(
            stored == want,
            "{when}, every send audited once: {} rows for {} sends",
            stored.len(),
            want.len()
        );
    };
    each_stored_once(&sigs, "after ClickHouse was frozen");

    // The journal's disk fails while a backlog ships: ClickHouse takes the
    // records, the journal refuses the marks that they were shipped. Shipping
    // stops 100 records past the marks, so that the next start, which inserts
    // again whatever it finds unmarked, stays within the inserts ClickHouse
    // remembers by name (lowered here to 150): shipped all, 200 records unmarked
    // came back and the oldest 50 were stored twice.
    ch.query("ALTER TABLE tx_sends MODIFY SETTING non_replicated_deduplication_window = 150");
    ch.process.signal("STOP");
    let before = sigs.len();
    for i in 0..200 {
        // One at a time, each its own journal record (gathered for 20 ms).
        sigs.extend(send_all(&rrt, &client, port, &[tx(2000 + i)]));
        std::thread::sleep(Duration::from_millis(40));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().contains("gw_sidecar_send_audit_pending_rows 200") {
        assert!(Instant::now() < deadline, "{}", metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    disk.fail_syncs();
    ch.process.signal("CONT");
    // Until shipping stops (no new row for 3 s): 100 records, a row each (a
    // few may hold two, gathered together).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (count(), Instant::now());
    while since.elapsed() < Duration::from_secs(3) {
        assert!(Instant::now() < deadline, "{} rows", count());
        std::thread::sleep(Duration::from_millis(100));
        let now = count();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let shipped = last - before;
    assert!(
        (100..=110).contains(&shipped),
        "shipping stops 100 records past the marks: {shipped} rows shipped of 200"
    );
    // Killed, the disk healed (what the process wrote is kept; the refused marks
    // were cut off): the next start ships the rest, and each send is stored once.
    sidecar.signal("KILL");
    sidecar.wait_exit(Duration::from_secs(10));
    disk.heal();
    let _sidecar = start(2);
    each_stored_once(&sigs, "after a backlog shipped on a failing disk");
}

/// Each send's audit row names who asked for it: the token the edge verified for
/// an opportunity over HTTP, the client's identity for one over the QUIC ingest.
#[test]
fn each_sends_row_names_who_asked_for_it() {
    use gw_sidecar::sender::ingest;
    let d = testkit::TempDir::new("sender-who");
    let ch = ClickHouse::start(d.path());
    let (rrt, rx) = receiver();
    let searcher = SigningKey::from_bytes(&[30u8; 32]);
    let searcher_b58 = bs58::encode(searcher.verifying_key().to_bytes()).into_string();
    let s = sending_to(
        &d.path().join("state"),
        &ch,
        &rx,
        json!({
            "route_policy": "tpu_first",
            "strategy": {"ingest": {"bind": "127.0.0.1:0", "allow": [searcher_b58]}},
        }),
    );
    command(&s, "mev:start", json!({}));
    let opp = json!({"module": "mev", "ev": 1.0, "txs": [b64(&tx(1))]});
    assert_eq!(offer(&s, vec![opp])["accepted"], 1);
    let addr = s.running.plane().unwrap().hot.ingest_addr.unwrap();
    rrt.block_on(async {
        let conn = ingest::connect(addr, &searcher, None).await.unwrap();
        let o = gw_proto::hotpath::Opportunity {
            module: "mev".into(),
            ev: Some(1.0),
            txs: vec![tx(2)],
            ..Default::default()
        };
        let mut st = conn.open_uni().await.unwrap();
        st.write_all(&ingest::frame(&o)).await.unwrap();
        st.finish().unwrap();
        st.stopped().await.unwrap();
    });
    assert_eq!(settle(&rx, &rrt, 2), 2);
    let sig = |i: u32| bs58::encode(&tx(i)[1..65]).into_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = if ch.query("EXISTS TABLE tx_sends").trim() == "1" {
            ch.query(
                "SELECT signature, requester, token_issuer FROM tx_sends \
                 ORDER BY signature FORMAT TSV",
            )
        } else {
            String::new()
        };
        if rows.lines().count() >= 2 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut want = vec![
        format!("{}\toperator-1\ttests", sig(1)),
        format!("{}\t{searcher_b58}\t", sig(2)),
    ];
    want.sort();
    assert_eq!(rows.lines().collect::<Vec<_>>(), want);
}

/// The transaction parser refuses what Agave's RPC would not send, and takes what
/// it would: 3 000 messages (legacy and v0, many with indexes out of bounds, some
/// with a key listed twice) serialized by solders, each held to the SDK's own
/// `sanitize` (and Agave's duplicate-key rule).
#[test]
fn the_transaction_parser_sanitizes_as_the_solana_sdk_does() {
    use gw_sidecar::sender::txwire::{self, TxError};
    let out = testkit::run_python(
        &[
            testkit::workspace_root()
                .join("sidecar/tests/py/sanitize_cases.py")
                .to_str()
                .unwrap(),
            "7",
            "3000",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    let text = String::from_utf8(out.stdout).unwrap();
    for line in text.lines() {
        let c: Value = serde_json::from_str(line).unwrap();
        let raw = hex::decode(c["hex"].as_str().unwrap()).unwrap();
        let expect = c["expect"].as_str().unwrap();
        let got = txwire::parse(&raw, false);
        let agrees = match expect {
            "ok" => got.is_ok(),
            "dup" => got == Err(TxError::AccountLoadedTwice),
            // Every case decodes (solders wrote it): what the SDK refuses is a
            // sanitize failure, in Agave's words.
            _ => matches!(got, Err(TxError::Sanitize(_))),
        };
        assert!(agrees, "solders says {expect}, txwire {got:?}: {line}");
        *seen
            .entry(match expect {
                "ok" => "ok",
                "dup" => "dup",
                _ => "refused",
            })
            .or_default() += 1;
    }
    assert_eq!(seen.values().sum::<usize>(), 3000);
    assert!(
        seen["ok"] > 200 && seen["dup"] > 20 && seen["refused"] > 1000,
        "{seen:?}"
    );
}

/// Every refusal of the data plane is a ledger row naming who the edge said sent
/// it: JSON-RPC errors (one row per refused request of a batch, keeping the
/// transaction refused or the request as it came), an opportunities body refused,
/// and one token holder's flood takes only its own share of the rows, so
/// another holder's refusal still has its row.
#[test]
fn every_refusal_of_the_data_plane_is_a_ledger_row_naming_who() {
    use gw_sidecar::serve::HOLDER_REFUSAL_ROWS_BURST;
    let d = testkit::TempDir::new("sender-refusals");
    let ch = ClickHouse::start(d.path());
    let (_rrt, rx) = receiver();
    let s = sending_to(
        &d.path().join("state"),
        &ch,
        &rx,
        json!({"rpc_module": "mev"}),
    );
    let post = |sub: &str, path: &str, body: Vec<u8>| -> (u16, Value) {
        s.rt.block_on(async {
            let r = common::stamped(
                s.http.post(format!("{}{path}", s.base)),
                &[
                    ("x-gw-verified", "jwt"),
                    ("x-gw-sub", sub),
                    ("x-gw-roles", "operator"),
                    ("x-gw-token-issuer", "tests"),
                ],
            )
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    };
    let call = |id: u32, method: &str, params: Value| json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    let valid = tx(1);
    let mut tampered = tx(2);
    tampered[1] ^= 1; // its signature
                      // mev is stopped (the initial state): a valid send is refused by its state.
                      // Refused as it is read: the row keeps the request.
    let bad_signature = call(
        3,
        "sendTransaction",
        json!([b64(&tampered), {"encoding": "base64"}]),
    );
    let batch = json!([
        call(
            1,
            "sendTransaction",
            json!([b64(&valid), {"encoding": "base64"}])
        ),
        call(2, "sendTransaction", json!(["not base58!"])),
        bad_signature.clone(),
        call(4, "getAccountInfo", json!([])),
        call(5, "getHealth", json!([])),
        // This sidecar has no relay: nothing to send a bundle with.
        call(
            6,
            "sendBundle",
            json!([[b64(&valid)], {"encoding": "base64"}]),
        ),
    ]);
    let (status, r) = post("alice", "/api/rpc", batch.to_string().into_bytes());
    assert_eq!(status, 200, "{r}");
    let codes: Vec<&Value> = r
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["error"]["code"])
        .collect();
    assert_eq!(
        codes,
        [
            &json!(-32005),
            &json!(-32602),
            &json!(-32003),
            &json!(-32601),
            &Value::Null,
            &json!(-32603),
        ],
        "{r}"
    );
    let (status, _) = post("alice", "/api/rpc", b"{not json".to_vec());
    assert_eq!(status, 200);
    let (status, r) = post(
        "alice",
        "/api/opportunities",
        br#"{"opportunities": [{"module": "nope", "txs": []}]}"#.to_vec(),
    );
    assert_eq!(
        (status, r["error"].as_str()),
        (400, Some("malformed")),
        "{r}"
    );
    nothing_more(&rx, 0);

    // (code, route, method, what the row keeps)
    let want = [
        (
            "module_refused",
            "/api/rpc",
            "sendTransaction",
            hex::encode(&valid),
        ),
        (
            "malformed",
            "/api/rpc",
            "sendTransaction",
            hex::encode(call(2, "sendTransaction", json!(["not base58!"])).to_string()),
        ),
        (
            "bad_signature",
            "/api/rpc",
            "sendTransaction",
            hex::encode(bad_signature.to_string()),
        ),
        (
            "malformed",
            "/api/rpc",
            "",
            hex::encode(call(4, "getAccountInfo", json!([])).to_string()),
        ),
        ("unavailable", "/api/rpc", "sendBundle", hex::encode(&valid)),
        ("malformed", "/api/rpc", "", hex::encode(b"{not json")),
        (
            "malformed",
            "/api/opportunities",
            "",
            hex::encode(br#"{"opportunities": [{"module": "nope", "txs": []}]}"#),
        ),
    ];
    let rows = common::wait_rows(&ch, want.len());
    let got: Vec<(&str, &str, String, &str)> = rows
        .iter()
        .map(|r| {
            let note: Value = serde_json::from_str(&r.args_json).unwrap();
            let method = note["method"].as_str().unwrap_or("").to_owned();
            (
                r.code.as_str(),
                r.route.as_str(),
                method,
                r.raw_hex.as_str(),
            )
        })
        .collect();
    let want: Vec<(&str, &str, String, &str)> = want
        .iter()
        .map(|(c, route, m, raw)| (*c, *route, (*m).to_owned(), raw.as_str()))
        .collect();
    assert_eq!(got, want);
    assert!(rows.iter().all(|r| r.stage == "sidecar"
        && r.decision == "rejected"
        && r.requester == "alice"
        && r.token_issuer == "tests"));
    let refused: Value = serde_json::from_str(&rows[0].args_json).unwrap();
    assert_eq!(
        refused["signature"],
        bs58::encode(&valid[1..65]).into_string()
    );
    assert_eq!(refused["rpc_code"], -32005);
    assert_eq!(refused["raw"], "transaction");

    // One holder's flood, larger than the budget of all holders: its own share
    // of rows, and another holder's refusal still has its row.
    let flood = 5 * HOLDER_REFUSAL_ROWS_BURST as usize;
    assert!(flood as f64 > gw_sidecar::serve::REFUSAL_ROWS_BURST);
    for _ in 0..flood {
        post("mallory", "/api/rpc", b"{flood".to_vec());
    }
    post("bob", "/api/rpc", b"{bob".to_vec());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mallory, bob, summed) = loop {
        let rows = common::stored(&ch);
        let of = |who: &str| rows.iter().filter(|r| r.requester == who).count();
        let summed: u64 = rows
            .iter()
            .filter_map(|r| {
                serde_json::from_str::<Value>(&r.args_json).ok()?["unrecorded"].as_u64()
            })
            .sum();
        if (of("bob") == 1 && of("mallory") as u64 + summed == flood as u64)
            || Instant::now() > deadline
        {
            break (of("mallory"), of("bob"), summed);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(bob, 1, "the other holder's refusal has its row");
    assert!(
        mallory < flood / 2,
        "{mallory} of {flood} rows for one holder's flood (its burst: {HOLDER_REFUSAL_ROWS_BURST})"
    );
    assert_eq!(
        mallory as u64 + summed,
        flood as u64,
        "every refusal is a row or summed"
    );
}

/// A batch's refusals decided while another of its requests still waits for the
/// RPC node are rows even when its client leaves before the answer (its stream
/// reset, the handler dropped). Before, they were written with the batch's
/// answer only: a client could probe `/api/rpc` and leave no row.
#[test]
fn a_batchs_refusals_are_rows_when_its_client_leaves_before_the_answer() {
    let d = testkit::TempDir::new("sender-orphaned");
    let ch = ClickHouse::start(d.path());
    let (_rrt, rx) = receiver();
    let node = testkit::rpc_node::RpcNode::start(1010);
    // The valid transaction's preflight waits this long for the node.
    node.set_delay(Duration::from_secs(3));
    let s = sending_to(
        &d.path().join("state"),
        &ch,
        &rx,
        json!({"rpc_allow_stopped": true, "rpc_node": {"url": node.url, "timeout_ms": 10_000}}),
    );
    let call = |id: u32, tx: &[u8]| {
        json!({"jsonrpc": "2.0", "id": id, "method": "sendTransaction",
               "params": [b64(tx), {"encoding": "base64"}]})
    };
    let mut tampered = tx(2);
    tampered[1] ^= 1; // its signature
    let batch = json!([call(1, &tx(1)), call(2, &tampered)]);
    let left = s.rt.block_on(async {
        common::stamped(
            s.http.post(format!("{}/api/rpc", s.base)),
            &[
                ("x-gw-verified", "jwt"),
                ("x-gw-sub", "alice"),
                ("x-gw-roles", "operator"),
                ("x-gw-token-issuer", "tests"),
            ],
        )
        .header("content-type", "application/json")
        .timeout(Duration::from_millis(500))
        .body(batch.to_string())
        .send()
        .await
    });
    assert!(left.is_err(), "answered before its client left: {left:?}");
    let rows = common::wait_rows(&ch, 1);
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r.code.as_str(), r.requester.as_str(), r.route.as_str()))
        .collect();
    assert_eq!(got, [("bad_signature", "alice", "/api/rpc")]);
    // The transaction whose client left during its preflight was not sent.
    std::thread::sleep(Duration::from_secs(3));
    nothing_more(&rx, 0);
    assert_eq!(common::stored(&ch).len(), 1);
}

/// Opportunities the QUIC ingest could not put in a full ring are a refusal
/// naming the searcher (`overloaded`, with how many were taken and dropped), as
/// over HTTP; before, only a global counter knew.
#[test]
fn opportunities_a_full_ring_drops_are_a_row_naming_the_searcher() {
    use gw_sidecar::sender::ingest;
    let d = testkit::TempDir::new("ingest-ring-full");
    let ch = ClickHouse::start(d.path());
    let (rrt, rx) = receiver();
    let searcher = SigningKey::from_bytes(&[32u8; 32]);
    let searcher_b58 = bs58::encode(searcher.verifying_key().to_bytes()).into_string();
    let s = sending_to(
        &d.path().join("state"),
        &ch,
        &rx,
        json!({"strategy": {"ring_capacity": 1,
                            "ingest": {"bind": "127.0.0.1:0", "allow": [searcher_b58]}}}),
    );
    let addr = s.running.plane().unwrap().hot.ingest_addr.unwrap();
    let frames: Vec<u8> = (0..50)
        .flat_map(|i| {
            ingest::frame(&gw_proto::hotpath::Opportunity {
                module: "mev".into(),
                ev: Some(1.0),
                txs: vec![tx(2000 + i)],
                ..Default::default()
            })
        })
        .collect();
    rrt.block_on(async {
        let conn = ingest::connect(addr, &searcher, None).await.unwrap();
        let mut st = conn.open_uni().await.unwrap();
        st.write_all(&frames).await.unwrap();
        let _ = st.finish();
        let _ = st.stopped().await;
    });
    let rows = common::wait_rows(&ch, 1);
    let dropped: u64 = rows
        .iter()
        .filter(|r| r.code == "overloaded")
        .map(|r| {
            assert_eq!(
                (r.requester.as_str(), r.route.as_str()),
                (searcher_b58.as_str(), "quic:ingest")
            );
            let note: Value = serde_json::from_str(&r.args_json).unwrap();
            note["dropped"].as_u64().unwrap()
        })
        .sum();
    assert!(dropped > 0, "{rows:#?}");
}

/// The QUIC ingest's refusals are ledger rows too: a handshake with an identity
/// not on the allow-list (no identity to name: the remote address instead), an
/// opportunity skipped and a stream stopped for its framing (each naming the
/// searcher's identity and keeping the bytes in question), a connection closed
/// for breaking QUIC's rules.
#[test]
fn the_ingests_refusals_are_ledger_rows_naming_the_client() {
    use gw_sidecar::sender::ingest;
    let d = testkit::TempDir::new("ingest-refusals");
    let ch = ClickHouse::start(d.path());
    let (rrt, rx) = receiver();
    let searcher = SigningKey::from_bytes(&[30u8; 32]);
    let searcher_b58 = bs58::encode(searcher.verifying_key().to_bytes()).into_string();
    let s = sending_to(
        &d.path().join("state"),
        &ch,
        &rx,
        json!({"strategy": {"ingest": {"bind": "127.0.0.1:0", "allow": [searcher_b58]}}}),
    );
    let addr = s.running.plane().unwrap().hot.ingest_addr.unwrap();
    // Its module's name: 20 000 control characters (written out, six bytes
    // each, into a note the row keeps whole).
    let skipped = gw_proto::hotpath::Opportunity {
        module: format!("nope{}", "\u{1}".repeat(20_000)),
        txs: vec![tx(1)],
        ..Default::default()
    };
    let garbage = [0xffu8; 10];
    rrt.block_on(async {
        // TLS 1.3: the client's side of the handshake ends before the server
        // checks its certificate, and the server then closes the connection.
        let stranger = SigningKey::from_bytes(&[31u8; 32]);
        if let Ok(c) = ingest::connect(addr, &stranger, None).await {
            let closed = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
            assert!(closed.is_ok(), "the server kept a stranger's connection");
        }
        let conn = ingest::connect(addr, &searcher, None).await.unwrap();
        let mut st = conn.open_uni().await.unwrap();
        st.write_all(&ingest::frame(&skipped)).await.unwrap();
        st.write_all(&garbage).await.unwrap();
        let _ = st.finish();
        let _ = st.stopped().await;
        // A frame whose length reads and whose bytes do not decode.
        let mut st = conn.open_uni().await.unwrap();
        st.write_all(&[3, 0xff, 0xff, 0xff]).await.unwrap();
        let _ = st.finish();
        let _ = st.stopped().await;
    });
    // A client breaking QUIC's rules (aioquic sends a DATAGRAM frame, which
    // the ingest does not offer to take) is closed, with a row naming it.
    let key_file = d.path().join("searcher.hex");
    std::fs::write(&key_file, hex::encode(searcher.to_bytes())).unwrap();
    let out = std::process::Command::new(testkit::venv_bin("python"))
        .arg(testkit::workspace_root().join("tests/searcher/searcher.py"))
        .args(["--endpoint", &addr.to_string(), "--datagram", "--key"])
        .arg(&key_file)
        .args([
            "--server-identity",
            &hex::encode(
                SigningKey::from_bytes(&[2u8; 32])
                    .verifying_key()
                    .to_bytes(),
            ),
        ])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // PROTOCOL_VIOLATION.
    assert!(said.starts_with("closed: code 0xa "), "{said}");
    let rows = common::wait_rows(&ch, 5);
    let mut got: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| {
            let note: Value = serde_json::from_str(&r.args_json).unwrap();
            let detail = note["detail"].as_str().unwrap_or("").to_owned();
            let kind = detail.split(':').next().unwrap_or("").to_owned();
            (r.code.clone(), r.requester.clone(), kind, r.raw_hex.clone())
        })
        .collect();
    got.sort();
    let mut want = vec![
        (
            "unauthenticated".to_owned(),
            String::new(),
            "handshake failed".to_owned(),
            String::new(),
        ),
        (
            "malformed".to_owned(),
            searcher_b58.clone(),
            "opportunity skipped".to_owned(),
            hex::encode(&prost::Message::encode_to_vec(&skipped)[..4096]),
        ),
        (
            "malformed".to_owned(),
            searcher_b58.clone(),
            "stream stopped".to_owned(),
            hex::encode(garbage),
        ),
        (
            "malformed".to_owned(),
            searcher_b58.clone(),
            "stream stopped".to_owned(),
            "ffffff".to_owned(),
        ),
        (
            "malformed".to_owned(),
            searcher_b58.clone(),
            "connection closed".to_owned(),
            String::new(),
        ),
    ];
    want.sort();
    assert_eq!(got, want, "{rows:#?}");
    assert!(rows
        .iter()
        .all(|r| r.stage == "sidecar" && r.decision == "rejected" && r.route == "quic:ingest"));
    // A note holds at most 512 bytes of detail, whatever the peer sent.
    assert!(rows.iter().all(|r| r.args_json.len() < 1024), "{rows:#?}");
    let handshake = rows.iter().find(|r| r.code == "unauthenticated").unwrap();
    let note: Value = serde_json::from_str(&handshake.args_json).unwrap();
    assert!(
        note["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{note}"
    );
}
