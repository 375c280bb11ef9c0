//! Turning a decision into a ledger row: [`Auditor::row`] builds it (the journal's
//! writer seals it into the chain as it writes it), [`Auditor::record`] makes one
//! row durable on its own; callers with more to make durable at once put the row
//! in their own transaction.

use std::sync::Arc;

use gw_core::contract::Requester;
use gw_core::ledger::{Decision, LedgerRow, Stage};
use gw_core::{Action, Code, Command, Module};

use crate::error::ApiError;
use crate::journal::{self, Journal, JournalError, Txn};

/// Where decisions are written; without a ledger nothing is (development only).
#[derive(Clone, Default)]
pub struct Auditor {
    journal: Option<Journal>,
}

/// One decision about one request.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Who decided.
    pub stage: Stage,
    /// What.
    pub decision: Decision,
    /// Why (rejections, duplicates).
    pub code: Option<Code>,
    /// The bytes the decision is about (a signed command, or the JSON body of the
    /// original route), stored so the row can be re-verified later.
    pub body: &'a [u8],
    /// The decoded command when the caller has it; decoded from `body` otherwise
    /// (a rejected body may not decode).
    pub command: Option<&'a Command>,
    /// Who sent the request, as the edge verified it.
    pub requester: Option<&'a Requester>,
    /// The route it came in on (`""` for the agent, which takes commands from the
    /// bus).
    pub route: &'a str,
}

/// The decision could not be made durable: the caller must not act on it.
#[derive(Debug, thiserror::Error)]
#[error("audit ledger: {0}")]
pub struct AuditError(#[from] pub JournalError);

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> Self {
        ApiError::with(Code::Unavailable, format!("audit ledger: {}", e.0.public()))
    }
}

impl Auditor {
    /// Writes through `journal` (none: decisions are not recorded).
    pub fn new(journal: Option<Journal>) -> Auditor {
        Auditor { journal }
    }

    /// Whether decisions are recorded.
    pub fn enabled(&self) -> bool {
        self.journal.is_some()
    }

    /// The row of `e`, unsealed (`None` when decisions are not recorded).
    pub fn row(&self, e: &Entry<'_>) -> Option<journal::Entry> {
        self.journal.as_ref().map(|_| journal::Entry::row(row(e)))
    }

    /// Makes one decision durable (sealed into the chain, fsynced) before returning
    /// its row as sealed.
    pub async fn record(&self, e: Entry<'_>) -> Result<Option<LedgerRow>, AuditError> {
        let Some(j) = &self.journal else {
            return Ok(None);
        };
        let c = j
            .commit(Txn::of(vec![journal::Entry::row(row(&e))]))
            .await?;
        Ok(c.rows.into_iter().next().map(Arc::unwrap_or_clone))
    }

    /// Records the sidecar's refusal with `code` of a request on `route` that
    /// carried no command it decoded (a caller, a route, a stream): its row holds
    /// `body` and who asked, as the edge said.
    pub async fn refusal(
        &self,
        code: Code,
        body: &[u8],
        requester: Option<&Requester>,
        route: &str,
    ) -> Result<(), AuditError> {
        self.record(refusal_entry(code, body, requester, route))
            .await
            .map(drop)
    }
}

/// The entry of the sidecar's refusal with `code` of a request on `route` that
/// carried no command it decoded.
fn refusal_entry<'a>(
    code: Code,
    body: &'a [u8],
    requester: Option<&'a Requester>,
    route: &'a str,
) -> Entry<'a> {
    Entry {
        stage: Stage::Sidecar,
        decision: Decision::Rejected,
        code: Some(code),
        body,
        command: None,
        requester,
        route,
    }
}

impl Auditor {
    /// The row of the sidecar's refusal with `code` of a request on `route` that
    /// carried no command ([`Self::refusal`]), its `args_json` `note`; unsealed
    /// (`None`: no ledger).
    pub fn refusal_row(
        &self,
        code: Code,
        body: &[u8],
        requester: Option<&Requester>,
        route: &str,
        note: &serde_json::Value,
    ) -> Option<journal::Entry> {
        self.row_noting(&refusal_entry(code, body, requester, route), note)
    }

    /// Makes `rows` durable together (nothing: nothing to do).
    pub async fn commit(&self, rows: Vec<journal::Entry>) -> Result<(), AuditError> {
        match &self.journal {
            Some(j) if !rows.is_empty() => {
                j.commit(Txn::of(rows)).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records that `n` refusals with `code` got no row of their own (over the
    /// ledger's budget for them, `serve::RefusalBudget`): one row of `stage`,
    /// `args_json` `{"unrecorded": n}`, route `""`.
    pub async fn unrecorded(&self, stage: Stage, code: Code, n: u64) -> Result<(), AuditError> {
        let (Some(j), Some(r)) = (&self.journal, self.unrecorded_row(stage, code, n)) else {
            return Ok(());
        };
        j.commit(Txn::of(vec![r])).await?;
        Ok(())
    }

    /// The row [`Self::unrecorded`] writes, to write with others (`None`: no
    /// ledger).
    pub fn unrecorded_row(&self, stage: Stage, code: Code, n: u64) -> Option<journal::Entry> {
        let e = Entry {
            stage,
            decision: Decision::Rejected,
            code: Some(code),
            body: &[],
            command: None,
            requester: None,
            route: "",
        };
        self.row_noting(&e, &serde_json::json!({ "unrecorded": n }))
    }

    /// The row of `e` whose `args_json` is `note` — what the row says of itself
    /// (a sum of refusals, a body kept in part, an edge report's id and time) —
    /// with the arguments of the command `e` holds, if any, under `args`;
    /// unsealed (`None`: no ledger).
    pub fn row_noting(&self, e: &Entry<'_>, note: &serde_json::Value) -> Option<journal::Entry> {
        self.journal.as_ref()?;
        let mut r = row(e);
        let mut note = note.clone();
        // A command's arguments stay, under `args` (a body that is no command, or
        // none, decodes as a command without any: nothing to keep).
        if let Some(obj) = note.as_object_mut() {
            if let Ok(args @ serde_json::Value::Object(_)) =
                serde_json::from_str::<serde_json::Value>(&r.args_json)
            {
                if args.as_object().is_some_and(|a| !a.is_empty()) {
                    obj.insert("args".into(), args);
                }
            }
        }
        r.args_json = note.to_string();
        Some(journal::Entry::row(r))
    }
}

/// A model swapped in to serve a module, or a library refused for it
/// ([`Auditor::record_model`]).
#[derive(Debug, Clone)]
pub struct ModelEvent<'a> {
    /// The module (`mev`, `arbitrage`).
    pub module: &'a str,
    /// `applied`: now serving; `rejected`: refused (or its link lost).
    pub decision: Decision,
    /// The refusal's reason label (`not_allowed`, `golden_mismatch`, …,
    /// `link_lost`); empty when served.
    pub reason: &'a str,
    /// The `lib<stem>_latest.so` link.
    pub link: &'a str,
    /// Who placed the link: `uid:<n>`, its owner.
    pub owner: String,
    /// What the row says of the library: path, SHA-256, name, version, ABI, or
    /// why it was refused.
    pub note: serde_json::Value,
}

impl Auditor {
    /// Makes the row of a model event durable (stage `models`, action `swap`,
    /// route the link), from a thread outside the async runtime.
    pub fn record_model(&self, e: &ModelEvent<'_>) -> Result<(), AuditError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let row = LedgerRow {
            ts_ms: crate::now_nanos() / 1_000_000,
            stage: Stage::Models.as_str().into(),
            decision: e.decision.as_str().into(),
            code: e.reason.into(),
            module: e.module.into(),
            action: "swap".into(),
            args_json: e.note.to_string(),
            requester: e.owner.clone(),
            route: e.link.into(),
            ..LedgerRow::default()
        };
        j.commit_blocking(Txn::of(vec![journal::Entry::row(row)]))?;
        Ok(())
    }
}

/// Most bytes a row keeps of a name a request gave (request id, issuer, key id,
/// algorithm, token issuer): a refused body's fields are its sender's to choose
/// and were kept whole — a 64 KiB request id in each of 10 000 rows made one
/// page of `/api/ledger/history` hundreds of megabytes. A verified command's
/// are shorter ([`gw_core::command::MAX_ISSUER_BYTES`],
/// [`gw_core::command::MAX_REQUEST_ID_BYTES`]); `raw_hex` keeps the request whole.
const MAX_ROW_NAME: usize = 256;

/// Most bytes a row keeps of who asked (the token's subject and roles) and of
/// the route.
const MAX_ROW_WHO: usize = 512;

/// `s`, cut to at most `max` bytes on a character boundary and marked `…` when
/// cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The unsealed row of an entry (`seq` and hashes are set by the chain).
fn row(e: &Entry<'_>) -> LedgerRow {
    let decoded;
    let (cmd, given) = match e.command {
        Some(c) => (Some(c), true),
        None => {
            decoded = <Command as prost::Message>::decode(e.body).ok();
            (decoded.as_ref(), false)
        }
    };
    let name = |v: i32, f: fn(i32) -> Option<&'static str>| f(v).unwrap_or("").to_owned();
    // Almost any body decodes as a command (every field may be absent, and the
    // absent module and action are arbitrage and start, the enums' zeros): a
    // decoded body names a module and action only when it looks like a command
    // (a schema version or a signature). Otherwise a request on a module route
    // (the JSON route's, one refused before it was signed) is about the module and
    // action its route names.
    let looks_like_command =
        |c: &&Command| given || !c.schema_version.is_empty() || !c.sig.is_empty();
    let routed = e
        .route
        .strip_prefix(gw_core::contract::MODULE_ROUTE_PREFIX)
        .and_then(gw_core::names::parse_module_spec);
    let (module, action) = cmd
        .filter(looks_like_command)
        .map(|c| {
            (
                name(c.module, |m| Module::from_proto(m).map(Module::as_str)),
                name(c.action, |a| Action::from_proto(a).map(Action::as_str)),
            )
        })
        .filter(|(m, _)| !m.is_empty())
        .or_else(|| routed.map(|(m, a)| (m.as_str().to_owned(), a.as_str().to_owned())))
        .unwrap_or_default();
    let who = e.requester.cloned().unwrap_or_default();
    LedgerRow {
        chain_id: String::new(),
        seq: 0,
        ts_ms: crate::now_nanos() / 1_000_000,
        stage: e.stage.as_str().into(),
        decision: e.decision.as_str().into(),
        code: e.code.map(Code::as_str).unwrap_or_default().into(),
        request_id: cmd.map_or(String::new(), |c| cut(&c.request_id, MAX_ROW_NAME)),
        issuer: cmd.map_or(String::new(), |c| cut(&c.issuer, MAX_ROW_NAME)),
        module,
        action,
        pubkey_id: cmd.map_or(String::new(), |c| cut(&c.pubkey_id, MAX_ROW_NAME)),
        sig_alg: cmd.map_or(String::new(), |c| cut(&c.sig_alg, MAX_ROW_NAME)),
        nonce: cmd.map_or(0, |c| c.nonce),
        args_json: cmd
            .map(|c| serde_json::to_string(&c.args).unwrap_or_default())
            .unwrap_or_default(),
        raw_hex: hex::encode(e.body),
        requester: cut(&who.sub, MAX_ROW_WHO),
        requester_roles: cut(&who.roles, MAX_ROW_WHO),
        token_issuer: cut(&who.token_issuer, MAX_ROW_NAME),
        route: cut(e.route, MAX_ROW_WHO),
        prev_hash: String::new(),
        row_hash: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(body: &'a [u8], route: &'a str) -> Entry<'a> {
        Entry {
            stage: Stage::Sidecar,
            decision: Decision::Rejected,
            code: Some(Code::BadArgs),
            body,
            command: None,
            requester: None,
            route,
        }
    }

    #[test]
    fn a_row_names_the_module_and_action_of_its_command_or_else_of_its_route() {
        let json = br#"{"throttle_pct": 150}"#;
        let r = row(&entry(json, "/api/control/module/mev:throttle"));
        assert_eq!((r.module.as_str(), r.action.as_str()), ("mev", "throttle"));
        // No module route: nothing to name.
        let r = row(&entry(json, "/api/control/commands"));
        assert_eq!((r.module.as_str(), r.action.as_str()), ("", ""));
        // An empty body decodes (as arbitrage:start): no command, nothing named.
        let r = row(&entry(b"", "/api/control/commands"));
        assert_eq!((r.module.as_str(), r.action.as_str()), ("", ""));
        let r = row(&entry(b"", "/api/control/module/mev:kill"));
        assert_eq!((r.module.as_str(), r.action.as_str()), ("mev", "kill"));
        let r = row(&entry(b"", "/api/control/module/hft:stop"));
        assert_eq!((r.module.as_str(), r.action.as_str()), ("", ""));
        // A command names its own, whatever route it came on.
        let cmd =
            testkit::fixtures::signed_command(7, Action::Stop, 1_750_000_000, "dashboard", &[]);
        let r = row(&entry(&cmd, "/api/control/module/mev:throttle"));
        let decoded = <Command as prost::Message>::decode(cmd.as_slice()).unwrap();
        let module = Module::from_proto(decoded.module).unwrap().as_str();
        assert_eq!((r.module.as_str(), r.action.as_str()), (module, "stop"));
    }

    /// A refused body's names are its sender's to choose: a row keeps at most
    /// 256 bytes of each (cut on a character boundary, marked), the body whole.
    #[test]
    fn a_row_keeps_a_bounded_part_of_the_names_a_request_gave() {
        let long = format!("é{}", "x".repeat(70_000));
        let cmd = Command {
            schema_version: "ctrl-v1".into(),
            request_id: long.clone(),
            issuer: long.clone(),
            pubkey_id: long.clone(),
            sig_alg: long.clone(),
            ..Command::default()
        };
        let body = prost::Message::encode_to_vec(&cmd);
        let route = format!("/api/ledger/{long}");
        let who = Requester {
            sub: long.clone(),
            roles: long.clone(),
            token_issuer: long.clone(),
        };
        let mut e = entry(&body, &route);
        e.requester = Some(&who);
        let r = row(&e);
        for (field, v, max) in [
            ("request_id", &r.request_id, MAX_ROW_NAME),
            ("issuer", &r.issuer, MAX_ROW_NAME),
            ("pubkey_id", &r.pubkey_id, MAX_ROW_NAME),
            ("sig_alg", &r.sig_alg, MAX_ROW_NAME),
            ("token_issuer", &r.token_issuer, MAX_ROW_NAME),
            ("requester", &r.requester, MAX_ROW_WHO),
            ("requester_roles", &r.requester_roles, MAX_ROW_WHO),
            ("route", &r.route, MAX_ROW_WHO),
        ] {
            assert!(
                v.len() <= max && v.ends_with('…'),
                "{field}: {} bytes",
                v.len()
            );
        }
        assert!(r.request_id.starts_with("éxxx"));
        assert_eq!(r.raw_hex, hex::encode(&body), "the body is kept whole");
        // Short names are kept as they are; a cut never splits a character.
        assert_eq!(cut("req-1", 256), "req-1");
        assert_eq!(cut("ééé", 6), "ééé");
        assert_eq!(cut("éééé", 6), "é…");
        assert_eq!(cut("aéééé", 6), "aé…");
    }
}
