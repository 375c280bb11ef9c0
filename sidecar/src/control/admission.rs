//! Admission of a signed command as a pure decision: the received bytes, the route,
//! what the edge said about the request and the clock go in; a verdict comes out —
//! the ledger rows to write, in order, and either the rejection to answer with or
//! the verified command to publish. No I/O: [`super::service`] performs the
//! effects (makes the rows, the nonce and the command durable in one journal
//! transaction, waits for the agent) and reports back the one effect that can fail
//! after the verdict ([`Admission::journal_failed`]).
//!
//! A nonce is *reserved* from the verdict until the shell calls
//! [`Admission::release`]: a second copy of the same command arriving meanwhile is
//! refused as a replay even before the first one's nonce is durable, and the
//! guard's bounds count the reserved nonces: requests decided together cannot take
//! it past them between them (a nonce accepted past its bounds would be durable but
//! not remembered).

use std::collections::{HashMap, HashSet};

use gw_core::contract::{EdgeIdentity, Verified};
use gw_core::ledger::{Decision, Stage};
use gw_core::replay::{self, Digest, NonceBook};
use gw_core::{Action, Code, Command, ControlPolicy, Module, Reject, VerifiedCommand};

use super::replay_store::Accepted;

/// What admission knows about nonces already accepted (the durable replay guard).
pub trait SeenNonces {
    /// Whether `(issuer, nonce)` may be accepted at `now` while `reserved` nonces
    /// per issuer are admitted but not yet in the guard: `replay` when it was (the
    /// detail says whether by these very bytes, `digest`), `replay_capacity` when
    /// the guard, with the reserved ones, is full.
    fn check(
        &self,
        issuer: &str,
        nonce: u64,
        digest: &Digest,
        now: u64,
        reserved: &HashMap<String, usize>,
    ) -> Result<(), Reject>;

    /// The time a command is judged at (freshness and replay), the caller's
    /// clock reading `now`: never before a time the guard forgot nonces at
    /// ([`NonceBook::clock`]).
    fn clock(&self, now: u64) -> u64;
}

impl SeenNonces for NonceBook<Accepted> {
    fn check(
        &self,
        issuer: &str,
        nonce: u64,
        digest: &Digest,
        now: u64,
        reserved: &HashMap<String, usize>,
    ) -> Result<(), Reject> {
        self.check_reserved(issuer, nonce, now, reserved)
            .map_err(|r| refusal(&r, issuer, nonce, digest))
    }

    fn clock(&self, now: u64) -> u64 {
        NonceBook::clock(self, now)
    }
}

impl SeenNonces for super::replay_store::ReplayStore {
    fn check(
        &self,
        issuer: &str,
        nonce: u64,
        digest: &Digest,
        now: u64,
        reserved: &HashMap<String, usize>,
    ) -> Result<(), Reject> {
        super::replay_store::ReplayStore::check(self, issuer, nonce, now, reserved)
            .map_err(|r| refusal(&r, issuer, nonce, digest))
    }

    fn clock(&self, now: u64) -> u64 {
        super::replay_store::ReplayStore::clock(self, now)
    }
}

/// The answer to a nonce the guard refused.
fn refusal(r: &replay::Refused<Accepted>, issuer: &str, nonce: u64, digest: &Digest) -> Reject {
    match r {
        replay::Refused::Replay(a) if a.digest == *digest => Reject::with(
            Code::Replay,
            format!(
                "this command was already accepted (request_id `{}`); it is never applied twice",
                a.request_id.escape_debug()
            ),
        ),
        replay::Refused::Replay(a) => Reject::with(
            Code::Replay,
            format!(
                "nonce {nonce} of issuer `{}` was already used by request `{}`",
                issuer.escape_debug(),
                a.request_id.escape_debug()
            ),
        ),
        other => other.reject(issuer, nonce),
    }
}

/// One request to admit.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The signed command as received.
    pub body: &'a [u8],
    /// The module and action the route named, if it named one.
    pub route: Option<(Module, Action)>,
    /// What the edge verified about this request (from its stamped headers).
    pub edge: Option<&'a EdgeIdentity>,
    /// Unix seconds.
    pub now: u64,
}

/// A ledger row to write about the request (its bytes and command are the request's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Who decided.
    pub stage: Stage,
    /// What.
    pub decision: Decision,
    /// Why, for rejections.
    pub code: Option<Code>,
}

/// A refused request.
#[derive(Debug, Clone)]
pub struct Refused {
    /// Rows to write before answering.
    pub rows: Vec<Row>,
    /// The answer.
    pub reject: Reject,
    /// The command, when it decoded and verified far enough to name it.
    pub command: Option<Command>,
}

/// An admitted request: its nonce is reserved until [`Admission::release`].
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Rows to write before publishing.
    pub rows: Vec<Row>,
    /// The verified command.
    pub verified: VerifiedCommand,
}

/// The verdict on one request.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Answer with a rejection.
    Refused(Refused),
    /// Publish the exact bytes on the bus.
    Admitted(Admitted),
}

/// The admission state machine: the verification rules and the nonces in flight.
#[derive(Debug)]
pub struct Admission {
    policy: ControlPolicy,
    in_flight: HashSet<(String, u64)>,
    /// `in_flight` counted per issuer, for the guard's bounds.
    reserved: HashMap<String, usize>,
}

const EDGE_ACCEPTED: Row = Row {
    stage: Stage::Edge,
    decision: Decision::Accepted,
    code: None,
};

fn rejected(code: Code) -> Row {
    Row {
        stage: Stage::Sidecar,
        decision: Decision::Rejected,
        code: Some(code),
    }
}

impl Admission {
    /// Admission under `policy`, nothing in flight.
    pub fn new(policy: ControlPolicy) -> Admission {
        Admission {
            policy,
            in_flight: HashSet::new(),
            reserved: HashMap::new(),
        }
    }

    /// The verification rules.
    pub fn policy(&self) -> &ControlPolicy {
        &self.policy
    }

    /// Decides on `req`. The edge's acceptance (when the edge forwarded the request)
    /// is recorded first, then the sidecar's own decision: re-verification (size,
    /// signature, key, scope, route, freshness), that the edge's stamp names this
    /// command, then replay against `seen` and the nonces in flight. An admitted
    /// command's nonce is reserved.
    pub fn decide(&mut self, req: &Request<'_>, seen: &impl SeenNonces) -> Verdict {
        let mut rows = Vec::with_capacity(2);
        // Only an edge that verified the signed body accepted the command: one
        // that checked the token alone (a route it did not take for a command
        // route) is not recorded as having accepted it.
        let edge_verified = req.edge.filter(|e| e.verified == Verified::Edge);
        if edge_verified.is_some() {
            rows.push(EDGE_ACCEPTED);
        }
        // Judged at the guard's clock: a nonce it forgot a moment ago (another
        // request read its clock later) is stale here, not fresh and unknown.
        let now = seen.clock(req.now);
        let v = match self.policy.check(req.body, now, req.route) {
            Ok(v) => v,
            Err(reject) => {
                rows.push(rejected(reject.code));
                return Verdict::Refused(Refused {
                    rows,
                    reject,
                    command: None,
                });
            }
        };
        // The edge's stamp says it verified a command: this one, or the stamp
        // is not the edge's word on it (and the edge's row is not written).
        if edge_verified.is_some_and(|e| !e.names(&v.command)) {
            let reject = Reject::new(
                Code::EdgeStampInvalid,
                "the edge's stamp names another signed command (key, issuer or nonce)",
            );
            return Verdict::Refused(Refused {
                rows: vec![rejected(reject.code)],
                reject,
                command: Some(v.command),
            });
        }
        let c = &v.command;
        let digest = gw_core::replay::digest(req.body);
        let replay = seen
            .check(&c.issuer, c.nonce, &digest, now, &self.reserved)
            .and_then(|()| {
                if self.in_flight.contains(&(c.issuer.clone(), c.nonce)) {
                    Err(Reject::new(
                        Code::Replay,
                        "the same command is being admitted by another request",
                    ))
                } else {
                    Ok(())
                }
            });
        if let Err(reject) = replay {
            rows.push(rejected(reject.code));
            return Verdict::Refused(Refused {
                rows,
                reject,
                command: Some(v.command),
            });
        }
        self.in_flight.insert((c.issuer.clone(), c.nonce));
        *self.reserved.entry(c.issuer.clone()).or_default() += 1;
        rows.push(Row {
            stage: Stage::Sidecar,
            decision: Decision::Accepted,
            code: None,
        });
        Verdict::Admitted(Admitted { rows, verified: v })
    }

    /// The journal did not take an admitted command (its rows, nonce and bus
    /// entry): not accepted — unless a failing disk kept what was written for it,
    /// which then comes back at the next start — and the same bytes may be sent
    /// again, which tells. The
    /// refusal's rows (the edge's acceptance, then this) replace the `accepted` one;
    /// the nonce stays reserved until released.
    pub fn journal_failed(&self, a: &Admitted, why: &str) -> Refused {
        self.not_taken(
            a,
            format!(
                "{why}; not accepted, unless the failing disk kept what was written for it: \
                 send the same bytes again, which tells (never sign the command again)"
            ),
        )
    }

    /// The refusal of an admitted command that is not taken after all, 503
    /// `unavailable` saying `detail`: its nonce is free again (the same bytes may
    /// be sent again), the edge's acceptance kept.
    pub fn not_taken(&self, a: &Admitted, detail: String) -> Refused {
        let mut rows: Vec<Row> = a
            .rows
            .iter()
            .copied()
            .filter(|r| r.stage == Stage::Edge)
            .collect();
        rows.push(rejected(Code::Unavailable));
        Refused {
            rows,
            reject: Reject::with(Code::Unavailable, detail),
            command: Some(a.verified.command.clone()),
        }
    }

    /// Ends the reservation of an admitted command's nonce (its fate is settled:
    /// durable in the replay guard, or failed and free to be sent again).
    pub fn release(&mut self, a: &Admitted) {
        let c = &a.verified.command;
        if self.in_flight.remove(&(c.issuer.clone(), c.nonce)) {
            if let Some(n) = self.reserved.get_mut(&c.issuer) {
                *n -= 1;
                if *n == 0 {
                    self.reserved.remove(&c.issuer);
                }
            }
        }
    }

    /// Nonces reserved now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    //! One test per way admission refuses a command, each sending exactly that input.

    use std::collections::BTreeMap;

    use ed25519_dalek::SigningKey;
    use gw_core::keyring::KeyRing;
    use gw_core::replay::Limits;
    use gw_core::sign_command;

    use super::*;

    const NOW: u64 = 1_750_000_000;

    fn key() -> SigningKey {
        testkit::fixtures::command_key()
    }

    /// The key of `mev-only` (a key has one id: its id is not signed).
    fn mev_key() -> SigningKey {
        SigningKey::from_bytes(&[42; 32])
    }

    fn policy() -> ControlPolicy {
        let pk = hex::encode(key().verifying_key().as_bytes());
        let mev_pk = hex::encode(mev_key().verifying_key().as_bytes());
        let keyring = KeyRing::from_json(
            &serde_json::json!({"keys": [
                {"id": "op-admin-1", "public_key_hex": pk},
                {"id": "mev-only", "public_key_hex": mev_pk, "modules": ["mev"],
                 "not_before": NOW - 100, "not_after": NOW + 100},
            ]})
            .to_string(),
        )
        .unwrap();
        ControlPolicy {
            keyring,
            max_skew: 30,
            max_body: 4096,
        }
    }

    fn book() -> NonceBook<Accepted> {
        NonceBook::new(Limits {
            max_per_issuer: 64,
            max_issuers: 4,
        })
    }

    fn accepted(body: &[u8]) -> Accepted {
        Accepted {
            digest: gw_core::replay::digest(body),
            request_id: "req-1".into(),
            what: None,
            seq: 1,
            applied: None,
            refused: None,
        }
    }

    fn command() -> Command {
        Command {
            ts: NOW,
            module: Module::Mev.to_proto() as i32,
            action: Action::Throttle.to_proto() as i32,
            args: BTreeMap::from([("throttle_pct".into(), "40".into())]),
            request_id: "req-1".into(),
            issuer: "dashboard".into(),
            schema_version: "ctrl-v1".into(),
            nonce: 7,
            ..Default::default()
        }
    }

    fn signed(c: &Command) -> Vec<u8> {
        sign_command(c, &key(), "op-admin-1")
    }

    fn edge() -> EdgeIdentity {
        EdgeIdentity {
            token_exp: None,
            verified: Verified::Edge,
            requester: gw_core::contract::Requester {
                sub: "alice".into(),
                roles: "admin".into(),
                token_issuer: "defi-dashboard".into(),
            },
            command: gw_core::contract::StampedCommand {
                pubkey_id: "op-admin-1".into(),
                issuer: "dashboard".into(),
                nonce: "7".into(),
            },
        }
    }

    fn decide_at(body: &[u8], now: u64, route: Option<(Module, Action)>) -> Verdict {
        let mut a = Admission::new(policy());
        a.decide(
            &Request {
                body,
                route,
                edge: None,
                now,
            },
            &book(),
        )
    }

    #[track_caller]
    fn refused(v: Verdict, code: Code) -> Refused {
        match v {
            Verdict::Refused(r) => {
                assert_eq!(r.reject.code, code, "{}", r.reject);
                assert_eq!(r.rows.last(), Some(&rejected(code)), "the refusal's row");
                r
            }
            Verdict::Admitted(_) => panic!("admitted; expected {code}"),
        }
    }

    fn refuse(body: &[u8], code: Code) -> Refused {
        refused(decide_at(body, NOW, None), code)
    }

    fn with(f: impl FnOnce(&mut Command)) -> Vec<u8> {
        let mut c = command();
        f(&mut c);
        signed(&c)
    }

    #[test]
    fn admits_a_valid_command_and_records_the_edge_first() {
        let mut a = Admission::new(policy());
        let body = signed(&command());
        let id = edge();
        let v = a.decide(
            &Request {
                body: &body,
                route: Some((Module::Mev, Action::Throttle)),
                edge: Some(&id),
                now: NOW,
            },
            &book(),
        );
        let Verdict::Admitted(ok) = v else {
            panic!("refused")
        };
        assert_eq!(
            ok.rows,
            vec![
                EDGE_ACCEPTED,
                Row {
                    stage: Stage::Sidecar,
                    decision: Decision::Accepted,
                    code: None
                }
            ]
        );
        assert_eq!(ok.verified.command.nonce, 7);
        assert_eq!(a.in_flight(), 1);
        a.release(&ok);
        assert_eq!(a.in_flight(), 0);
    }

    /// A fresh admission's verdict on `body` for mev:throttle, stamped `id`.
    fn decide_stamped(body: &[u8], id: &EdgeIdentity) -> Verdict {
        Admission::new(policy()).decide(
            &Request {
                body,
                route: Some((Module::Mev, Action::Throttle)),
                edge: Some(id),
                now: NOW,
            },
            &book(),
        )
    }

    #[test]
    fn a_stamp_of_another_command_is_refused_without_the_edges_row() {
        let body = signed(&command());
        let decide = |id: &EdgeIdentity| decide_stamped(&body, id);
        let fields: [fn(&mut gw_core::contract::StampedCommand); 4] = [
            |s| s.pubkey_id = "op-admin-2".into(),
            |s| s.issuer = "dashboard2".into(),
            |s| s.nonce = "8".into(),
            |s| s.nonce = String::new(),
        ];
        for change in fields {
            let mut id = edge();
            change(&mut id.command);
            let r = refused(decide(&id), Code::EdgeStampInvalid);
            assert_eq!(r.rows, vec![rejected(Code::EdgeStampInvalid)], "{id:?}");
            assert_eq!(r.command.map(|c| c.nonce), Some(7));
        }
        // A token-only stamp names no command: nothing to compare.
        let mut id = edge();
        id.verified = Verified::Jwt;
        id.command = Default::default();
        assert!(matches!(decide(&id), Verdict::Admitted(_)));
        // The filter's encoding of a claim it could not write as is.
        let mut c = command();
        c.issuer = " dashbörd ".into();
        let mut id = edge();
        id.command.issuer = "%20dashb%C3%B6rd%20".into();
        assert!(matches!(
            decide_stamped(&signed(&c), &id),
            Verdict::Admitted(_)
        ));
    }

    #[test]
    fn an_edge_that_checked_only_the_token_is_not_recorded_as_accepting() {
        let mut a = Admission::new(policy());
        let mut id = edge();
        id.verified = Verified::Jwt;
        let Verdict::Admitted(ok) = a.decide(
            &Request {
                body: &signed(&command()),
                route: None,
                edge: Some(&id),
                now: NOW,
            },
            &book(),
        ) else {
            panic!("refused")
        };
        assert_eq!(ok.rows.len(), 1);
        assert_eq!(ok.rows[0].stage, Stage::Sidecar);
    }

    #[test]
    fn without_the_edge_only_the_sidecar_decides() {
        let Verdict::Admitted(ok) = decide_at(&signed(&command()), NOW, None) else {
            panic!("refused")
        };
        assert_eq!(ok.rows.len(), 1);
        assert_eq!(ok.rows[0].stage, Stage::Sidecar);
    }

    #[test]
    fn refuses_too_large() {
        let body = with(|c| {
            c.args.insert("pad".into(), "x".repeat(1000));
        });
        let mut big = body.clone();
        big.extend(std::iter::repeat_n(0u8, 4096));
        refuse(&big, Code::TooLarge);
    }

    #[test]
    fn refuses_malformed() {
        let r = refuse(b"\xff\xff\xff", Code::Malformed);
        assert!(r.command.is_none());
    }

    #[test]
    fn refuses_bad_schema() {
        refuse(
            &with(|c| c.schema_version = "ctrl-v2".into()),
            Code::BadSchema,
        );
    }

    #[test]
    fn refuses_sig_alg() {
        let mut c = command();
        let good = signed(&c);
        let decoded = <Command as prost::Message>::decode(good.as_slice()).unwrap();
        c.sig = decoded.sig;
        c.pubkey_id = "op-admin-1".into();
        c.sig_alg = "ed25519-v0".into();
        refuse(&prost::Message::encode_to_vec(&c), Code::SigAlg);
    }

    #[test]
    fn refuses_bad_sig_length() {
        let mut c = command();
        c.sig = vec![1; 63];
        c.pubkey_id = "op-admin-1".into();
        c.sig_alg = "ed25519-v1".into();
        refuse(&prost::Message::encode_to_vec(&c), Code::BadSigLength);
    }

    #[test]
    fn refuses_unknown_key() {
        refuse(
            &sign_command(&command(), &key(), "nobody"),
            Code::UnknownKey,
        );
    }

    #[test]
    fn refuses_key_expired() {
        let body = sign_command(&command(), &mev_key(), "mev-only");
        refused(decide_at(&body, NOW + 101, None), Code::KeyExpired);
    }

    #[test]
    fn refuses_key_not_yet_valid() {
        let body = sign_command(&command(), &mev_key(), "mev-only");
        refused(decide_at(&body, NOW - 101, None), Code::KeyNotYetValid);
    }

    #[test]
    fn refuses_bad_signature() {
        let mut body = signed(&command());
        let last = body.len() - 1;
        body[last] ^= 1; // the nonce, after signing
        refuse(&body, Code::BadSignature);
    }

    #[test]
    fn refuses_key_scope() {
        let mut c = command();
        c.module = Module::Arbitrage.to_proto() as i32;
        refuse(&sign_command(&c, &mev_key(), "mev-only"), Code::KeyScope);
    }

    #[test]
    fn refuses_stale() {
        refused(decide_at(&signed(&command()), NOW + 31, None), Code::Stale);
    }

    /// A command whose nonce the guard forgot at a later reading of the clock
    /// than this request's (another request read it a moment later, or the
    /// clock was stepped back) is judged at the guard's time: stale, where it
    /// would have been fresh and unknown — a replay admitted.
    #[test]
    fn a_nonce_forgotten_at_a_later_reading_of_the_clock_is_no_replay_let_through() {
        let body = signed(&command());
        let mut seen = book();
        let accepted = |request_id: &str| Accepted {
            digest: gw_core::replay::digest(&body),
            request_id: request_id.into(),
            what: None,
            seq: 1,
            applied: Some(2),
            refused: None,
        };
        seen.insert("dashboard", 7, NOW + 30, accepted("req-1"), NOW)
            .unwrap();
        // Another command of the issuer, admitted at NOW + 31: nonce 7 is forgotten.
        seen.insert("dashboard", 8, NOW + 61, accepted("req-2"), NOW + 31)
            .unwrap();
        let mut a = Admission::new(policy());
        let replayed = a.decide(
            &Request {
                body: &body,
                route: None,
                edge: None,
                now: NOW + 30,
            },
            &seen,
        );
        refused(replayed, Code::Stale);
    }

    #[test]
    fn refuses_future() {
        refused(decide_at(&signed(&command()), NOW - 31, None), Code::Future);
    }

    #[test]
    fn refuses_bad_nonce() {
        refuse(&with(|c| c.nonce = 0), Code::BadNonce);
    }

    #[test]
    fn refuses_bad_args() {
        refuse(
            &with(|c| {
                c.args.insert("throttle_pct".into(), "101".into());
            }),
            Code::BadArgs,
        );
    }

    #[test]
    fn refuses_route_mismatch() {
        refused(
            decide_at(&signed(&command()), NOW, Some((Module::Mev, Action::Kill))),
            Code::RouteMismatch,
        );
    }

    #[test]
    fn refuses_a_nonce_the_replay_guard_has_seen() {
        let body = signed(&command());
        let mut seen = book();
        seen.insert("dashboard", 7, NOW + 30, accepted(&body), NOW)
            .unwrap();
        let mut a = Admission::new(policy());
        let v = a.decide(&req(&body), &seen);
        let r = refused(v, Code::Replay);
        assert_eq!(r.command.map(|c| c.nonce), Some(7), "the row names it");
        assert!(
            r.reject.detail.contains("already accepted"),
            "a resend: {}",
            r.reject
        );
        assert_eq!(a.in_flight(), 0);
        // Another command reusing the nonce is told so.
        let other = with(|c| c.request_id = "req-2".into());
        let r = refused(a.decide(&req(&other), &seen), Code::Replay);
        assert!(
            r.reject.detail.contains("already used by request"),
            "{}",
            r.reject
        );
    }

    /// A request for `body` at `NOW`, on no route, with no edge identity.
    fn req(body: &[u8]) -> Request<'_> {
        Request {
            body,
            route: None,
            edge: None,
            now: NOW,
        }
    }

    /// The guard with `n` of the issuer's 64 nonces taken.
    fn book_holding(n: u64) -> NonceBook<Accepted> {
        let mut seen = book();
        for nonce in 100..100 + n {
            seen.insert("dashboard", nonce, NOW + 30, accepted(b"x"), NOW)
                .unwrap();
        }
        seen
    }

    #[test]
    fn refuses_a_fresh_command_when_the_guard_is_full() {
        let seen = book_holding(64);
        let mut a = Admission::new(policy());
        let body = signed(&command());
        let r = refused(a.decide(&req(&body), &seen), Code::ReplayCapacity);
        assert_eq!(r.reject.code.http_status(), 429);
    }

    #[test]
    fn commands_in_flight_count_against_the_guards_bounds() {
        // 63 of the issuer's 64 in the guard: one more may be admitted, and a
        // second one decided before the first is durable must be refused — both
        // admitted, one of them would be durable but past the guard's bound.
        let seen = book_holding(63);
        let mut a = Admission::new(policy());
        let (one, two) = (signed(&command()), with(|c| c.nonce = 8));
        let Verdict::Admitted(first) = a.decide(&req(&one), &seen) else {
            panic!("refused")
        };
        refused(a.decide(&req(&two), &seen), Code::ReplayCapacity);
        // Its fate settled (here: not durable), the room is free again; a second
        // release of the same command frees nothing more.
        a.release(&first);
        a.release(&first);
        assert!(matches!(a.decide(&req(&two), &seen), Verdict::Admitted(_)));
        refused(a.decide(&req(&one), &seen), Code::ReplayCapacity);
        // Issuers: the guard keeps 4; "dashboard" and three others reserved fill it.
        let mut a = Admission::new(policy());
        let seen = book();
        let mut held = Vec::new();
        for issuer in ["dashboard", "ops-1", "ops-2", "ops-3"] {
            let body = with(|c| c.issuer = issuer.into());
            let Verdict::Admitted(ok) = a.decide(&req(&body), &seen) else {
                panic!("{issuer} refused")
            };
            held.push(ok);
        }
        let fifth = with(|c| c.issuer = "ops-4".into());
        refused(a.decide(&req(&fifth), &seen), Code::ReplayCapacity);
        // Another nonce of an issuer already reserved is not a new issuer.
        let again = with(|c| c.nonce = 9);
        assert!(matches!(
            a.decide(&req(&again), &seen),
            Verdict::Admitted(_)
        ));
        a.release(&held[3]);
        assert!(matches!(
            a.decide(&req(&fifth), &seen),
            Verdict::Admitted(_)
        ));
    }

    #[test]
    fn refuses_a_nonce_in_flight_until_released() {
        let mut a = Admission::new(policy());
        let seen = book();
        let body = signed(&command());
        let req = req(&body);
        let Verdict::Admitted(first) = a.decide(&req, &seen) else {
            panic!("refused")
        };
        refused(a.decide(&req, &seen), Code::Replay);
        a.release(&first);
        assert!(matches!(a.decide(&req, &seen), Verdict::Admitted(_)));
    }

    #[test]
    fn a_journal_failure_accepts_nothing_and_keeps_the_edge_row() {
        let mut a = Admission::new(policy());
        let id = edge();
        let Verdict::Admitted(ok) = a.decide(
            &Request {
                body: &signed(&command()),
                route: None,
                edge: Some(&id),
                now: NOW,
            },
            &book(),
        ) else {
            panic!("refused")
        };
        let r = a.journal_failed(&ok, "journal: no space left on device");
        assert_eq!(r.reject.code, Code::Unavailable);
        assert!(r.reject.detail.contains("send the same bytes again"));
        assert_eq!(r.rows, vec![EDGE_ACCEPTED, rejected(Code::Unavailable)]);
        // Released, the nonce is free for the same bytes again.
        a.release(&ok);
        assert_eq!(a.in_flight(), 0);
    }

    #[test]
    fn a_refusal_forwarded_by_the_edge_still_records_the_edge_first() {
        let mut a = Admission::new(policy());
        let id = edge();
        let v = a.decide(
            &Request {
                body: b"junk",
                route: None,
                edge: Some(&id),
                now: NOW,
            },
            &book(),
        );
        let r = refused(v, Code::Malformed);
        assert_eq!(r.rows[0], EDGE_ACCEPTED);
    }
}
