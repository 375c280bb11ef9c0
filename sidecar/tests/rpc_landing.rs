//! JSON-RPC `sendTransaction` with a Solana RPC node's landing semantics, against a
//! local node the test drives (testkit::rpc_node: slot, statuses, blockhash
//! validity, simulation) and the protocol-enforcing TPU receiver: preflight
//! failures answered as Solana answers them (-32002, nothing sent),
//! `minContextSlot` (-32016), `maxRetries` (0, N, absent = until seen or expired),
//! and `getSignatureStatuses` from the node plus what the gateway saw; many
//! transactions in flight polled in batches, not one call each; and upstreams that
//! answer without end or not at all: bounded reads, errors that never show the URL.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use gw_core::module_state::{ModuleState, RunState};
use gw_core::Module;
use gw_sidecar::sender::rpc;
use gw_sidecar::sender::tpu::Leader;
use gw_sidecar::sender::txwire;
use serde_json::{json, Value};
use testkit::rpc_node::RpcNode;
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver};

mod common;

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

/// A signed transaction against blockhash `[bh; 32]`: base64, signature, blockhash (base58).
fn tx(bh: u8, pad: usize) -> (Vec<u8>, String, String, String) {
    let w = txwire::example_tx(&key(50), [bh; 32], pad);
    let sig = txwire::parse(&w, true).unwrap().signature_b58();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&w);
    (w, b64, sig, bs58::encode([bh; 32]).into_string())
}

/// The answer to `body`, and the codes of the refusals it holds (their rows).
async fn answered(ctx: &rpc::RpcContext<'_>, body: &[u8]) -> (Value, Vec<&'static str>) {
    let done = rpc::Request::parse(body).run(ctx).await;
    let codes = done.refusals.iter().map(|r| r.code.as_str()).collect();
    (done.answer, codes)
}

fn send(b64: &str, opts: Value) -> Vec<u8> {
    let mut o = json!({"encoding": "base64"});
    for (k, v) in opts.as_object().unwrap() {
        o[k] = v.clone();
    }
    serde_json::to_vec(
        &json!({"jsonrpc": "2.0", "id": 7, "method": "sendTransaction", "params": [b64, o]}),
    )
    .unwrap()
}

/// The runtime the tests run in.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What `/api/rpc` serves from, sending to `rx` and landing with `node`.
fn rig_to(rx: &TpuReceiver, node: &RpcNode, rebroadcast_ms: u64) -> common::rpc::RpcRig {
    common::rpc::RpcRig::new(
        Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        },
        &node.url,
        rebroadcast_ms,
    )
}

/// What `/api/rpc` serves from with the relay route alone (no TPU route),
/// landing with `node` every 100 ms. Must run in a runtime.
fn relay_only_rig(relay: &testkit::relay::Relay, node: &RpcNode) -> common::rpc::RpcRig {
    let cfg: gw_sidecar::sender::SenderConfig =
        serde_json::from_value(json!({"relay": {"url": relay.url}})).unwrap();
    let sender = gw_sidecar::sender::Sender::new(
        &cfg,
        &ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
        None,
        None,
    )
    .unwrap();
    common::rpc::RpcRig::with_sender(sender, &node.url, 100)
}

/// A sender of configuration `cfg` (identity `[2; 32]`) whose one leader is
/// `rx`. Must run in a runtime.
fn sender_to(rx: &TpuReceiver, cfg: Value) -> std::sync::Arc<gw_sidecar::sender::Sender> {
    let cfg: gw_sidecar::sender::SenderConfig = serde_json::from_value(cfg).unwrap();
    let leaders: std::sync::Arc<dyn gw_sidecar::sender::leaders::LeaderSource> =
        std::sync::Arc::new(gw_sidecar::sender::leaders::StaticLeaders::from_leaders(
            vec![Leader {
                tpu_quic: rx.addr,
                identity: Some(rx.identity),
            }],
        ));
    gw_sidecar::sender::Sender::new(&cfg, &key(2), Some(leaders), None).unwrap()
}

fn copies(rx: &TpuReceiver, wire: &[u8]) -> usize {
    rx.received().iter().filter(|r| r.bytes == wire).count()
}

#[test]
fn send_transaction_has_a_solana_nodes_landing_semantics() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 100);
        let (landing, modules) = (&rig.landing, &rig.modules);
        let ctx = rig.ctx();
        let call = |body: Vec<u8>| {
            let ctx = &ctx;
            async move { rpc::handle(ctx, &body).await }
        };

        // Preflight (the default): the node's simulation fails → Solana's -32002,
        // with its err and logs; nothing is sent.
        node.set_simulation_err(Some(json!({"InstructionError": [0, {"Custom": 1}]})));
        let (w1, b1, _, _) = tx(1, 0);
        let r = call(send(&b1, json!({}))).await;
        assert_eq!(r["error"]["code"], -32002, "{r}");
        assert_eq!(
            r["error"]["message"],
            "Transaction simulation failed: Error processing Instruction 0: custom program error: 0x1"
        );
        assert_eq!(
            r["error"]["data"]["err"],
            json!({"InstructionError": [0, {"Custom": 1}]})
        );
        assert!(r["error"]["data"]["logs"]
            .as_array()
            .is_some_and(|l| !l.is_empty()));
        let sim = node
            .calls()
            .into_iter()
            .find(|(m, _)| m == "simulateTransaction")
            .unwrap();
        assert_eq!(
            sim.1[1]["commitment"], "finalized",
            "Solana's default preflight commitment"
        );
        node.set_simulation_err(None);

        // minContextSlot beyond the node's slot: -32016 with the slot, with or
        // without preflight.
        for opts in [
            json!({"minContextSlot": 5000}),
            json!({"minContextSlot": 5000, "skipPreflight": true}),
        ] {
            let r = call(send(&b1, opts.clone())).await;
            assert_eq!(r["error"]["code"], -32016, "{opts}: {r}");
            assert_eq!(r["error"]["data"]["contextSlot"], 1010, "{r}");
        }
        let get_slot = node.calls().into_iter().find(|(m, _)| m == "getSlot").unwrap();
        assert_eq!(get_slot.1[0]["commitment"], "processed", "Agave's bank without preflight");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(copies(&rx, &w1), 0, "a refused transaction was sent");

        // A passing preflight with preflightCommitment: sent (and, maxRetries 0, once).
        let (w2, b2, s2, _) = tx(2, 0);
        let r = call(send(
            &b2,
            json!({"preflightCommitment": "processed", "maxRetries": 0}),
        ))
        .await;
        assert_eq!(r["result"], s2, "{r}");
        let last = node
            .calls()
            .into_iter()
            .rev()
            .find(|(m, _)| m == "simulateTransaction")
            .unwrap();
        assert_eq!(last.1[1]["commitment"], "processed");
        // `binary`, Agave's old name of base58, is base58.
        let (w9, _, s9, _) = tx(9, 0);
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": "sendTransaction", "params": [
            bs58::encode(&w9).into_string(),
            {"encoding": "binary", "skipPreflight": true, "maxRetries": 0},
        ]});
        let r = call(serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(r["result"], s9, "{r}");

        // maxRetries 2: the first send and two more, then it stops.
        let (w3, b3, s3, _) = tx(3, 0);
        let r = call(send(&b3, json!({"skipPreflight": true, "maxRetries": 2}))).await;
        assert_eq!(r["result"], s3, "{r}");

        // No maxRetries: again every 100 ms until the node sees it.
        let (w4, b4, s4, _) = tx(4, 0);
        let r = call(send(&b4, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], s4, "{r}");
        // … or until its blockhash expires.
        let (w5, b5, s5, bh5) = tx(5, 0);
        let r = call(send(&b5, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], s5, "{r}");

        // … or until the module is killed.
        let (w6, b6, s6, _) = tx(6, 0);
        let r = call(send(&b6, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], s6, "{r}");

        // Polled with deadlines: a loaded CI machine is slow, never fast.
        async fn until(what: &str, f: impl Fn() -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while !f() {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        until("maxRetries 2: three copies", || copies(&rx, &w3) == 3).await;
        until("rebroadcast of w4", || copies(&rx, &w4) >= 3).await;
        until("rebroadcast of w5", || copies(&rx, &w5) >= 3).await;
        until("rebroadcast of w6", || copies(&rx, &w6) >= 3).await;
        let status = json!({"slot": 1011, "confirmations": 0, "err": null,
                            "confirmationStatus": "confirmed", "status": {"Ok": null}});
        node.set_status(&s4, status.clone());
        node.expire_blockhash(&bh5);
        // Two "not valid" answers after "valid" end it (one may be a lagging node).
        until("w5's blockhash expired", || {
            landing.stats.expired.load(std::sync::atomic::Ordering::Relaxed) == 1
        })
        .await;
        modules.set(
            Module::Arbitrage,
            ModuleState {
                state: RunState::Killed,
                ..ModuleState::default()
            },
        );
        use std::sync::atomic::Ordering::Relaxed;
        let st = &landing.stats;
        until("every rebroadcast ended", || landing.pending() == 0).await;
        assert_eq!(
            (
                st.seen.load(Relaxed),
                st.expired.load(Relaxed),
                st.retries_spent.load(Relaxed),
                st.refused.load(Relaxed)
            ),
            (1, 1, 1, 1),
            "seen (w4), expired (w5), retries spent (w3), refused by the kill (w6)"
        );
        let (n4, n5, n6) = (copies(&rx, &w4), copies(&rx, &w5), copies(&rx, &w6));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            (copies(&rx, &w4), copies(&rx, &w5), copies(&rx, &w6)),
            (n4, n5, n6),
            "nothing sent after the loops ended"
        );
        assert_eq!(copies(&rx, &w2), 1, "maxRetries 0 sends once");
        assert_eq!(copies(&rx, &w3), 3, "maxRetries 2 sends three times");

        // getSignatureStatuses: the node's answer; where the node has nothing (it
        // forgot, or lags), what the rebroadcast loop saw.
        let (_, _, unknown, _) = tx(9, 0);
        let q = |sigs: Value| {
            serde_json::to_vec(
                &json!({"jsonrpc": "2.0", "id": 1, "method": "getSignatureStatuses",
                                        "params": [sigs, {"searchTransactionHistory": false}]}),
            )
            .unwrap()
        };
        let r = call(q(json!([s4, unknown]))).await;
        assert_eq!(r["result"]["value"][0], status, "{r}");
        assert_eq!(r["result"]["value"][1], Value::Null);
        node.forget_status(&s4);
        let r = call(q(json!([s4]))).await;
        assert_eq!(
            r["result"]["value"][0], status,
            "the gateway's own sighting: {r}"
        );
        let r = call(q(json!(["not-a-signature"]))).await;
        assert_eq!(r["error"]["code"], -32602, "{r}");
        // The configuration as Agave reads it, and only Solana's option reaches the
        // node (which, like Agave, refuses one without it).
        let with = |opts: Option<Value>| {
            let mut params = json!([[s4]]);
            if let Some(o) = opts {
                params.as_array_mut().unwrap().push(o);
            }
            serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1,
                "method": "getSignatureStatuses", "params": params}))
            .unwrap()
        };
        let last_forwarded = || {
            let (_, p) = node.calls().into_iter().rev().find(|(m, _)| m == "getSignatureStatuses").unwrap();
            p
        };
        for (opts, forwarded) in [
            (
                Some(json!({"searchTransactionHistory": true, "junk": "x".repeat(4096)})),
                json!([[s4], {"searchTransactionHistory": true}]),
            ),
            (Some(json!([false])), json!([[s4], {"searchTransactionHistory": false}])),
            (None, json!([[s4]])),
            (Some(Value::Null), json!([[s4]])),
        ] {
            let r = call(with(opts.clone())).await;
            assert_eq!(r["result"]["value"][0], status, "{opts:?}: {r}");
            assert_eq!(last_forwarded(), forwarded, "{opts:?}");
        }
        // A batch of 64 status calls reaches the node 8 at a time at most (no
        // rebroadcast is polling meanwhile).
        assert_eq!(landing.pending(), 0);
        node.recount();
        node.set_delay(Duration::from_millis(100));
        let batch: Vec<Value> = (0..64)
            .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": "getSignatureStatuses", "params": [[s4]]}))
            .collect();
        let r = call(serde_json::to_vec(&batch).unwrap()).await;
        assert_eq!(r.as_array().map(Vec::len), Some(64));
        assert!(r.as_array().unwrap().iter().all(|a| a["result"]["value"][0] == status), "{r}");
        node.set_delay(Duration::ZERO);
        assert_eq!(node.most_in_flight(), 8, "the batch's calls at once");
        for bad in [
            json!({}),
            json!({"searchTransactionHistory": "yes"}),
            json!({"searchTransactionHistory": null}),
            json!([true, 1]),
            json!(7),
        ] {
            let r = call(with(Some(bad.clone()))).await;
            assert_eq!(r["error"]["code"], -32602, "{bad}: {r}");
        }
        // Half a megabyte of valid base58 (quadratic to decode: minutes of a worker,
        // without the bound): refused, and not echoed whole.
        let r = call(q(json!(["2".repeat(1 << 19)]))).await;
        assert_eq!(r["error"]["code"], -32602);
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.len() < 200 && message.contains('…'), "{message}");
        let r = call(q(Value::Array(vec![json!(s4); 257]))).await;
        assert_eq!(r["error"]["code"], -32602, "{r}");
        // Bad options are refused before anything is sent.
        let r = call(send(&b1, json!({"maxRetries": -1}))).await;
        assert_eq!(r["error"]["code"], -32602, "{r}");
    });
}

#[test]
fn many_transactions_in_flight_are_polled_in_batches() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 200);
        let landing = &rig.landing;
        let ctx = rig.ctx();
        // 300 transactions on 3 blockhashes, in flight together, each to be sent
        // twice (maxRetries 1).
        let mut wires = Vec::new();
        let mut bodies = Vec::new();
        for i in 0..300u32 {
            let mut bh = [(i % 3) as u8 + 100; 32];
            bh[31] = 0;
            let w = txwire::example_tx(&key(50), bh, i as usize % 200);
            let b64 = base64::engine::general_purpose::STANDARD.encode(&w);
            bodies.push(send(&b64, json!({"skipPreflight": true, "maxRetries": 1})));
            wires.push(w);
        }
        let answers =
            futures_util::future::join_all(bodies.iter().map(|b| rpc::handle(&ctx, b))).await;
        for r in answers {
            assert!(r["result"].is_string(), "{r}");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while landing.pending() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "rebroadcasts did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rx.wait_for(600, Duration::from_secs(10)).await, 600);
        for w in &wires {
            assert_eq!(copies(&rx, w), 2, "one send and one rebroadcast each");
        }
        let statuses: Vec<Value> = node
            .calls()
            .into_iter()
            .filter(|(m, _)| m == "getSignatureStatuses")
            .map(|(_, p)| p)
            .collect();
        let polled: usize = statuses.iter().map(|p| p[0].as_array().unwrap().len()).sum();
        println!(
            "300 transactions: {} getSignatureStatuses calls for {polled} signatures, {} isBlockhashValid calls",
            statuses.len(),
            node.count("isBlockhashValid")
        );
        assert!(polled >= 600, "each transaction polled twice ({polled})");
        assert!(
            statuses.iter().all(|p| p[0].as_array().unwrap().len() <= 256),
            "Solana's limit of 256 signatures per call"
        );
        // Unbatched it was 600 of each; a loaded machine may spread the 300
        // over a few more rounds.
        assert!(
            statuses.len() * 10 <= polled,
            "{} status calls for {polled} signatures: not batched",
            statuses.len()
        );
        assert!(
            node.count("isBlockhashValid") <= 60,
            "{} blockhash checks for 3 blockhashes",
            node.count("isBlockhashValid")
        );
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(landing.stats.retries_spent.load(Relaxed), 300);
        assert_eq!(landing.stats.rebroadcasts.load(Relaxed), 300);
    });
}

/// The gate counts only sends that go, and bounds the sends that outlive their
/// clients: at `throttle_pct` 50 every second transaction that would go goes, and a
/// transaction refused by its preflight, or whose client left during it, gives its
/// share back, and a client's resend of one being rebroadcast takes none; with `rpc_max_in_flight` 1, a second send while the first (its
/// client long gone) still runs is refused `busy`, nothing sent, and the permit
/// comes back when the first ends.
#[test]
fn only_sends_that_go_count_and_sends_in_flight_are_bounded() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 100);
        rig.modules.set(
            Module::Arbitrage,
            ModuleState {
                state: RunState::Running,
                throttle_pct: 50,
                ..ModuleState::default()
            },
        );
        let ctx = rig.ctx();
        let once = json!({"maxRetries": 0});
        let throttled = |r: &Value| {
            r["error"]["code"] == -32005
                && r["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("throttled"))
        };
        // The first of two is throttled (the share starts with no credit).
        let (_, b20, _, _) = tx(20, 0);
        let (r, rows) = answered(&ctx, &send(&b20, once.clone())).await;
        assert!(throttled(&r), "{r}");
        assert_eq!(rows, ["throttled"]);
        // The second would go, but its preflight fails: not sent, its share back.
        node.set_simulation_err(Some(json!({"InstructionError": [0, {"Custom": 1}]})));
        let (w21, b21, _, _) = tx(21, 0);
        let (r, rows) = answered(&ctx, &send(&b21, once.clone())).await;
        assert_eq!(r["error"]["code"], -32002, "{r}");
        assert_eq!(rows, ["node_refused"], "the node's refusal, passed on");
        node.set_simulation_err(None);
        // Nor is one whose simulation answer holds none (`null`, `{}` from a
        // proxy): it checked nothing.
        let mut unchecked = Vec::new();
        for (i, v) in [Value::Null, json!({"logs": []})].into_iter().enumerate() {
            node.set_simulation_value(Some(v));
            let (w, b, _, _) = tx(25 + i as u8, 0);
            let (r, rows) = answered(&ctx, &send(&b, once.clone())).await;
            assert_eq!(r["error"]["code"], -32603, "{r}");
            assert_eq!(rows, ["unavailable"], "no answer worth the name");
            assert!(
                r["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("holds no simulation")),
                "{r}"
            );
            unchecked.push(w);
        }
        node.set_simulation_value(None);
        // The next would go, but its client leaves during the preflight.
        node.set_delay(Duration::from_millis(600));
        let (w22, b22, _, _) = tx(22, 0);
        let left = tokio::time::timeout(
            Duration::from_millis(150),
            rpc::handle(&ctx, &send(&b22, once.clone())),
        )
        .await;
        assert!(left.is_err(), "answered before its client left: {left:?}");
        node.set_delay(Duration::ZERO);
        // So the next goes (rebroadcast), and its client's resend of it is
        // answered, not throttled (nothing is sent); the one after is throttled.
        let (w23, b23, s23, _) = tx(23, 0);
        let (r, rows) = answered(&ctx, &send(&b23, json!({}))).await;
        assert_eq!(r["result"], s23, "{r}");
        assert!(rows.is_empty(), "a send is no refusal: {rows:?}");
        let (r, rows) = answered(&ctx, &send(&b23, json!({}))).await;
        assert_eq!(r["result"], s23, "{r}");
        assert!(rows.is_empty(), "{rows:?}");
        let (_, b24, _, _) = tx(24, 0);
        let r = rpc::handle(&ctx, &send(&b24, once.clone())).await;
        assert!(throttled(&r), "{r}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while copies(&rx, &w23) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "w23 never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!((copies(&rx, &w21), copies(&rx, &w22)), (0, 0));
        assert!(unchecked.iter().all(|w| copies(&rx, w) == 0));

        // One send in flight at most. The first goes to a leader that never answers
        // (its handshake times out after the TPU route's connect timeout); its
        // client leaves after 150 ms, the send goes on.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut rig = common::rpc::RpcRig::new(
            Leader {
                tpu_quic: silent.local_addr().unwrap(),
                identity: None,
            },
            &node.url,
            100,
        );
        rig.gate = rpc::RpcGate::new(1);
        let ctx = rig.ctx();
        let quick = json!({"skipPreflight": true, "maxRetries": 0});
        let (_, b30, _, _) = tx(30, 0);
        let left = tokio::time::timeout(
            Duration::from_millis(150),
            rpc::handle(&ctx, &send(&b30, quick.clone())),
        )
        .await;
        assert!(left.is_err(), "answered before its client left: {left:?}");
        assert_eq!(rig.gate.in_flight(), 1, "the send goes on");
        let (_, b31, _, _) = tx(31, 0);
        let (r, rows) = answered(&ctx, &send(&b31, quick.clone())).await;
        assert_eq!(r["error"]["code"], -32005, "{r}");
        assert_eq!(rows, ["overloaded"]);
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("busy:")),
            "{r}"
        );
        // The first send ends (the leader never answered): the permit is back, and
        // the busy one was never sent.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while rig.gate.in_flight() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the permit never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let st = &rig.sender.stats;
        let sends = || st.landed.load(Relaxed) + st.failed.load(Relaxed);
        assert_eq!(sends(), 1, "only the first was sent");
        assert_eq!(rig.gate.stats.busy.load(Relaxed), 1);
        let r = rpc::handle(&ctx, &send(&b31, quick)).await;
        assert_eq!(
            r["error"]["code"], -32603,
            "sent, and failed at the silent leader: {r}"
        );
        assert_eq!(sends(), 2);
    });
}

/// An RPC node and a relay that answer without end, with something that is not
/// an id, or not at all, behind URLs that carry a key: the gateway reads at most
/// a bounded answer (an endless one fails fast, not at the deadline), and its
/// errors — which reach JSON-RPC callers and audit rows — never show the URL.
#[test]
fn upstream_answers_are_bounded_and_errors_never_show_the_url() {
    use gw_sidecar::sender::landing::{Landing, RpcNodeConfig};
    use gw_sidecar::sender::relay::{RelayClient, RelayConfig, RelayError};
    use std::time::Instant;
    use testkit::http_thread::HttpThread;

    const KEY: &str = "k3y-SECRET-4f1c";
    let local = || "127.0.0.1:0".parse().unwrap();
    // Whitespace without end: a JSON answer's valid beginning.
    let endless = HttpThread::start(
        local(),
        axum::Router::new().fallback(|| async {
            let chunk = bytes::Bytes::from(vec![b' '; 64 << 10]);
            axum::body::Body::from_stream(futures_util::stream::repeat_with(move || {
                Ok::<_, std::io::Error>(chunk.clone())
            }))
        }),
    );
    // 9 MiB with its length announced: refused by the length, nothing read.
    let announced = HttpThread::start(
        local(),
        axum::Router::new().fallback(|| async { vec![b' '; 9 << 20] }),
    );
    // A JSON-RPC result of 10 000 characters: not a signature or a bundle id.
    let huge_result = HttpThread::start(
        local(),
        axum::Router::new().fallback(|| async {
            axum::Json(json!({"jsonrpc": "2.0", "id": 1, "result": "x".repeat(10_000)}))
        }),
    );
    // An error status with a large page.
    let busy_page = HttpThread::start(
        local(),
        axum::Router::new().fallback(|| async {
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                vec![b'x'; 100_000],
            )
        }),
    );
    // Takes connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Nobody listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rt = runtime();
    rt.block_on(async {
        // (url, the call's deadline, what the error says)
        for (url, timeout_ms, expect) in [
            // Read until it passes the bound, long before the deadline.
            (
                format!("http://{}/?api-key={KEY}", endless.addr),
                30_000,
                "larger than 524288 bytes",
            ),
            (
                format!("http://{}/?api-key={KEY}", announced.addr),
                30_000,
                "larger than 524288 bytes",
            ),
            (
                format!("http://{}/{KEY}/", silent.local_addr().unwrap()),
                1500,
                "no answer within the deadline",
            ),
            (
                format!("http://{closed}/?api-key={KEY}"),
                1500,
                "error sending request",
            ),
        ] {
            let cfg: RpcNodeConfig =
                serde_json::from_value(json!({"url": url, "timeout_ms": timeout_ms})).unwrap();
            let landing = Landing::new(cfg).unwrap();
            let t = Instant::now();
            let e = landing.call("getSlot", json!([])).await.unwrap_err();
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{url}: {:?}",
                t.elapsed()
            );
            assert_eq!(e.code, -32603, "{url}: {}", e.message);
            assert!(e.message.contains(expect), "{url}: {}", e.message);
            assert!(!e.message.contains(KEY), "{url}: {}", e.message);
            assert!(!e.message.contains("127.0.0.1"), "{url}: {}", e.message);
        }
        // Through `/api/rpc`: the preflight's failure, as the caller sees it.
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = common::rpc::RpcRig::new(
            Leader {
                tpu_quic: rx.addr,
                identity: Some(rx.identity),
            },
            &format!("http://{}/?api-key={KEY}", announced.addr),
            100,
        );
        let ctx = rig.ctx();
        let (_, b64, _, _) = tx(9, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({}))).await;
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("larger than"), "{r}");
        assert!(!r.to_string().contains(KEY), "{r}");

        // The relay: the same bound (smaller: its answers are ids), a result that
        // is not an id, and a refused connection to a URL with a key in its path.
        let (wire, _, _, _) = tx(10, 0);
        let fails = |url: String| {
            let cfg: RelayConfig =
                serde_json::from_value(json!({"url": url, "timeout_ms": 1500})).unwrap();
            let (relay, wire) = (RelayClient::new(&cfg).unwrap(), &wire);
            async move { relay.send_transaction(wire).await.unwrap_err() }
        };
        let e = fails(format!("http://{}", endless.addr)).await;
        assert!(
            matches!(&e, RelayError::BadResponse(m) if m.contains("larger than 65536 bytes")),
            "{e}"
        );
        let e = fails(format!("http://{}", busy_page.addr)).await;
        assert!(
            matches!(&e, RelayError::Http(503, m) if m.contains("larger than 65536 bytes")),
            "{e}"
        );
        let e = fails(format!("http://{}", huge_result.addr)).await;
        assert!(
            matches!(&e, RelayError::BadResponse(m) if m.contains("a result of 10000 bytes")),
            "{e}"
        );
        let e = fails(format!("http://{closed}/{KEY}")).await;
        assert!(matches!(&e, RelayError::Unreachable(_)), "{e}");
        assert!(!e.maybe_sent(), "nothing went: {e}");
        assert!(!e.to_string().contains(KEY), "{e}");
    });
}

/// What the RPC node answers is held to what a Solana node answers: only the
/// errors by which Solana refuses a transaction or a request are passed on as
/// the node's (`node_refused`); a provider's rate limit, an error without a
/// code or an error page is the node failing to answer (-32603, `unavailable`,
/// and a preflight's "the transaction was not sent"): a -32429 reached the
/// client as a refusal of its transaction. A `getSignatureStatuses` answer of
/// another length than asked, or with an entry that is no status, is refused
/// rather than paired with the wrong signatures; a status keeps Solana's fields
/// only.
#[test]
fn a_nodes_answers_are_held_to_a_solana_nodes() {
    use gw_sidecar::sender::landing::{Landing, RpcNodeConfig};
    use testkit::http_thread::HttpThread;

    let answering = |status: u16, body: Value| {
        let status = axum::http::StatusCode::from_u16(status).unwrap();
        HttpThread::start(
            "127.0.0.1:0".parse().unwrap(),
            axum::Router::new().fallback(move || {
                let body = body.clone();
                async move { (status, axum::Json(body)) }
            }),
        )
    };
    let error = |e: Value| json!({"jsonrpc": "2.0", "error": e, "id": 1});
    let rate_limited = answering(
        429,
        error(json!({"code": -32429, "message": "rate limited: upgrade your plan"})),
    );
    let bare = answering(401, error(json!("Unauthorized")));
    let page = HttpThread::start(
        "127.0.0.1:0".parse().unwrap(),
        axum::Router::new().fallback(|| async {
            (
                axum::http::StatusCode::BAD_GATEWAY,
                "<html>bad gateway</html>",
            )
        }),
    );
    let too_soon = answering(
        200,
        error(
            json!({"code": -32016, "message": "Minimum context slot has not been reached",
                     "data": {"contextSlot": 5}}),
        ),
    );
    let rt = runtime();
    rt.block_on(async {
        let landing = |url: String| {
            Landing::new(
                serde_json::from_value::<RpcNodeConfig>(json!({"url": url, "timeout_ms": 1500}))
                    .unwrap(),
            )
            .unwrap()
        };
        for (server, says) in [
            (
                &rate_limited,
                "its error -32429: rate limited: upgrade your plan",
            ),
            (&bare, "its error without a code"),
            (&page, "HTTP 502 Bad Gateway"),
        ] {
            let e = landing(server.url())
                .call("getSlot", json!([]))
                .await
                .unwrap_err();
            assert_eq!(
                (e.refusal, e.code),
                (gw_core::Code::Unavailable, -32603),
                "{}",
                e.message
            );
            assert!(e.message.contains(says), "{}", e.message);
        }
        let e = landing(too_soon.url())
            .call("getSlot", json!([]))
            .await
            .unwrap_err();
        assert_eq!(
            (e.refusal, e.code, e.data),
            (
                gw_core::Code::NodeRefused,
                -32016,
                Some(json!({"contextSlot": 5}))
            )
        );
        // Through `/api/rpc`: the provider's limit hit by the preflight.
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = common::rpc::RpcRig::new(
            Leader {
                tpu_quic: rx.addr,
                identity: Some(rx.identity),
            },
            &rate_limited.url(),
            100,
        );
        let (_, b64, _, _) = tx(72, 0);
        let (r, refusals) = answered(&rig.ctx(), &send(&b64, json!({}))).await;
        assert_eq!(r["error"]["code"], -32603, "{r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("-32429") && msg.contains("the transaction was not sent"),
            "{r}"
        );
        assert_eq!(refusals, ["unavailable"]);

        // getSignatureStatuses: two signatures asked.
        let sigs = ["a".repeat(88), "b".repeat(88)];
        let statuses = |value: Value| {
            answering(
                200,
                json!({"jsonrpc": "2.0", "id": 1,
                       "result": {"context": {"slot": 9}, "value": value}}),
            )
        };
        let st = json!({"slot": 7, "confirmations": 1, "err": null, "status": {"Ok": null},
                        "confirmationStatus": "confirmed"});
        for bad in [
            json!([st.clone()]),
            json!([st.clone(), null, null]),
            json!([st.clone(), "confirmed"]),
            json!([st.clone(), {"slot": 7, "confirmationStatus": "landed"}]),
            json!([st.clone(), {"confirmationStatus": "confirmed"}]),
            json!([st.clone(), {"slot": 7, "confirmations": -1, "confirmationStatus": "confirmed"}]),
        ] {
            let node = statuses(bad.clone());
            let e = landing(node.url()).statuses(&sigs, None).await.unwrap_err();
            assert_eq!(
                e.refusal,
                gw_core::Code::Unavailable,
                "{bad}: {}",
                e.message
            );
        }
        let mut extra = st.clone();
        extra["memo"] = json!("x".repeat(1000));
        let node = statuses(json!([extra, null]));
        let got = landing(node.url()).statuses(&sigs, None).await.unwrap();
        assert_eq!(got, json!({"context": {"slot": 9}, "value": [st, null]}));
    });
}

/// A slow node delays no resend: a round waits for the node's answers at most a
/// rebroadcast period, and a transaction due is sent again on time whatever the
/// node has not said yet (Agave's service resends on its timer) — and what the
/// node says, however late, is still acted on. Before, a round waited for every
/// status call, then for every blockhash check.
/// A rebroadcast goes to the leaders by the TPU route alone: hedged as a new
/// send is, every resend also went to the relay (a request against its rate
/// limit, a tip) and into the routes' statistics.
#[test]
fn rebroadcasts_go_by_the_tpu_route_alone() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let relay = testkit::relay::Relay::start(None);
        // Both routes at once for a new send (the hedge at 0 ms).
        let sender = sender_to(
            &rx,
            json!({
                "tpu": {}, "leaders": {"static": []}, "relay": {"url": relay.url},
                "route_policy": "latency", "hedge_delay_ms": 0, "adaptive": false,
            }),
        );
        let rig = common::rpc::RpcRig::with_sender(sender, &node.url, 100);
        let ctx = rig.ctx();
        let (w, b64, sig, _) = tx(61, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig, "{r}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while copies(&rx, &w) < 6 {
            assert!(tokio::time::Instant::now() < deadline, "resent by the TPU");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(relay.calls().len(), 1, "the first send's hedge only");
    });
}

/// Without a TPU route nothing is rebroadcast: every resend went to the relay,
/// each a request against its rate limit (a transaction the node never
/// confirmed was posted there every `rebroadcast_ms` until its blockhash
/// expired). A client's own resend goes (it is the only one: answered without
/// a send, the transaction hung on one relay post), and the transaction is let
/// go once the node sees it confirmed.
#[test]
fn a_relay_only_sender_does_not_rebroadcast_to_the_relay() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let relay = testkit::relay::Relay::start(None);
        let rig = relay_only_rig(&relay, &node);
        let ctx = rig.ctx();
        let (_, b64, sig, _) = tx(65, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig, "{r}");
        // Ten rebroadcast periods: the send only; then the client's own resend.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(relay.calls().len(), 1, "the send only");
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig, "{r}");
        assert_eq!(relay.calls().len(), 2, "the client's resend");
        assert_eq!(rig.landing.pending(), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(relay.calls().len(), 2);
        node.set_status(
            &sig,
            json!({"slot": 1009, "confirmations": null, "err": null,
            "confirmationStatus": "confirmed"}),
        );
        let body = serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1,
            "method": "getSignatureStatuses", "params": [[sig]]}))
        .unwrap();
        let r = rpc::handle(&ctx, &body).await;
        assert_eq!(
            r["result"]["value"][0]["confirmationStatus"], "confirmed",
            "{r}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while rig.landing.pending() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "still followed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(relay.calls().len(), 2);
    });
}

/// The same bundle in two requests at once is posted to the relay once, both
/// answered with its bundle id; another bundle of the same transactions in
/// another order is another bundle.
#[test]
fn the_same_bundle_in_two_requests_at_once_is_sent_once() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let relay = testkit::relay::Relay::start(None);
        relay.set_mode(testkit::relay::Mode::Delay(Duration::from_millis(300)));
        let rig = relay_only_rig(&relay, &node);
        let ctx = rig.ctx();
        let ((_, a, _, _), (_, b, _, _)) = (tx(66, 0), tx(67, 0));
        let bundle = |txs: [&str; 2]| {
            serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 3, "method": "sendBundle",
                "params": [txs, {"encoding": "base64"}]}))
            .unwrap()
        };
        let ab = bundle([&a, &b]);
        let (x, y) = tokio::join!(rpc::handle(&ctx, &ab), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            rpc::handle(&ctx, &ab).await
        });
        assert!(x["result"].is_string(), "{x}");
        assert_eq!(x, y);
        assert_eq!(relay.calls().len(), 1);
        assert_eq!(rig.gate.stats.coalesced.load(Ordering::Relaxed), 1);
        let ba = bundle([&b, &a]);
        let (x, y) = tokio::join!(rpc::handle(&ctx, &ab), rpc::handle(&ctx, &ba));
        assert!(
            x["result"].is_string() && y["result"].is_string(),
            "{x} {y}"
        );
        assert_eq!(relay.calls().len(), 3);
    });
}

/// The same transaction in two requests at once (a client resending on a short
/// timeout, two bots with one transaction): the second waits for the first's
/// send and is answered with its signature; one preflight, one copy on the wire
/// (two of each before). A first whose client leaves while it is at the node
/// leaves the send to the second; a first refused by its preflight leaves the
/// second to make its own, refused the same way, each with its row.
#[test]
fn a_transaction_in_two_requests_at_once_is_sent_once() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 10_000);
        let ctx = rig.ctx();
        let coalesced = || rig.gate.stats.coalesced.load(Ordering::Relaxed);
        node.set_delay(Duration::from_millis(300));
        let later = |body: Vec<u8>| {
            let ctx = &ctx;
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                rpc::handle(ctx, &body).await
            }
        };

        let (w, b64, sig, _) = tx(71, 0);
        let body = send(&b64, json!({}));
        let simulated = node.count("simulateTransaction");
        let (a, b) = tokio::join!(rpc::handle(&ctx, &body), later(body.clone()));
        assert_eq!(
            (&a["result"], &b["result"]),
            (&json!(sig), &json!(sig)),
            "{a} {b}"
        );
        assert_eq!(node.count("simulateTransaction") - simulated, 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(copies(&rx, &w), 1);
        assert_eq!(coalesced(), 1);

        // The first's client leaves while it is at the node: the second sends.
        let (w, b64, sig, _) = tx(72, 0);
        let body = send(&b64, json!({}));
        let first = tokio::time::timeout(Duration::from_millis(100), rpc::handle(&ctx, &body));
        let (a, b) = tokio::join!(first, later(body.clone()));
        assert!(a.is_err(), "the first left: {a:?}");
        assert_eq!(b["result"], sig, "{b}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(copies(&rx, &w), 1);
        assert_eq!(coalesced(), 1);

        // Refused by the node: each request its own refusal, and its row.
        node.set_simulation_err(Some(json!({"InstructionError": [0, {"Custom": 1}]})));
        let (w, b64, _, _) = tx(73, 0);
        let body = send(&b64, json!({}));
        let ((a, ra), (b, rb)) = tokio::join!(answered(&ctx, &body), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            answered(&ctx, &body).await
        });
        assert_eq!(
            (&a["error"]["code"], &b["error"]["code"]),
            (&json!(-32002), &json!(-32002))
        );
        assert_eq!((ra, rb), (vec!["node_refused"], vec!["node_refused"]));
        node.set_simulation_err(None);
        assert_eq!(copies(&rx, &w), 0);
        assert_eq!(coalesced(), 1);
    });
}

/// A transaction sent again while it is rebroadcast (a client resending until
/// it lands, in single calls or a batch) is answered with its signature and not
/// sent again: each was one more send. A new transaction twice in one batch is
/// sent once, each copy answered under its own id (both were sent: neither was
/// tracked before its send went).
#[test]
fn a_transaction_already_rebroadcast_is_not_sent_again() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 10_000);
        let ctx = rig.ctx();
        let (w, b64, sig, _) = tx(62, 0);
        for _ in 0..3 {
            let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
            assert_eq!(r["result"], sig, "{r}");
        }
        let one = json!({"jsonrpc": "2.0", "id": 1, "method": "sendTransaction",
                         "params": [b64, {"encoding": "base64", "skipPreflight": true}]});
        let batch = serde_json::to_vec(&json!([one.clone(), one])).unwrap();
        let r = rpc::handle(&ctx, &batch).await;
        assert_eq!(
            (&r[0]["result"], &r[1]["result"]),
            (&json!(sig), &json!(sig)),
            "{r}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(copies(&rx, &w), 1);
        assert_eq!(rig.landing.pending(), 1);
        // A new one, twice in one batch (and another beside them).
        let (w2, b64_2, sig2, _) = tx(63, 0);
        let (w3, b64_3, sig3, _) = tx(64, 0);
        let call = |id: u64, b64: &str| {
            json!({"jsonrpc": "2.0", "id": id, "method": "sendTransaction",
                   "params": [b64, {"encoding": "base64", "skipPreflight": true}]})
        };
        let batch = serde_json::to_vec(&json!([call(7, &b64_2), call(8, &b64_3), call(9, &b64_2)]))
            .unwrap();
        let r = rpc::handle(&ctx, &batch).await;
        assert_eq!(
            r,
            json!([
                {"jsonrpc": "2.0", "result": sig2, "id": 7},
                {"jsonrpc": "2.0", "result": sig3, "id": 8},
                {"jsonrpc": "2.0", "result": sig2, "id": 9},
            ]),
            "{r}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!((copies(&rx, &w2), copies(&rx, &w3)), (1, 1));
    });
}

/// A send whose route failed once its bytes may have gone (the relay took the
/// request and answered nothing in time; the leader refused the connection at
/// the handshake, nothing sent) is answered with its signature and rebroadcast
/// until it arrives, as a Solana node answers a transaction its
/// send-transaction-service retries: it was answered "was not sent" and never
/// sent again, and a client told so signs it again — both could land. With
/// `maxRetries: 0` it is an error that says it may have been sent; a send no
/// route took (the relay refused it) is still "was not sent".
#[test]
fn a_send_that_may_have_gone_is_answered_and_rebroadcast() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        rx.refuse_incoming(true);
        let relay = testkit::relay::Relay::start(None);
        relay.set_mode(testkit::relay::Mode::Delay(Duration::from_secs(3)));
        let sender = sender_to(
            &rx,
            json!({
                "tpu": {"refused_backoff_min_ms": 200},
                "relay": {"url": relay.url, "timeout_ms": 300},
                "leaders": {"static": []}, "route_policy": "tpu_first",
            }),
        );
        let rig = common::rpc::RpcRig::with_sender(sender, &node.url, 100);
        let ctx = rig.ctx();
        let relayed = |wire: &[u8]| {
            relay
                .calls()
                .iter()
                .filter(|c| c.txs.iter().any(|t| t.as_slice() == wire))
                .count()
        };

        let (w, b64, sig, _) = tx(70, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig, "{r}");
        assert_eq!(relayed(&w), 1, "the relay took the request");
        assert_eq!(
            rig.sender.stats.failed.load(Ordering::Relaxed),
            1,
            "no route confirmed it"
        );
        assert!(rig.landing.is_pending(&sig));
        assert_eq!(rx.count(), 0);
        rx.refuse_incoming(false);
        rx.wait_for(1, Duration::from_secs(20)).await;
        assert!(copies(&rx, &w) >= 1, "rebroadcast until it arrived");

        // maxRetries 0: not rebroadcast, and the error says it may have gone.
        let refused = || rx.stats.refused_incoming.load(Ordering::Relaxed);
        let before = refused();
        rx.refuse_incoming(true);
        rx.evict_with(0);
        // The close reaches the sender, whose next handshake is refused.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while refused() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no handshake after the eviction"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (w, b64, sig, _) = tx(71, 0);
        let r = rpc::handle(
            &ctx,
            &send(&b64, json!({"skipPreflight": true, "maxRetries": 0})),
        )
        .await;
        assert_eq!(r["error"]["code"], -32603, "{r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&sig) && msg.contains("may have been sent"),
            "{r}"
        );
        assert_eq!(relayed(&w), 1);
        assert!(!rig.landing.is_pending(&sig));

        // The relay refuses it (a JSON-RPC error): nothing went anywhere.
        relay.set_mode(testkit::relay::Mode::Refuse(-32000, "no".into()));
        let (_, b64, sig, _) = tx(72, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(&sig) && msg.contains("was not sent"), "{r}");
        assert!(!rig.landing.is_pending(&sig));
    });
}

/// A slow RPC node holds the places of the sends' calls to it, not the sends':
/// with every such place taken by a preflight waiting on it, a `skipPreflight`
/// send goes, and another preflight is refused `busy`. Both were refused.
#[test]
fn a_slow_node_holds_no_send_that_skips_the_preflight() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let mut rig = rig_to(&rx, &node, 10_000);
        rig.gate = rpc::RpcGate::new(2);
        node.set_delay(Duration::from_millis(1500));
        let ctx = rig.ctx();
        let (_, slow_a, _, _) = tx(63, 0);
        let (_, slow_b, _, _) = tx(64, 0);
        let (w, quick, sig, _) = tx(65, 0);
        let (_, third, _, _) = tx(66, 0);
        let later = |b64: String, opts: Value| {
            let ctx = &ctx;
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                rpc::handle(ctx, &send(&b64, opts)).await
            }
        };
        let (slow_a, slow_b) = (send(&slow_a, json!({})), send(&slow_b, json!({})));
        let (_, _, skipped, preflight) = tokio::join!(
            rpc::handle(&ctx, &slow_a),
            rpc::handle(&ctx, &slow_b),
            later(quick, json!({"skipPreflight": true})),
            later(third, json!({})),
        );
        assert_eq!(skipped["result"], sig, "{skipped}");
        assert_eq!(preflight["error"]["code"], -32005, "{preflight}");
        // Busy for the RPC node's places (the code is shared with the module
        // gates and the sends' own places).
        let message = preflight["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with("busy:") && message.contains("calling the RPC node"),
            "{preflight}"
        );
        assert_eq!(copies(&rx, &w), 1);
    });
}

/// What reading a request refuses (a request whose client left while it was
/// read records these) is what its run records of it: the same codes, in the
/// batch's order.
#[test]
fn a_requests_read_refusals_are_those_its_run_records() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 10_000);
        let (mut bad, _, _, _) = tx(67, 0);
        bad[1] ^= 1;
        let bad = base64::engine::general_purpose::STANDARD.encode(&bad);
        let (_, good, _, _) = tx(68, 0);
        let call = |id: u32, b64: &str| {
            json!({"jsonrpc": "2.0", "id": id, "method": "sendTransaction",
                   "params": [b64, {"encoding": "base64", "skipPreflight": true}]})
        };
        let body = serde_json::to_vec(&json!([
            call(1, &bad),
            call(2, &good),
            {"jsonrpc": "2.0", "id": 3, "method": "getBalance", "params": []},
            call(4, "not base64!"),
        ]))
        .unwrap();
        let read: Vec<&'static str> = rpc::Request::parse(&body)
            .read_refusals()
            .iter()
            .map(|r| r.code.as_str())
            .collect();
        let (_, run) = answered(&rig.ctx(), &body).await;
        assert_eq!(read, run);
        assert_eq!(read.len(), 3, "{read:?}");
        // Not JSON at all: the one refusal.
        let read = rpc::Request::parse(b"{").read_refusals();
        assert_eq!(read.len(), 1);
    });
}

#[test]
fn a_slow_node_delays_no_rebroadcast() {
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 200);
        // Every answer 900 ms late, within a call's 1 s deadline: a round that
        // waited for both polls in turn took 1.8 s, nine periods.
        node.set_delay(Duration::from_millis(900));
        let ctx = rig.ctx();
        let (w, b64, sig, _) = tx(60, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig, "{r}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while copies(&rx, &w) < 8 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} copies in 4 s at a period of 200 ms: resends waited for the node",
                copies(&rx, &w)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What the slow node says is still acted on: seen confirmed, the
        // rebroadcast ends as seen (not at its age, 30 s here).
        node.set_status(
            &sig,
            json!({"slot": 1011, "confirmations": 0, "err": null,
                   "confirmationStatus": "confirmed", "status": {"Ok": null}}),
        );
        let landing = &rig.landing;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while landing.pending() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node's late answers were never acted on"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(
            (
                landing.stats.seen.load(Relaxed),
                landing.stats.expired.load(Relaxed)
            ),
            (1, 0)
        );
    });
}

/// At shutdown the rebroadcasts stop: nothing is resent or tracked after
/// `Landing::stop`, and the data plane's quiesce waits for the resends still on
/// the wire (`resending`), so each has its audit row before the journal stops.
/// Before, the loop went on resending through the rest of the shutdown, and a
/// resend on the wire at exit had no row.
#[test]
fn rebroadcasts_stop_at_shutdown() {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let rig = rig_to(&rx, &node, 50);
        let ctx = rig.ctx();
        let (w, b64, sig, _) = tx(65, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig, "{r}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while copies(&rx, &w) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "no rebroadcast");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let landing = &rig.landing;
        landing.stop();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while landing.resending() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a resend never ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (sent, copied) = (landing.stats.rebroadcasts.load(Relaxed), copies(&rx, &w));
        // A new send goes once, untracked.
        let (w2, b64, sig2, _) = tx(66, 0);
        let r = rpc::handle(&ctx, &send(&b64, json!({"skipPreflight": true}))).await;
        assert_eq!(r["result"], sig2, "{r}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            (
                landing.stats.rebroadcasts.load(Relaxed),
                copies(&rx, &w),
                copies(&rx, &w2)
            ),
            (sent, copied, 1),
            "resent after the stop"
        );
    });
}

/// One client sending faster than its transactions land does not take every
/// other's rebroadcasts: past its share of `max_pending` its sends go once
/// (counted `not_tracked`) while another client's are still rebroadcast.
#[test]
fn one_client_cannot_take_every_rebroadcast() {
    use gw_core::contract::Requester;
    use gw_sidecar::sender::landing::{Landing, RpcNodeConfig};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    let rt = runtime();
    let node = RpcNode::start(1010);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let mut rig = rig_to(&rx, &node, 10_000);
        rig.landing = Landing::new(
            serde_json::from_value::<RpcNodeConfig>(json!({
                "url": node.url, "timeout_ms": 1000, "rebroadcast_ms": 10_000,
                "max_age_secs": 30, "max_pending": 4,
            }))
            .unwrap(),
        )
        .unwrap();
        let as_who = |sub: &str, issuer: &str| {
            let mut ctx = rig.ctx();
            ctx.requester = Arc::new(Requester {
                sub: sub.into(),
                token_issuer: issuer.into(),
                ..Requester::default()
            });
            ctx
        };
        // The same `sub` of another issuer is another client.
        let (greedy, other) = (as_who("greedy", "tests"), as_who("greedy", "elsewhere"));
        for i in 0..3u8 {
            let (_, b64, sig, _) = tx(70 + i, 0);
            let r = rpc::handle(&greedy, &send(&b64, json!({"skipPreflight": true}))).await;
            assert_eq!(r["result"], sig, "{r}");
        }
        // Half of max_pending by default: the third went once, untracked.
        assert_eq!(rig.landing.pending(), 2);
        assert_eq!(rig.landing.stats.not_tracked.load(Relaxed), 1);
        for i in 0..2u8 {
            let (_, b64, sig, _) = tx(80 + i, 0);
            let r = rpc::handle(&other, &send(&b64, json!({"skipPreflight": true}))).await;
            assert_eq!(r["result"], sig, "{r}");
        }
        assert_eq!(rig.landing.pending(), 4, "the other client's are tracked");
        assert_eq!(rig.landing.stats.not_tracked.load(Relaxed), 1);
        let bad = serde_json::from_value::<RpcNodeConfig>(json!({
            "url": node.url, "max_pending": 4, "max_pending_per_requester": 5,
        }))
        .unwrap();
        assert!(bad.validate().is_err());
    });
}
