//! Ed25519 signature verification with per-key precomputed tables, for the edge.
//!
//! Why: inside Envoy the filter runs as wasm32, where a 64×64→128-bit multiply
//! does not exist. `ed25519-dalek` then uses its 32-bit field backend and a
//! double-base scalar multiplication (about 253 doublings per verify). The command
//! keys are few and known at configuration time, so we precompute fixed-base tables
//! for every key (and once for the base point) and verify with table additions
//! only — one mixed addition per window of each scalar ([`KEY_WINDOW`],
//! [`BASE_WINDOW`]) — and one inversion (safegcd divsteps, `inverse.rs`), no
//! doubling. `docs/edge-ed25519.md` explains the design; `bash bench/run.sh verify`
//! measures it against `ed25519-dalek`.
//!
//! What it accepts is exactly what `ed25519_dalek::VerifyingKey::verify_strict`
//! accepts (the differential tests in `tests` hold it to that):
//! - `s` must be canonical (< ℓ);
//! - R must equal, byte for byte, the canonical encoding of `[s]B − [k]A` with
//!   k = SHA-512(R ‖ A ‖ M) mod ℓ — so non-canonical and off-curve R never match;
//! - R must not be of small order (its encoding, equal to the recomputed point's,
//!   is none of the eight small-order encodings);
//! - A must not be of small order and its encoding must be canonical (refused
//!   when the key is loaded).
//!
//! Everything is variable time; it only handles public values. The sidecar keeps
//! verifying with `ed25519-dalek`, so the two layers use independent implementations.

mod field;
mod inverse;
mod point;
mod table;

#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use curve25519_dalek::Scalar;
use sha2::{Digest, Sha512};

use crate::jwk::{KeyError, WEAK_ED25519};
use point::{Consts, Ext};
use table::{digits, Table, MAX_ROWS};

/// Window of the per-key tables, bits: 10 gives 26 rows × 512 points × 120 bytes =
/// 1.5 MiB per key and 26 additions per verify (smaller windows: smaller tables,
/// more additions; measured in `docs/benchmarks.md`).
pub const KEY_WINDOW: u32 = 10;
/// Window of the base-point table, built once per process (or wasm VM); 10 bits as
/// for the keys.
pub const BASE_WINDOW: u32 = 10;

/// Encoding of the Ed25519 base point.
const BASE_BYTES: [u8; 32] = [
    0x58, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
    0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66,
];

/// The canonical encodings of the eight points of small order (the 8-torsion):
/// a recomputed R equal to one of these is refused, as `verify_strict` refuses it.
const SMALL_ORDER: [[u8; 32]; 8] = [
    // identity (order 1)
    [
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00,
    ],
    // (0, −1), order 2
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // (±√−1, 0), order 4
    [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00,
    ],
    [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x80,
    ],
    // order 8
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x85,
    ],
    // order 8
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0xfa,
    ],
];

static BASE: OnceLock<Option<Table>> = OnceLock::new();

fn base_table() -> Option<&'static Table> {
    BASE.get_or_init(|| {
        let c = Consts::new();
        Ext::decompress(&BASE_BYTES, &c).map(|b| Table::new(&b, BASE_WINDOW, &c))
    })
    .as_ref()
}

/// Builds the base-point table now rather than on the first verify (a few
/// milliseconds in wasm); returns whether it is available.
pub fn warm_up() -> bool {
    base_table().is_some()
}

/// A public key with its fixed-base table of −A. Cheap to clone (shared table).
#[derive(Clone)]
pub struct PrecomputedKey {
    a: [u8; 32],
    neg_a: Arc<Table>,
}

impl std::fmt::Debug for PrecomputedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecomputedKey")
            .field("key", &hex::encode(self.a))
            .field("window", &self.neg_a.window())
            .finish()
    }
}

impl PrecomputedKey {
    /// Validates the 32-byte public key and builds its table (the first one in a
    /// process or VM also builds the base point's).
    pub fn new(public_key: &[u8; 32]) -> Result<PrecomputedKey, KeyError> {
        let c = Consts::new();
        let a = Ext::decompress(public_key, &c)
            .ok_or(KeyError::Invalid("not a canonical Ed25519 point encoding"))?;
        if a.is_small_order() {
            return Err(KeyError::Invalid(WEAK_ED25519));
        }
        Ok(PrecomputedKey {
            a: *public_key,
            neg_a: Arc::new(Table::new(&a.neg(), KEY_WINDOW, &c)),
        })
    }

    /// Verifies `signature` over `message`, accepting exactly what
    /// `ed25519_dalek::VerifyingKey::verify_strict` accepts.
    pub fn verify_strict(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Some(base) = base_table() else {
            return false;
        };
        let (r, s_bytes) = signature.split_at(32);
        let Some(s) = s_bytes
            .try_into()
            .ok()
            .and_then(|b| Option::<Scalar>::from(Scalar::from_canonical_bytes(b)))
        else {
            return false;
        };
        let mut h = Sha512::new();
        h.update(r);
        h.update(self.a);
        h.update(message);
        let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());

        let mut ds = [0i16; MAX_ROWS];
        let mut dk = [0i16; MAX_ROWS];
        let ds = digits(s.as_bytes(), base.window(), &mut ds);
        let dk = digits(k.as_bytes(), self.neg_a.window(), &mut dk);
        std::hint::black_box(base.touch(ds) ^ self.neg_a.touch(dk));
        // [s]B + [k](−A)
        let Some(acc) = base.add_digits(Ext::IDENTITY, ds) else {
            return false;
        };
        let Some(acc) = self.neg_a.add_digits(acc, dk) else {
            return false;
        };
        // R equals the canonical encoding of the recomputed point, so comparing it
        // with the small-order encodings decides the point's order (no doublings).
        acc.compress()[..] == *r && !SMALL_ORDER.iter().any(|e| e[..] == *r)
    }
}
