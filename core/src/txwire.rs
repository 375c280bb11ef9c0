//! Enough of Solana's transaction wire format to refuse garbage before it costs a
//! send and to name a transaction by its signature: the whole message read (legacy
//! and v0: header, account keys, blockhash, instructions, address-table lookups),
//! sanitized as Agave's RPC does before it sends (`Message::sanitize`, and no
//! account key twice), and each signature verified (`verify_strict`, as the
//! runtime does) over the message bytes. What needs a bank — lookup tables'
//! contents, fees, programs — is the RPC node's preflight's.

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};

/// The largest transaction a packet carries (Solana's `PACKET_DATA_SIZE`).
pub const MAX_TX_BYTES: usize = 1232;
/// Largest base58 transaction (Solana's `MAX_BASE58_SIZE`).
pub const MAX_BASE58: usize = 1683;
/// Largest base64 transaction (Solana's `MAX_BASE64_SIZE`).
pub const MAX_BASE64: usize = 1644;

/// Decodes base58 `s` into exactly `N` bytes (a signature: 64, a public key: 32),
/// or `None`. Text longer than `N` bytes can take is refused before decoding:
/// base58's decode is quadratic in its input (a megabyte of it takes minutes), so
/// nothing from outside may reach it unbounded.
pub fn b58_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    // `N` bytes are at most ⌈N · log 256 / log 58⌉ = ⌈1.3657 · N⌉ characters.
    if s.len() > N * 137 / 100 + 1 {
        return None;
    }
    let mut out = [0u8; N];
    match bs58::decode(s).onto(&mut out[..]) {
        Ok(n) if n == N => Some(out),
        _ => None,
    }
}

/// How a transaction is encoded in a JSON-RPC request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `base58` (the RPC default).
    Base58,
    /// `base64`.
    Base64,
}

/// Why an encoded transaction is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Longer than the encoding of the largest transaction.
    #[error("{encoding} encoded transaction too large ({len} bytes) (max: encoded/raw {max}/{MAX_TX_BYTES})")]
    TooLarge {
        /// `base58` or `base64`.
        encoding: &'static str,
        /// Its length.
        len: usize,
        /// The largest accepted.
        max: usize,
    },
    /// Not valid base58/base64.
    #[error("invalid {encoding} encoding: {detail}")]
    Encoding {
        /// `base58` or `base64`.
        encoding: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// Decoded, but not a transaction or not validly signed.
    #[error(transparent)]
    Tx(#[from] TxError),
}

/// Decodes one encoded transaction and checks it (size, structure, every
/// signature): the raw bytes and what they tell.
pub fn decode(s: &str, encoding: Encoding) -> Result<(Vec<u8>, TxInfo), DecodeError> {
    let raw = match encoding {
        Encoding::Base64 => {
            if s.len() > MAX_BASE64 {
                return Err(DecodeError::TooLarge {
                    encoding: "base64",
                    len: s.len(),
                    max: MAX_BASE64,
                });
            }
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| DecodeError::Encoding {
                    encoding: "base64",
                    detail: e.to_string(),
                })?
        }
        Encoding::Base58 => {
            if s.len() > MAX_BASE58 {
                return Err(DecodeError::TooLarge {
                    encoding: "base58",
                    len: s.len(),
                    max: MAX_BASE58,
                });
            }
            bs58::decode(s)
                .into_vec()
                .map_err(|e| DecodeError::Encoding {
                    encoding: "base58",
                    detail: e.to_string(),
                })?
        }
    };
    let info = parse(&raw, true)?;
    Ok((raw, info))
}

/// Why a transaction is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// Larger than a packet.
    #[error("transaction is {0} bytes; at most {MAX_TX_BYTES} fit in a packet")]
    TooLarge(usize),
    /// Not a transaction.
    #[error("malformed transaction: {0}")]
    Malformed(&'static str),
    /// A signature does not verify.
    #[error("signature {0} does not verify")]
    BadSignature(usize),
    /// Read whole, but its indexes do not hold (Agave's `SanitizeFailure`): the
    /// words are Agave's RPC's, then which rule.
    #[error(
        "invalid transaction: Transaction failed to sanitize accounts offsets correctly ({0})"
    )]
    Sanitize(&'static str),
    /// One account key listed twice (Agave's `AccountLoadedTwice`).
    #[error("invalid transaction: Account loaded twice")]
    AccountLoadedTwice,
}

/// What a parsed transaction tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxInfo {
    /// The first signature: the transaction's id.
    pub signature: [u8; 64],
    /// Signatures carried.
    pub signatures: usize,
    /// The fee payer (first account key).
    pub fee_payer: [u8; 32],
    /// The recent blockhash it was signed against (its lifetime).
    pub recent_blockhash: [u8; 32],
}

impl TxInfo {
    /// The id as Solana prints it (base58 of the first signature).
    pub fn signature_b58(&self) -> String {
        bs58::encode(self.signature).into_string()
    }
}

/// Solana's compact-u16 ("shortvec"): 1–3 bytes, 7 bits each, canonical only.
fn shortvec(buf: &[u8], pos: &mut usize) -> Result<usize, TxError> {
    let mut value: usize = 0;
    for i in 0..3 {
        let b = *buf
            .get(*pos)
            .ok_or(TxError::Malformed("truncated length"))?;
        *pos += 1;
        if i == 2 && b > 0x03 {
            return Err(TxError::Malformed("length overflows u16"));
        }
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(TxError::Malformed("non-canonical length"));
            }
            return Ok(value);
        }
    }
    Err(TxError::Malformed("length overflows u16"))
}

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], TxError> {
    let end = pos
        .checked_add(n)
        .filter(|e| *e <= buf.len())
        .ok_or(TxError::Malformed("truncated"))?;
    let s = &buf[*pos..end];
    *pos = end;
    Ok(s)
}

/// Parses `wire`; with `verify`, checks every signature too. The whole message is
/// read first (what Agave's decoding refuses is [`TxError::Malformed`]), then
/// sanitized ([`TxError::Sanitize`], [`TxError::AccountLoadedTwice`]), then its
/// signatures verified — Agave's order. Allocates nothing.
pub fn parse(wire: &[u8], verify: bool) -> Result<TxInfo, TxError> {
    if wire.len() > MAX_TX_BYTES {
        return Err(TxError::TooLarge(wire.len()));
    }
    let mut pos = 0;
    let n_sigs = shortvec(wire, &mut pos)?;
    let sigs = take(wire, &mut pos, n_sigs * 64)?;
    let message = &wire[pos..];
    let mut m = 0;
    let first = *message.first().ok_or(TxError::Malformed("no message"))?;
    let v0 = first & 0x80 != 0;
    if v0 {
        if first & 0x7f != 0 {
            return Err(TxError::Malformed("unsupported message version"));
        }
        m += 1;
    }
    let header: [u8; 3] = take(message, &mut m, 3)?
        .try_into()
        .map_err(|_| TxError::Malformed("header"))?;
    let n_keys = shortvec(message, &mut m)?;
    let keys = take(message, &mut m, n_keys * 32)?;
    let blockhash =
        take(message, &mut m, 32).map_err(|_| TxError::Malformed("no recent blockhash"))?;
    let mut shape = Shape {
        signatures: n_sigs,
        header,
        keys: n_keys,
        loaded: 0,
        empty_lookup: false,
        bad_program: None,
        max_account: None,
    };
    let n_ix = shortvec(message, &mut m)?;
    for _ in 0..n_ix {
        let program = take(message, &mut m, 1)?[0];
        if shape.bad_program.is_none() {
            // Programs are static keys (never loaded from a table), and never the
            // fee payer.
            if usize::from(program) >= n_keys {
                shape.bad_program = Some("an instruction's program is not an account key");
            } else if program == 0 {
                shape.bad_program = Some("the fee payer called as a program");
            }
        }
        let n_accounts = shortvec(message, &mut m)?;
        let accounts = take(message, &mut m, n_accounts)?;
        shape.max_account = accounts.iter().copied().chain(shape.max_account).max();
        let n_data = shortvec(message, &mut m)?;
        take(message, &mut m, n_data)?;
    }
    if v0 {
        let n_lookups = shortvec(message, &mut m)?;
        for _ in 0..n_lookups {
            take(message, &mut m, 32)?;
            let writable = shortvec(message, &mut m)?;
            take(message, &mut m, writable)?;
            let readonly = shortvec(message, &mut m)?;
            take(message, &mut m, readonly)?;
            shape.empty_lookup |= writable + readonly == 0;
            shape.loaded += writable + readonly;
        }
    }
    if m != message.len() {
        return Err(TxError::Malformed("bytes after the message"));
    }
    shape.sanitize()?;
    // No key twice (n ≤ 38 in a packet: the pairs cost less than a sort's
    // allocation).
    for (i, key) in keys.chunks_exact(32).enumerate() {
        if keys.chunks_exact(32).skip(i + 1).any(|other| other == key) {
            return Err(TxError::AccountLoadedTwice);
        }
    }
    if verify {
        for i in 0..n_sigs {
            // Each signature's key is a static key: sanitized.
            let key: [u8; 32] = keys
                .get(i * 32..i * 32 + 32)
                .and_then(|k| k.try_into().ok())
                .ok_or(TxError::Malformed("key"))?;
            let sig: [u8; 64] = sigs
                .get(i * 64..i * 64 + 64)
                .and_then(|s| s.try_into().ok())
                .ok_or(TxError::Malformed("signature"))?;
            let vk = VerifyingKey::from_bytes(&key).map_err(|_| TxError::BadSignature(i))?;
            vk.verify_strict(message, &Signature::from_bytes(&sig))
                .map_err(|_| TxError::BadSignature(i))?;
        }
    }
    // At least one signature and one key: sanitized.
    let signature: [u8; 64] = sigs
        .get(..64)
        .and_then(|s| s.try_into().ok())
        .ok_or(TxError::Malformed("no signatures"))?;
    let fee_payer: [u8; 32] = keys
        .get(..32)
        .and_then(|k| k.try_into().ok())
        .ok_or(TxError::Malformed("no fee payer"))?;
    let recent_blockhash: [u8; 32] = blockhash
        .try_into()
        .map_err(|_| TxError::Malformed("no recent blockhash"))?;
    Ok(TxInfo {
        signature,
        signatures: n_sigs,
        fee_payer,
        recent_blockhash,
    })
}

/// What [`parse`] read of a message, for [`Shape::sanitize`].
struct Shape {
    /// Signatures the transaction carries.
    signatures: usize,
    /// Signatures required, read-only signed, read-only unsigned.
    header: [u8; 3],
    /// Static account keys.
    keys: usize,
    /// Keys loaded through lookup tables (0 for a legacy message).
    loaded: usize,
    /// A lookup table that loads nothing is listed.
    empty_lookup: bool,
    /// The first instruction's program that is no static key, or the fee payer.
    bad_program: Option<&'static str>,
    /// The largest account index an instruction names.
    max_account: Option<u8>,
}

impl Shape {
    /// Agave's `VersionedTransaction::sanitize` and `Message::sanitize` (legacy
    /// and v0), in their order; every failure is Agave's `SanitizeFailure`.
    fn sanitize(&self) -> Result<(), TxError> {
        let [required, ro_signed, ro_unsigned] = self.header.map(usize::from);
        if required != self.signatures {
            return Err(TxError::Sanitize(
                "signature count differs from the message header",
            ));
        }
        if self.signatures > self.keys || required + ro_unsigned > self.keys {
            return Err(TxError::Sanitize(
                "fewer account keys than the header needs",
            ));
        }
        if ro_signed >= required {
            // Also no signature at all.
            return Err(TxError::Sanitize("the fee payer must be writable"));
        }
        if self.empty_lookup {
            return Err(TxError::Sanitize("a lookup table that loads no account"));
        }
        let total = self.keys + self.loaded;
        if total > 256 {
            return Err(TxError::Sanitize("more than 256 account keys"));
        }
        if let Some(why) = self.bad_program {
            return Err(TxError::Sanitize(why));
        }
        if self.max_account.is_some_and(|a| usize::from(a) >= total) {
            return Err(TxError::Sanitize(
                "an instruction's account is not an account key",
            ));
        }
        Ok(())
    }
}

/// Builds a minimal legacy transaction (one signer, no instructions) signed by `key`:
/// valid on the wire, for tests and benchmarks. `pad` extra bytes of instruction data
/// in a memo-like instruction make it bigger.
pub fn example_tx(key: &ed25519_dalek::SigningKey, blockhash: [u8; 32], pad: usize) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let program = [3u8; 32];
    let mut msg = vec![1u8, 0, 1];
    msg.push(2); // two account keys: payer, program
    msg.extend_from_slice(&key.verifying_key().to_bytes());
    msg.extend_from_slice(&program);
    msg.extend_from_slice(&blockhash);
    if pad == 0 {
        msg.push(0); // no instructions
    } else {
        msg.push(1);
        msg.push(1); // program index
        msg.push(0); // no accounts
        encode_shortvec(&mut msg, pad);
        msg.extend((0..pad).map(|i| (i % 251) as u8));
    }
    let sig = key.sign(&msg);
    let mut wire = vec![1u8];
    wire.extend_from_slice(&sig.to_bytes());
    wire.extend_from_slice(&msg);
    wire
}

fn encode_shortvec(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes: their base58 decodes back, at the right length only.
        #[test]
        fn b58_exact_takes_what_the_library_writes(
            sig in proptest::array::uniform32(any::<u8>()),
            tail in proptest::array::uniform32(any::<u8>()),
            zeros in 0usize..=64,
        ) {
            let mut s64 = [0u8; 64];
            s64[..32].copy_from_slice(&sig);
            s64[32..].copy_from_slice(&tail);
            s64[..zeros].fill(0); // leading zero bytes: one '1' each
            let text = bs58::encode(s64).into_string();
            prop_assert_eq!(b58_exact::<64>(&text), Some(s64));
            prop_assert_eq!(b58_exact::<32>(&text), None);
            let key = bs58::encode(sig).into_string();
            prop_assert_eq!(b58_exact::<32>(&key), Some(sig));
            prop_assert_eq!(b58_exact::<64>(&key), None);
        }
    }

    #[test]
    fn b58_exact_refuses_long_text_before_decoding_it() {
        // A megabyte of valid base58 (quadratic to decode: minutes; this test would
        // hang without the bound).
        assert_eq!(b58_exact::<64>(&"2".repeat(1 << 20)), None);
        assert_eq!(b58_exact::<64>(&"2".repeat(89)), None);
        // The longest texts of 64 and 32 bytes are within the bound.
        assert_eq!(bs58::encode([0xff; 64]).into_string().len(), 88);
        assert_eq!(
            b58_exact::<64>(&bs58::encode([0xff; 64]).into_string()),
            Some([0xff; 64])
        );
        assert_eq!(
            b58_exact::<32>(&bs58::encode([0xff; 32]).into_string()),
            Some([0xff; 32])
        );
        assert_eq!(b58_exact::<64>(&"1".repeat(64)), Some([0; 64]));
        for bad in ["", "0", "I", "l", "O", "not base58!"] {
            assert_eq!(b58_exact::<32>(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_signed_transaction_parses_and_verifies() {
        let k = SigningKey::from_bytes(&[9u8; 32]);
        for pad in [0, 1, 200, 1000] {
            let tx = example_tx(&k, [5u8; 32], pad);
            let info = parse(&tx, true).unwrap();
            assert_eq!(info.signatures, 1);
            assert_eq!(info.fee_payer, k.verifying_key().to_bytes());
            assert_eq!(info.recent_blockhash, [5u8; 32]);
            assert_eq!(&info.signature[..], &tx[1..65]);
            assert_eq!(
                bs58::decode(info.signature_b58()).into_vec().unwrap(),
                &tx[1..65]
            );
        }
    }

    #[test]
    fn tampering_and_size_are_refused() {
        let k = SigningKey::from_bytes(&[9u8; 32]);
        let mut tx = example_tx(&k, [5u8; 32], 10);
        let last = tx.len() - 1;
        tx[last] ^= 1;
        assert_eq!(parse(&tx, true), Err(TxError::BadSignature(0)));
        assert!(parse(&tx, false).is_ok(), "structure is still fine");
        let big = example_tx(&k, [5u8; 32], 1200);
        assert_eq!(parse(&big, false), Err(TxError::TooLarge(big.len())));
        assert_eq!(
            parse(&[], false),
            Err(TxError::Malformed("truncated length"))
        );
        assert_eq!(parse(&[0], false), Err(TxError::Malformed("no message")));
        assert_eq!(
            parse(&[0x80, 0x00], false),
            Err(TxError::Malformed("non-canonical length"))
        );
    }

    #[test]
    fn shortvec_matches_solana() {
        for (v, enc) in [
            (0usize, vec![0u8]),
            (0x7f, vec![0x7f]),
            (0x80, vec![0x80, 0x01]),
            (0x3fff, vec![0xff, 0x7f]),
            (0x4000, vec![0x80, 0x80, 0x01]),
            (0xffff, vec![0xff, 0xff, 0x03]),
        ] {
            let mut out = Vec::new();
            encode_shortvec(&mut out, v);
            assert_eq!(out, enc);
            let mut pos = 0;
            assert_eq!(shortvec(&enc, &mut pos), Ok(v));
            assert_eq!(pos, enc.len());
        }
        let mut pos = 0;
        assert!(shortvec(&[0xff, 0xff, 0x04], &mut pos).is_err());
    }

    /// A legacy message of `keys` (the first the fee payer, signing), `header`'s
    /// read-only counts, and `instructions` (program index, account indexes),
    /// signed by `payer`.
    fn legacy(
        payer: &SigningKey,
        extra_keys: &[[u8; 32]],
        ro: (u8, u8),
        instructions: &[(u8, &[u8])],
    ) -> Vec<u8> {
        use ed25519_dalek::Signer;
        let mut msg = vec![1u8, ro.0, ro.1];
        encode_shortvec(&mut msg, 1 + extra_keys.len());
        msg.extend_from_slice(&payer.verifying_key().to_bytes());
        for k in extra_keys {
            msg.extend_from_slice(k);
        }
        msg.extend_from_slice(&[5u8; 32]);
        encode_shortvec(&mut msg, instructions.len());
        for (program, accounts) in instructions {
            msg.push(*program);
            encode_shortvec(&mut msg, accounts.len());
            msg.extend_from_slice(accounts);
            msg.push(0); // no data
        }
        let mut wire = vec![1u8];
        wire.extend_from_slice(&payer.sign(&msg).to_bytes());
        wire.extend_from_slice(&msg);
        wire
    }

    /// The rules Agave's RPC applies before it sends (`Message::sanitize`, no key
    /// twice), each on its own; `sender_plane.rs` holds the parser to solders'
    /// `sanitize` over many more.
    #[test]
    fn what_agave_would_not_sanitize_is_refused() {
        let k = SigningKey::from_bytes(&[9u8; 32]);
        let (a, p) = ([1u8; 32], [2u8; 32]);
        assert!(parse(&legacy(&k, &[a, p], (0, 1), &[(2, &[0, 1])]), true).is_ok());
        for (wire, want) in [
            (
                legacy(&k, &[a, p], (0, 1), &[(3, &[0])]),
                TxError::Sanitize("an instruction's program is not an account key"),
            ),
            (
                legacy(&k, &[a, p], (0, 1), &[(0, &[1])]),
                TxError::Sanitize("the fee payer called as a program"),
            ),
            (
                legacy(&k, &[a, p], (0, 1), &[(2, &[3])]),
                TxError::Sanitize("an instruction's account is not an account key"),
            ),
            (
                legacy(&k, &[a, p], (1, 0), &[]),
                TxError::Sanitize("the fee payer must be writable"),
            ),
            (
                legacy(&k, &[a], (0, 2), &[]),
                TxError::Sanitize("fewer account keys than the header needs"),
            ),
            (
                legacy(&k, &[a, a], (0, 1), &[]),
                TxError::AccountLoadedTwice,
            ),
            (
                legacy(&k, &[k.verifying_key().to_bytes()], (0, 0), &[]),
                TxError::AccountLoadedTwice,
            ),
        ] {
            assert_eq!(parse(&wire, true), Err(want.clone()), "{want}");
        }
        // Bytes after the message: Agave would sign-check the message without
        // them; a leader may drop the packet. Refused, with what it is.
        let mut long = legacy(&k, &[a, p], (0, 1), &[(2, &[0])]);
        long.push(0);
        assert_eq!(
            parse(&long, false),
            Err(TxError::Malformed("bytes after the message"))
        );
        // A v0 lookup that loads nothing.
        let mut v0 = vec![0x80u8, 1, 0, 0, 1];
        v0.extend_from_slice(&k.verifying_key().to_bytes());
        v0.extend_from_slice(&[5u8; 32]);
        v0.push(0); // no instructions
        v0.push(1); // one lookup
        v0.extend_from_slice(&[7u8; 32]);
        v0.extend_from_slice(&[0, 0]);
        let mut wire = vec![1u8];
        wire.extend_from_slice(&[0u8; 64]);
        wire.extend_from_slice(&v0);
        assert_eq!(
            parse(&wire, false),
            Err(TxError::Sanitize("a lookup table that loads no account"))
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let _ = parse(&bytes, true);
        }
    }
}
