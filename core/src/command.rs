//! Signed control commands: the signing payload, signing and verification.
//!
//! `sig = Ed25519(sk, P)` where `P` is the deterministic serialization of the
//! command with `sig` (8), `pubkey_id` (9) and `sig_alg` (10) empty. We verify over
//! the *received* records with those three removed — never a decode/re-encode, which
//! would drop unknown fields and reorder `args` — and, if that fails, over the same
//! records in canonical deterministic order (known fields ascending, `args` entries by
//! key, unknown fields after them in received order), because the original API signs
//! the deterministic form but publishes a non-deterministic one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::{Signer, SigningKey};
use gw_proto::control::Command;
use prost::Message;

use crate::args::CommandArgs;
use crate::code::{Code, Reject};
use crate::freshness::check_freshness;
use crate::keyring::KeyRing;
use crate::names::{Action, Module};
use crate::wire::{self, Record, WireType};

/// The only signature algorithm we accept.
pub const SIG_ALG_ED25519_V1: &str = "ed25519-v1";
/// The only command schema we accept.
pub const SCHEMA_CTRL_V1: &str = "ctrl-v1";
/// Default bound on a command body.
pub const DEFAULT_MAX_COMMAND_BYTES: usize = 64 * 1024;

const FIELD_ARGS: u32 = 4;
const FIELD_SIG: u32 = 8;
const FIELD_PUBKEY_ID: u32 = 9;
const FIELD_SIG_ALG: u32 = 10;
const HIGHEST_KNOWN_FIELD: u32 = 11;

/// Wire type of each known field of `control.Command` (index = field number).
pub(crate) const KNOWN_WIRE_TYPES: [Option<WireType>; 12] = [
    None,
    Some(WireType::Varint), // ts
    Some(WireType::Varint), // module
    Some(WireType::Varint), // action
    Some(WireType::Len),    // args (map entry)
    Some(WireType::Len),    // request_id
    Some(WireType::Len),    // issuer
    Some(WireType::Len),    // schema_version
    Some(WireType::Len),    // sig
    Some(WireType::Len),    // pubkey_id
    Some(WireType::Len),    // sig_alg
    Some(WireType::Varint), // nonce
];

fn malformed(detail: String) -> Reject {
    Reject::with(Code::Malformed, detail)
}

/// A received command split into its signature fields and what they sign.
#[derive(Debug, Clone)]
pub struct SignedParts<'a> {
    /// `sig` (field 8), as received.
    pub sig: &'a [u8],
    /// `pubkey_id` (field 9).
    pub pubkey_id: &'a str,
    /// `sig_alg` (field 10).
    pub sig_alg: &'a str,
    /// The records other than 8/9/10, in received order.
    pub payload: Vec<u8>,
    /// The same records in canonical deterministic order, when that differs.
    pub canonical: Option<Vec<u8>>,
}

fn utf8<'a>(body: &'a [u8], r: &Record, name: &str) -> Result<&'a str, Reject> {
    std::str::from_utf8(&body[r.value.clone()])
        .map_err(|_| malformed(format!("field `{name}` is not UTF-8")))
}

/// The key of one `args` map entry, for canonical ordering.
fn map_entry_key<'a>(body: &'a [u8], r: &Record) -> Result<&'a [u8], Reject> {
    let entry = &body[r.value.clone()];
    let mut key: &[u8] = b"";
    let (mut has_key, mut has_value) = (false, false);
    let mut pos = 0;
    while pos < entry.len() {
        let er = wire::read_record(entry, &mut pos)
            .map_err(|e| malformed(format!("args entry: {e}")))?;
        match (er.field, er.wire_type) {
            (1, WireType::Len) if has_key => {
                return Err(malformed("an args entry has two keys".into()))
            }
            (2, WireType::Len) if has_value => {
                return Err(malformed("an args entry has two values".into()))
            }
            (1, WireType::Len) => {
                key = &entry[er.value];
                has_key = true;
            }
            (2, WireType::Len) => has_value = true,
            (1 | 2, _) => return Err(malformed("args entry has a wrong wire type".into())),
            _ => {} // unknown entry fields are tolerated, as by every protobuf parser
        }
    }
    Ok(key)
}

/// Splits a received command into its signature fields and signing payloads.
pub fn split_signed(body: &[u8]) -> Result<SignedParts<'_>, Reject> {
    let records = wire::records(body).map_err(|e| malformed(e.to_string()))?;
    let mut sig = None;
    let mut pubkey_id = None;
    let mut sig_alg = None;
    let mut seen = [false; HIGHEST_KNOWN_FIELD as usize + 1];
    let mut kept: Vec<(&Record, Option<&[u8]>)> = Vec::with_capacity(records.len());
    for r in &records {
        let known = KNOWN_WIRE_TYPES.get(r.field as usize).copied().flatten();
        if let Some(wt) = known {
            if wt != r.wire_type {
                return Err(malformed(format!(
                    "field {} has the wrong wire type",
                    r.field
                )));
            }
            // Only `args` repeats; a repeated singular field is ambiguous.
            if r.field != FIELD_ARGS {
                if seen[r.field as usize] {
                    return Err(malformed(format!("field {} appears twice", r.field)));
                }
                seen[r.field as usize] = true;
            }
        }
        match r.field {
            FIELD_SIG => sig = Some(&body[r.value.clone()]),
            FIELD_PUBKEY_ID => pubkey_id = Some(utf8(body, r, "pubkey_id")?),
            FIELD_SIG_ALG => sig_alg = Some(utf8(body, r, "sig_alg")?),
            FIELD_ARGS => kept.push((r, Some(map_entry_key(body, r)?))),
            _ => kept.push((r, None)),
        }
    }

    // A map key given twice is ambiguous (which value holds?): refused, like a
    // repeated singular field.
    let mut keys: Vec<&[u8]> = kept.iter().filter_map(|(_, k)| *k).collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(malformed(format!(
            "args key `{}` appears twice",
            String::from_utf8_lossy(w[0]).escape_debug()
        )));
    }

    let payload_len = kept.iter().map(|(r, _)| r.span.len()).sum();
    let mut payload = Vec::with_capacity(payload_len);
    for (r, _) in &kept {
        payload.extend_from_slice(&body[r.span.clone()]);
    }

    // Canonical order: known fields by number (args by key), unknown after, stably.
    fn sort_key<'b>((r, k): &(&Record, Option<&'b [u8]>)) -> (bool, u32, &'b [u8]) {
        let known = r.field <= HIGHEST_KNOWN_FIELD;
        (!known, if known { r.field } else { 0 }, k.unwrap_or(b""))
    }
    let in_order = kept.windows(2).all(|w| sort_key(&w[0]) <= sort_key(&w[1]));
    let canonical = if in_order {
        None
    } else {
        let mut sorted = kept.clone();
        sorted.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        let mut c = Vec::with_capacity(payload_len);
        for (r, _) in &sorted {
            c.extend_from_slice(&body[r.span.clone()]);
        }
        Some(c)
    };

    Ok(SignedParts {
        sig: sig.unwrap_or_default(),
        pubkey_id: pubkey_id.unwrap_or_default(),
        sig_alg: sig_alg.unwrap_or_default(),
        payload,
        canonical,
    })
}

/// Longest issuer name: it names replay state at the edge and in the sidecar, and
/// travels in a header and in every ledger row.
pub const MAX_ISSUER_BYTES: usize = 128;

/// Longest request id: it names the command in every ledger row and answer, and
/// is looked up by (`/api/ledger/request/{id}`).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// A command whose signature, key and scope were verified.
#[derive(Debug, Clone)]
pub struct VerifiedCommand {
    /// The decoded command (unknown fields are not kept here; the caller keeps the body).
    pub command: Command,
    /// The module.
    pub module: Module,
    /// The action.
    pub action: Action,
    /// The exact bytes the signature covers (received order or canonical order).
    pub signed_payload: Vec<u8>,
    /// The typed, bounds-checked `args`.
    pub args: CommandArgs,
}

/// Verifies a received command's signature, key and scope. `now` (unix seconds),
/// when given, checks the key's validity window; freshness and replay are separate
/// ([`ControlPolicy::check`] adds freshness and the route).
pub fn verify_command(
    body: &[u8],
    keyring: &KeyRing,
    now: Option<u64>,
) -> Result<VerifiedCommand, Reject> {
    verify_with(body, keyring, now.map_or(KeyTime::Unchecked, KeyTime::At))
}

/// When a command's key must have been valid.
#[derive(Clone, Copy)]
enum KeyTime {
    /// Not checked.
    Unchecked,
    /// At this moment (admission).
    At(u64),
    /// At some moment admission could have taken the command at: within
    /// `max_skew` of its `ts`, and not after `now` (an agent applying it later).
    Admitted { now: u64, max_skew: u64 },
}

fn verify_with(body: &[u8], keyring: &KeyRing, when: KeyTime) -> Result<VerifiedCommand, Reject> {
    let parts = split_signed(body)?;
    // Decode for typed access; the wire checks above make this agree with the records.
    let command = Command::decode(body).map_err(|e| malformed(format!("decode: {e}")))?;

    if parts.sig_alg != SIG_ALG_ED25519_V1 {
        return Err(Reject::with(
            Code::SigAlg,
            format!(
                "sig_alg must be `{SIG_ALG_ED25519_V1}`, got `{}`",
                parts.sig_alg.escape_debug()
            ),
        ));
    }
    let sig_bytes: &[u8; 64] = parts.sig.try_into().map_err(|_| {
        Reject::with(
            Code::BadSigLength,
            format!("sig must be 64 bytes, got {}", parts.sig.len()),
        )
    })?;
    let key = keyring.get(parts.pubkey_id).ok_or_else(|| {
        Reject::with(
            Code::UnknownKey,
            format!("unknown pubkey_id `{}`", parts.pubkey_id.escape_debug()),
        )
    })?;
    match when {
        KeyTime::Unchecked => {}
        KeyTime::At(now) => key.check_validity(now)?,
        KeyTime::Admitted { now, max_skew } => key.check_validity_within(
            command.ts.saturating_sub(max_skew),
            now.min(command.ts.saturating_add(max_skew)),
        )?,
    }
    // The bytes as received, then (when the fields arrived out of order) in
    // canonical order.
    let verified = match &parts.canonical {
        Some(c) => keyring.first_verified(key, &[&parts.payload, c], sig_bytes),
        None => keyring.first_verified(key, &[&parts.payload], sig_bytes),
    };
    let signed_payload = match (verified, parts.canonical) {
        (Some(0), _) => parts.payload,
        (Some(_), Some(c)) => c,
        _ => {
            return Err(Reject::new(
                Code::BadSignature,
                "signature does not verify over the command",
            ))
        }
    };

    let module = Module::from_proto(command.module)
        .ok_or_else(|| malformed(format!("unknown module {}", command.module)))?;
    let action = Action::from_proto(command.action)
        .ok_or_else(|| malformed(format!("unknown action {}", command.action)))?;
    if command.schema_version != SCHEMA_CTRL_V1 {
        return Err(Reject::with(
            Code::BadSchema,
            format!(
                "schema_version must be `{SCHEMA_CTRL_V1}`, got `{}`",
                command.schema_version.escape_debug()
            ),
        ));
    }
    check_names(&command.issuer, &command.request_id)?;
    key.check_scope(&command.issuer, module, action)?;
    if command.nonce == 0 {
        return Err(Reject::new(Code::BadNonce, "nonce must be non-zero"));
    }
    let args = CommandArgs::parse(action, &command.args)?;
    Ok(VerifiedCommand {
        command,
        module,
        action,
        signed_payload,
        args,
    })
}

/// A command's issuer and request id: bounded, without control characters.
fn check_names(issuer: &str, request_id: &str) -> Result<(), Reject> {
    let bad = |s: &str, max: usize| s.len() > max || s.chars().any(char::is_control);
    if bad(issuer, MAX_ISSUER_BYTES) {
        return Err(malformed(format!(
            "issuer must be at most {MAX_ISSUER_BYTES} bytes without control characters"
        )));
    }
    if bad(request_id, MAX_REQUEST_ID_BYTES) {
        return Err(malformed(format!(
            "request_id must be at most {MAX_REQUEST_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// The signing payload of a command we build: its deterministic encoding (prost
/// writes fields by number and `BTreeMap` args by key) with the signature fields empty.
pub fn signing_payload(cmd: &Command) -> Vec<u8> {
    let mut c = cmd.clone();
    c.sig.clear();
    c.pubkey_id.clear();
    c.sig_alg.clear();
    c.encode_to_vec()
}

/// Signs `cmd` with `sk` under `pubkey_id` and returns the encoded signed command.
pub fn sign_command(cmd: &Command, sk: &SigningKey, pubkey_id: &str) -> Vec<u8> {
    let payload = signing_payload(cmd);
    let mut signed = cmd.clone();
    signed.sig = sk.sign(&payload).to_bytes().to_vec();
    signed.pubkey_id = pubkey_id.to_owned();
    signed.sig_alg = SIG_ALG_ED25519_V1.to_owned();
    signed.encode_to_vec()
}

/// The verification rules of a deployment: keys, clock skew, body bound.
#[derive(Debug, Clone)]
pub struct ControlPolicy {
    /// Command keys.
    pub keyring: KeyRing,
    /// Allowed clock skew, seconds.
    pub max_skew: u64,
    /// Bound on the body.
    pub max_body: usize,
}

impl ControlPolicy {
    /// What admission checks, at the edge and in the sidecar: size, signature, key,
    /// scope, route binding and freshness — everything but replay, which each
    /// verifier applies with its own state.
    pub fn check(
        &self,
        body: &[u8],
        now: u64,
        route: Option<(Module, Action)>,
    ) -> Result<VerifiedCommand, Reject> {
        self.check_size(body)?;
        let v = verify_command(body, &self.keyring, Some(now))?;
        if let Some((m, a)) = route {
            if (m, a) != (v.module, v.action) {
                return Err(Reject::with(
                    Code::RouteMismatch,
                    format!(
                        "route says {}:{} but the signed command is {}:{}",
                        m.as_str(),
                        a.as_str(),
                        v.module.as_str(),
                        v.action.as_str()
                    ),
                ));
            }
        }
        check_freshness(v.command.ts, now, self.max_skew)?;
        Ok(v)
    }

    /// What an agent checks before it applies a command it read from the bus: size,
    /// signature, key, scope, and that the command is for `module` (the bus key it
    /// was delivered under). Not freshness: a consumer that lags must still apply
    /// what admission accepted in time — and so the key's validity is judged when
    /// admission could have taken the command (within `max_skew` of its `ts`, not
    /// after `now`), not at `now`: a key that expired while its command waited in
    /// Kafka refused what it had accepted. A key removed from the keyring still
    /// refuses (`unknown_key`). Only for a command a gateway node `admitted`
    /// (its record says so): another (`kafka.accept_unforwarded`) was never
    /// checked at admission: its key is judged at `now`, and a `ts` more than
    /// `max_skew` ahead of `now` is refused (`future`).
    pub fn verify_for_apply(
        &self,
        body: &[u8],
        module: Module,
        now: u64,
        admitted: bool,
    ) -> Result<VerifiedCommand, Reject> {
        self.check_size(body)?;
        let when = if admitted {
            KeyTime::Admitted {
                now,
                max_skew: self.max_skew,
            }
        } else {
            KeyTime::At(now)
        };
        let v = verify_with(body, &self.keyring, when)?;
        // Never admitted (taken from the bus unforwarded): nothing held it to
        // the clock yet. A command from the future (signed ahead, published
        // straight to the topic) is refused as admission refuses it; an old one
        // may be a lagging consumer's, judged by the agents' memory instead.
        if !admitted && v.command.ts > now.saturating_add(self.max_skew) {
            return Err(Reject::with(
                Code::Future,
                format!(
                    "command ts {} is {}s in the future (max skew {}s)",
                    v.command.ts,
                    v.command.ts - now,
                    self.max_skew
                ),
            ));
        }
        if v.module != module {
            return Err(Reject::with(
                Code::RouteMismatch,
                format!(
                    "keyed for {} but signed for {}",
                    module.as_str(),
                    v.module.as_str()
                ),
            ));
        }
        Ok(v)
    }

    fn check_size(&self, body: &[u8]) -> Result<(), Reject> {
        if body.len() > self.max_body {
            return Err(Reject::with(
                Code::TooLarge,
                format!(
                    "command is {} bytes; the limit is {}",
                    body.len(),
                    self.max_body
                ),
            ));
        }
        Ok(())
    }
}

/// A command to build and sign: the one builder behind `gwctl sign` and the
/// sidecar's JSON route. The caller supplies the clock and the randomness
/// (`request_id`), so the core stays free of both.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// The module.
    pub module: Module,
    /// The action.
    pub action: Action,
    /// `args` (checked against the action's bounds by [`NewCommand::build`]).
    pub args: BTreeMap<String, String>,
    /// Who issues it.
    pub issuer: String,
    /// A unique id (a UUID, say).
    pub request_id: String,
    /// Unix seconds.
    pub ts: u64,
    /// Unique per issuer while the command is fresh (see [`NonceSource`]).
    pub nonce: u64,
}

impl NewCommand {
    /// The unsigned command; refuses args the modules would refuse, and a zero nonce.
    pub fn build(self) -> Result<Command, Reject> {
        CommandArgs::parse(self.action, &self.args)?;
        check_names(&self.issuer, &self.request_id)?;
        if self.nonce == 0 {
            return Err(Reject::new(Code::BadNonce, "nonce must be non-zero"));
        }
        Ok(Command {
            ts: self.ts,
            module: self.module.to_proto() as i32,
            action: self.action.to_proto() as i32,
            args: self.args,
            request_id: self.request_id,
            issuer: self.issuer,
            schema_version: SCHEMA_CTRL_V1.into(),
            nonce: self.nonce,
            ..Default::default()
        })
    }

    /// [`Self::build`], then [`sign_command`].
    pub fn sign(self, sk: &SigningKey, pubkey_id: &str) -> Result<Vec<u8>, Reject> {
        Ok(sign_command(&self.build()?, sk, pubkey_id))
    }
}

/// Nonces for one signer: unix nanoseconds, strictly increasing even when the clock
/// stands still or steps back, so two commands of one process never share a nonce.
#[derive(Debug, Default)]
pub struct NonceSource {
    last: AtomicU64,
}

impl NonceSource {
    /// The next nonce at `now_nanos` (the caller's clock).
    pub fn next(&self, now_nanos: u64) -> u64 {
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = now_nanos.max(prev.saturating_add(1)).max(1);
            match self
                .last
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

#[cfg(test)]
mod tests;
