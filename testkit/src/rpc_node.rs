//! A local Solana JSON-RPC node whose slot, signature statuses, blockhash validity
//! and simulation results the test drives: `getSlot`, `getSignatureStatuses`,
//! `isBlockhashValid`, `simulateTransaction` (honouring `minContextSlot` as Agave's
//! RPC does, -32016) and `getHealth`. Every call is recorded. It stands in for a
//! validator's RPC service, which needs a bank this machine does not run.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::http_thread::HttpThread;

#[derive(Default)]
struct Inner {
    slot: u64,
    statuses: HashMap<String, Value>,
    expired: HashSet<String>,
    simulation_err: Option<Value>,
    simulation_value: Option<Value>,
    delay: Duration,
    calls: Vec<(String, Value)>,
    /// Calls being answered now, and the most there were at once.
    in_flight: usize,
    most_in_flight: usize,
}

type Shared = Arc<Mutex<Inner>>;

/// A running node; stops when dropped.
pub struct RpcNode {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    shared: Shared,
    _server: HttpThread,
}

impl RpcNode {
    /// Starts on a free port at `slot`, on its own thread.
    pub fn start(slot: u64) -> RpcNode {
        let shared: Shared = Arc::new(Mutex::new(Inner {
            slot,
            ..Inner::default()
        }));
        let app = axum::Router::new()
            .route("/", axum::routing::post(handle))
            .with_state(shared.clone());
        let server = HttpThread::start(SocketAddr::from(([127, 0, 0, 1], 0)), app);
        RpcNode {
            url: server.url(),
            shared,
            _server: server,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.shared.lock().expect("node state"))
    }

    /// Sets the slot.
    pub fn set_slot(&self, slot: u64) {
        self.with(|i| i.slot = slot);
    }

    /// The node has seen `signature` with this status object.
    pub fn set_status(&self, signature: &str, status: Value) {
        self.with(|i| i.statuses.insert(signature.to_owned(), status));
    }

    /// The node no longer knows `signature` (a node that lags, or forgot).
    pub fn forget_status(&self, signature: &str) {
        self.with(|i| i.statuses.remove(signature));
    }

    /// `blockhash` (base58) is no longer valid.
    pub fn expire_blockhash(&self, blockhash: &str) {
        self.with(|i| i.expired.insert(blockhash.to_owned()));
    }

    /// Simulations fail with `err` (a TransactionError as JSON), or pass (`None`).
    pub fn set_simulation_err(&self, err: Option<Value>) {
        self.with(|i| i.simulation_err = err);
    }

    /// Simulations answer `value` as their `result.value`, whatever it is (a
    /// proxy's or a broken node's answer), or a simulation (`None`).
    pub fn set_simulation_value(&self, value: Option<Value>) {
        self.with(|i| i.simulation_value = value);
    }

    /// Every answer comes `delay` late (a slow or overloaded node).
    pub fn set_delay(&self, delay: Duration) {
        self.with(|i| i.delay = delay);
    }

    /// The calls so far: method and params.
    pub fn calls(&self) -> Vec<(String, Value)> {
        self.with(|i| i.calls.clone())
    }

    /// The most calls it was answering at once since the last [`Self::recount`].
    pub fn most_in_flight(&self) -> usize {
        self.with(|i| i.most_in_flight)
    }

    /// Starts [`Self::most_in_flight`] again from the calls being answered now.
    pub fn recount(&self) {
        self.with(|i| i.most_in_flight = i.in_flight);
    }

    /// How many calls of `method`.
    pub fn count(&self, method: &str) -> usize {
        self.with(|i| i.calls.iter().filter(|(m, _)| m == method).count())
    }
}

async fn handle(State(sh): State<Shared>, Json(req): Json<Value>) -> Json<Value> {
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let method = req["method"].as_str().unwrap_or("").to_owned();
    let params = req.get("params").cloned().unwrap_or(json!([]));
    let delay = {
        let mut i = sh.lock().expect("node state");
        i.calls.push((method.clone(), params.clone()));
        i.in_flight += 1;
        i.most_in_flight = i.most_in_flight.max(i.in_flight);
        i.delay
    };
    // Counted out however the call ends (its client may hang up mid-delay).
    struct Answering(Shared);
    impl Drop for Answering {
        fn drop(&mut self) {
            if let Ok(mut i) = self.0.lock() {
                i.in_flight -= 1;
            }
        }
    }
    let _answering = Answering(sh.clone());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let i = sh.lock().expect("node state");
    let context = json!({"slot": i.slot, "apiVersion": "3.1.0"});
    let ok = |v: Value| Json(json!({"jsonrpc": "2.0", "result": v, "id": id}));
    let err = |code: i64, msg: &str, data: Option<Value>| {
        let mut e = json!({"code": code, "message": msg});
        if let Some(d) = data {
            e["data"] = d;
        }
        Json(json!({"jsonrpc": "2.0", "error": e, "id": id}))
    };
    match method.as_str() {
        "getHealth" => ok(json!("ok")),
        "getSlot" => ok(json!(i.slot)),
        "getSignatureStatuses" => {
            // As Agave reads its configuration (`Option<RpcSignatureStatusConfig>`,
            // whose one field has no default).
            let config_ok = match params.get(1) {
                None | Some(Value::Null) => true,
                Some(Value::Object(o)) => o
                    .get("searchTransactionHistory")
                    .is_some_and(Value::is_boolean),
                Some(Value::Array(a)) => a.len() == 1 && a[0].is_boolean(),
                Some(_) => false,
            };
            if !config_ok {
                return err(
                    -32602,
                    "Invalid params: missing field `searchTransactionHistory`",
                    None,
                );
            }
            let sigs = params[0].as_array().cloned().unwrap_or_default();
            let value: Vec<Value> = sigs
                .iter()
                .map(|s| {
                    s.as_str()
                        .and_then(|s| i.statuses.get(s).cloned())
                        .unwrap_or(Value::Null)
                })
                .collect();
            ok(json!({"context": context, "value": value}))
        }
        "isBlockhashValid" => {
            let valid = params[0].as_str().is_some_and(|b| !i.expired.contains(b));
            ok(json!({"context": context, "value": valid}))
        }
        "simulateTransaction" => {
            if let Some(min) = params[1]["minContextSlot"].as_u64() {
                if i.slot < min {
                    return err(
                        -32016,
                        "Minimum context slot has not been reached",
                        Some(json!({"contextSlot": i.slot})),
                    );
                }
            }
            if let Some(v) = &i.simulation_value {
                return ok(json!({"context": context, "value": v}));
            }
            let e = i.simulation_err.clone().unwrap_or(Value::Null);
            let logs = if e.is_null() {
                json!([
                    "Program 11111111111111111111111111111111 invoke [1]",
                    "Program 11111111111111111111111111111111 success"
                ])
            } else {
                json!([
                    "Program 11111111111111111111111111111111 invoke [1]",
                    "Program 11111111111111111111111111111111 failed: custom program error: 0x1"
                ])
            };
            ok(json!({"context": context, "value": {
                "err": e, "logs": logs, "accounts": null, "unitsConsumed": 150,
                "returnData": null}}))
        }
        _ => err(-32601, "Method not found", None),
    }
}
