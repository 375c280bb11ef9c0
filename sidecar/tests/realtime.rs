//! `/api/realtime` at the sidecar, over real WebSockets (tokio-tungstenite): the
//! identity the edge verified is checked again, fan-out is bounded, committed
//! decisions and module states arrive as they happen, and a client that stops
//! reading is closed with 4008 and counted while a client that keeps up is not
//! touched. (Through Envoy, over HTTP/1.1, HTTP/2 and HTTP/3: tests/console.)

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use gw_sidecar::console::realtime::{RealtimeConfig, CLOSE_EXPIRED, CLOSE_SLOW, SUBPROTOCOL};
use serde_json::{json, Value};
use testkit::clickhouse::ClickHouse;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

mod common;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A sidecar on plain HTTP (loopback, trusted as the edge, as in development), so a
/// plain WebSocket client can stand in for Envoy.
fn start(dir: &Path, realtime: RealtimeConfig, ch: Option<&ClickHouse>) -> common::Served {
    let mut cfg = common::config(dir, true);
    cfg.file.clickhouse_url = ch.map(ClickHouse::url);
    cfg.file.tls = None;
    cfg.file.insecure_plaintext = true;
    cfg.file.realtime = realtime;
    let mut s = common::serve(cfg);
    s.base = s.base.replace("https://", "http://");
    s
}

/// Opens the stream as `tester` with the headers the edge sets after verifying a
/// token.
async fn open(base: &str, roles: Option<&str>) -> Result<Ws, (u16, Value)> {
    open_as(base, roles, "tester").await
}

/// The same for subject `sub`.
async fn open_as(base: &str, roles: Option<&str>, sub: &str) -> Result<Ws, (u16, Value)> {
    open_until(base, roles, sub, None).await
}

/// The same with a token that expires at `exp` (unix seconds), as the edge says.
async fn open_until(
    base: &str,
    roles: Option<&str>,
    sub: &str,
    exp: Option<u64>,
) -> Result<Ws, (u16, Value)> {
    open_sealed(base, roles, sub, exp, testkit::fixtures::EDGE_KEY_HEX).await
}

/// The same with a token of `issuer`.
async fn open_issued(base: &str, roles: &str, sub: &str, issuer: &str) -> Result<Ws, (u16, Value)> {
    let stamp = [("x-gw-token-issuer", issuer)];
    open_stamped(
        base,
        Some(roles),
        sub,
        None,
        testkit::fixtures::EDGE_KEY_HEX,
        &stamp,
    )
    .await
}

/// The same, the stamp sealed under `key` (hex).
async fn open_sealed(
    base: &str,
    roles: Option<&str>,
    sub: &str,
    exp: Option<u64>,
    key: &str,
) -> Result<Ws, (u16, Value)> {
    open_stamped(base, roles, sub, exp, key, &[]).await
}

/// The same, with `more` stamped headers.
async fn open_stamped(
    base: &str,
    roles: Option<&str>,
    sub: &str,
    exp: Option<u64>,
    key: &str,
    more: &[(&'static str, &str)],
) -> Result<Ws, (u16, Value)> {
    let mut req = format!("{}/api/realtime", base.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
    let exp = exp.map(|e| e.to_string());
    let mut stamp = Vec::new();
    if let Some(r) = roles {
        stamp.extend([
            ("x-gw-verified", "jwt"),
            ("x-gw-roles", r),
            ("x-gw-sub", sub),
        ]);
    }
    if let Some(exp) = &exp {
        stamp.push(("x-gw-token-exp", exp));
    }
    stamp.extend_from_slice(more);
    let seal = (!stamp.is_empty()).then(|| {
        testkit::fixtures::edge_seal_at(&stamp, common::now(), "GET", "/api/realtime", key)
    });
    for (k, v) in stamp
        .iter()
        .copied()
        .chain(seal.as_ref().map(|(k, v)| (*k, v.as_str())))
    {
        h.insert(k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            assert_eq!(
                resp.headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok()),
                Some(SUBPROTOCOL)
            );
            Ok(ws)
        }
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.into_body().map_or(Value::Null, |b| {
                serde_json::from_slice(&b).unwrap_or(Value::Null)
            });
            Err((status, body))
        }
        Err(e) => panic!("connect: {e}"),
    }
}

/// The next JSON message matching `pred` (pings and others skipped), within 15 s.
async fn until(ws: &mut Ws, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 15 s"))
            .unwrap_or_else(|| panic!("stream ended before {what}"))
            .unwrap_or_else(|e| panic!("stream error before {what}: {e}"));
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if pred(&v) {
                return v;
            }
        }
    }
}

/// Reads `ws` (answering its pings) until its close frame; that frame's code.
async fn close_code(mut ws: Ws) -> Option<CloseCode> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| f.code),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

fn closed_count(s: &common::Served, reason: &str) -> u64 {
    let metrics = s.get_ops("/metrics");
    let line = format!("gw_sidecar_realtime_closed_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or_else(
            || panic!("no {line} in {metrics}"),
            |v| v.trim().parse().unwrap(),
        )
}

#[test]
fn committed_decisions_and_states_stream_to_bounded_clients() {
    let d = testkit::TempDir::new("realtime-stream");
    let ch = ClickHouse::start(d.path());
    let s = start(
        &d.path().join("sidecar"),
        RealtimeConfig {
            max_clients: 2,
            max_per_sub: 2,
            ..RealtimeConfig::default()
        },
        Some(&ch),
    );
    let base = s.base.clone();
    let hub = s.running.realtime().clone();
    s.rt.block_on(async {
        // The edge's word is checked again: verified, and a role on the ladder.
        let (status, body) = open(&base, None).await.err().unwrap();
        assert_eq!((status, body["error"].as_str()), (401, Some("jwt_missing")));
        let (status, body) = open(&base, Some("auditor")).await.err().unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden_role"))
        );
        // A viewer's stamp the edge did not seal: not believed.
        let other_key = "11".repeat(32);
        let (status, body) = open_sealed(&base, Some("viewer"), "tester", None, &other_key)
            .await
            .err()
            .unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("edge_stamp_invalid"))
        );

        let mut a = open(&base, Some("viewer")).await.unwrap();
        let hello = until(&mut a, "hello", |m| m["type"] == "hello").await;
        assert_eq!(hello["schema"], 1);
        assert_eq!(hello["sub"], "tester");
        assert_eq!(hello["modules"]["mev"]["state"], "stopped");
        assert_eq!(hello["roles"], json!(["viewer"]));
        let mut b = open(&base, Some("admin,viewer")).await.unwrap();
        let hello = until(&mut b, "hello", |m| m["type"] == "hello").await;
        // The roles the edge found (by its roles_claim), for the page to offer
        // what they allow.
        assert_eq!(hello["roles"], json!(["admin", "viewer"]));
        // Bounded fan-out: the third is refused, and counted.
        let (status, body) = open_as(&base, Some("viewer"), "someone-else")
            .await
            .err()
            .unwrap();
        assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));

        let client = reqwest::Client::new();
        let r: Value =
            common::as_admin(client.post(format!("{base}/api/control/module/mev:throttle")))
                .json(&json!({"throttle_pct": 33}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        assert_eq!(r["applied"], true, "{r}");
        let rid = r["request_id"].as_str().unwrap().to_owned();
        for ws in [&mut a, &mut b] {
            // The edge's row names the request too (its JSON body, the id the
            // command was given), before the sidecar's.
            let edge = until(ws, "edge row", |m| {
                m["type"] == "decision"
                    && m["request_id"] == rid.as_str()
                    && m["decision"] == "accepted"
            })
            .await;
            assert_eq!(
                (&edge["stage"], &edge["module"], &edge["action"]),
                (&json!("edge"), &json!("mev"), &json!("throttle"))
            );
            let accepted = until(ws, "accepted row", |m| {
                m["type"] == "decision"
                    && m["request_id"] == rid.as_str()
                    && m["decision"] == "accepted"
            })
            .await;
            assert_eq!(accepted["stage"], "sidecar");
            assert!(accepted["seq"].as_u64().unwrap() >= 1);
            until(ws, "applied row", |m| {
                m["type"] == "decision"
                    && m["request_id"] == rid.as_str()
                    && m["decision"] == "applied"
            })
            .await;
            let st = until(ws, "mev state", |m| m["type"] == "module").await;
            assert_eq!(st["module"], "mev");
            assert_eq!(st["state"]["throttle_pct"], 33);
        }
        // A refused command: its row, with its code, on the stream.
        let r = common::as_admin(client.post(format!("{base}/api/control/module/mev:throttle")))
            .json(&json!({"throttle_pct": 150}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let refused = until(&mut b, "refused row", |m| {
            m["type"] == "decision" && m["code"] == "bad_args"
        })
        .await;
        assert_eq!(refused["decision"], "rejected");
        // From here b is only read in the background: a client that stops reading
        // stops answering pings too, and would be closed as `no_pong` if the reads
        // below outlast two and a half pings on a slow machine.
        let b = tokio::spawn(close_code(b));
        // The console's reads of the same ledger, once ClickHouse has the rows.
        let get = |path: &'static str| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let r = common::as_role(client.get(format!("{base}{path}")), "viewer")
                    .send()
                    .await
                    .unwrap();
                (
                    r.status().as_u16(),
                    r.json::<Value>().await.unwrap_or(Value::Null),
                )
            }
        };
        let mut refusals = Value::Null;
        for _ in 0..100 {
            refusals = get("/api/ledger/refusals").await.1;
            if refusals["by_code"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|c| c["code"] == "bad_args" && c["stage"] == "sidecar" && c["count"] == 1)
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            refusals["per_minute"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "{refusals}"
        );
        // The refused upgrades have their rows too.
        for code in ["jwt_missing", "forbidden_role", "unavailable"] {
            assert!(
                refusals["by_code"].as_array().is_some_and(|a| a
                    .iter()
                    .any(|c| c["code"] == code && c["stage"] == "sidecar" && c["count"] == 1)),
                "{code}: {refusals}"
            );
        }
        let (status, one) = get("/api/ledger/history?limit=1").await;
        assert_eq!(
            (status, one.as_array().map(Vec::len)),
            (200, Some(1)),
            "{one}"
        );
        let (status, bad) = get("/api/ledger/history?limit=many").await;
        assert_eq!((status, bad["error"].as_str()), (400, Some("malformed")));
        let (status, sends) = get("/api/ledger/sends").await;
        assert_eq!(status, 200, "{sends}");
        assert!(
            sends["per_minute"].is_array() && sends["latency"].is_array(),
            "{sends}"
        );
        let (status, cps) = get("/api/ledger/checkpoints").await;
        assert!(status == 200 && cps.is_array(), "{status} {cps}");

        // A closed client frees its place.
        a.close(None).await.unwrap();
        drop(a);
        let mut c = None;
        for _ in 0..50 {
            if let Ok(ws) = open(&base, Some("viewer")).await {
                c = Some(ws);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut c = c.expect("a closed stream's place was not freed");
        until(&mut c, "hello", |m| m["type"] == "hello").await;
        // Stopping: open streams are closed with 1001, not left to the drain timeout.
        hub.shutdown();
        let frame = loop {
            match tokio::time::timeout(Duration::from_secs(5), c.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => break f,
                Ok(Some(Ok(_))) => {}
                other => panic!("no close frame on shutdown: {other:?}"),
            }
        };
        assert_eq!(frame.map(|f| f.code), Some(CloseCode::Away));
        assert_eq!(b.await.unwrap(), Some(CloseCode::Away), "b at shutdown");
    });
    // b and c were open; each stream counts itself once its close frame is out.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while closed_count(&s, "shutdown") < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(closed_count(&s, "shutdown"), 2, "b and c were open");
    assert_eq!(closed_count(&s, "full"), 1);
    assert!(closed_count(&s, "client") >= 1);
    // A refused upgrade counts as a decision of its code, as every refusal.
    let metrics = s.get_ops("/metrics");
    assert!(
        metrics.contains("gw_sidecar_decisions_total{code=\"unavailable\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn a_client_that_stops_reading_is_closed_with_4008_and_counted() {
    let d = testkit::TempDir::new("realtime-slow");
    let s = start(
        &d.path().join("sidecar"),
        RealtimeConfig {
            max_clients: 4,
            max_per_sub: 2,
            queue: 64,
            // Long enough that the stall below ends before it: the lag is what closes.
            write_timeout_ms: 30_000,
            ping_ms: 25_000,
            ..RealtimeConfig::default()
        },
        None,
    );
    let base = s.base.clone();
    let hub = s.running.realtime().clone();
    s.rt.block_on(async {
        let mut fast = open(&base, Some("viewer")).await.unwrap();
        until(&mut fast, "hello", |m| m["type"] == "hello").await;
        let mut slow = open(&base, Some("viewer")).await.unwrap();
        until(&mut slow, "hello", |m| m["type"] == "hello").await;
        // One subject cannot take every place: a third stream for `tester` is refused.
        let (status, body) = open(&base, Some("viewer")).await.err().unwrap();
        assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));
        assert!(
            body["detail"].as_str().unwrap().contains("max_per_sub"),
            "{body}"
        );
        // The same `sub` of another issuer is someone else: its own places.
        let mut other = open_issued(&base, "viewer", "tester", "elsewhere")
            .await
            .unwrap();
        let hello = until(&mut other, "hello", |m| m["type"] == "hello").await;
        assert_eq!(hello["sub"], "tester");
        other.close(None).await.unwrap();

        // The fast client reads everything as it comes.
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = fast.next().await {
                if matches!(m, Message::Text(_)) {
                    counter.fetch_add(1, Ordering::AcqRel);
                }
            }
            fast
        });
        // 48 MB of 4 KiB messages: far more than two loopback socket buffers, so the
        // slow client's sends stall; paced by the fast client so it never falls 32
        // behind (bounded fan-out must not punish a healthy reader).
        const N: usize = 12_000;
        let pad = "x".repeat(4096);
        for i in 0..N {
            while i >= seen.load(Ordering::Acquire) + 32 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            hub.publish(json!({"type": "test", "i": i, "pad": pad}));
        }
        while seen.load(Ordering::Acquire) < N {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The slow client reads again: what was buffered, then the close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut got = 0usize;
        let code = loop {
            match tokio::time::timeout_at(deadline, slow.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => got += 1,
                Ok(Some(Ok(Message::Close(Some(f))))) => break f,
                Ok(Some(Ok(_))) => {}
                other => panic!("no close frame after {got} messages: {other:?}"),
            }
        };
        assert_eq!(code.code, CloseCode::from(CLOSE_SLOW), "{code:?}");
        assert!(code.reason.contains("slow consumer"), "{code:?}");
        assert!(
            got < N,
            "the slow client got every message ({got}): it was never behind"
        );
        // The fast one is still open and still served.
        hub.publish(json!({"type": "test", "i": "after"}));
        let before = seen.load(Ordering::Acquire);
        for _ in 0..200 {
            if seen.load(Ordering::Acquire) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            seen.load(Ordering::Acquire),
            N + 1,
            "the fast reader missed messages"
        );
        reader.abort();
    });
    assert_eq!(closed_count(&s, "slow"), 1);
    assert_eq!(closed_count(&s, "write_timeout"), 0);
    assert_eq!(closed_count(&s, "full_for_sub"), 1);
}

/// The token is checked once, at the upgrade: the stream ends at its expiry
/// (4001, counted `expired`), so a stream does not outlive the token (or the
/// role) that opened it. The page then asks for a new token.
#[test]
fn a_stream_ends_when_its_token_expires() {
    let d = testkit::TempDir::new("realtime-expiry");
    let s = start(
        &d.path().join("sidecar"),
        RealtimeConfig {
            max_clients: 4,
            max_per_sub: 2,
            queue: 64,
            write_timeout_ms: 5_000,
            // No ping while the second stream is not read.
            ping_ms: 20_000,
            ..RealtimeConfig::default()
        },
        None,
    );
    let base = s.base.clone();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    s.rt.block_on(async {
        let started = tokio::time::Instant::now();
        let mut ws = open_until(&base, Some("viewer"), "tester", Some(exp))
            .await
            .unwrap();
        until(&mut ws, "hello", |m| m["type"] == "hello").await;
        let mut lasting = open(&base, Some("viewer")).await.unwrap();
        until(&mut lasting, "hello", |m| m["type"] == "hello").await;
        assert_eq!(close_code(ws).await, Some(CloseCode::from(CLOSE_EXPIRED)));
        let took = started.elapsed();
        assert!(took <= Duration::from_secs(4), "{took:?}");
        // A stream whose token says no expiry goes on.
        let more = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match lasting.next().await {
                    Some(Ok(Message::Close(f))) => return f,
                    Some(Ok(_)) => {}
                    other => panic!("{other:?}"),
                }
            }
        })
        .await;
        assert!(more.is_err(), "closed too: {more:?}");
        // A token already expired by the sidecar's clock (within the edge's
        // leeway): no stream, rather than one closed at once.
        let (status, body) = open_until(&base, Some("viewer"), "tester", Some(exp - 10))
            .await
            .err()
            .unwrap();
        assert_eq!((status, body["error"].as_str()), (401, Some("jwt_expired")));
        // A token that says it never expires: the stream opens.
        let mut far = open_until(&base, Some("viewer"), "tester", Some(u64::MAX))
            .await
            .unwrap();
        until(&mut far, "hello", |m| m["type"] == "hello").await;
    });
    assert_eq!(closed_count(&s, "expired"), 1);
}
