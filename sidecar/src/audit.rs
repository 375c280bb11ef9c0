//! Turning a decision into a sealed ledger row (see [`crate::ledger_sink`]).

use std::sync::{Arc, Mutex};

use gw_core::ledger::LedgerRow;
use gw_core::{Action, Code, Command, Module, Reject};

use crate::ledger_sink::Ledger;

/// Where decisions are written; without a ledger nothing is (development only).
#[derive(Clone, Default)]
pub struct Auditor(Option<Arc<Mutex<Ledger>>>);

/// One decision.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    /// `edge`, `sidecar` or `agent`.
    pub stage: &'a str,
    /// `accepted`, `rejected`, `applied`, `duplicate`.
    pub decision: &'a str,
    /// The rejection code, empty when none.
    pub code: &'a str,
}

impl Auditor {
    /// Writes to `ledger`.
    pub fn new(ledger: Option<Ledger>) -> Auditor {
        Auditor(ledger.map(|l| Arc::new(Mutex::new(l))))
    }

    /// The ledger, when there is one.
    pub fn ledger(&self) -> Option<&Arc<Mutex<Ledger>>> {
        self.0.as_ref()
    }

    /// Seals one decision into the chain and the spool (fsync) before returning.
    /// `cmd` is decoded from `body` when not given (a rejected body may not decode).
    pub fn record(
        &self,
        d: Decision<'_>,
        body: &[u8],
        cmd: Option<&Command>,
    ) -> Result<(), Reject> {
        let Some(ledger) = &self.0 else {
            return Ok(());
        };
        let decoded;
        let cmd = match cmd {
            Some(c) => Some(c),
            None => {
                decoded = <Command as prost::Message>::decode(body).ok();
                decoded.as_ref()
            }
        };
        let name = |v: i32, f: fn(i32) -> Option<&'static str>| f(v).unwrap_or("").to_owned();
        let row = LedgerRow {
            seq: 0,
            ts_ms: crate::now_nanos() / 1_000_000,
            stage: d.stage.into(),
            decision: d.decision.into(),
            code: d.code.into(),
            request_id: cmd.map(|c| c.request_id.clone()).unwrap_or_default(),
            issuer: cmd.map(|c| c.issuer.clone()).unwrap_or_default(),
            module: cmd
                .map(|c| name(c.module, |m| Module::from_proto(m).map(Module::as_str)))
                .unwrap_or_default(),
            action: cmd
                .map(|c| name(c.action, |a| Action::from_proto(a).map(Action::as_str)))
                .unwrap_or_default(),
            pubkey_id: cmd.map(|c| c.pubkey_id.clone()).unwrap_or_default(),
            sig_alg: cmd.map(|c| c.sig_alg.clone()).unwrap_or_default(),
            nonce: cmd.map_or(0, |c| c.nonce),
            args_json: cmd
                .map(|c| serde_json::to_string(&c.args).unwrap_or_default())
                .unwrap_or_default(),
            raw_hex: hex::encode(body),
            prev_hash: String::new(),
            row_hash: String::new(),
        };
        ledger
            .lock()
            .map_err(|_| Reject::new(Code::Unavailable, "audit ledger lock poisoned"))?
            .append(row)
            .map(|_| ())
            .map_err(|e| Reject::with(Code::Unavailable, format!("audit ledger: {e}")))
    }
}
