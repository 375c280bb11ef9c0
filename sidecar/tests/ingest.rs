//! The hot path's QUIC ingest endpoint against real QUIC clients and the TPU
//! receiver: allowed searchers' frames become sends, byte-identical; everyone else
//! is refused at the handshake; bad framing stops only its stream; invalid
//! opportunities are counted and skipped; module state still gates every send.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gw_core::module_state::{ModuleState, RunState};
use gw_core::Module;
use gw_proto::hotpath;
use gw_sidecar::control::ModuleTable;
use gw_sidecar::sender::ingest::{self, STOP_MALFORMED};
use gw_sidecar::sender::strategy::{HotPath, Opportunity, SignedTx, Skip, StrategyConfig};
use gw_sidecar::sender::tpu::Leader;
use gw_sidecar::sender::{txwire, Sender, SenderConfig};
use serde_json::json;
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver};

mod common;

fn key(b: u8) -> SigningKey {
    SigningKey::from_bytes(&[b; 32])
}

fn tx(i: u32) -> Vec<u8> {
    let mut bh = [0u8; 32];
    bh[..4].copy_from_slice(&i.to_le_bytes());
    txwire::example_tx(&key(50), bh, 40)
}

fn opp(i: u32) -> hotpath::Opportunity {
    hotpath::Opportunity {
        module: "mev".into(),
        features: vec![],
        ev: Some(1.0),
        txs: vec![tx(i)],
    }
}

struct Rig {
    rx: TpuReceiver,
    hot: HotPath,
    modules: ModuleTable,
    _rt: tokio::runtime::Runtime,
}

fn rig(ingest: serde_json::Value) -> Rig {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let rx = TpuReceiver::start(ReceiverConfig::default(), &key(1)).unwrap();
    let sender = common::rpc::tpu_first_sender(Leader {
        tpu_quic: rx.addr,
        identity: Some(rx.identity),
    });
    let modules = ModuleTable::new();
    modules.set(
        Module::Mev,
        ModuleState {
            state: RunState::Running,
            ..ModuleState::default()
        },
    );
    let strategy: StrategyConfig = serde_json::from_value(json!({ "ingest": ingest })).unwrap();
    let hot = HotPath::start(
        &strategy,
        sender,
        modules.clone(),
        None,
        rt.handle().clone(),
        Some(&key(2)),
    )
    .unwrap();
    Rig {
        rx,
        hot,
        modules,
        _rt: rt,
    }
}

fn allow(keys: &[u8]) -> Vec<String> {
    keys.iter()
        .map(|b| bs58::encode(key(*b).verifying_key().to_bytes()).into_string())
        .collect()
}

fn server_key() -> Option<[u8; 32]> {
    Some(key(2).verifying_key().to_bytes())
}

async fn write_stream(conn: &quinn::Connection, bytes: &[u8]) -> Option<quinn::VarInt> {
    let mut s = conn.open_uni().await.unwrap();
    // A stopped stream may refuse the rest of the write: that is the answer.
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
    s.stopped().await.ok().flatten()
}

/// Writes `bytes` and leaves the stream open: the server's verdict is a stop.
async fn write_open(conn: &quinn::Connection, bytes: &[u8]) -> Option<quinn::VarInt> {
    let mut s = conn.open_uni().await.unwrap();
    let _ = s.write_all(bytes).await;
    tokio::time::timeout(Duration::from_secs(5), s.stopped())
        .await
        .expect("the server did not stop the stream")
        .ok()
        .flatten()
}

fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

#[test]
fn allowed_searchers_frames_become_sends_byte_identical() {
    let r = rig(json!({"bind": "127.0.0.1:0", "allow": allow(&[30])}));
    let addr = r.hot.ingest_addr.expect("the endpoint listens");
    r._rt.block_on(async {
        let conn = ingest::connect(addr, &key(30), server_key()).await.unwrap();
        // 300 frames on three streams at once, written in odd-sized pieces.
        let mut sent = Vec::new();
        let mut streams = Vec::new();
        for s in 0..3u32 {
            let mut bytes = Vec::new();
            for i in 0..100 {
                let o = opp(s * 1000 + i);
                sent.push(o.txs[0].clone());
                bytes.extend(ingest::frame(&o));
            }
            let conn = conn.clone();
            streams.push(tokio::spawn(async move {
                let mut st = conn.open_uni().await.unwrap();
                for piece in bytes.chunks(777) {
                    st.write_all(piece).await.unwrap();
                }
                st.finish().unwrap();
                st.stopped().await.unwrap()
            }));
        }
        for s in streams {
            assert_eq!(s.await.unwrap(), None, "no stream stopped");
        }
        assert_eq!(r.rx.wait_for(300, Duration::from_secs(10)).await, 300);
        let got: Vec<Vec<u8>> = r.rx.received().into_iter().map(|x| x.bytes).collect();
        assert_eq!(
            sorted(got),
            sorted(sent),
            "every transaction, once, as framed"
        );
        let st = &r.hot.ingest_stats;
        assert_eq!(st.connections.load(Ordering::Relaxed), 1);
        assert_eq!(st.frames.load(Ordering::Relaxed), 300);
        assert_eq!(r.hot.stats.sent.load(Ordering::Relaxed), 300);
        let decided: u64 = r.hot.stats.decision_buckets().iter().map(|b| b.1).sum();
        assert_eq!(decided, 300, "each send's decision latency is recorded");

        // HTTP's producers still go through the same ingest thread.
        let w = tx(99_999);
        let signature = txwire::parse(&w, true).unwrap().signature_b58();
        let took = r
            .hot
            .offer_async(vec![Opportunity {
                module: Module::Mev,
                features: vec![],
                ev: Some(1.0),
                txs: vec![SignedTx {
                    wire: w.clone().into(),
                    signature,
                }],
                received: Instant::now(),
                requester: Default::default(),
            }])
            .await;
        assert_eq!(took, 1);
        assert_eq!(r.rx.wait_for(301, Duration::from_secs(5)).await, 301);

        // A killed module: frames are read, nothing is sent.
        r.modules.set(
            Module::Mev,
            ModuleState {
                state: RunState::Killed,
                ..ModuleState::default()
            },
        );
        let mut bytes = Vec::new();
        for i in 0..20 {
            bytes.extend(ingest::frame(&opp(50_000 + i)));
        }
        assert_eq!(write_stream(&conn, &bytes).await, None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.hot.stats.skipped(Skip::Killed) < 20 {
            assert!(Instant::now() < deadline, "killed skips not counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.rx.count(), 301, "a killed module sends nothing");
    });
}

/// An independent QUIC stack (aioquic, `tests/searcher/searcher.py`) as the
/// searcher: its self-signed Ed25519 certificate is accepted when allow-listed, it
/// pins the server's key, and its frames become sends byte-identical; a key not on
/// the list is refused at the handshake and sends nothing.
#[test]
fn an_aioquic_searcher_is_served_and_a_stranger_refused() {
    let r = rig(json!({"bind": "127.0.0.1:0", "allow": allow(&[31])}));
    let addr = r.hot.ingest_addr.expect("the endpoint listens");
    let d = testkit::TempDir::new("ingest-aioquic");
    let searcher = |seed: u8, extra: &[&str], txs: &[Vec<u8>]| {
        let key_file = d.path().join(format!("searcher-{seed}.hex"));
        std::fs::write(&key_file, hex::encode(key(seed).to_bytes())).unwrap();
        let out = std::process::Command::new(testkit::venv_bin("python"))
            .arg(testkit::workspace_root().join("tests/searcher/searcher.py"))
            .args(["--endpoint", &addr.to_string()])
            .arg("--key")
            .arg(&key_file)
            .args(["--server-identity", &hex::encode(server_key().unwrap())])
            .args(["--module", "mev", "--ev", "1.0"])
            .args(extra)
            .args(txs.iter().map(hex::encode))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let txs: Vec<Vec<u8>> = (0..5).map(|i| tx(70_000 + i)).collect();
    let (code, out) = searcher(31, &[], &txs);
    assert_eq!((code, out.trim()), (Some(0), "sent 5"), "{out}");
    r._rt.block_on(async {
        assert_eq!(r.rx.wait_for(5, Duration::from_secs(10)).await, 5);
    });
    let got: Vec<Vec<u8>> = r.rx.received().into_iter().map(|x| x.bytes).collect();
    assert_eq!(sorted(got), sorted(txs));

    let (code, out) = searcher(32, &["--expect-refused"], &[tx(80_000)]);
    assert_eq!(code, Some(0), "a stranger was served: {out}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.rx.count(), 5, "a stranger sends nothing");
    assert!(r.hot.ingest_stats.refused.load(Ordering::Relaxed) >= 1);
}

#[test]
fn strangers_are_refused_at_the_handshake_and_the_server_can_be_pinned() {
    let r = rig(json!({"bind": "127.0.0.1:0", "allow": allow(&[30]), "max_connections": 1}));
    let addr = r.hot.ingest_addr.unwrap();
    r._rt.block_on(async {
        // A key not on the list. TLS 1.3 lets the client finish its side of the
        // handshake before the server has checked its certificate, so the client
        // may see a connection; the server closes it at once, and nothing it
        // sends is read.
        match ingest::connect(addr, &key(31), server_key()).await {
            Err(_) => {}
            Ok(c) => {
                // The close may already be there: then the stream cannot open.
                if let Ok(mut st) = c.open_uni().await {
                    let _ = st.write_all(&ingest::frame(&opp(666))).await;
                    let _ = st.finish();
                }
                let why = tokio::time::timeout(Duration::from_secs(5), c.closed())
                    .await
                    .expect("the server kept a stranger's connection");
                assert!(
                    !matches!(why, quinn::ConnectionError::LocallyClosed),
                    "{why}"
                );
            }
        }
        // The right client pinning another server key refuses the server.
        let wrong = Some(key(3).verifying_key().to_bytes());
        assert!(ingest::connect(addr, &key(30), wrong).await.is_err());
        // One allowed connection is the cap: a second is refused. (Wait until the
        // server has let go of the two failed ones first.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.hot.ingest_stats.refused.load(Ordering::Relaxed) < 2 {
            assert!(
                Instant::now() < deadline,
                "the failed handshakes were not counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = ingest::connect(addr, &key(30), server_key()).await.unwrap();
        // The cap applies once the second client is authenticated: it may see its
        // handshake finish, then the server closes it (code 2, busy).
        if let Ok(second) = ingest::connect(addr, &key(30), server_key()).await {
            let why = tokio::time::timeout(Duration::from_secs(5), second.closed())
                .await
                .expect("a connection over the cap stayed open");
            assert!(
                matches!(&why, quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == ingest::CLOSE_BUSY.into()),
                "{why}"
            );
        }
        assert!(r.hot.ingest_stats.refused.load(Ordering::Relaxed) >= 3);
        // The first still works.
        assert_eq!(write_stream(&first, &ingest::frame(&opp(7))).await, None);
        assert_eq!(r.rx.wait_for(1, Duration::from_secs(5)).await, 1);
        assert_eq!(r.rx.count(), 1, "nothing from the refused clients");
    });
}

#[test]
fn bad_framing_stops_its_stream_and_bad_opportunities_are_skipped() {
    let r = rig(json!({"bind": "127.0.0.1:0", "allow": allow(&[30]), "max_frame_bytes": 4096}));
    let addr = r.hot.ingest_addr.unwrap();
    r._rt.block_on(async {
        let conn = ingest::connect(addr, &key(30), server_key()).await.unwrap();
        let st = &r.hot.ingest_stats;
        // A length beyond max_frame_bytes: stopped at once with code 1.
        let mut huge = Vec::new();
        prost::encoding::encode_varint(1 << 20, &mut huge);
        huge.extend(vec![0u8; 8192]);
        assert_eq!(write_open(&conn, &huge).await, Some(STOP_MALFORMED.into()));
        // Not protobuf.
        assert_eq!(
            write_open(&conn, &[4, 0xff, 0xff, 0xff, 0xff]).await,
            Some(STOP_MALFORMED.into())
        );
        assert_eq!(st.malformed.load(Ordering::Relaxed), 2);
        // Invalid opportunities between valid ones: skipped, the stream goes on.
        let mut tampered = opp(2);
        let last = tampered.txs[0].len() - 1;
        tampered.txs[0][last] ^= 1;
        let mut unknown = opp(3);
        unknown.module = "nope".into();
        let mut bytes = ingest::frame(&opp(1));
        bytes.extend(ingest::frame(&tampered));
        bytes.extend(ingest::frame(&unknown));
        bytes.extend(ingest::frame(&opp(4)));
        assert_eq!(write_stream(&conn, &bytes).await, None);
        assert_eq!(r.rx.wait_for(2, Duration::from_secs(5)).await, 2);
        assert_eq!(st.invalid.load(Ordering::Relaxed), 2);
        assert_eq!(st.frames.load(Ordering::Relaxed), 2);
        let got: Vec<Vec<u8>> = r.rx.received().into_iter().map(|x| x.bytes).collect();
        assert_eq!(sorted(got), sorted(vec![tx(1), tx(4)]));
        // The connection survived all of it.
        assert!(conn.close_reason().is_none());
    });
}

#[test]
fn an_ingest_that_cannot_bind_fails_the_start() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let cfg: SenderConfig =
        serde_json::from_value(json!({"tpu": {}, "leaders": {"static": []}})).unwrap();
    let sender = Sender::new(&cfg, &key(2), None, None).unwrap();
    let strategy: StrategyConfig = serde_json::from_value(
        json!({"ingest": {"bind": addr.to_string(), "allow": allow(&[30])}}),
    )
    .unwrap();
    let r = HotPath::start(
        &strategy,
        sender,
        ModuleTable::new(),
        None,
        rt.handle().clone(),
        Some(&key(2)),
    );
    assert!(r.is_err(), "bound to a taken port");
}

#[test]
fn one_identity_cannot_take_every_connection() {
    let r = rig(json!({
        "bind": "127.0.0.1:0", "allow": allow(&[30, 32]),
        "max_connections": 8, "max_connections_per_identity": 1,
    }));
    let addr = r.hot.ingest_addr.unwrap();
    r._rt.block_on(async {
        let a = ingest::connect(addr, &key(30), server_key()).await.unwrap();
        if let Ok(again) = ingest::connect(addr, &key(30), server_key()).await {
            let why = tokio::time::timeout(Duration::from_secs(5), again.closed())
                .await
                .expect("a second connection of one identity stayed open");
            assert!(
                matches!(&why, quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == ingest::CLOSE_BUSY.into()),
                "{why}"
            );
        }
        // Another searcher still gets in, and both send.
        let b = ingest::connect(addr, &key(32), server_key()).await.unwrap();
        assert_eq!(write_stream(&a, &ingest::frame(&opp(1))).await, None);
        assert_eq!(write_stream(&b, &ingest::frame(&opp(2))).await, None);
        assert_eq!(r.rx.wait_for(2, Duration::from_secs(5)).await, 2);
        assert_eq!(r.hot.ingest_stats.connections.load(Ordering::Relaxed), 2);
    });
}

fn frames_of(r: &Rig, b: u8) -> u64 {
    let who = key(b).verifying_key().to_bytes();
    let by = r.hot.ingest_stats.frames_by_identity.lock();
    by.get(&who).map_or(0, |n| n.load(Ordering::Relaxed))
}

/// A searcher with many busy streams gets no more of the ingest thread than one
/// with a single stream: while both have frames waiting, they are decoded turn
/// about (frames of 16 transactions a turn, one turn per identity over all its
/// connections), so the flood of eight streams on four connections is slowed to
/// the pace of the one, not the one to a ninth; and every frame written is read
/// in the end (QUIC's flow control held them, nothing dropped).
#[test]
fn searchers_share_the_ingest_thread_by_identity_not_by_stream() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    let r = rig(json!({"bind": "127.0.0.1:0", "allow": allow(&[30, 31])}));
    let addr = r.hot.ingest_addr.unwrap();
    // Nothing is sent: the strategy reads and skips, the test counts frames.
    r.modules.set(
        Module::Mev,
        ModuleState {
            state: RunState::Killed,
            ..ModuleState::default()
        },
    );
    r._rt.block_on(async {
        // Each searcher writes for as long as the test runs: its streams always
        // have frames waiting (its writes wait on flow control).
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let mut conn: Option<quinn::Connection> = None;
        let mut writers = Vec::new();
        // The flood's eight streams on four connections: its turn is its
        // identity's, whatever the connection.
        for (who, conns, per_conn) in [(30u8, 4u32, 2u32), (31, 1, 1)] {
            for s in 0..conns * per_conn {
                if s % per_conn == 0 {
                    conn = Some(
                        ingest::connect(addr, &key(who), server_key())
                            .await
                            .unwrap(),
                    );
                }
                let Some(c) = conn.clone() else {
                    unreachable!("connected above")
                };
                let (stop, written) = (stop.clone(), written.clone());
                let base = u32::from(who) * 100_000_000 + s * 1_000_000;
                writers.push(tokio::spawn(async move {
                    let mut st = c.open_uni().await.unwrap();
                    let mut i = 0u32;
                    while !stop.load(Ordering::Acquire) {
                        let mut bytes = Vec::new();
                        for _ in 0..32 {
                            bytes.extend(ingest::frame(&opp(base + i)));
                            i += 1;
                        }
                        st.write_all(&bytes).await.unwrap();
                        written.fetch_add(32, Ordering::Relaxed);
                    }
                    st.finish().unwrap();
                    st.stopped().await.unwrap()
                }));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while frames_of(&r, 30).min(frames_of(&r, 31)) < 500 {
            assert!(Instant::now() < deadline, "not both being read");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (flood0, one0) = (frames_of(&r, 30), frames_of(&r, 31));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (flood, one) = (frames_of(&r, 30) - flood0, frames_of(&r, 31) - one0);
        // Turn about: about as many of each; per stream the flood would have
        // eight for each one of the other's.
        assert!(
            one > 0 && flood <= 3 * one,
            "in 1 s: {flood} frames of the searcher with eight streams, {one} of the one with one"
        );
        stop.store(true, Ordering::Release);
        for w in writers {
            assert_eq!(w.await.unwrap(), None, "no stream stopped");
        }
        let all = written.load(Ordering::Relaxed);
        while frames_of(&r, 30) + frames_of(&r, 31) < all {
            assert!(Instant::now() < deadline, "frames lost");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            r.hot.ingest_stats.frames.load(Ordering::Relaxed),
            all,
            "every frame written, once"
        );
    });
}

/// A UDP relay in front of `server` that passes each client's first `pass`
/// datagrams (and every answer) and drops the rest: with `pass` 2 (the first
/// Initial, answered with a Retry, then the Initial with the token), the server
/// takes the handshake in and then hears nothing more — a stalled handshake, from
/// the relay's address.
async fn stalling_relay(server: std::net::SocketAddr, pass: usize) -> std::net::SocketAddr {
    stalling_relay_at("127.0.0.1", server, pass).await
}

/// [`stalling_relay`] whose clients come from `ip` (a loopback address).
async fn stalling_relay_at(
    ip: &str,
    server: std::net::SocketAddr,
    pass: usize,
) -> std::net::SocketAddr {
    use std::collections::HashMap;
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut clients: HashMap<std::net::SocketAddr, (Arc<UdpSocket>, usize)> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            let (up, sent) = match clients.get_mut(&from) {
                Some(c) => c,
                None => {
                    let up = Arc::new(UdpSocket::bind((ip, 0)).await.unwrap());
                    let (back, front, up2) = (from, front.clone(), up.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = up2.recv(&mut buf).await {
                            let _ = front.send_to(&buf[..n], back).await;
                        }
                    });
                    up.connect(server).await.unwrap();
                    clients.entry(from).or_insert((up, 0))
                }
            };
            if *sent < pass {
                *sent += 1;
                let _ = up.send(&buf[..n]).await;
            }
        }
    });
    addr
}

/// One host that starts handshakes and stalls them (here 8 of them, through a
/// relay that drops everything after the client's second Initial) takes at most
/// `handshakes::MAX_PER_SOURCE` of the `max_connections` handshake slots: a searcher
/// from another address still gets in and its frames are sent.
#[test]
fn one_address_stalling_handshakes_cannot_lock_searchers_out() {
    let r = rig(json!({
        "bind": "127.0.0.1:0", "allow": allow(&[30, 31]), "max_connections": 6,
    }));
    let addr = r.hot.ingest_addr.unwrap();
    r._rt.block_on(async {
        let relay = stalling_relay(addr, 2).await;
        let mut stalled = Vec::new();
        for _ in 0..8 {
            stalled.push(tokio::spawn(async move {
                ingest::connect(relay, &key(30), server_key()).await
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every stalled client was answered (a Retry, then a handshake or a
        // refusal) before the searcher comes.
        let refused = &r.hot.ingest_stats.refused;
        let deadline = Instant::now() + Duration::from_secs(1);
        while refused.load(Ordering::Relaxed) < (8 - ingest::handshakes::MAX_PER_SOURCE) as u64 {
            assert!(Instant::now() < deadline, "refused {refused:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let searcher =
            ingest::connect_from("127.0.0.2:0".parse().unwrap(), addr, &key(31), server_key())
                .await
                .expect("a searcher from another address gets in");
        assert_eq!(write_stream(&searcher, &ingest::frame(&opp(1))).await, None);
        assert_eq!(r.rx.wait_for(1, Duration::from_secs(5)).await, 1);
        assert_eq!(
            refused.load(Ordering::Relaxed),
            (8 - ingest::handshakes::MAX_PER_SOURCE) as u64,
            "only the handshakes beyond the address's share were refused so far"
        );
        // The stalled ones end at the server's handshake timeout, refused too
        // (a client deems its handshake done once it sent its Finished, which
        // the relay dropped: only the server knows).
        let deadline = Instant::now() + ingest::HANDSHAKE_TIMEOUT * 3;
        while refused.load(Ordering::Relaxed) < 8 {
            assert!(Instant::now() < deadline, "refused {refused:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(r.hot.ingest_stats.connections.load(Ordering::Relaxed), 1);
        drop(stalled);
    });
}

/// Whether `connect`'s error is the server refusing to start the handshake.
fn refused_at_once(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<quinn::ConnectionError>(),
        Some(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// Strangers stalling handshakes from as many addresses as it takes to fill
/// every place cannot keep a searcher that connected before from coming back:
/// addresses an allowed client connected from have places of their own. A
/// searcher from an address never seen waits like any stranger.
#[test]
fn strangers_stalling_handshakes_cannot_keep_a_searcher_from_coming_back() {
    // Stalled handshakes hold their places for 10 s: the test's steps have
    // that long on a loaded machine.
    let r = rig(json!({
        "bind": "127.0.0.1:0", "allow": allow(&[30, 31]), "max_connections": 4,
        "handshake_timeout_ms": 10_000,
    }));
    let addr = r.hot.ingest_addr.unwrap();
    let searcher_at: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
    r._rt.block_on(async {
        let first = ingest::connect_from(searcher_at, addr, &key(30), server_key())
            .await
            .unwrap();
        assert_eq!(write_stream(&first, &ingest::frame(&opp(1))).await, None);
        assert_eq!(r.rx.wait_for(1, Duration::from_secs(5)).await, 1);
        // Its connection stays open: a searcher connected for long comes back
        // (a network blip) before the server saw the old connection end.
        // One address's worth of stalled handshakes fills the strangers' places
        // (each client deems its handshake done once the server answered it:
        // the server took it in).
        let relay = stalling_relay_at("127.0.0.3", addr, 2).await;
        let mut stalled = Vec::new();
        for _ in 0..ingest::handshakes::MAX_PER_SOURCE {
            stalled.push(
                ingest::connect(relay, &key(31), server_key())
                    .await
                    .unwrap(),
            );
        }
        let other = "127.0.0.4:0".parse().unwrap();
        let e = ingest::connect_from(other, addr, &key(40), server_key())
            .await
            .expect_err("the strangers' places are taken");
        assert!(refused_at_once(&e), "{e:#}");
        // A searcher from an address never seen waits like any stranger.
        let new = "127.0.0.7:0".parse().unwrap();
        let e = ingest::connect_from(new, addr, &key(31), server_key())
            .await
            .expect_err("no place for a new address");
        assert!(refused_at_once(&e), "{e:#}");
        // The searcher that connected before comes back.
        let again = ingest::connect_from(searcher_at, addr, &key(30), server_key())
            .await
            .expect("a searcher's address has places strangers cannot take");
        assert_eq!(write_stream(&again, &ingest::frame(&opp(2))).await, None);
        assert_eq!(r.rx.wait_for(2, Duration::from_secs(5)).await, 2);
        drop((stalled, first));
    });
}

/// An address no allowed client connected from starts at most
/// `STARTS_PER_MINUTE` handshakes a minute; the next is refused before any
/// handshake work.
#[test]
fn a_stranger_starts_only_a_handful_of_handshakes_a_minute() {
    let r = rig(json!({"bind": "127.0.0.1:0", "allow": allow(&[30])}));
    let addr = r.hot.ingest_addr.unwrap();
    let from: std::net::SocketAddr = "127.0.0.5:0".parse().unwrap();
    r._rt.block_on(async {
        for i in 0..ingest::handshakes::STARTS_PER_MINUTE {
            match ingest::connect_from(from, addr, &key(31), server_key()).await {
                Err(e) => assert!(!refused_at_once(&e), "start {i}: {e:#}"),
                Ok(c) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
                }
            }
        }
        let e = ingest::connect_from(from, addr, &key(31), server_key())
            .await
            .expect_err("a stranger's handshake beyond its starts");
        assert!(refused_at_once(&e), "{e:#}");
        // Another address is not held back by it.
        let other = "127.0.0.6:0".parse().unwrap();
        ingest::connect_from(other, addr, &key(30), server_key())
            .await
            .expect("an allowed client from another address");
    });
}
