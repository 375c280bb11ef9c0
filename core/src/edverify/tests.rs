//! The table verifier against references: field arithmetic against big-integer
//! arithmetic mod p (crypto-bigint), points against curve25519-dalek, and
//! verification against `ed25519_dalek::VerifyingKey::verify_strict`.

use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::{Encoding, U256};
use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::{EdwardsPoint, Scalar};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use proptest::prelude::*;
use sha2::{Digest, Sha512};

use super::field::Fe;
use super::inverse;
use super::point::{self, Consts, Ext};
use super::table::{digits, rows, Table, MAX_ROWS};
use super::PrecomputedKey;
use crate::jwk::{KeyError, WEAK_ED25519};

type R = DynResidue<4>;

fn params() -> DynResidueParams<4> {
    // p = 2^255 − 19
    let p = U256::from_be_hex("7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed");
    DynResidueParams::new(&p)
}

const POS: [usize; 10] = [0, 26, 51, 77, 102, 128, 153, 179, 204, 230];

/// Σ limb_i · 2^pos_i mod p, computed with big integers.
fn value(f: &Fe) -> U256 {
    let pr = params();
    let mut acc = R::zero(pr);
    for (i, &l) in f.0.iter().enumerate() {
        let mag = R::new(&U256::from_u64(u64::from(l.unsigned_abs())), pr);
        let shift = R::new(&U256::ONE.shl_vartime(POS[i]), pr);
        let term = mag.mul(&shift);
        acc = if l < 0 {
            acc.sub(&term)
        } else {
            acc.add(&term)
        };
    }
    acc.retrieve()
}

fn le(v: U256) -> [u8; 32] {
    v.to_le_bytes()
}

/// Limbs up to `scale` × the reduced bounds (2^25 even, 2^24 odd), any sign.
fn limbs(scale: i64) -> impl Strategy<Value = Fe> {
    proptest::array::uniform10(any::<i64>()).prop_map(move |r| {
        let mut l = [0i32; 10];
        for i in 0..10 {
            let bound = scale * if i % 2 == 0 { 1 << 25 } else { 1 << 24 };
            l[i] = (r[i].rem_euclid(2 * bound + 1) - bound) as i32;
        }
        Fe(l)
    })
}

fn mul_ref(a: &Fe, b: &Fe) -> U256 {
    let pr = params();
    R::new(&value(a), pr).mul(&R::new(&value(b), pr)).retrieve()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mul_and_square_match_big_integers(a in limbs(4), b in limbs(4)) {
        prop_assert_eq!(a.mul(&b).to_bytes(), le(mul_ref(&a, &b)));
        prop_assert_eq!(a.square().to_bytes(), le(mul_ref(&a, &a)));
    }

    #[test]
    fn add_sub_neg_and_encoding_match(a in limbs(2), b in limbs(2)) {
        let pr = params();
        let (ra, rb) = (R::new(&value(&a), pr), R::new(&value(&b), pr));
        prop_assert_eq!(a.add(&b).to_bytes(), le(ra.add(&rb).retrieve()));
        prop_assert_eq!(a.sub(&b).to_bytes(), le(ra.sub(&rb).retrieve()));
        prop_assert_eq!(a.neg().to_bytes(), le(ra.neg().retrieve()));
        prop_assert_eq!(a.reduce().to_bytes(), a.to_bytes());
    }

    #[test]
    fn from_bytes_reduces_the_low_255_bits(bytes in any::<[u8; 32]>()) {
        let mut low = bytes;
        low[31] &= 0x7f;
        let pr = params();
        let want = R::new(&U256::from_le_bytes(low), pr).retrieve();
        prop_assert_eq!(Fe::from_bytes(&bytes).to_bytes(), le(want));
    }

    #[test]
    fn inverse_and_square_root_power(a in limbs(4)) {
        let one = Fe::ONE.to_bytes();
        if !a.is_zero() {
            prop_assert_eq!(a.mul(&a.invert()).to_bytes(), one);
            prop_assert_eq!(a.mul(&a.invert_fermat()).to_bytes(), one);
        }
        // (a^((p−5)/8))^8 = a^(p−5) = a^-4 for a ≠ 0.
        let t = a.pow_p58();
        let t8 = t.square().square().square();
        let a4 = a.square().square();
        if !a.is_zero() {
            prop_assert_eq!(t8.mul(&a4).to_bytes(), one);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// safegcd against Fermat and against big integers, for any 255-bit input
    /// (values ≥ p included: `from_bytes` accepts them).
    #[test]
    fn safegcd_inverse_matches_fermat_and_big_integers(bytes in any::<[u8; 32]>()) {
        let a = Fe::from_bytes(&bytes);
        let (inv, rounds) = inverse::invert_in_rounds(&a).expect("within MAX_ROUNDS");
        prop_assert!(rounds <= 25, "{} rounds: past the 724-divstep bound", rounds);
        prop_assert_eq!(inv.to_bytes(), a.invert_fermat().to_bytes());
        let pr = params();
        let (inv, ok) = R::new(&value(&a), pr).invert();
        if bool::from(ok) {
            prop_assert_eq!(a.invert().to_bytes(), le(inv.retrieve()));
        } else {
            prop_assert!(a.invert().is_zero());
        }
    }
}

#[test]
fn safegcd_inverse_of_edge_values() {
    let p = U256::from_be_hex("7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed");
    let mut values = vec![
        U256::ZERO,
        U256::ONE,
        U256::from_u8(2),
        U256::from_u8(19),
        p.wrapping_sub(&U256::ONE),
        p.wrapping_sub(&U256::from_u8(2)),
        p, // ≡ 0
        U256::ONE.shl_vartime(254),
        U256::ONE.shl_vartime(255).wrapping_sub(&U256::ONE), // ≡ 18
    ];
    // Powers of two and their neighbours: long runs of zero bits, the bulk path of divsteps.
    for k in (0..255).step_by(7) {
        let v = U256::ONE.shl_vartime(k);
        values.extend([v, v.wrapping_sub(&U256::ONE), v.wrapping_add(&U256::ONE)]);
    }
    for v in values {
        let a = Fe::from_bytes(&le(v));
        let (got, rounds) = inverse::invert_in_rounds(&a).expect("within MAX_ROUNDS");
        assert!(rounds <= 25, "1/{v}: {rounds} rounds");
        assert_eq!(got.to_bytes(), a.invert_fermat().to_bytes(), "1/{v}");
        if a.is_zero() {
            assert!(got.is_zero(), "1/0 must be 0");
        } else {
            assert!(a.mul(&got).same_value(&Fe::ONE), "{v}·(1/{v}) ≠ 1");
        }
    }
}

#[test]
fn extreme_limbs_do_not_overflow() {
    // Every limb at ± 4× the reduced bound: the worst case `mul` documents.
    for sign in [1i32, -1] {
        let mut l = [0i32; 10];
        for (i, x) in l.iter_mut().enumerate() {
            *x = sign
                * 4
                * if i % 2 == 0 {
                    1 << 25
                } else {
                    (1 << 24) + (1 << 16)
                };
        }
        let a = Fe(l);
        assert_eq!(a.mul(&a).to_bytes(), le(mul_ref(&a, &a)));
        assert_eq!(a.square().to_bytes(), le(mul_ref(&a, &a)));
        assert_eq!(a.mul(&a.neg()).to_bytes(), le(mul_ref(&a, &a.neg())));
    }
}

#[test]
fn encodings_near_p_are_canonical() {
    let p = U256::from_be_hex("7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed");
    for (v, want) in [
        (p.wrapping_sub(&U256::ONE), p.wrapping_sub(&U256::ONE)),
        (p, U256::ZERO),
        (p.wrapping_add(&U256::ONE), U256::ONE),
        (p.wrapping_add(&U256::from_u8(18)), U256::from_u8(18)),
        (
            U256::ONE.shl_vartime(255).wrapping_sub(&U256::ONE),
            U256::from_u8(18),
        ),
    ] {
        assert_eq!(Fe::from_bytes(&le(v)).to_bytes(), le(want));
    }
    // −1 in signed limbs.
    assert_eq!(Fe::ONE.neg().to_bytes(), le(p.wrapping_sub(&U256::ONE)));
    assert!(Fe::from_bytes(&le(p)).is_zero());
}

#[test]
fn curve_constants_are_right() {
    let d = point::d();
    // d · 121666 = −121665
    let n = |v: u64| Fe::from_bytes(&le(U256::from_u64(v)));
    assert!(d.mul(&n(121666)).same_value(&n(121665).neg()));
    let i = point::sqrt_m1();
    assert!(i.square().same_value(&Fe::ONE.neg()));
    assert_eq!(
        super::BASE_BYTES,
        ED25519_BASEPOINT_POINT.compress().to_bytes()
    );
}

fn ext(p: &EdwardsPoint) -> Ext {
    Ext::decompress(&p.compress().to_bytes(), &Consts::new()).expect("a dalek point decodes")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn points_round_trip_and_add_like_dalek(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
        let c = Consts::new();
        let p = ED25519_BASEPOINT_POINT * Scalar::from_bytes_mod_order(a);
        let q = ED25519_BASEPOINT_POINT * Scalar::from_bytes_mod_order(b);
        let (pe, qe) = (ext(&p), ext(&q));
        prop_assert_eq!(pe.compress(), p.compress().to_bytes());
        prop_assert_eq!(pe.add_cached(&qe.to_cached(&c)).to_ext().compress(), (p + q).compress().to_bytes());
        prop_assert_eq!(pe.double().to_ext().compress(), (p + p).compress().to_bytes());
        prop_assert_eq!(pe.neg().compress(), (-p).compress().to_bytes());
        let n = Ext::batch_to_niels(&[pe, qe], &c);
        prop_assert_eq!(pe.add_niels(&n[1]).to_ext().compress(), (p + q).compress().to_bytes());
        prop_assert_eq!(pe.sub_niels(&n[1]).to_ext().compress(), (p - q).compress().to_bytes());
    }

    #[test]
    fn digits_rebuild_the_scalar(bytes in any::<[u8; 32]>(), w in 2u32..=super::BASE_WINDOW) {
        let s = Scalar::from_bytes_mod_order(bytes);
        let mut buf = [0i16; MAX_ROWS];
        let ds = digits(s.as_bytes(), w, &mut buf);
        prop_assert_eq!(ds.len(), rows(w));
        let half = 1i16 << (w - 1);
        let mut acc = Scalar::ZERO;
        let radix = Scalar::from(1u64 << w);
        for &d in ds.iter().rev() {
            prop_assert!(-half < d && d <= half, "digit {} for w = {}", d, w);
            let term = Scalar::from(u64::from(d.unsigned_abs()));
            acc = acc * radix + if d < 0 { -term } else { term };
        }
        prop_assert_eq!(acc, s);
    }
}

#[test]
fn table_multiples_match_dalek_for_every_window() {
    let c = Consts::new();
    let p = ED25519_BASEPOINT_POINT * Scalar::from(0x1234_5678_9abc_def1u64);
    for w in 2..=super::BASE_WINDOW {
        let t = Table::new(&ext(&p), w, &c);
        for seed in 0u8..4 {
            let s = Scalar::from_bytes_mod_order([seed.wrapping_mul(37).wrapping_add(w as u8); 32]);
            let mut buf = [0i16; MAX_ROWS];
            let got = t
                .add_digits(Ext::IDENTITY, digits(s.as_bytes(), w, &mut buf))
                .expect("digits in range");
            assert_eq!(got.compress(), (p * s).compress().to_bytes(), "w = {w}");
        }
        // The largest scalar (ℓ − 1) and zero.
        let mut buf = [0i16; MAX_ROWS];
        let got = t.add_digits(
            Ext::IDENTITY,
            digits((-Scalar::ONE).as_bytes(), w, &mut buf),
        );
        assert_eq!(got.map(|e| e.compress()), Some((-p).compress().to_bytes()));
        let got = t.add_digits(Ext::IDENTITY, digits(Scalar::ZERO.as_bytes(), w, &mut buf));
        assert_eq!(
            got.map(|e| e.compress()),
            Some(EdwardsPoint::default().compress().to_bytes())
        );
    }
}

#[test]
fn decoding_refuses_what_is_not_a_canonical_point() {
    let c = Consts::new();
    // y = 2 is not on the curve (x² would be a non-square)? Find off-curve ys and
    // check them against dalek, which decodes the same set.
    let mut off = 0;
    for y in 2u8..40 {
        let mut b = [0u8; 32];
        b[0] = y;
        let ours = Ext::decompress(&b, &c).map(|e| e.compress());
        let theirs = curve25519_dalek::edwards::CompressedEdwardsY(b)
            .decompress()
            .map(|p| p.compress().to_bytes());
        assert_eq!(ours, theirs, "y = {y}");
        off += usize::from(theirs.is_none());
    }
    assert!(off > 5, "the sample holds off-curve encodings");
    // Non-canonical y (p + 1 encodes y = 1) and negative zero: dalek decodes
    // them, we refuse them (keys must be canonical).
    let p_plus_1 = le(U256::from_be_hex(
        "7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffee",
    ));
    assert!(Ext::decompress(&p_plus_1, &c).is_none());
    let mut neg_zero = [0u8; 32];
    neg_zero[0] = 1;
    neg_zero[31] = 0x80;
    assert!(Ext::decompress(&neg_zero, &c).is_none());
}

#[test]
fn weak_and_malformed_keys_are_refused() {
    for t in EIGHT_TORSION {
        let err = PrecomputedKey::new(&t.compress().to_bytes()).unwrap_err();
        // (0, 1) with sign 0 etc. decode fine and are small order.
        assert_eq!(err, KeyError::Invalid(WEAK_ED25519));
    }
    let mut off_curve = [0u8; 32];
    off_curve[0] = 2;
    assert!(curve25519_dalek::edwards::CompressedEdwardsY(off_curve)
        .decompress()
        .is_none());
    assert_eq!(
        PrecomputedKey::new(&off_curve).unwrap_err(),
        KeyError::Invalid("not a canonical Ed25519 point encoding")
    );
    // A point of order 8ℓ (a torsion component) is not small order: accepted, as by dalek.
    let mixed = ED25519_BASEPOINT_POINT + EIGHT_TORSION[1];
    assert!(PrecomputedKey::new(&mixed.compress().to_bytes()).is_ok());
}

fn both(vk: &VerifyingKey, pk: &PrecomputedKey, msg: &[u8], sig: &[u8; 64]) -> (bool, bool) {
    let dalek = vk
        .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
        .is_ok();
    (pk.verify_strict(msg, sig), dalek)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn verifies_exactly_like_dalek_verify_strict(
        seed in any::<[u8; 32]>(),
        msg in proptest::collection::vec(any::<u8>(), 0..300),
        flip in any::<(u8, u8)>(),
        garbage in any::<[u8; 32]>(),
    ) {
        let sk = SigningKey::from_bytes(&seed);
        let vk = sk.verifying_key();
        let pk = PrecomputedKey::new(vk.as_bytes()).expect("a real key");
        let sig = sk.sign(&msg).to_bytes();
        prop_assert_eq!(both(&vk, &pk, &msg, &sig), (true, true));
        // One flipped bit anywhere in the signature.
        let mut bad = sig;
        bad[flip.0 as usize % 64] ^= 1 << (flip.1 % 8);
        let (ours, theirs) = both(&vk, &pk, &msg, &bad);
        prop_assert_eq!(ours, theirs);
        prop_assert!(!ours);
        // Another message.
        let mut other = msg.clone();
        other.push(flip.0);
        prop_assert_eq!(both(&vk, &pk, &other, &sig), (false, false));
        // Garbage R or garbage s.
        let mut g = sig;
        g[..32].copy_from_slice(&garbage);
        prop_assert_eq!(both(&vk, &pk, &msg, &g), (false, false));
        let mut g = sig;
        g[32..].copy_from_slice(&garbage);
        let (ours, theirs) = both(&vk, &pk, &msg, &g);
        prop_assert_eq!(ours, theirs);
    }
}

/// Signs with a chosen nonce point R = [r]B + T (T a torsion point) — what a
/// forger controls — so the edge cases of R are reachable.
fn sign_with(sk: &SigningKey, msg: &[u8], r: Scalar, t: EdwardsPoint) -> ([u8; 64], EdwardsPoint) {
    let a = sk.to_scalar();
    let big_r = ED25519_BASEPOINT_POINT * r + t;
    let r_bytes = big_r.compress().to_bytes();
    let mut h = Sha512::new();
    h.update(r_bytes);
    h.update(sk.verifying_key().as_bytes());
    h.update(msg);
    let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
    let s = r + k * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r_bytes);
    sig[32..].copy_from_slice(s.as_bytes());
    (sig, big_r)
}

#[test]
fn edge_cases_of_r_and_s_match_dalek() {
    let sk = SigningKey::from_bytes(&[7; 32]);
    let vk = sk.verifying_key();
    let pk = PrecomputedKey::new(vk.as_bytes()).unwrap();
    let msg = b"edge cases";
    // Our own signer agrees with dalek's.
    let (sig, _) = sign_with(&sk, msg, Scalar::from(99u64), EdwardsPoint::default());
    assert_eq!(both(&vk, &pk, msg, &sig), (true, true));
    // R of small order (r = 0, R = T): the equation can hold, verify_strict refuses.
    for t in EIGHT_TORSION {
        let (sig, _) = sign_with(&sk, msg, Scalar::ZERO, t);
        assert_eq!(
            both(&vk, &pk, msg, &sig),
            (false, false),
            "R = {:?}",
            t.compress()
        );
    }
    // R with a torsion component (not small order): the cofactorless equation fails.
    for t in &EIGHT_TORSION[1..] {
        let (sig, _) = sign_with(&sk, msg, Scalar::from(5u64), *t);
        assert_eq!(both(&vk, &pk, msg, &sig), (false, false));
    }
    // s + ℓ: same point, non-canonical scalar.
    let l = U256::from_be_hex("1000000000000000000000000000000014def9dea2f79cd65812631a5cf5d3ed");
    let s = U256::from_le_bytes(sig[32..].try_into().unwrap());
    let mut non_canonical = sig;
    non_canonical[32..].copy_from_slice(&s.wrapping_add(&l).to_le_bytes());
    assert_eq!(both(&vk, &pk, msg, &non_canonical), (false, false));
    // High bits of s.
    let mut high = sig;
    high[63] |= 0xe0;
    assert_eq!(both(&vk, &pk, msg, &high), (false, false));
    // Non-canonical R never matches: the recomputed R is encoded canonically. The
    // reachable cases: the identity as y = 1 + p, and negative zero.
    let p = U256::from_be_hex("7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed");
    for r in [le(p.wrapping_add(&U256::ONE)), {
        let mut b = [0u8; 32];
        b[0] = 1;
        b[31] = 0x80;
        b
    }] {
        let mut s2 = sig;
        s2[..32].copy_from_slice(&r);
        assert_eq!(both(&vk, &pk, msg, &s2), (false, false));
    }
}

/// Every small-order R through the path where the equation holds: with a key that
/// has a torsion component, A = [a]B + T₈ (accepted, as dalek accepts it),
/// [s]B − [k]A = −[k]T₈ for s = k·a, which is a chosen small-order T whenever the
/// hash lands k on the right residue mod 8. Only the small-order test can refuse
/// these, here and in dalek's `verify_strict`; the cofactorless equation holds.
#[test]
fn small_order_r_is_refused_where_the_equation_holds() {
    let a = Scalar::from(0x0123_4567_89ab_cdefu64);
    let t8 = EIGHT_TORSION[1];
    let big_a = ED25519_BASEPOINT_POINT * a + t8;
    let a_bytes = big_a.compress().to_bytes();
    let vk = VerifyingKey::from_bytes(&a_bytes).expect("dalek decodes A");
    let pk = PrecomputedKey::new(&a_bytes).expect("not small order: accepted");
    for t in EIGHT_TORSION {
        let r_bytes = t.compress().to_bytes();
        let found = (0u32..1000).find_map(|i| {
            let msg = format!("small order R, try {i}").into_bytes();
            let mut h = Sha512::new();
            h.update(r_bytes);
            h.update(a_bytes);
            h.update(&msg);
            let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
            (-(t8 * k) == t).then_some((msg, k))
        });
        let (msg, k) = found.expect("k hits each residue mod 8 within 1000 tries");
        let s = k * a;
        // The equation holds: [s]B − [k]A = R.
        assert_eq!(ED25519_BASEPOINT_POINT * s - big_a * k, t);
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r_bytes);
        sig[32..].copy_from_slice(s.as_bytes());
        assert_eq!(
            both(&vk, &pk, &msg, &sig),
            (false, false),
            "R = {}",
            hex::encode(r_bytes)
        );
    }
}

#[test]
fn rfc8032_test_vectors() {
    // RFC 8032 §7.1 tests 1, 2 and 3.
    let cases = [
        (
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    ];
    for (pk_hex, msg_hex, sig_hex) in cases {
        let pk: [u8; 32] = hex::decode(pk_hex).unwrap().try_into().unwrap();
        let msg = hex::decode(msg_hex).unwrap();
        let sig: [u8; 64] = hex::decode(sig_hex).unwrap().try_into().unwrap();
        let key = PrecomputedKey::new(&pk).unwrap();
        assert!(key.verify_strict(&msg, &sig), "{pk_hex}");
        let mut bad = sig;
        bad[0] ^= 0x40;
        assert!(!key.verify_strict(&msg, &bad));
    }
}
#[test]
fn the_small_order_encodings_are_the_eight_torsion_points() {
    let mut want: Vec<[u8; 32]> = EIGHT_TORSION
        .iter()
        .map(|p| p.compress().to_bytes())
        .collect();
    let mut got = super::SMALL_ORDER.to_vec();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let c = Consts::new();
    for e in super::SMALL_ORDER {
        let p = Ext::decompress(&e, &c).expect("a canonical encoding");
        assert!(p.is_small_order());
        assert_eq!(p.compress(), e);
    }
}
