//! The sender's routes against real QUIC and HTTP peers: the protocol-enforcing TPU
//! receiver, a Jito-style relay, a UDP path that can go silent, and a Solana RPC
//! node's leader-schedule methods. Connection hygiene against a leader that refuses
//! connections the way Agave's TPU server does when a peer's per-IP budget is
//! spent: it completes the handshake, then closes with code 2 "disallowed" (fault
//! injection in the test receiver). A validator operator must not see a reconnect
//! storm, and nothing may be lost once the budget frees.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use gw_sidecar::sender::hedge::Route;
use gw_sidecar::sender::leaders::{LeaderSource, RpcLeaders, StaticLeaders};
use gw_sidecar::sender::tpu::{Leader, TpuClient, TpuConfig, TpuError, CLOSE_REASONS};
use gw_sidecar::sender::{tls, txwire, SendMeta, Sender, SenderConfig};
use serde_json::json;
use testkit::relay::{Mode, Relay};
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver, CLOSE_DISALLOWED, STOP_TOO_LARGE};
use testkit::udp_delay::DelayProxy;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

fn tx(i: u32, pad: usize) -> (Bytes, String) {
    let mut bh = [0u8; 32];
    bh[..4].copy_from_slice(&i.to_le_bytes());
    let w = txwire::example_tx(&key(50), bh, pad);
    let sig = txwire::parse(&w, true).unwrap().signature_b58();
    (Bytes::from(w), sig)
}

fn sender_config(v: serde_json::Value) -> SenderConfig {
    serde_json::from_value(v).unwrap()
}

fn leader(addr: SocketAddr, identity: Option<[u8; 32]>) -> Arc<dyn LeaderSource> {
    Arc::new(StaticLeaders::from_leaders(vec![Leader {
        tpu_quic: addr,
        identity,
    }]))
}

fn meta() -> SendMeta {
    SendMeta {
        source: "test",
        ..SendMeta::default()
    }
}

/// A raw quinn client with an Ed25519 certificate (or none) and any ALPN.
fn raw_client(alpn: &[u8], with_cert: bool) -> quinn::Endpoint {
    let id = tls::identity_cert(&key(60)).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(tls::LeaderVerifier::new(None));
    let mut c = if with_cert {
        b.with_client_auth_cert(vec![id.0], id.1).unwrap()
    } else {
        b.with_no_client_auth()
    };
    c.alpn_protocols = vec![alpn.to_vec()];
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(c).unwrap(),
    )));
    ep
}

#[test]
fn the_tpu_route_delivers_each_transaction_byte_identical_on_its_own_stream() {
    let rt = rt();
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let l = Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        };
        let mut sent = Vec::new();
        let mut waits = Vec::new();
        for i in 0..50 {
            let (w, _) = tx(i, (i as usize * 20) % 1000);
            waits.push(client.submit(&l, w.clone()).unwrap());
            sent.push(w.to_vec());
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        assert_eq!(rx.wait_for(50, Duration::from_secs(5)).await, 50);
        let got = rx.received();
        let mut bytes: Vec<Vec<u8>> = got.iter().map(|r| r.bytes.clone()).collect();
        bytes.sort();
        sent.sort();
        assert_eq!(bytes, sent, "every transaction arrives exactly as sent");
        assert!(
            got.iter()
                .all(|r| r.peer == key(2).verifying_key().to_bytes()),
            "the receiver saw our identity in the client certificate"
        );
        assert_eq!(
            rx.stats
                .connections
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one cached connection"
        );
        // Too large: refused before anything is sent.
        let big = Bytes::from(vec![1u8; 1233]);
        assert_eq!(client.submit(&l, big).err(), Some(TpuError::TooLarge(1233)));
    });
}

#[test]
fn a_leader_answering_with_another_identity_is_refused() {
    let rt = rt();
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let l = Leader {
            tpu_quic: rx.addr,
            identity: Some(key(9).verifying_key().to_bytes()),
        };
        let r = client.submit(&l, tx(1, 0).0).unwrap().await.unwrap();
        match r {
            Err(TpuError::Unreachable(_, why)) => assert!(why.contains("handshake"), "{why}"),
            other => panic!("expected a refused handshake, got {other:?}"),
        }
        assert_eq!(rx.count(), 0);
    });
}

#[test]
fn the_receiver_enforces_the_tpu_protocol() {
    let rt = rt();
    rt.block_on(async {
        let cfg = ReceiverConfig {
            max_streams: 4,
            ..ReceiverConfig::default()
        };
        let rx = TpuReceiver::start(cfg, &key(1)).unwrap();
        // Wrong ALPN: no handshake.
        let ep = raw_client(b"h3", true);
        let r = ep.connect(rx.addr, "connect").unwrap().await;
        assert!(r.is_err(), "h3 ALPN must be refused");
        // No client certificate: refused.
        let ep = raw_client(b"solana-tpu", false);
        let r = match ep.connect(rx.addr, "connect").unwrap().await {
            // TLS 1.3: the client may finish before the server rejects it; the
            // connection then dies at once.
            Ok(c) => {
                let e = tokio::time::timeout(Duration::from_secs(2), c.closed()).await;
                e.is_ok()
            }
            Err(_) => true,
        };
        assert!(r, "a client without a certificate must be refused");
        // A proper client.
        let ep = raw_client(b"solana-tpu", true);
        let c = ep.connect(rx.addr, "connect").unwrap().await.unwrap();
        // Oversized stream: refused and counted, never taken as a transaction. (The
        // STOP_SENDING with the size code may arrive after QUIC already acknowledged
        // the bytes, so the sender cannot rely on seeing it.)
        let mut s = c.open_uni().await.unwrap();
        let _ = s.write_all(&vec![7u8; 1300]).await;
        let _ = s.finish();
        let stopped = tokio::time::timeout(Duration::from_secs(2), s.stopped())
            .await
            .unwrap();
        assert!(matches!(stopped, Ok(None | Some(_))), "{stopped:?}");
        if let Ok(Some(code)) = stopped {
            assert_eq!(code, quinn::VarInt::from_u32(STOP_TOO_LARGE));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while rx.stats.oversize.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "oversize not counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rx.count(), 0, "an oversized stream is not a transaction");
        // No bidirectional streams are granted.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), async {
                let (mut s, _) = c.open_bi().await.unwrap();
                s.write_all(b"x").await.unwrap();
            })
            .await
            .is_err(),
            "a bidirectional stream must never open"
        );
        // At most 4 streams at once: the fifth waits until one ends. (On a fresh
        // connection: whether the refused oversized stream's slot is back yet is a
        // race of STOP_SENDING against the FIN, which once left this loop waiting
        // for stream credit until the idle timeout.)
        let c = ep.connect(rx.addr, "connect").unwrap().await.unwrap();
        let mut open = Vec::new();
        for _ in 0..4 {
            let mut s = c.open_uni().await.unwrap();
            s.write_all(b"partial").await.unwrap();
            open.push(s);
        }
        let fifth = tokio::time::timeout(Duration::from_millis(300), c.open_uni()).await;
        assert!(fifth.is_err(), "the stream limit must hold");
        open[0].finish().unwrap();
        let fifth = tokio::time::timeout(Duration::from_secs(2), c.open_uni()).await;
        assert!(fifth.is_ok(), "a finished stream frees a slot");
        let st = &rx.stats;
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(st.oversize.load(Relaxed), 1);
        assert!(
            st.refused.load(Relaxed) >= 1,
            "no-certificate client counted"
        );
    });
}

/// A module stopped or killed after a send was decided sends nothing more: the
/// hedge leg due later is held back (its route's error says so, and the send is
/// not counted as hedged), where the relay used to get the transaction — a paid
/// send after a kill. The first leg, already on the wire, is not recalled.
#[test]
fn a_hedge_leg_due_after_a_kill_is_held_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let rt = rt();
    let relay = Relay::start(None);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let path = DelayProxy::start(rx.addr, Duration::ZERO);
        path.set_blackhole(true); // the leader went silent: the TPU leg hangs
        let cfg = sender_config(json!({
            "tpu": {"connect_timeout_ms": 3000},
            "relay": {"url": relay.url},
            "leaders": {"static": [{"tpu_quic": path.addr.to_string()}]},
            "hedge_delay_ms": 300,
            "adaptive": false,
        }));
        let sender = Sender::new(&cfg, &key(2), Some(leader(path.addr, None)), None).unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let open = running.clone();
        let gated = SendMeta {
            source: "test",
            gate: gw_sidecar::sender::SendGate::new(move || open.load(Ordering::Acquire)),
            ..SendMeta::default()
        };
        let (w, sig) = tx(7, 100);
        let send = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(w, sig, &gated).await }
        });
        // Killed 50 ms after the send was decided, before its hedge is due.
        tokio::time::sleep(Duration::from_millis(50)).await;
        running.store(false, Ordering::Release);
        let out = send.await.unwrap();
        assert_eq!(out.landed, None, "{out:?}");
        assert_eq!(
            out.relay_error.as_deref(),
            Some(gw_sidecar::sender::HELD_BACK),
            "{out:?}"
        );
        assert!(!out.hedged && out.hedged_after.is_none(), "{out:?}");
        assert!(
            relay.calls().is_empty(),
            "the relay got {:?}",
            relay.calls()
        );
        // Open, the same silent leader is hedged to the relay as before.
        let (w, sig) = tx(8, 100);
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Relay), "{out:?}");
    });
}

#[test]
fn a_silent_primary_is_hedged_after_the_delay_and_the_relay_lands_it() {
    let rt = rt();
    let relay = Relay::start(Some("token-1"));
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let path = DelayProxy::start(rx.addr, Duration::ZERO);
        path.set_blackhole(true); // the leader went silent: no answer, no error
        let cfg = sender_config(json!({
            "tpu": {"connect_timeout_ms": 1500},
            "relay": {"url": relay.url, "auth": "token-1"},
            "leaders": {"static": [{"tpu_quic": path.addr.to_string()}]},
            "hedge_delay_ms": 10,
            "adaptive": false,
        }));
        let sender = Sender::new(&cfg, &key(2), Some(leader(path.addr, None)), None).unwrap();
        let (w, sig) = tx(1, 100);
        let out = sender.send(w.clone(), sig.clone(), &meta()).await;
        assert_eq!(out.primary, Route::Tpu);
        assert_eq!(out.landed, Some(Route::Relay), "{out:?}");
        assert!(out.hedged);
        let after = out.hedged_after.unwrap();
        assert!(
            // Not before the delay; well before the TPU's own 1.5 s handshake deadline
            // (loose upper bound: CI machines are busy).
            after >= Duration::from_millis(10) && after < Duration::from_millis(250),
            "hedged {after:?} after the start; the delay is 10 ms"
        );
        let calls = relay.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].txs,
            vec![w.to_vec()],
            "byte-identical at the relay"
        );
        assert_eq!(calls[0].auth.as_deref(), Some("token-1"));
        assert_eq!(calls[0].method, "sendTransaction");
        // The timer is asked a tick before the deadline (tokio's rounding): the
        // hedge still never goes out early, timed from outside the sender — also
        // while another task keeps a worker busy, so that the driver turns often and
        // the early timer is likely to fire before the deadline and be re-armed
        // (the state machine's unit tests check early timers deterministically).
        let busy = tokio::spawn(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
        let mut timed = 0;
        for i in 0..20u32 {
            let (w, sig) = tx(100 + i, 100);
            let start = Instant::now();
            let out = sender.send(w, sig, &meta()).await;
            assert_eq!(out.landed, Some(Route::Relay), "{out:?}");
            if out.tpu_error.is_some() {
                // The TPU route failed at once (on a loaded machine the silent
                // leader's handshake may time out, and sends in its retry window
                // fail): a hedge on failure is due at once, not after the delay.
                continue;
            }
            timed += 1;
            let at = relay.calls().last().map(|c| c.at).unwrap();
            let after = at.duration_since(start);
            assert!(
                after >= Duration::from_millis(10),
                "send {i}: the relay had it {after:?} after the start; the delay is 10 ms"
            );
            assert!(out.hedged_after.unwrap() >= Duration::from_millis(10));
        }
        busy.abort();
        assert!(
            timed >= 10,
            "only {timed} of 20 hedges went out on the timer"
        );
        // The leader comes back: the TPU route takes it and nothing is hedged.
        path.set_blackhole(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (w, sig) = tx(2, 0);
            let out = sender.send(w, sig, &meta()).await;
            if out.landed == Some(Route::Tpu) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the TPU route never came back: {out:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// A sender trying `relay` first, the TPU route (to `rx`) after 200 ms or at its
/// failure.
fn relay_first(relay: serde_json::Value, rx: &TpuReceiver) -> std::sync::Arc<Sender> {
    let cfg = sender_config(json!({
        "tpu": {},
        "relay": relay,
        "leaders": {"static": []},
        "hedge_delay_ms": 200,
        "primary": "relay",
        "adaptive": false,
    }));
    Sender::new(
        &cfg,
        &key(2),
        Some(leader(rx.addr, Some(rx.identity))),
        None,
    )
    .unwrap()
}

#[test]
fn a_failing_primary_is_hedged_at_once_and_both_down_is_a_clear_error() {
    let rt = rt();
    let relay = Relay::start(None);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        // Relay first; it refuses → TPU at once, well before the 200 ms delay.
        relay.set_mode(Mode::Refuse(-32000, "bundle auction closed".into()));
        let sender = relay_first(json!({"url": relay.url}), &rx);
        let (w, sig) = tx(1, 0);
        let out = sender.send(w.clone(), sig, &meta()).await;
        assert_eq!(
            (out.primary, out.landed, out.hedged),
            (Route::Relay, Some(Route::Tpu), true)
        );
        assert!(
            out.hedged_after.unwrap() < Duration::from_millis(200),
            "{out:?}"
        );
        assert!(out
            .relay_error
            .as_deref()
            .unwrap()
            .contains("bundle auction closed"));
        assert_eq!(rx.wait_for(1, Duration::from_secs(2)).await, 1);
        assert_eq!(rx.received()[0].bytes, w.to_vec());
        // Both down: the TPU leader is gone and the relay answers 503.
        drop(rx);
        relay.set_mode(Mode::Status(503));
        let cfg = sender_config(json!({
            "tpu": {"connect_timeout_ms": 300},
            "relay": {"url": relay.url},
            "leaders": {"static": []},
            "hedge_delay_ms": 10,
            "adaptive": false,
        }));
        let gone: SocketAddr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let sender = Sender::new(&cfg, &key(2), Some(leader(gone, None)), None).unwrap();
        let (w, sig) = tx(3, 0);
        let t0 = Instant::now();
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(out.landed, None);
        assert!(out.hedged, "the relay was still tried");
        let e = out.error();
        assert!(
            e.contains("tpu:") && e.contains("relay:") && e.contains("503"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "a bounded failure");
    });
}

/// A relay's answer counts as a delivery only when it names the transaction.
/// A relay that redirects is not followed: its `x-jito-auth` would go to the
/// other host (reqwest drops only the standard credential headers), and a
/// `result` of `null` is not an id. Either way the TPU route takes the
/// transaction at once.
#[test]
fn a_relay_that_redirects_or_names_nothing_has_not_delivered() {
    let rt = rt();
    let relay = Relay::start(Some("relay-secret"));
    // Where a redirect points: it takes the same token.
    let elsewhere = Relay::start(Some("relay-secret"));
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let sender = relay_first(json!({"url": relay.url, "auth": "relay-secret"}), &rx);
        let cases = [
            (
                Mode::Redirect(format!("{}/api/v1/transactions", elsewhere.url)),
                "307",
            ),
            (Mode::Answer(serde_json::Value::Null), "null"),
            (Mode::Answer(json!({})), "{}"),
        ];
        for (i, (mode, said)) in cases.into_iter().enumerate() {
            relay.set_mode(mode);
            let (w, sig) = tx(40 + i as u32, 0);
            let out = sender.send(w, sig, &meta()).await;
            assert_eq!(
                (out.primary, out.landed, out.hedged),
                (Route::Relay, Some(Route::Tpu), true),
                "{out:?}"
            );
            let e = out.relay_error.unwrap_or_default();
            assert!(e.contains(said), "{e}");
        }
        assert_eq!(rx.wait_for(3, Duration::from_secs(2)).await, 3);
        assert!(
            elsewhere.calls().is_empty(),
            "the redirect was followed, the relay's token with it"
        );
    });
}

#[test]
fn route_statistics_move_the_first_try_to_the_route_that_lands() {
    let rt = rt();
    let relay = Relay::start(None);
    rt.block_on(async {
        let gone: SocketAddr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let cfg = sender_config(json!({
            "tpu": {"connect_timeout_ms": 200, "backoff_min_ms": 5000, "backoff_max_ms": 5000},
            "relay": {"url": relay.url},
            "leaders": {"static": []},
            "hedge_delay_ms": 5,
        }));
        let sender = Sender::new(&cfg, &key(2), Some(leader(gone, None)), None).unwrap();
        assert_eq!(sender.preferred(), Route::Tpu);
        for i in 0..3 {
            let (w, sig) = tx(i, 0);
            let out = sender.send(w, sig, &meta()).await;
            assert_eq!(out.landed, Some(Route::Relay));
        }
        // Give the TPU attempts time to fail (connect timeout) and be counted.
        let deadline = Instant::now() + Duration::from_secs(5);
        while sender.route_counts()[0].1 == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let [tpu, relay_counts] = sender.route_counts();
        assert!(tpu.1 >= 1, "TPU failures counted: {tpu:?}");
        assert!(
            relay_counts.0 >= 3 && relay_counts.1 == 0,
            "{relay_counts:?}"
        );
        assert_eq!(sender.preferred(), Route::Relay, "the relay goes first now");
        let (w, sig) = tx(9, 0);
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(
            (out.primary, out.landed, out.hedged),
            (Route::Relay, Some(Route::Relay), false)
        );
    });
}

#[test]
fn leaders_follow_a_solana_rpc_node() {
    let rt = rt();
    rt.block_on(async {
        let a = TpuReceiver::start(ReceiverConfig::default(), &key(11)).unwrap();
        let b = TpuReceiver::start(ReceiverConfig::default(), &key(12)).unwrap();
        let ida = bs58::encode(a.identity).into_string();
        let idb = bs58::encode(b.identity).into_string();
        let idc = bs58::encode(key(13).verifying_key().to_bytes()).into_string();
        // Epoch 7 starts at slot 1000; we are at slot 1010 (index 10).
        // Slots 8..11 → a, 12..15 → b, 16..19 → c (no tpuQuic: skipped), 20..23 → a.
        let schedule = json!({
            ida.clone(): [8, 9, 10, 11, 20, 21, 22, 23],
            idb.clone(): [12, 13, 14, 15],
            idc.clone(): [16, 17, 18, 19],
        });
        let nodes = json!([
            {"pubkey": ida, "tpuQuic": a.addr.to_string(), "gossip": "127.0.0.1:1"},
            {"pubkey": idb, "tpuQuic": b.addr.to_string()},
            {"pubkey": idc, "tpuQuic": null},
        ]);
        let (url, seen) = leader_node(schedule, nodes).await;
        let src = RpcLeaders::start(&url, Duration::from_millis(100), true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !src.ready() {
            assert!(
                Instant::now() < deadline,
                "never ready; calls: {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let up = src.upcoming(3);
        assert_eq!(
            up.iter().map(|l| l.tpu_quic).collect::<Vec<_>>(),
            vec![a.addr, b.addr],
            "current leader first, the one without a TPU address skipped, no repeats"
        );
        assert_eq!(up[0].identity, Some(a.identity));
        // Sending through it reaches the current leader, pinned to its identity.
        let cfg = sender_config(
            json!({"tpu": {}, "leaders": {"rpc": {"url": url}}, "hedge_delay_ms": 50}),
        );
        let sender = Sender::new(&cfg, &key(2), Some(src as Arc<dyn LeaderSource>), None).unwrap();
        // Upcoming leaders are connected before anything is sent to them.
        sender.refresh_leaders();
        let deadline = Instant::now() + Duration::from_secs(5);
        while b
            .stats
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            assert!(
                Instant::now() < deadline,
                "the next leader was not pre-warmed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (w, sig) = tx(5, 0);
        let out = sender.send(w.clone(), sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Tpu), "{out:?}");
        assert_eq!(a.wait_for(1, Duration::from_secs(2)).await, 1);
        assert_eq!(b.count(), 0);
        let calls = seen.lock().unwrap().clone();
        for m in [
            "getSlot",
            "getEpochInfo",
            "getLeaderSchedule",
            "getClusterNodes",
        ] {
            assert!(calls.iter().any(|c| c == m), "{m} was used: {calls:?}");
        }
    });
}

/// A Solana RPC node for a leader source at `/`, in epoch 7 (from slot 1000) at
/// slot 1010, with `schedule` and `nodes`: its URL, and the methods called.
async fn leader_node(
    schedule: serde_json::Value,
    nodes: serde_json::Value,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |axum::Json(req): axum::Json<serde_json::Value>| {
            let (schedule, nodes, seen) = (schedule.clone(), nodes.clone(), seen2.clone());
            async move {
                let m = req["method"].as_str().unwrap_or("").to_owned();
                seen.lock().unwrap().push(m.clone());
                let result = match m.as_str() {
                    "getSlot" => json!(1010),
                    "getEpochInfo" => json!({"epoch": 7, "slotIndex": 10, "absoluteSlot": 1010, "slotsInEpoch": 432000}),
                    "getLeaderSchedule" => schedule,
                    "getClusterNodes" => nodes,
                    _ => return axum::Json(json!({"jsonrpc":"2.0","error":{"code":-32601,"message":"no"},"id":1})),
                };
                axum::Json(json!({"jsonrpc": "2.0", "result": result, "id": req["id"]}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

/// A Solana RPC node whose slot the test moves (`slot`), with epochs of 100
/// slots from slot 0 (epoch 10 starts at slot 1000); `schedules` by epoch (an
/// epoch without one is answered `null`, as a node that does not know it yet).
/// `getEpochInfo` answers for `epoch_slot` while it is not 0 (a node behind).
async fn driven_leader_node(
    slot: Arc<std::sync::atomic::AtomicU64>,
    epoch_slot: Arc<std::sync::atomic::AtomicU64>,
    schedules: std::collections::HashMap<u64, serde_json::Value>,
    nodes: serde_json::Value,
) -> (
    String,
    Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |axum::Json(req): axum::Json<serde_json::Value>| {
            let (slot, schedules, nodes, seen) = (
                slot.clone(),
                schedules.clone(),
                nodes.clone(),
                seen2.clone(),
            );
            let behind = epoch_slot.load(Relaxed);
            async move {
                let m = req["method"].as_str().unwrap_or("").to_owned();
                seen.lock()
                    .unwrap()
                    .push((m.clone(), req["params"].clone()));
                let now = slot.load(Relaxed);
                let result = match m.as_str() {
                    "getSlot" => json!(now),
                    "getEpochInfo" => {
                        let at = if behind > 0 { behind } else { now };
                        json!({"epoch": at / 100, "slotIndex": at % 100,
                            "absoluteSlot": at, "slotsInEpoch": 100})
                    }
                    "getLeaderSchedule" => {
                        let at = req["params"][0].as_u64().unwrap_or(now);
                        schedules
                            .get(&(at / 100))
                            .cloned()
                            .unwrap_or(serde_json::Value::Null)
                    }
                    "getClusterNodes" => nodes,
                    _ => {
                        return axum::Json(
                            json!({"jsonrpc":"2.0","error":{"code":-32601,"message":"no"},"id":1}),
                        )
                    }
                };
                axum::Json(json!({"jsonrpc": "2.0", "result": result, "id": req["id"]}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

/// Near an epoch's end the next epoch's schedule is fetched, so its first
/// leaders are known (and warmed) before the boundary and the source never
/// runs dry there; across the boundary the fetched schedule becomes the current
/// one. A node that reports a slot behind one it reported before (a pool of
/// nodes behind one URL) does not move the leaders back.
#[test]
fn leaders_carry_over_an_epochs_end_and_never_go_back() {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = rt();
    rt.block_on(async {
        let [a, b, c] =
            [11u8, 12, 13].map(|i| TpuReceiver::start(ReceiverConfig::default(), &key(i)).unwrap());
        let id = |r: &TpuReceiver| bs58::encode(r.identity).into_string();
        // Epoch 10 (slots 1000..1100): a for 0..96, b for its last 4 slots.
        // Epoch 11: c for its first 4 slots, then a.
        let e10: Vec<u64> = (0..96).collect();
        let e11: Vec<u64> = (4..100).collect();
        let schedules = std::collections::HashMap::from([
            (10, json!({id(&a): e10, id(&b): [96, 97, 98, 99]})),
            (11, json!({id(&c): [0, 1, 2, 3], id(&a): e11})),
        ]);
        let nodes = json!([a.addr, b.addr, c.addr]
            .iter()
            .zip([&a, &b, &c])
            .map(|(addr, r)| json!({"pubkey": id(r), "tpuQuic": addr.to_string()}))
            .collect::<Vec<_>>());
        let slot = Arc::new(std::sync::atomic::AtomicU64::new(1010));
        let (url, seen) = driven_leader_node(slot.clone(), Arc::default(), schedules, nodes).await;
        let src = RpcLeaders::start(&url, Duration::from_millis(50), true).unwrap();
        let leaders = |n| -> Vec<std::net::SocketAddr> {
            src.upcoming(n).iter().map(|l| l.tpu_quic).collect()
        };
        let wait = |want: Vec<std::net::SocketAddr>, why: &str| {
            let (src_leaders, why) = (&leaders, why.to_owned());
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                while src_leaders(3) != want {
                    assert!(
                        Instant::now() < deadline,
                        "{why}: {:?}, want {want:?}",
                        src_leaders(3)
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        wait(vec![a.addr, b.addr], "mid-epoch: this epoch's leaders only").await;
        // 60 slots before the end: the next epoch's schedule comes with the rest.
        slot.store(1040, Relaxed);
        wait(
            vec![a.addr, b.addr, c.addr],
            "the next epoch's first leader",
        )
        .await;
        let ahead = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| m == "getLeaderSchedule" && p[0] == 1100)
            .count();
        assert!(ahead >= 1, "fetched by the next epoch's first slot");
        // b's turn, the epoch's last; then a node behind (slot 1090, a's): the
        // leaders do not move back to slots that have passed.
        slot.store(1096, Relaxed);
        wait(vec![b.addr, c.addr, a.addr], "the epoch's last leader").await;
        let slot_calls = |seen: &std::sync::Mutex<Vec<(String, serde_json::Value)>>| {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(m, _)| m == "getSlot")
                .count()
        };
        let asked = slot_calls(&seen);
        slot.store(1090, Relaxed);
        // Two refreshes that read the slot behind.
        let deadline = Instant::now() + Duration::from_secs(5);
        while slot_calls(&seen) < asked + 3 {
            assert!(Instant::now() < deadline, "no refresh");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            leaders(3),
            vec![b.addr, c.addr, a.addr],
            "a slot reported behind is not taken"
        );
        // Across the boundary: the schedule fetched ahead is the current one —
        // the epoch asked for (its length), no schedule fetched again.
        let calls_before = seen.lock().unwrap().len();
        slot.store(1101, Relaxed);
        wait(vec![c.addr, a.addr], "the new epoch").await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.lock().unwrap()[calls_before..]
            .iter()
            .any(|(m, _)| m == "getEpochInfo")
        {
            assert!(
                Instant::now() < deadline,
                "the new epoch's length was not asked"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let refetched: Vec<_> = seen.lock().unwrap()[calls_before..]
            .iter()
            .filter(|(m, _)| m == "getLeaderSchedule")
            .cloned()
            .collect();
        assert!(refetched.is_empty(), "{refetched:?}");
    });
}

/// A node still in the epoch before when the source crosses into the epoch it
/// fetched ahead (one of a pool behind one URL, lagging) leaves the new epoch's
/// length unknown for that answer: it is asked again, and the epoch after is
/// still fetched ahead of its boundary (it was not, for the whole epoch).
#[test]
fn a_node_behind_at_the_boundary_does_not_stop_the_next_prefetch() {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = rt();
    rt.block_on(async {
        let a = TpuReceiver::start(ReceiverConfig::default(), &key(11)).unwrap();
        let id = bs58::encode(a.identity).into_string();
        let all: Vec<u64> = (0..100).collect();
        let schedules = std::collections::HashMap::from([
            (10, json!({id.clone(): all.clone()})),
            (11, json!({id.clone(): all.clone()})),
            (12, json!({id.clone(): all})),
        ]);
        let nodes = json!([{"pubkey": id, "tpuQuic": a.addr.to_string()}]);
        let slot = Arc::new(std::sync::atomic::AtomicU64::new(1040));
        let behind = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (url, seen) = driven_leader_node(slot.clone(), behind.clone(), schedules, nodes).await;
        let src = RpcLeaders::start(&url, Duration::from_millis(50), true).unwrap();
        let fetched = |first: u64| {
            seen.lock()
                .unwrap()
                .iter()
                .any(|(m, p)| m == "getLeaderSchedule" && p[0] == first)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fetched(1100) {
            assert!(Instant::now() < deadline, "epoch 11 not fetched ahead");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Across the boundary, while the node answering getEpochInfo is behind.
        behind.store(1099, Relaxed);
        let asked = seen.lock().unwrap().len();
        slot.store(1101, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.lock().unwrap()[asked..]
            .iter()
            .any(|(m, _)| m == "getEpochInfo")
        {
            assert!(Instant::now() < deadline, "the new epoch not asked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        behind.store(0, Relaxed);
        assert_eq!(src.upcoming(1).len(), 1);
        // 50 slots before epoch 12: its schedule is fetched ahead.
        slot.store(1150, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fetched(1200) {
            assert!(Instant::now() < deadline, "epoch 12 not fetched ahead");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// A leader schedule with a slot index no epoch has is refused whole (the source
/// never becomes ready on it), where the same schedule without it is taken; the
/// source describes its node without the URL's path and query.
#[test]
fn a_leader_schedule_beyond_an_epoch_is_refused() {
    let rt = rt();
    rt.block_on(async {
        let a = TpuReceiver::start(ReceiverConfig::default(), &key(11)).unwrap();
        let ida = bs58::encode(a.identity).into_string();
        let nodes = json!([{"pubkey": ida, "tpuQuic": a.addr.to_string()}]);
        for (indexes, taken) in [
            (json!([8, 9, 10, 11, 1u64 << 20]), false),
            (json!([8, 9, 10, 11, u64::MAX]), false),
            (json!([8, 9, 10, 11, 20]), true),
        ] {
            let (url, seen) = leader_node(json!({ida.clone(): indexes}), nodes.clone()).await;
            let src = RpcLeaders::start(
                &format!("{url}/?api-key=k3y-SECRET"),
                Duration::from_millis(50),
                true,
            )
            .unwrap();
            assert!(!src.describe().contains("SECRET"), "{}", src.describe());
            // Refused ones are asked for again at the next refresh, the wait
            // doubling from 50 ms while refreshes fail: 1.5 s is 5 refreshes.
            let wait = if taken { 10_000 } else { 1500 };
            let deadline = Instant::now() + Duration::from_millis(wait);
            while !src.ready() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let schedules = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|m| *m == "getLeaderSchedule")
                .count();
            if !taken {
                // Refused, so asked for again at the next refreshes.
                assert!(schedules >= 2, "{indexes}: {schedules} schedule calls");
            }
            assert_eq!(src.ready(), taken, "{indexes}");
            assert_eq!(src.upcoming(1).len(), usize::from(taken), "{indexes}");
        }
    });
}

#[test]
fn the_boosted_phase_puts_more_bytes_in_flight() {
    let rt = rt();
    rt.block_on(async {
        let mut flown = Vec::new();
        for boost in [false, true] {
            let rx = TpuReceiver::start(
                ReceiverConfig {
                    keep: false,
                    ..ReceiverConfig::default()
                },
                &key(1),
            )
            .unwrap();
            // 40 ms each way: nothing is acknowledged for 80 ms, so what leaves in
            // the first 60 ms after the burst starts is what the window allows.
            let path = DelayProxy::start(rx.addr, Duration::from_millis(40));
            let cfg: TpuConfig = serde_json::from_value(json!({
                "congestion": {"algorithm": "cubic", "boost_gain": 4.0, "decay_ms": 0}
            }))
            .unwrap();
            let client = TpuClient::new(cfg, &key(2)).unwrap();
            let l = Leader {
                tpu_quic: path.addr,
                identity: None,
            };
            client.prewarm(&[l]);
            let deadline = Instant::now() + Duration::from_secs(5);
            let conn = loop {
                if let Some(c) = client.connection(path.addr) {
                    break c;
                }
                assert!(Instant::now() < deadline, "no connection");
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            tokio::time::sleep(Duration::from_millis(300)).await; // handshake settled
            client.set_phase(path.addr, boost);
            let before = conn.stats().path.cwnd;
            let t0 = Instant::now();
            let mut waits = Vec::new();
            for i in 0..120 {
                waits.push(client.submit(&l, tx(i, 1000).0).unwrap());
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
            let early = path.bytes_between(t0, Duration::from_millis(60));
            let cwnd = conn.stats().path.cwnd;
            for w in waits {
                w.await.unwrap().unwrap();
            }
            assert_eq!(rx.count(), 120);
            eprintln!("boost={boost}: cwnd before {before}, during {cwnd}, bytes in the first 60 ms {early}");
            flown.push((early, cwnd, before));
        }
        let (plain, boosted) = (flown[0], flown[1]);
        // The windows themselves: the inner window grows with every ACK (slow start),
        // so compare the boosted one with the initial window it started from (x4
        // at least x3 whatever the ACKs did), not with the plain run at the same moment.
        assert!(
            boosted.1 >= boosted.2 * 3,
            "boosted window {} vs initial {}",
            boosted.1,
            boosted.2
        );
        assert!(
            boosted.0 as f64 >= plain.0 as f64 * 2.0,
            "bytes in flight before the first ACK: {} boosted vs {} plain",
            boosted.0,
            plain.0
        );
    });
}

#[test]
fn a_full_leader_queue_drops_and_counts_instead_of_growing() {
    let rt = rt();
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        // A silent path keeps the worker in its handshake, so jobs wait in the queue.
        let path = DelayProxy::start(rx.addr, Duration::ZERO);
        path.set_blackhole(true);
        let cfg: TpuConfig = serde_json::from_value(json!({
            "queue_per_leader": 2, "connect_timeout_ms": 2000
        }))
        .unwrap();
        let client = TpuClient::new(cfg, &key(2)).unwrap();
        let l = Leader {
            tpu_quic: path.addr,
            identity: None,
        };
        client.prewarm(&[l]);
        tokio::time::sleep(Duration::from_millis(50)).await; // the worker is connecting
        let a = client.submit(&l, tx(1, 0).0).unwrap();
        let b = client.submit(&l, tx(2, 0).0).unwrap();
        assert_eq!(
            client.submit(&l, tx(3, 0).0).err(),
            Some(TpuError::QueueFull(path.addr))
        );
        assert_eq!(
            client
                .stats
                .dropped_full
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // The queued ones are not lost: they fail cleanly when the handshake gives up.
        for d in [a, b] {
            let r = tokio::time::timeout(Duration::from_secs(5), d)
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(r, Err(TpuError::Unreachable(..))), "{r:?}");
        }
    });
}

#[test]
fn the_relay_has_a_deadline_and_names_its_errors() {
    let relay = Relay::start(Some("secret-token"));
    let rt = rt();
    rt.block_on(async {
        use gw_sidecar::sender::relay::{RelayClient, RelayConfig, RelayError};
        let cfg: RelayConfig = serde_json::from_value(json!({
            "url": relay.url, "auth": "secret-token", "timeout_ms": 200
        }))
        .unwrap();
        assert!(
            !format!("{cfg:?}").contains("secret-token"),
            "the token is never printed"
        );
        let c = RelayClient::new(&cfg).unwrap();
        let (w, sig) = tx(1, 0);
        assert_eq!(c.send_transaction(&w).await, Ok(sig));
        relay.set_mode(Mode::Delay(Duration::from_secs(2)));
        let t0 = Instant::now();
        assert_eq!(
            c.send_transaction(&w).await,
            Err(RelayError::Timeout(Duration::from_millis(200)))
        );
        assert!(t0.elapsed() < Duration::from_secs(1));
        relay.set_mode(Mode::Accept);
        let bundle: Vec<Bytes> = (0..6).map(|i| tx(i, 0).0).collect();
        assert_eq!(c.send_bundle(&bundle).await, Err(RelayError::BundleSize(6)));
        let id = c.send_bundle(&bundle[..5]).await.unwrap();
        assert_eq!(id.len(), 64);
        let last = relay.calls().pop().unwrap();
        assert_eq!((last.method.as_str(), last.txs.len()), ("sendBundle", 5));
        let wrong =
            RelayClient::new(&serde_json::from_value(json!({"url": relay.url})).unwrap()).unwrap();
        match wrong.send_transaction(&w).await {
            Err(RelayError::Http(401, _)) => {}
            other => panic!("expected 401 without the token, got {other:?}"),
        }
    });
}

#[test]
fn a_stalled_route_saturates_the_hot_path_instead_of_piling_up_sends() {
    use gw_core::args::CommandArgs;
    use gw_core::module_state::Modules;
    use gw_core::{Action, Module};
    use gw_sidecar::sender::strategy::{HotPath, Opportunity, SignedTx, Skip, StrategyConfig};
    let rt = rt();
    let path = DelayProxy::start("127.0.0.1:9".parse().unwrap(), Duration::ZERO);
    path.set_blackhole(true); // the only route never answers
    let cfg = sender_config(json!({
        "tpu": {"connect_timeout_ms": 5000},
        "leaders": {"static": []},
        "hedge_delay_ms": 10,
    }));
    let sender = rt.block_on(async {
        Sender::new(&cfg, &key(2), Some(leader(path.addr, None)), None).unwrap()
    });
    let mut modules = Modules::new();
    modules.apply(Module::Mev, Action::Start, &CommandArgs::default(), "t");
    let strategy: StrategyConfig = serde_json::from_value(json!({"max_inflight": 3})).unwrap();
    let hot = HotPath::start(
        &strategy,
        sender,
        gw_sidecar::control::ModuleTable::from(modules),
        None,
        rt.handle().clone(),
        None,
    )
    .unwrap();
    let opps: Vec<Opportunity> = (0..10)
        .map(|i| {
            let (wire, signature) = tx(i, 0);
            Opportunity {
                module: Module::Mev,
                features: Vec::new(),
                ev: Some(1.0),
                txs: vec![SignedTx { wire, signature }],
                received: Instant::now(),
                requester: Default::default(),
            }
        })
        .collect();
    assert_eq!(hot.offer(opps), 10);
    let deadline = Instant::now() + Duration::from_secs(3);
    while hot.stats.skipped(Skip::Saturated) < 7 {
        assert!(Instant::now() < deadline, "saturation not reached");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(hot.stats.sent.load(std::sync::atomic::Ordering::Relaxed), 3);
    drop(hot);
}

/// Submits transaction after transaction (numbered from `i` on) to a leader
/// that accepts again, until one is delivered, within `within`: that one.
async fn first_delivered(
    client: &TpuClient,
    leader: &Leader,
    i: &mut u32,
    within: Duration,
) -> Bytes {
    let deadline = Instant::now() + within;
    loop {
        *i += 1;
        let w = tx(*i, 0).0;
        if let Ok(Ok(Ok(()))) = tokio::time::timeout(
            Duration::from_secs(3),
            client.submit(leader, w.clone()).unwrap(),
        )
        .await
        {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "the leader accepts again, the client does not"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn closes(client: &TpuClient, reason: &str) -> u64 {
    let i = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap();
    client.stats.closes[i].load(Ordering::Relaxed)
}

/// A leader that refuses the connection before its handshake (Agave's
/// `Incoming::refuse` when its connection table is full: `CONNECTION_REFUSED`)
/// is backed off as a refusing leader and, with nothing to send, not tried again:
/// it was taken for an unreachable one and handshaken with about 8 times a
/// minute, for as long as it stayed an upcoming leader. With something to send
/// it is tried again, and once it accepts the transaction arrives.
#[test]
fn a_leader_refusing_at_the_handshake_is_not_retried_for_nothing() {
    rt().block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        rx.refuse_incoming(true);
        let cfg = TpuConfig {
            refused_backoff_min_ms: 500,
            ..TpuConfig::default()
        };
        let client = TpuClient::new(cfg, &key(2)).unwrap();
        let leader = Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        };
        let attempts = || rx.stats.refused_incoming.load(Ordering::Relaxed);
        client.prewarm(&[leader]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            attempts(),
            1,
            "a refusing leader is not retried for nothing"
        );
        assert_eq!(client.stats.handshakes_refused.load(Ordering::Relaxed), 1);
        rx.refuse_incoming(false);
        let mut i = 0;
        let sent = first_delivered(&client, &leader, &mut i, Duration::from_secs(20)).await;
        assert_eq!(
            rx.received().last().map(|r| r.bytes.clone()),
            Some(sent.to_vec())
        );
        assert_eq!(attempts(), 1, "no attempt while it refused after the first");
    });
}

#[test]
fn a_refusing_leader_sees_no_reconnect_storm_and_nothing_is_lost_once_it_accepts() {
    rt().block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        rx.refuse_with(CLOSE_DISALLOWED);
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let leader = Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        };
        let handshakes = || rx.stats.connections.load(Ordering::Relaxed);

        // Pre-warm only, nothing to send: one handshake, refused, then quiet (the
        // old client made 1 894 handshakes in a second here).
        client.prewarm(&[leader]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            handshakes(),
            1,
            "a refusing leader is not retried for nothing"
        );
        assert_eq!(closes(&client, "disallowed"), 1);

        // Transactions queued all the time for 10 s: a handful of handshakes, each
        // refused, and every transaction answered at once (so the hedge can go).
        let before = handshakes();
        let start = Instant::now();
        let mut answered = 0;
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(10) {
            i += 1;
            match client.submit(&leader, tx(i, 0).0) {
                Ok(d) => {
                    let r = tokio::time::timeout(Duration::from_secs(3), d).await;
                    match r {
                        Ok(Ok(Err(
                            TpuError::Unreachable(..) | TpuError::Stream(..) | TpuError::Unread(..),
                        ))) => {
                            answered += 1;
                        }
                        other => panic!("transaction {i}: {other:?}"),
                    }
                }
                Err(e) => panic!("submit {i}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let during = handshakes() - before;
        assert!(
            (1..=5).contains(&during),
            "{during} handshakes in 10 s with work queued (≤ 5)"
        );
        assert!(answered >= 100, "{answered} transactions answered");
        println!("refused: 1 handshake in 3 s of pre-warm, {during} in 10 s with {answered} transactions queued");
        assert_eq!(rx.count(), 0);
        let refused = rx.stats.closed_after_handshake.load(Ordering::Relaxed);
        assert_eq!(refused, handshakes());
        assert_eq!(closes(&client, "disallowed"), refused);

        // The budget frees: once the backoff runs out a transaction gets through,
        // and from then on every one arrives, byte-identical.
        rx.refuse_with(0);
        let first = first_delivered(&client, &leader, &mut i, Duration::from_secs(70)).await;
        let mut sent = vec![first];
        let mut pending = Vec::new();
        for k in 0..200 {
            let w = tx(1_000_000 + k, 0).0;
            pending.push(client.submit(&leader, w.clone()).unwrap());
            sent.push(w);
        }
        for p in pending {
            assert_eq!(p.await.unwrap(), Ok(()));
        }
        assert_eq!(rx.wait_for(201, Duration::from_secs(5)).await, 201);
        let mut got: Vec<Vec<u8>> = rx.received().into_iter().map(|r| r.bytes).collect();
        let mut want: Vec<Vec<u8>> = sent.iter().map(|b| b.to_vec()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "nothing lost, nothing changed");
    });
}

/// Agave drops an established connection (close code 1, `dropped`) to make room
/// for another peer under load. A working connection dropped so is not a refusal
/// that escalates: each time, the client is back after the first step of the
/// refused backoff (1 to 1.5 s), where it waited 1, 2, 4, 8 … up to 60 s, and
/// every transaction sent between the drops arrives.
#[test]
fn a_working_connection_the_leader_drops_again_and_again_is_back_after_the_first_step() {
    rt().block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let leader = Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        };
        let mut i = 0;
        let mut delivered = Vec::new();
        // Six drops: seven handshakes in all, within the per-leader cap (8 a minute).
        for round in 0..=6u64 {
            let start = Instant::now();
            loop {
                i += 1;
                let w = tx(i, 0).0;
                let d = client.submit(&leader, w.clone()).unwrap();
                if let Ok(Ok(Ok(()))) = tokio::time::timeout(Duration::from_secs(3), d).await {
                    delivered.push(w);
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(3),
                    "round {round}: the leader out of reach for {:?}",
                    start.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if round == 6 {
                break;
            }
            // It carried a stream: a working connection, dropped by the leader.
            assert_eq!(rx.evict_with(1), 1, "round {round}");
            let deadline = Instant::now() + Duration::from_secs(3);
            while closes(&client, "dropped") <= round {
                assert!(Instant::now() < deadline, "round {round}: drop not seen");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(closes(&client, "dropped"), 6);
        assert_eq!(rx.stats.connections.load(Ordering::Relaxed), 7);
        assert_eq!(rx.wait_for(7, Duration::from_secs(5)).await, 7);
        let mut got: Vec<Vec<u8>> = rx.received().into_iter().map(|r| r.bytes).collect();
        let mut want: Vec<Vec<u8>> = delivered.iter().map(|b| b.to_vec()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    });
}

/// A leader that completes the handshake and then never grants a stream (alive:
/// it answers keep-alives, so QUIC's idle timeout never ends the connection)
/// would hold every send to it forever, and the hot path's `max_inflight` with
/// them: once no stream was acknowledged for `stall_timeout_ms` while some
/// waited, the connection is closed as stalled, every send on it fails (saying
/// so, so the hedge goes), and the leader is backed off as a refusing one.
#[test]
fn a_leader_that_grants_no_stream_stalls_its_connection_and_sends_fail() {
    rt().block_on(async {
        let silent = ReceiverConfig {
            max_streams: 0,
            ..ReceiverConfig::default()
        };
        let rx = TpuReceiver::start(silent, &key(1)).unwrap();
        let cfg: TpuConfig = serde_json::from_value(json!({
            "stall_timeout_ms": 300, "idle_timeout_ms": 1000, "stable_after_ms": 100,
        }))
        .unwrap();
        let client = TpuClient::new(cfg, &key(2)).unwrap();
        let leader = Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        };
        let t0 = Instant::now();
        // One through the leader's worker; once connected, one on this task.
        let queued = client.submit(&leader, tx(1, 0).0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while client.connection(rx.addr).is_none() {
            assert!(Instant::now() < deadline, "no handshake");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let direct = client.send(&leader, tx(2, 0).0).unwrap();
        // Both wait on the connection at once (the direct one on this task).
        let (queued, direct) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(queued, direct)
        })
        .await
        .expect("sends to a leader granting no stream never ended");
        let waited = t0.elapsed();
        // No stream was granted, so none was written: the leader cannot have
        // them (`Unread`, not `Stream`: no rebroadcast on a guess).
        for r in [queued.unwrap(), direct.unwrap()] {
            match r {
                Err(TpuError::Unread(_, e)) => assert!(e.contains("stalled"), "{e}"),
                other => panic!("not failed as stalled, unread: {other:?}"),
            }
        }
        // The stall ended them (keep-alives hold the connection open past its
        // idle timeout: the `stalled` error above says which ended them; no
        // upper bound on a loaded machine).
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        // Counted by the worker as it notices the close (another thread).
        while closes(&client, "stalled") == 0 {
            assert!(Instant::now() < deadline, "the stall is not counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(closes(&client, "stalled"), 1);
        assert_eq!(closes(&client, "local"), 0);
        assert_eq!(client.stats.delivered.load(Ordering::Relaxed), 0);
        assert_eq!(rx.count(), 0);
        // Backed off as a refusing leader: the next send fails at once, unsent.
        match client.submit(&leader, tx(3, 0).0).unwrap().await.unwrap() {
            Err(TpuError::Unreachable(_, e)) => assert!(e.contains("stalled"), "{e}"),
            other => panic!("not backed off: {other:?}"),
        }
        // Stalled again, the wait doubles (1 to 1.5 s, then 2 to 3 s): a stall
        // is a refusal even on a connection that stayed up past
        // `stable_after_ms` (the default 2 s equals the default stall timeout).
        async fn send_until(client: &TpuClient, leader: &Leader, rx: &TpuReceiver, n: u64) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut i = 100 * n as u32;
            while rx.stats.connections.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "no handshake {n}");
                i += 1;
                drop(client.submit(leader, tx(i, 0).0));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        send_until(&client, &leader, &rx, 2).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while closes(&client, "stalled") < 2 {
            assert!(Instant::now() < deadline, "not stalled again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = Instant::now();
        send_until(&client, &leader, &rx, 3).await;
        let waited = second.elapsed();
        assert!(
            waited >= Duration::from_millis(1900),
            "backed off {waited:?}, not doubled"
        );
    });
}

/// A leader's address taken over by another validator (the schedule now names
/// another identity there): its transactions go to the new identity over a link
/// that pins it, not over the old link whose pin refuses the new key; a send
/// naming the old identity there (stale gossip) fails on a link of its own and
/// does not tear down the new identity's.
#[test]
fn an_address_taken_over_by_another_identity_gets_its_own_link() {
    rt().block_on(async {
        let old = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let addr = old.addr;
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let was = Leader {
            tpu_quic: addr,
            identity: Some(old.identity),
        };
        assert_eq!(
            client.submit(&was, tx(1, 0).0).unwrap().await.unwrap(),
            Ok(())
        );
        drop(old);
        // Its port is free once its endpoint's driver has let go of the socket.
        let deadline = Instant::now() + Duration::from_secs(5);
        let new = loop {
            let at_same = ReceiverConfig {
                listen: addr,
                ..ReceiverConfig::default()
            };
            match TpuReceiver::start(at_same, &key(3)) {
                Ok(r) => break r,
                Err(e) => assert!(Instant::now() < deadline, "{addr} not free: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let now = Leader {
            tpu_quic: addr,
            identity: Some(new.identity),
        };
        assert_eq!(
            client.send(&now, tx(2, 0).0).unwrap().await.unwrap(),
            Ok(()),
            "sent to the identity the schedule names now"
        );
        assert_eq!(new.wait_for(1, Duration::from_secs(3)).await, 1);
        // The old identity at that address (stale gossip) is not believed: its
        // pin refuses the key the address presents now; and its link leaves the
        // new identity's alone.
        let r = client.submit(&was, tx(3, 0).0).unwrap().await.unwrap();
        assert!(r.is_err(), "{r:?}");
        assert_eq!(new.count(), 1);
        let conn = client.connection(addr).expect("the new identity's link");
        assert_eq!(
            client.send(&now, tx(4, 0).0).unwrap().await.unwrap(),
            Ok(())
        );
        assert_eq!(new.wait_for(2, Duration::from_secs(3)).await, 2);
        assert_eq!(
            client.connection(addr).map(|c| c.stable_id()),
            Some(conn.stable_id()),
            "the same connection carried it"
        );
    });
}

#[test]
fn a_stable_connection_that_ends_is_replaced_at_once() {
    rt().block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let client = TpuClient::new(TpuConfig::default(), &key(2)).unwrap();
        let leader = Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        };
        // A connection that carried a transaction is stable.
        assert_eq!(
            client.submit(&leader, tx(1, 0).0).unwrap().await.unwrap(),
            Ok(())
        );
        let conn = client.connection(rx.addr).unwrap();
        // The connection ends for a reason that is not a refusal (closed here).
        conn.close(0u32.into(), b"test");
        let t = Instant::now();
        loop {
            if client
                .connection(rx.addr)
                .is_some_and(|c| c.stable_id() != conn.stable_id())
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "not reconnected at once"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(closes(&client, "local"), 1);
        assert_eq!(
            client.submit(&leader, tx(2, 0).0).unwrap().await.unwrap(),
            Ok(())
        );
        assert_eq!(rx.wait_for(2, Duration::from_secs(3)).await, 2);
    });
}

/// `route_policy: tpu_first` with a warm leader: the first transaction of a fresh
/// sender goes to the TPU and is not hedged (the relay costs a tip); a leader that
/// goes silent is left for the relay only after `relay_failover_ms` (not
/// `hedge_delay_ms`), and once the TPU's delivery estimate has dropped the relay
/// goes early again.
#[test]
fn tpu_first_keeps_the_relay_for_failures_and_warm_leaders_need_no_hedge() {
    let rt = rt();
    let relay = Relay::start(None);
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let path = DelayProxy::start(rx.addr, Duration::ZERO);
        let cfg = sender_config(json!({
            "tpu": {"connect_timeout_ms": 400, "backoff_min_ms": 50, "backoff_max_ms": 50,
                    "idle_timeout_ms": 1000},
            "relay": {"url": relay.url},
            "leaders": {"static": []},
            "hedge_delay_ms": 10,
            "relay_failover_ms": 300,
            "route_policy": "tpu_first",
        }));
        let sender = Sender::new(
            &cfg,
            &key(2),
            Some(leader(path.addr, Some(rx.identity))),
            None,
        )
        .unwrap();
        // Warm before the first send, as the plane's slot loop does.
        sender.refresh_leaders();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.stats.connections.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "the leader was not connected ahead"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for i in 0..20 {
            let (w, sig) = tx(i, 0);
            let out = sender.send(w, sig, &meta()).await;
            assert_eq!(
                (out.primary, out.landed, out.hedged),
                (Route::Tpu, Some(Route::Tpu), false),
                "send {i}: {out:?}"
            );
        }
        assert_eq!(relay.calls().len(), 0, "no tip paid while the TPU lands");
        assert_eq!(rx.stats.connections.load(Ordering::Relaxed), 1);
        assert!(sender.tpu_delivery().unwrap() > 0.99);

        // Silent leader (a warm connection that gets no answer, so nothing fails
        // before QUIC's idle timeout): no hedge at 10 ms; the relay at the 300 ms
        // failover deadline.
        path.set_blackhole(true);
        let (w, sig) = tx(100, 0);
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Relay), "{out:?}");
        let after = out.hedged_after.unwrap();
        assert!(
            after >= Duration::from_millis(290) && after < Duration::from_secs(2),
            "the relay went out {after:?} after the start; failover is 300 ms: {out:?}"
        );
        // Keep sending until the estimate is below 0.9 (each failure weighs 0.1).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 200;
        while sender.tpu_delivery().unwrap() >= 0.9 {
            assert!(Instant::now() < deadline, "{:?}", sender.tpu_delivery());
            let (w, sig) = tx(n, 0);
            n += 1;
            assert_eq!(
                sender.send(w, sig, &meta()).await.landed,
                Some(Route::Relay)
            );
        }
        // Below the threshold: the relay goes early (at the 10 ms hedge delay, or
        // at once when the TPU route fails first), well before the failover deadline.
        let (w, sig) = tx(999, 0);
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Relay), "{out:?}");
        assert!(
            out.hedged_after.unwrap() < Duration::from_millis(200),
            "{out:?}"
        );
        // tpu_first with the relay first is a contradiction, refused.
        let bad = sender_config(json!({
            "tpu": {}, "relay": {"url": relay.url}, "leaders": {"static": []},
            "route_policy": "tpu_first", "primary": "relay",
        }));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("sender.primary"));
    });
}

/// `leader_deny` / `leader_allow`: a refused leader is never connected to nor sent
/// to; when every upcoming leader is refused the relay takes the transaction.
#[test]
fn leader_allow_and_deny_lists_apply_before_sending_and_connecting() {
    let rt = rt();
    let relay = Relay::start(None);
    rt.block_on(async {
        let denied = TpuReceiver::start(ReceiverConfig::default(), &key(11)).unwrap();
        let allowed = TpuReceiver::start(ReceiverConfig::default(), &key(12)).unwrap();
        let b58 = |k: [u8; 32]| bs58::encode(k).into_string();
        let both: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![
            Leader {
                tpu_quic: denied.addr,
                identity: Some(denied.identity),
            },
            Leader {
                tpu_quic: allowed.addr,
                identity: Some(allowed.identity),
            },
        ]));
        let cfg = sender_config(json!({
            "tpu": {},
            "relay": {"url": relay.url},
            "leaders": {"static": []},
            "fanout": 2,
            "route_policy": "tpu_first",
            "leader_deny": [b58(denied.identity)],
        }));
        let sender = Sender::new(&cfg, &key(2), Some(both.clone()), None).unwrap();
        sender.refresh_leaders();
        let (w, sig) = tx(1, 0);
        let out = sender.send(w.clone(), sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Tpu), "{out:?}");
        assert_eq!(allowed.wait_for(1, Duration::from_secs(2)).await, 1);
        assert_eq!(allowed.received()[0].bytes, w.to_vec());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(denied.count(), 0, "a denied leader got the transaction");
        assert_eq!(
            denied.stats.connections.load(Ordering::Relaxed),
            0,
            "a denied leader was connected to"
        );
        assert_eq!(sender.stats.leaders_refused.load(Ordering::Relaxed), 1);

        // An allow list naming neither: the TPU route refuses both, the relay lands it.
        let cfg = sender_config(json!({
            "tpu": {},
            "relay": {"url": relay.url},
            "leaders": {"static": []},
            "fanout": 2,
            "route_policy": "tpu_first",
            "leader_allow": [b58(key(13).verifying_key().to_bytes())],
        }));
        let sender = Sender::new(&cfg, &key(2), Some(both), None).unwrap();
        let (w, sig) = tx(2, 0);
        let out = sender.send(w.clone(), sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Relay), "{out:?}");
        assert!(
            out.tpu_error.as_deref().unwrap().contains("refuse all 2"),
            "{out:?}"
        );
        assert_eq!(relay.calls().len(), 1);
        assert_eq!(relay.calls()[0].txs, vec![w.to_vec()]);
        assert_eq!(
            denied.count() + allowed.count(),
            1,
            "only the first send reached a TPU"
        );

        // Identities that are not base58 keys are refused at configuration time.
        let bad = sender_config(json!({
            "tpu": {}, "leaders": {"static": []}, "leader_deny": ["not-a-key"],
        }));
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.starts_with("sender.leader_deny"), "{e}");
    });
}

/// `max_streams` is a hard cap: a batch that would take the streams in flight past
/// it waits until earlier ones are acknowledged. Over a path with 150 ms each way,
/// a cap of 4 and two batches of 3: the second batch reaches the leader a round
/// trip after the first, not with it.
#[test]
fn a_batch_that_does_not_fit_waits_for_acknowledgements() {
    let rt = rt();
    rt.block_on(async {
        let (rx, _path, client, l) = over_a_slow_path(150, 4).await;
        let first: Vec<Bytes> = (0..3).map(|i| tx(60_000 + i, 10).0).collect();
        let second: Vec<Bytes> = (0..3).map(|i| tx(61_000 + i, 10).0).collect();
        let a = client.submit_batch(&l, first.clone()).unwrap();
        let b = client.submit_batch(&l, second.clone()).unwrap();
        assert!(a.await.unwrap().iter().all(Result::is_ok));
        assert!(b.await.unwrap().iter().all(Result::is_ok));
        let got = rx.received();
        let at = |w: &Bytes| got.iter().find(|r| r.bytes == w[..]).unwrap().at;
        let first_done = first.iter().map(at).max().unwrap();
        let second_begun = second.iter().map(at).min().unwrap();
        let gap = second_begun.saturating_duration_since(first_done);
        assert!(
            gap >= Duration::from_millis(200),
            "the second batch arrived {gap:?} after the first: it did not wait"
        );
    });
}

/// `TpuClient::send` writes on the caller's task when the connection is up, nothing
/// is queued to the worker and a stream is free. Those streams count against the
/// same `max_streams` as the worker's, and one caller's transactions keep their
/// order: with a cap of 1 and the one stream in flight over a path of 100 ms each
/// way, the next is queued to the worker and waits for that acknowledgement, and
/// the one after queues behind it. A delivery not yet polled holds no stream.
#[test]
fn sends_on_the_callers_task_share_the_stream_cap_and_keep_their_order() {
    let rt = rt();
    rt.block_on(async {
        let (rx, _path, client, l) = over_a_slow_path(100, 1).await;
        let w: Vec<Bytes> = (0..5).map(|i| tx(70_000 + i, 0).0).collect();
        let da = client.send(&l, w[0].clone()).unwrap();
        assert!(
            da.is_direct(),
            "connection up, a stream free: sent on this task"
        );
        let ta = tokio::spawn(da);
        tokio::time::sleep(Duration::from_millis(30)).await; // written, not yet acknowledged
        let db = client.send(&l, w[1].clone()).unwrap();
        assert!(
            !db.is_direct(),
            "the one stream is taken: queued to the worker"
        );
        let dc = client.send(&l, w[2].clone()).unwrap();
        assert!(!dc.is_direct(), "something is queued: queued behind it");
        ta.await.unwrap().unwrap().unwrap();
        db.await.unwrap().unwrap();
        dc.await.unwrap().unwrap();
        let got = rx.received();
        let order: Vec<&[u8]> = got.iter().map(|r| &r.bytes[..]).collect();
        assert_eq!(order, vec![&w[0][..], &w[1][..], &w[2][..]]);
        let gap = got[1].at.saturating_duration_since(got[0].at);
        assert!(
            gap >= Duration::from_millis(150),
            "the second arrived {gap:?} after the first: it did not wait for the stream"
        );
        // Nothing queued now: both go on this task, and the first, not yet polled,
        // holds no stream — the second, awaited first, is not held up by it.
        let dd = client.send(&l, w[3].clone()).unwrap();
        let de = client.send(&l, w[4].clone()).unwrap();
        assert!(dd.is_direct() && de.is_direct());
        tokio::time::timeout(Duration::from_secs(5), de)
            .await
            .expect("a delivery not yet polled held the one stream")
            .unwrap()
            .unwrap();
        dd.await.unwrap().unwrap();
        assert_eq!(rx.wait_for(5, Duration::from_secs(2)).await, 5);
        assert_eq!(client.stats.delivered.load(Ordering::Relaxed), 5);
    });
}

/// With `fanout` 2 a send answers at the first leader's acknowledgement, and the
/// slower leader still gets its copy, acknowledged and counted (the send hands the
/// copies still in flight to a task of their own).
#[test]
fn every_upcoming_leader_gets_its_copy_after_the_first_acknowledges() {
    let rt = rt();
    rt.block_on(async {
        let near = TpuReceiver::start(ReceiverConfig::default(), &key(11)).unwrap();
        let far_rx = TpuReceiver::start(ReceiverConfig::default(), &key(12)).unwrap();
        let far = DelayProxy::start(far_rx.addr, Duration::from_millis(100));
        let both: Arc<dyn LeaderSource> = Arc::new(StaticLeaders::from_leaders(vec![
            Leader {
                tpu_quic: near.addr,
                identity: Some(near.identity),
            },
            Leader {
                tpu_quic: far.addr,
                identity: Some(far_rx.identity),
            },
        ]));
        let cfg = sender_config(json!({
            "tpu": {}, "leaders": {"static": []}, "fanout": 2,
        }));
        let sender = Sender::new(&cfg, &key(2), Some(both), None).unwrap();
        sender.refresh_leaders();
        let tpu = sender.tpu().unwrap();
        connected(tpu, near.addr).await;
        connected(tpu, far.addr).await;
        let (w, sig) = tx(3, 0);
        let out = sender.send(w.clone(), sig, &meta()).await;
        assert_eq!(out.landed, Some(Route::Tpu), "{out:?}");
        assert!(
            out.latency < Duration::from_millis(150),
            "answered after {:?}: it waited for the slower leader",
            out.latency
        );
        assert_eq!(far_rx.wait_for(1, Duration::from_secs(3)).await, 1);
        assert_eq!(far_rx.received()[0].bytes, w.to_vec());
        assert_eq!(near.received()[0].bytes, w.to_vec());
        let deadline = Instant::now() + Duration::from_secs(3);
        while tpu.stats.delivered.load(Ordering::Relaxed) < 2 {
            assert!(
                Instant::now() < deadline,
                "the slower copy was not acknowledged and counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

/// A receiver behind a path of `ms` milliseconds each way, and a TPU client with
/// `max_streams` connected to it through that path (the leader).
async fn over_a_slow_path(
    ms: u64,
    max_streams: usize,
) -> (TpuReceiver, DelayProxy, Arc<TpuClient>, Leader) {
    let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
    let path = DelayProxy::start(rx.addr, Duration::from_millis(ms));
    let cfg = TpuConfig {
        max_streams,
        ..TpuConfig::default()
    };
    let client = TpuClient::new(cfg, &key(2)).unwrap();
    let l = Leader {
        tpu_quic: path.addr,
        identity: Some(rx.identity),
    };
    client.prewarm(&[l]);
    connected(&client, path.addr).await;
    (rx, path, client, l)
}

/// A sender for `cfg` whose one leader is `addr`, once its TPU route is connected.
async fn connected_sender(cfg: &SenderConfig, addr: SocketAddr) -> Arc<Sender> {
    let sender = Sender::new(cfg, &key(2), Some(leader(addr, None)), None).unwrap();
    sender.refresh_leaders();
    connected(sender.tpu().unwrap(), addr).await;
    sender
}

/// Waits (at most 10 s) until `client` has a live connection to `addr`.
async fn connected(client: &TpuClient, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.connection(addr).is_none() {
        assert!(Instant::now() < deadline, "no connection to {addr}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With the TPU route alone there is nothing to hedge to: a send slower than
/// `hedge_delay` is neither marked hedged nor given a "relay route is not
/// configured" error (its audit row would claim a hedge that never went out).
#[test]
fn a_lone_route_slower_than_the_hedge_delay_is_not_hedged() {
    let rt = rt();
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let path = DelayProxy::start(rx.addr, Duration::from_millis(40));
        let cfg = sender_config(json!({
            "tpu": {},
            "leaders": {"static": []},
            "hedge_delay_ms": 5,
        }));
        let sender = connected_sender(&cfg, path.addr).await;
        let (w, sig) = tx(62_000, 10);
        let t = Instant::now();
        let out = sender.send(w, sig, &meta()).await;
        let took = t.elapsed();
        assert_eq!(out.landed, Some(Route::Tpu), "{out:?}");
        // The latency is the send's own (its clock is the CPU's counter, not the
        // system's): at least the path's round trip, at most the call's time (give
        // or take the two clocks' rates: 1 ms is 1.2 % of the round trip).
        assert!(
            out.latency >= Duration::from_millis(80)
                && out.latency <= took + Duration::from_millis(1),
            "a round trip over 40 ms each way, within the call's {took:?}: {out:?}"
        );
        assert!(!out.hedged && out.hedged_after.is_none(), "{out:?}");
        assert_eq!(out.relay_error, None);
        assert_eq!(sender.stats.hedged.load(Ordering::Relaxed), 0);
        // Counted in the route's statistics: one attempt, no failure.
        assert_eq!(sender.route_counts(), [(1, 0), (0, 0)]);
        assert_eq!(sender.tpu_delivery(), Some(1.0));

        // And when the lone route fails, the send fails: no hedge, no relay error.
        let nobody = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = sender_config(json!({
            "tpu": {"connect_timeout_ms": 300},
            "leaders": {"static": []},
            "hedge_delay_ms": 5,
        }));
        let dead = nobody.local_addr().unwrap();
        let sender = Sender::new(&cfg, &key(2), Some(leader(dead, None)), None).unwrap();
        let (w, sig) = tx(62_001, 10);
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(out.landed, None, "{out:?}");
        assert!(out.tpu_error.is_some(), "{out:?}");
        assert!(!out.hedged && out.relay_error.is_none(), "{out:?}");
        assert_eq!(sender.stats.hedged.load(Ordering::Relaxed), 0);
        assert_eq!(sender.stats.failed.load(Ordering::Relaxed), 1);
        assert_eq!(sender.route_counts(), [(1, 1), (0, 0)]);

        // A route that cannot start (every leader refused by the allow list) fails
        // the send and is not counted against the route.
        let cfg = sender_config(json!({
            "tpu": {},
            "leaders": {"static": []},
            "leader_allow": [bs58::encode(key(13).verifying_key().to_bytes()).into_string()],
        }));
        let sender = Sender::new(&cfg, &key(2), Some(leader(dead, None)), None).unwrap();
        let (w, sig) = tx(62_002, 10);
        let out = sender.send(w, sig, &meta()).await;
        assert_eq!(out.landed, None, "{out:?}");
        assert!(
            out.tpu_error
                .as_deref()
                .unwrap_or("")
                .contains("refuse all 1"),
            "{out:?}"
        );
        assert_eq!(sender.route_counts(), [(0, 0), (0, 0)]);
        assert_eq!(sender.stats.failed.load(Ordering::Relaxed), 1);
    });
}

/// CPU time of the calling thread so far (Linux `/proc`, 10 ms ticks).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let rest = s.rsplit_once(") ").unwrap().1;
    let f: Vec<u64> = rest
        .split(' ')
        .take(13)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    Duration::from_millis((f[11] + f[12]) * 10)
}

/// `tpu_first` waits `relay_failover_ms` for the TPU route, not `hedge_delay_ms`.
/// The send's timer used to fire at `hedge_delay_ms` and, never re-armed, be ready
/// on every poll until the failover deadline: the send spun on its thread for the
/// whole wait. Over a path with 60 ms each way, the TPU route confirms after about
/// 120 ms, unhedged, and the thread that awaited the send was not busy meanwhile.
#[test]
fn tpu_first_waits_for_the_failover_without_spinning() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let relay = Relay::start(None);
        let path = DelayProxy::start(rx.addr, Duration::from_millis(60));
        let cfg = sender_config(json!({
            "tpu": {},
            "relay": {"url": relay.url},
            "leaders": {"static": []},
            "route_policy": "tpu_first",
            "hedge_delay_ms": 5,
            "relay_failover_ms": 2000,
        }));
        let sender = connected_sender(&cfg, path.addr).await;
        // Past the refusal window of a fresh connection (two round trips).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (w, sig) = tx(62_100, 10);
        let cpu = thread_cpu();
        let out = sender.send(w, sig, &meta()).await;
        let used = thread_cpu() - cpu;
        assert_eq!(out.landed, Some(Route::Tpu), "{out:?}");
        assert!(!out.hedged, "{out:?}");
        assert!(out.latency >= Duration::from_millis(100), "{out:?}");
        assert!(
            used < out.latency / 2,
            "the thread was busy {used:?} of the send's {:?}",
            out.latency
        );
        assert!(relay.calls().is_empty(), "the relay was not used");
    });
}

/// A leader's handshake budget (`max_handshakes_per_leader_per_min`) outlives its
/// connection: with room for one leader connection, sends alternating between two
/// leaders close and open each one again and again, and still no leader sees more
/// than its budget of handshakes in the minute (each link used to start afresh).
#[test]
fn a_leaders_handshake_budget_outlives_its_connection() {
    rt().block_on(async {
        let a = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
        let b = TpuReceiver::start(ReceiverConfig::default(), &key(3)).unwrap();
        let cfg: TpuConfig = serde_json::from_value(serde_json::json!({
            "max_leaders": 1, "max_handshakes_per_leader_per_min": 2,
        }))
        .unwrap();
        let client = TpuClient::new(cfg, &key(2)).unwrap();
        let leaders = [&a, &b].map(|rx| Leader {
            tpu_quic: rx.addr,
            identity: Some(rx.identity),
        });
        for i in 0..5 {
            for l in &leaders {
                // Answered or not (a capped link waits for its budget): the next
                // submit to the other leader closes this one.
                let d = client.submit(l, tx(i, 0).0).unwrap();
                let _ = tokio::time::timeout(Duration::from_millis(300), d).await;
            }
        }
        let hs = |rx: &TpuReceiver| rx.stats.connections.load(Ordering::Relaxed);
        assert!(
            hs(&a) <= 2 && hs(&b) <= 2,
            "handshakes per leader: {} and {} (budget 2 a minute)",
            hs(&a),
            hs(&b)
        );
        assert!(client.stats.handshakes_capped.load(Ordering::Relaxed) >= 1);
    });
}
