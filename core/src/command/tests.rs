use super::*;
use crate::keyring::{CommandKey, KeyRingConfig};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NOW: u64 = 1_750_000_000;

fn sk(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn ring() -> KeyRing {
    let mut r = KeyRing::new();
    r.insert(CommandKey::unrestricted(
        "op-admin-1",
        sk(1).verifying_key(),
    ))
    .unwrap();
    r
}

fn cmd(args: &[(&str, &str)]) -> Command {
    Command {
        ts: NOW,
        module: Module::Mev.to_proto() as i32,
        action: Action::Throttle.to_proto() as i32,
        // THROTTLE needs throttle_pct; callers may override it.
        args: std::iter::once(("throttle_pct", "10"))
            .chain(args.iter().copied())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        request_id: "req-1".into(),
        issuer: "dashboard".into(),
        schema_version: SCHEMA_CTRL_V1.into(),
        nonce: 42,
        ..Default::default()
    }
}

/// Appends a LEN record.
fn len_record(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    wire::write_varint(out, u64::from(field) << 3 | 2);
    wire::write_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// The three signature records for `payload`, signed by `key`.
fn sig_records(payload: &[u8], key: &SigningKey, id: &str, alg: &str) -> Vec<u8> {
    let mut out = Vec::new();
    len_record(&mut out, FIELD_SIG, &key.sign(payload).to_bytes());
    len_record(&mut out, FIELD_PUBKEY_ID, id.as_bytes());
    len_record(&mut out, FIELD_SIG_ALG, alg.as_bytes());
    out
}

/// `op-admin-1` (`sk(1)`) valid until `NOW + 10`, with the scope fields `scope`
/// (JSON members).
fn ring_until_now_plus_10(scope: &str) -> KeyRing {
    let pk = hex::encode(sk(1).verifying_key().as_bytes());
    let cfg: KeyRingConfig = serde_json::from_str(&format!(
        r#"{{"keys":[{{"id":"op-admin-1","public_key_hex":"{pk}","not_after":{},{scope}}}]}}"#,
        NOW + 10
    ))
    .unwrap();
    KeyRing::from_config(&cfg).unwrap()
}

fn policy() -> ControlPolicy {
    ControlPolicy {
        keyring: ring(),
        max_skew: 30,
        max_body: DEFAULT_MAX_COMMAND_BYTES,
    }
}

#[test]
fn round_trip_with_zero_one_and_several_args() {
    for args in [
        vec![],
        vec![("throttle_pct", "40")],
        vec![
            ("throttle_pct", "40"),
            ("ev_min", "0.5"),
            ("tip_ladder", "0.1,0.2,0.3"),
        ],
    ] {
        let body = sign_command(&cmd(&args), &sk(1), "op-admin-1");
        let v = verify_command(&body, &ring(), Some(NOW)).unwrap();
        assert_eq!(v.command.args, cmd(&args).args);
        assert!(v.args.throttle_pct.is_some());
        assert_eq!(v.module, Module::Mev);
        assert_eq!(v.action, Action::Throttle);
        assert_eq!(v.signed_payload, signing_payload(&cmd(&args)));
    }
}

#[test]
fn map_entries_in_insertion_order_verify_canonically() {
    let c = cmd(&[("a", "1"), ("b", "2"), ("c", "3")]);
    let signed = signing_payload(&c);
    // Rebuild the same records with args entries reversed (as a non-deterministic
    // serializer may publish them), and the signature fields in the middle.
    let recs = wire::records(&signed).unwrap();
    let args: Vec<_> = recs.iter().filter(|r| r.field == 4).collect();
    let mut body = Vec::new();
    for r in recs.iter().filter(|r| r.field < 4) {
        body.extend_from_slice(&signed[r.span.clone()]);
    }
    for r in args.iter().rev() {
        body.extend_from_slice(&signed[r.span.clone()]);
    }
    body.extend(sig_records(
        &signed,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    for r in recs.iter().filter(|r| r.field > 4) {
        body.extend_from_slice(&signed[r.span.clone()]);
    }
    let parts = split_signed(&body).unwrap();
    assert_ne!(parts.payload, signed, "received order differs");
    assert_eq!(parts.canonical.as_deref(), Some(&signed[..]));
    let v = verify_command(&body, &ring(), Some(NOW)).unwrap();
    assert_eq!(v.signed_payload, signed);
}

#[test]
fn non_canonical_signed_bytes_verify_as_received() {
    // A signer that signed its own (non-sorted) bytes: received order must verify too.
    let c = cmd(&[("a", "1"), ("b", "2")]);
    let det = signing_payload(&c);
    let recs = wire::records(&det).unwrap();
    let mut odd = Vec::new();
    for r in recs.iter().rev() {
        odd.extend_from_slice(&det[r.span.clone()]);
    }
    let mut body = odd.clone();
    body.extend(sig_records(&odd, &sk(1), "op-admin-1", SIG_ALG_ED25519_V1));
    let v = verify_command(&body, &ring(), None).unwrap();
    assert_eq!(v.signed_payload, odd);
}

#[test]
fn unknown_fields_are_signed_and_kept() {
    let c = cmd(&[("throttle_pct", "40")]);
    let mut signed = signing_payload(&c);
    len_record(&mut signed, 12, b"newer-client-field");
    let mut body = signed.clone();
    body.extend(sig_records(
        &signed,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    let v = verify_command(&body, &ring(), None).unwrap();
    assert_eq!(v.signed_payload, signed);

    // Dropping the unknown field breaks the signature: it is covered.
    let mut stripped = signing_payload(&c);
    stripped.extend(sig_records(
        &signed,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    assert_eq!(
        verify_command(&stripped, &ring(), None).unwrap_err().code,
        Code::BadSignature
    );
}

#[test]
fn decode_reencode_would_break_unknown_fields() {
    // The original agent's approach (decode, clear, re-encode) fails here; ours passes.
    let c = cmd(&[]);
    let mut signed = signing_payload(&c);
    len_record(&mut signed, 15, b"x");
    let mut body = signed.clone();
    body.extend(sig_records(
        &signed,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    let reencoded = signing_payload(&Command::decode(&body[..]).unwrap());
    assert_ne!(reencoded, signed);
    assert!(verify_command(&body, &ring(), None).is_ok());
}

#[test]
fn rejections_have_the_right_codes() {
    let c = cmd(&[("throttle_pct", "40")]);
    let good = sign_command(&c, &sk(1), "op-admin-1");
    let payload = signing_payload(&c);
    let with = |sig: &[u8], id: &str, alg: &str| {
        let mut b = payload.clone();
        len_record(&mut b, FIELD_SIG, sig);
        len_record(&mut b, FIELD_PUBKEY_ID, id.as_bytes());
        len_record(&mut b, FIELD_SIG_ALG, alg.as_bytes());
        b
    };
    let sig = sk(1).sign(&payload).to_bytes();
    let code = |b: &[u8]| verify_command(b, &ring(), Some(NOW)).unwrap_err().code;

    assert_eq!(code(&with(&sig, "op-admin-1", "ed25519")), Code::SigAlg);
    assert_eq!(code(&with(&sig, "op-admin-1", "")), Code::SigAlg);
    assert_eq!(
        code(&with(&sig[..63], "op-admin-1", SIG_ALG_ED25519_V1)),
        Code::BadSigLength
    );
    assert_eq!(code(&payload), Code::SigAlg, "unsigned command");
    assert_eq!(
        code(&with(&sig, "nobody", SIG_ALG_ED25519_V1)),
        Code::UnknownKey
    );
    let other = sk(2).sign(&payload).to_bytes();
    assert_eq!(
        code(&with(&other, "op-admin-1", SIG_ALG_ED25519_V1)),
        Code::BadSignature
    );
    assert_eq!(code(&good[..good.len() - 3]), Code::Malformed, "truncated");

    // Changed nonce / args after signing.
    let mut tampered = c.clone();
    tampered.nonce = 43;
    let mut b = signing_payload(&tampered);
    b.extend(sig_records(
        &payload,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    assert_eq!(code(&b), Code::BadSignature);
    let mut tampered = c.clone();
    tampered.args.insert("throttle_pct".into(), "100".into());
    let mut b = signing_payload(&tampered);
    b.extend(sig_records(
        &payload,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    assert_eq!(code(&b), Code::BadSignature);

    // Duplicate singular field and wrong wire type.
    let mut dup = good.clone();
    dup.extend_from_slice(&[0x08, 0x01]);
    assert_eq!(code(&dup), Code::Malformed);
    let mut wt = vec![0x0a, 0x00]; // field 1 (ts) as LEN
    wt.extend_from_slice(&good);
    assert_eq!(code(&wt), Code::Malformed);
}

#[test]
fn semantic_checks_after_the_signature() {
    let code = |c: &Command| {
        let b = sign_command(c, &sk(1), "op-admin-1");
        verify_command(&b, &ring(), Some(NOW)).unwrap_err().code
    };
    let mut c = cmd(&[]);
    c.schema_version = "ctrl-v2".into();
    assert_eq!(code(&c), Code::BadSchema);
    let mut c = cmd(&[]);
    c.nonce = 0;
    assert_eq!(code(&c), Code::BadNonce);
    let mut c = cmd(&[]);
    c.module = 9;
    assert_eq!(code(&c), Code::Malformed);
    let mut c = cmd(&[]);
    c.action = 6;
    assert_eq!(code(&c), Code::Malformed);
    let c = cmd(&[("throttle_pct", "140")]);
    assert_eq!(code(&c), Code::BadArgs);
    // Issuers name replay state and travel in headers and ledger rows: bounded.
    let mut c = cmd(&[]);
    c.issuer = "x".repeat(MAX_ISSUER_BYTES + 1);
    assert_eq!(code(&c), Code::Malformed);
    let mut c = cmd(&[]);
    c.issuer = "desk\n7".into();
    assert_eq!(code(&c), Code::Malformed);
    let mut c = cmd(&[]);
    c.issuer = "x".repeat(MAX_ISSUER_BYTES);
    let b = sign_command(&c, &sk(1), "op-admin-1");
    assert!(verify_command(&b, &ring(), Some(NOW)).is_ok());
    // So are request ids (every row and answer names the command by it).
    let mut c = cmd(&[]);
    c.request_id = "r".repeat(MAX_REQUEST_ID_BYTES + 1);
    assert_eq!(code(&c), Code::Malformed);
    let mut c = cmd(&[]);
    c.request_id = "req\u{1b}[2J".into();
    assert_eq!(code(&c), Code::Malformed);
    let mut c = cmd(&[]);
    c.request_id = "r".repeat(MAX_REQUEST_ID_BYTES);
    let b = sign_command(&c, &sk(1), "op-admin-1");
    assert!(verify_command(&b, &ring(), Some(NOW)).is_ok());
}

#[test]
fn key_scope_and_validity_are_enforced() {
    let ring = ring_until_now_plus_10(
        r#""issuers":["dashboard"],"modules":["mev"],"actions":["throttle"]"#,
    );
    let ok = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    assert!(verify_command(&ok, &ring, Some(NOW)).is_ok());
    assert_eq!(
        verify_command(&ok, &ring, Some(NOW + 11)).unwrap_err().code,
        Code::KeyExpired
    );
    let mut c = cmd(&[]);
    c.action = Action::Kill.to_proto() as i32;
    let b = sign_command(&c, &sk(1), "op-admin-1");
    assert_eq!(
        verify_command(&b, &ring, Some(NOW)).unwrap_err().code,
        Code::KeyScope
    );
    let mut c = cmd(&[]);
    c.issuer = "mallory".into();
    let b = sign_command(&c, &sk(1), "op-admin-1");
    assert_eq!(
        verify_command(&b, &ring, Some(NOW)).unwrap_err().code,
        Code::KeyScope
    );
}

#[test]
fn policy_checks_size_route_and_freshness() {
    let p = policy();
    let body = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    assert_eq!(
        p.check(&body, NOW, Some((Module::Mev, Action::Kill)))
            .unwrap_err()
            .code,
        Code::RouteMismatch
    );
    assert_eq!(
        p.check(&body, NOW + 31, None).unwrap_err().code,
        Code::Stale
    );
    assert_eq!(
        p.check(&body, NOW - 31, None).unwrap_err().code,
        Code::Future
    );
    let v = p
        .check(&body, NOW, Some((Module::Mev, Action::Throttle)))
        .unwrap();
    assert_eq!(v.command.nonce, 42);
    let small = ControlPolicy {
        max_body: 10,
        ..policy()
    };
    assert_eq!(
        small.check(&body, NOW, None).unwrap_err().code,
        Code::TooLarge
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = verify_command(&bytes, &ring(), Some(NOW));
    }

    #[test]
    fn any_flipped_bit_is_rejected(idx in any::<prop::sample::Index>(), bit in 0u8..8) {
        let body = sign_command(&cmd(&[("throttle_pct", "40"), ("ev_min", "0.1")]), &sk(1), "op-admin-1");
        let mut b = body.clone();
        let i = idx.index(b.len());
        b[i] ^= 1 << bit;
        prop_assert!(verify_command(&b, &ring(), Some(NOW)).is_err());
    }

    #[test]
    fn any_permutation_of_args_verifies(
        args in proptest::collection::btree_map("x_[a-z_]{1,8}", "[0-9.,]{0,8}", 0..8),
        seed in any::<u64>(),
    ) {
        let mut c = cmd(&[]);
        c.args.extend(args);
        let signed = signing_payload(&c);
        let recs = wire::records(&signed).unwrap();
        let mut entries: Vec<_> = recs.iter().filter(|r| r.field == 4).collect();
        // Deterministic shuffle from the seed.
        let mut s = seed;
        for i in (1..entries.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            entries.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut body = Vec::new();
        for r in recs.iter().filter(|r| r.field < 4) { body.extend_from_slice(&signed[r.span.clone()]); }
        for r in &entries { body.extend_from_slice(&signed[r.span.clone()]); }
        for r in recs.iter().filter(|r| r.field > 4) { body.extend_from_slice(&signed[r.span.clone()]); }
        body.extend(sig_records(&signed, &sk(1), "op-admin-1", SIG_ALG_ED25519_V1));
        prop_assert!(verify_command(&body, &ring(), Some(NOW)).is_ok());
    }
}

#[test]
fn a_command_never_admitted_is_not_applied_from_the_future() {
    let p = policy();
    let body = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    let skew = p.max_skew;
    // Admitted (a gateway node held it to the clock): applied whenever it comes.
    assert!(p
        .verify_for_apply(&body, Module::Mev, NOW - skew - 1, true)
        .is_ok());
    // Never admitted: within the skew, or late, it applies; ahead of it, not.
    assert!(p
        .verify_for_apply(&body, Module::Mev, NOW - skew, false)
        .is_ok());
    assert!(p
        .verify_for_apply(&body, Module::Mev, NOW + 86_400, false)
        .is_ok());
    assert_eq!(
        p.verify_for_apply(&body, Module::Mev, NOW - skew - 1, false)
            .unwrap_err()
            .code,
        Code::Future
    );
}

#[test]
fn verify_for_apply_checks_the_delivery_key_not_freshness() {
    let p = policy();
    let body = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    // Days later (a lagging consumer): still applies.
    let v = p
        .verify_for_apply(&body, Module::Mev, NOW + 86_400, true)
        .unwrap();
    assert_eq!(v.module, Module::Mev);
    assert_eq!(
        p.verify_for_apply(&body, Module::Arbitrage, NOW, true)
            .unwrap_err()
            .code,
        Code::RouteMismatch
    );
    let small = ControlPolicy {
        max_body: 10,
        ..policy()
    };
    assert_eq!(
        small
            .verify_for_apply(&body, Module::Mev, NOW, true)
            .unwrap_err()
            .code,
        Code::TooLarge
    );
}

/// A key that expires while its command waits on the bus (a broker away): the
/// agent judges it when admission could have taken the command (within
/// `max_skew` of its `ts`), not when it applies it; a command signed after the
/// key expired (beyond the skew) is still refused.
#[test]
fn verify_for_apply_judges_the_key_when_the_command_was_admitted() {
    let p = ControlPolicy {
        keyring: ring_until_now_plus_10(r#""modules":["mev"]"#),
        ..policy()
    };
    let body = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    assert!(p
        .verify_for_apply(&body, Module::Mev, NOW + 600, true)
        .is_ok());
    // Admission itself, at that time, refuses it.
    assert_eq!(
        p.check(&body, NOW + 600, None).unwrap_err().code,
        Code::KeyExpired
    );
    let late = Command {
        ts: NOW + 10 + 31,
        ..cmd(&[])
    };
    let body = sign_command(&late, &sk(1), "op-admin-1");
    assert_eq!(
        p.verify_for_apply(&body, Module::Mev, NOW + 600, true)
            .unwrap_err()
            .code,
        Code::KeyExpired
    );
    let edge = Command {
        ts: NOW + 10 + 30,
        ..cmd(&[])
    };
    let body = sign_command(&edge, &sk(1), "op-admin-1");
    assert!(p
        .verify_for_apply(&body, Module::Mev, NOW + 600, true)
        .is_ok()); // A record no gateway node admitted: judged now.
    assert_eq!(
        p.verify_for_apply(&body, Module::Mev, NOW + 600, false)
            .unwrap_err()
            .code,
        Code::KeyExpired
    );
}

#[test]
fn the_builder_refuses_what_the_modules_refuse() {
    let base = || crate::command::NewCommand {
        module: Module::Mev,
        action: Action::Throttle,
        args: [("throttle_pct".to_string(), "40".to_string())].into(),
        issuer: "gwctl".into(),
        request_id: "r".into(),
        ts: NOW,
        nonce: 9,
    };
    let body = base().sign(&sk(1), "op-admin-1").unwrap();
    let v = verify_command(&body, &ring(), Some(NOW)).unwrap();
    assert_eq!(v.args.throttle_pct, Some(40));
    assert_eq!(v.command.schema_version, crate::command::SCHEMA_CTRL_V1);
    let mut bad = base();
    bad.args.insert("throttle_pct".into(), "101".into());
    assert_eq!(bad.build().unwrap_err().code, Code::BadArgs);
    let mut zero = base();
    zero.nonce = 0;
    assert_eq!(zero.build().unwrap_err().code, Code::BadNonce);
}

#[test]
fn nonces_strictly_increase_whatever_the_clock_does() {
    let s = crate::command::NonceSource::default();
    let a = s.next(1_000);
    let b = s.next(1_000);
    let c = s.next(500);
    let d = s.next(5_000);
    assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
    assert_eq!(d, 5_000);
    assert_eq!(
        crate::command::NonceSource::default().next(0),
        1,
        "never zero"
    );
}

/// The wire-type table the scanner checks received records against is the schema's.
#[test]
fn wire_types_match_control_proto() {
    use prost::Message as _;
    use prost_types::field_descriptor_proto::{Label, Type};
    let fds = prost_types::FileDescriptorSet::decode(gw_proto::CONTROL_DESCRIPTOR_SET).unwrap();
    let msg = fds
        .file
        .iter()
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == "Command")
        .expect("control.Command in the descriptor");
    let highest = msg
        .field
        .iter()
        .map(prost_types::FieldDescriptorProto::number)
        .max()
        .unwrap();
    assert_eq!(
        crate::command::KNOWN_WIRE_TYPES.len(),
        usize::try_from(highest).unwrap() + 1,
        "the table covers every field number"
    );
    for f in &msg.field {
        let want = match f.r#type() {
            Type::Uint64 | Type::Enum | Type::Int32 | Type::Int64 | Type::Uint32 | Type::Bool => {
                WireType::Varint
            }
            Type::String | Type::Bytes | Type::Message => WireType::Len,
            other => panic!(
                "field {} has a type the table does not know: {other:?}",
                f.name()
            ),
        };
        let repeated = f.label() == Label::Repeated;
        assert_eq!(
            crate::command::KNOWN_WIRE_TYPES[usize::try_from(f.number()).unwrap()],
            Some(want),
            "field {} ({})",
            f.number(),
            f.name()
        );
        // Only `args` (a map: repeated entries) may appear more than once.
        assert_eq!(repeated, f.name() == "args", "field {}", f.name());
    }
    let numbers: Vec<i32> = msg
        .field
        .iter()
        .map(prost_types::FieldDescriptorProto::number)
        .collect();
    for (n, slot) in crate::command::KNOWN_WIRE_TYPES.iter().enumerate() {
        assert_eq!(
            slot.is_some(),
            numbers.contains(&i32::try_from(n).unwrap()),
            "field number {n}"
        );
    }
}

/// The same `args` key twice (`throttle_pct` "0" then "21"), validly signed over
/// exactly those bytes: which value holds is ambiguous, so the command is refused
/// before its signature is even checked. Likewise an entry with two keys or two
/// values.
#[test]
fn a_repeated_args_key_is_malformed_even_when_signed() {
    fn entry(fields: &[(u32, &str)]) -> Vec<u8> {
        let mut e = Vec::new();
        for (f, v) in fields {
            len_record(&mut e, *f, v.as_bytes());
        }
        e
    }
    let base = signing_payload(&cmd(&[]));
    let recs = wire::records(&base).unwrap();
    let without_args: Vec<u8> = recs
        .iter()
        .filter(|r| r.field != FIELD_ARGS)
        .flat_map(|r| base[r.span.clone()].to_vec())
        .collect();
    /// Args entries, each a list of (entry field, value).
    type Entries<'a> = &'a [&'a [(u32, &'a str)]];
    let cases: [(Entries, &str); 3] = [
        (
            &[
                &[(1, "throttle_pct"), (2, "0")],
                &[(1, "throttle_pct"), (2, "21")],
            ],
            "args key `throttle_pct` appears twice",
        ),
        (
            &[&[(1, "throttle_pct"), (1, "ev_min"), (2, "21")]],
            "an args entry has two keys",
        ),
        (
            &[&[(1, "throttle_pct"), (2, "0"), (2, "21")]],
            "an args entry has two values",
        ),
    ];
    for (entries, want) in cases {
        let mut signed = without_args.clone();
        for e in entries {
            len_record(&mut signed, FIELD_ARGS, &entry(e));
        }
        let mut body = signed.clone();
        body.extend(sig_records(
            &signed,
            &sk(1),
            "op-admin-1",
            SIG_ALG_ED25519_V1,
        ));
        let err = verify_command(&body, &ring(), Some(NOW)).unwrap_err();
        assert_eq!(err.code, Code::Malformed, "{want}");
        assert!(err.detail.contains(want), "{}: {want}", err.detail);
    }
    // One entry per key still verifies.
    let mut signed = without_args.clone();
    len_record(
        &mut signed,
        FIELD_ARGS,
        &entry(&[(1, "throttle_pct"), (2, "21")]),
    );
    let mut body = signed.clone();
    body.extend(sig_records(
        &signed,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    assert!(verify_command(&body, &ring(), Some(NOW)).is_ok());
}

/// The ring with a memo of verified signatures (`crate::sigmemo`).
fn remembering(mut r: KeyRing) -> (KeyRing, std::sync::Arc<crate::sigmemo::SigMemo>) {
    let m = r.remember_verified(64);
    (r, m)
}

#[test]
fn a_remembered_signature_still_meets_the_keys_window_and_scope() {
    let (ring, memo) = remembering(ring_until_now_plus_10(r#""actions":["throttle"]"#));
    let ok = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    assert!(verify_command(&ok, &ring, Some(NOW)).is_ok());
    // Remembered, yet the key has expired since.
    assert_eq!(
        verify_command(&ok, &ring, Some(NOW + 11)).unwrap_err().code,
        Code::KeyExpired
    );
    // A valid signature for an action the key may not sign: remembered as a
    // signature, refused for its scope every time.
    let mut c = cmd(&[]);
    c.action = Action::Kill.to_proto() as i32;
    let kill = sign_command(&c, &sk(1), "op-admin-1");
    for _ in 0..2 {
        assert_eq!(
            verify_command(&kill, &ring, Some(NOW)).unwrap_err().code,
            Code::KeyScope
        );
    }
    // Computed: ok, kill; answered: the second kill (the expired key was refused
    // before its signature was looked at).
    assert_eq!(memo.counts(), (1, 2));
}

#[test]
fn a_replaced_key_does_not_inherit_what_the_old_one_verified() {
    let (ring, _memo) = remembering(ring());
    let body = sign_command(&cmd(&[]), &sk(1), "op-admin-1");
    assert!(verify_command(&body, &ring, Some(NOW)).is_ok());
    // A clone shares the memo; the id now names another public key.
    let mut rotated = ring.clone();
    assert!(rotated
        .set_public_key("op-admin-1", sk(2).verifying_key())
        .unwrap());
    assert_eq!(
        verify_command(&body, &rotated, Some(NOW)).unwrap_err().code,
        Code::BadSignature
    );
    assert!(verify_command(&body, &ring, Some(NOW)).is_ok());
}

#[test]
fn out_of_order_fields_are_verified_once_with_the_memo() {
    // Args in reverse order: the received bytes do not verify, the canonical do.
    let c = cmd(&[("a", "1"), ("b", "2")]);
    let signed = signing_payload(&c);
    let recs = wire::records(&signed).unwrap();
    let mut body = Vec::new();
    for r in recs.iter().filter(|r| r.field < 4) {
        body.extend_from_slice(&signed[r.span.clone()]);
    }
    for r in recs.iter().filter(|r| r.field == 4).rev() {
        body.extend_from_slice(&signed[r.span.clone()]);
    }
    for r in recs.iter().filter(|r| r.field > 4) {
        body.extend_from_slice(&signed[r.span.clone()]);
    }
    body.extend(sig_records(
        &signed,
        &sk(1),
        "op-admin-1",
        SIG_ALG_ED25519_V1,
    ));
    let (ring, memo) = remembering(ring());
    for _ in 0..2 {
        let v = verify_command(&body, &ring, Some(NOW)).unwrap();
        assert_eq!(v.signed_payload, signed);
    }
    // First call: the received order failed, the canonical verified; second: one
    // lookup answered it.
    assert_eq!(memo.counts(), (1, 2));
}

proptest! {
    #[test]
    fn the_memo_never_changes_a_verdict(
        idx in any::<prop::sample::Index>(),
        bit in 0u8..8,
        flip in any::<bool>(),
    ) {
        let body = sign_command(&cmd(&[("throttle_pct", "40"), ("ev_min", "0.1")]), &sk(1), "op-admin-1");
        let mut b = body.clone();
        if flip {
            let i = idx.index(b.len());
            b[i] ^= 1 << bit;
        }
        let plain = ring();
        let (memo_ring, _m) = remembering(ring());
        // The memo first learns the genuine bytes, then judges the candidate twice.
        prop_assert!(verify_command(&body, &memo_ring, Some(NOW)).is_ok());
        let want = verify_command(&b, &plain, Some(NOW)).map(|v| v.signed_payload).map_err(|e| e.code);
        for _ in 0..2 {
            let got = verify_command(&b, &memo_ring, Some(NOW)).map(|v| v.signed_payload).map_err(|e| e.code);
            prop_assert_eq!(&got, &want);
        }
    }
}
