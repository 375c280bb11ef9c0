//! Connection hygiene of the TPU route against a leader that refuses connections
//! the way Agave's TPU server does when a peer's per-IP budget is spent: it
//! completes the handshake, then closes with code 2 "disallowed" (fault injection
//! in the protocol-enforcing test receiver). A validator operator must not see a
//! reconnect storm, and nothing may be lost once the budget frees.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use gw_sidecar::sender::tpu::{Leader, TpuClient, TpuConfig, TpuError, CLOSE_REASONS};
use gw_sidecar::sender::txwire;
use testkit::tpu_receiver::{ReceiverConfig, TpuReceiver, CLOSE_DISALLOWED};

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

fn tx(i: u32) -> Bytes {
    let mut bh = [0u8; 32];
    bh[..4].copy_from_slice(&i.to_le_bytes());
    Bytes::from(txwire::example_tx(&key(50), bh, 0))
}

fn closes(client: &TpuClient, reason: &str) -> u64 {
    let i = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap();
    client.stats.closes[i].load(Ordering::Relaxed)
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
            match client.submit(&leader, tx(i)) {
                Ok(d) => {
                    let r = tokio::time::timeout(Duration::from_secs(3), d).await;
                    match r {
                        Ok(Ok(Err(TpuError::Unreachable(..) | TpuError::Stream(..)))) => {
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
        let deadline = Instant::now() + Duration::from_secs(70);
        let first = loop {
            i += 1;
            let w = tx(i);
            if let Ok(Ok(Ok(()))) = tokio::time::timeout(
                Duration::from_secs(3),
                client.submit(&leader, w.clone()).unwrap(),
            )
            .await
            {
                break w;
            }
            assert!(
                Instant::now() < deadline,
                "the leader accepts again, the client does not"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut sent = vec![first];
        let mut pending = Vec::new();
        for k in 0..200 {
            let w = tx(1_000_000 + k);
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
            client.submit(&leader, tx(1)).unwrap().await.unwrap(),
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
            client.submit(&leader, tx(2)).unwrap().await.unwrap(),
            Ok(())
        );
        assert_eq!(rx.wait_for(2, Duration::from_secs(3)).await, 2);
    });
}
