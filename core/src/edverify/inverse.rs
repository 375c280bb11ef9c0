//! Inversion modulo p = 2^255 − 19 by Bernstein–Yang divsteps ("safegcd"), in the
//! variable-time form of libsecp256k1's `modinv32_var`: 30 divsteps at a time on the
//! low bits only, then one 2×2 matrix applied to the full-width numbers.
//!
//! Why: a verify needs one inversion (to encode the recomputed R). Fermat's
//! `z^(p−2)` costs 254 squarings and 11 multiplications; this needs a dozen or so
//! rounds of about a hundred 32×32→64-bit products.
//! Variable time is fine here: the verifier only handles public values.
//!
//! Numbers are nine signed 30-bit limbs (`[i32; 9]`, value Σ v_i·2^(30·i)).
//! Reference: Bernstein & Yang, "Fast constant-time gcd computation and modular
//! inversion" (2019), and libsecp256k1's `doc/safegcd_implementation.md`, whose
//! bounds (|u|+|v| ≤ 2^30 after 30 divsteps, d and e within (−2p, p)) this follows.

use super::field::Fe;

/// 2^30 − 1.
const M30: i32 = (u32::MAX >> 2) as i32;
/// p in signed 30-bit limbs: 2^255 − 19 = −19 + 2^15·2^240.
const P: [i32; 9] = [-19, 0, 0, 0, 0, 0, 0, 0, 1 << 15];
/// p^−1 mod 2^30.
const P_INV30: u32 = inverse_mod_2_32(P[0] as u32) & (M30 as u32);
/// More than enough rounds: an inversion of a 255-bit number needs at most
/// 724 divsteps (Bernstein–Yang's bound) = 25 rounds of 30; typically 12–15.
const MAX_ROUNDS: usize = 64;

/// x^−1 mod 2^32 for odd x (Newton's iteration doubles the correct low bits).
const fn inverse_mod_2_32(x: u32) -> u32 {
    let mut y = x; // x·x ≡ 1 (mod 8): 3 correct bits
    let mut i = 0;
    while i < 4 {
        y = y.wrapping_mul(2u32.wrapping_sub(x.wrapping_mul(y)));
        i += 1;
    }
    y
}

/// −(2i + 1)^−1 mod 256, for i in 0..128.
const NEG_INV256: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let inv = inverse_mod_2_32(2 * i as u32 + 1);
        t[i] = (inv.wrapping_neg() & 0xff) as u8;
        i += 1;
    }
    t
};

/// The transition matrix of 30 divsteps, scaled by 2^30: [u v; q r].
struct Trans {
    u: i32,
    v: i32,
    q: i32,
    r: i32,
}

/// 30 divsteps on the low 30 bits of f (odd) and g; returns the new eta (−delta)
/// and the matrix. Steps that only halve g are done in bulk (count trailing zeros),
/// and up to 8 bits of g are cancelled at once with a table of inverses.
fn divsteps_30(mut eta: i32, f0: u32, g0: u32) -> (i32, Trans) {
    let (mut u, mut v, mut q, mut r) = (1u32, 0u32, 0u32, 1u32);
    let (mut f, mut g) = (f0, g0);
    let mut i: u32 = 30;
    loop {
        // A sentinel bit above the steps left bounds the count at i.
        let zeros = (g | (u32::MAX << i)).trailing_zeros();
        g >>= zeros;
        u <<= zeros;
        v <<= zeros;
        eta -= zeros as i32;
        i -= zeros;
        if i == 0 {
            break;
        }
        // g is odd now. If eta < 0: (eta, f, g) ← (−eta, g, −f), and the rows swap.
        if eta < 0 {
            eta = -eta;
            (f, g) = (g, f.wrapping_neg());
            (u, q) = (q, u.wrapping_neg());
            (v, r) = (r, v.wrapping_neg());
        }
        // Cancel the low min(eta + 1, i, 8) bits of g by adding a multiple of f.
        let limit = (eta + 1).min(i as i32) as u32;
        let mask = (u32::MAX >> (32 - limit)) & 0xff;
        let w = g.wrapping_mul(u32::from(NEG_INV256[((f >> 1) & 127) as usize])) & mask;
        g = g.wrapping_add(f.wrapping_mul(w));
        q = q.wrapping_add(u.wrapping_mul(w));
        r = r.wrapping_add(v.wrapping_mul(w));
    }
    (
        eta,
        Trans {
            u: u as i32,
            v: v as i32,
            q: q as i32,
            r: r as i32,
        },
    )
}

/// (d, e) ← (t·(d, e) + p·(md, me)) / 2^30, with md, me chosen so the division is
/// exact; keeps d and e within (−2p, p).
fn update_de(d: &mut [i32; 9], e: &mut [i32; 9], t: &Trans) {
    let (u, v, q, r) = (t.u, t.v, t.q, t.r);
    // Start md, me at [u, q] if d < 0 plus [v, r] if e < 0 (keeps the result in range).
    let sd = d[8] >> 31;
    let se = e[8] >> 31;
    let mut md = (u & sd).wrapping_add(v & se);
    let mut me = (q & sd).wrapping_add(r & se);
    let mut cd = i64::from(u) * i64::from(d[0]) + i64::from(v) * i64::from(e[0]);
    let mut ce = i64::from(q) * i64::from(d[0]) + i64::from(r) * i64::from(e[0]);
    // Make the low 30 bits of t·(d, e) + p·(md, me) zero.
    md = md.wrapping_sub((P_INV30.wrapping_mul(cd as u32).wrapping_add(md as u32) as i32) & M30);
    me = me.wrapping_sub((P_INV30.wrapping_mul(ce as u32).wrapping_add(me as u32) as i32) & M30);
    cd += i64::from(P[0]) * i64::from(md);
    ce += i64::from(P[0]) * i64::from(me);
    debug_assert!(cd & i64::from(M30) == 0 && ce & i64::from(M30) == 0);
    cd >>= 30;
    ce >>= 30;
    for i in 1..9 {
        let (di, ei) = (i64::from(d[i]), i64::from(e[i]));
        cd += i64::from(u) * di + i64::from(v) * ei + i64::from(P[i]) * i64::from(md);
        ce += i64::from(q) * di + i64::from(r) * ei + i64::from(P[i]) * i64::from(me);
        d[i - 1] = (cd as i32) & M30;
        e[i - 1] = (ce as i32) & M30;
        cd >>= 30;
        ce >>= 30;
    }
    d[8] = cd as i32;
    e[8] = ce as i32;
}

/// (f, g) ← t·(f, g) / 2^30 over the first `len` limbs (exact by construction).
fn update_fg(len: usize, f: &mut [i32; 9], g: &mut [i32; 9], t: &Trans) {
    let (u, v, q, r) = (
        i64::from(t.u),
        i64::from(t.v),
        i64::from(t.q),
        i64::from(t.r),
    );
    let mut cf = u * i64::from(f[0]) + v * i64::from(g[0]);
    let mut cg = q * i64::from(f[0]) + r * i64::from(g[0]);
    cf >>= 30;
    cg >>= 30;
    for i in 1..len {
        let (fi, gi) = (i64::from(f[i]), i64::from(g[i]));
        cf += u * fi + v * gi;
        cg += q * fi + r * gi;
        f[i - 1] = (cf as i32) & M30;
        g[i - 1] = (cg as i32) & M30;
        cf >>= 30;
        cg >>= 30;
    }
    f[len - 1] = cf as i32;
    g[len - 1] = cg as i32;
}

/// Brings d from (−2p, p) to [0, p), negated first if `sign` < 0.
fn normalize(d: &mut [i32; 9], sign: i32) {
    let add_p = |d: &mut [i32; 9]| {
        if d[8] < 0 {
            for (x, p) in d.iter_mut().zip(P) {
                *x += p;
            }
        }
    };
    let carry = |d: &mut [i32; 9]| {
        for i in 0..8 {
            d[i + 1] += d[i] >> 30;
            d[i] &= M30;
        }
    };
    // Limbs are within (−2^30, 2^30), so none of this overflows an i32.
    add_p(d); // (−2p, p) → (−p, p)
    if sign < 0 {
        for x in d.iter_mut() {
            *x = -*x;
        }
    }
    carry(d);
    add_p(d); // (−p, p) → [0, p)
    carry(d);
}

fn to_signed30(x: &Fe) -> [i32; 9] {
    let bytes = x.to_bytes();
    let mut out = [0i32; 9];
    let (mut acc, mut bits, mut o) = (0u64, 0u32, 0usize);
    for b in bytes {
        acc |= u64::from(b) << bits;
        bits += 8;
        if bits >= 30 {
            out[o] = (acc as i32) & M30;
            o += 1;
            acc >>= 30;
            bits -= 30;
        }
    }
    out[8] = acc as i32; // the last 16 bits (bit 255 is 0: canonical)
    out
}

fn from_signed30(d: &[i32; 9]) -> Fe {
    let mut bytes = [0u8; 32];
    let (mut acc, mut bits, mut o) = (0u64, 0u32, 0usize);
    for &limb in d {
        acc |= (limb as u64) << bits;
        bits += 30;
        while bits >= 8 && o < 32 {
            bytes[o] = acc as u8;
            o += 1;
            acc >>= 8;
            bits -= 8;
        }
    }
    Fe::from_bytes(&bytes)
}

/// `1/x` mod p (zero maps to zero, as with Fermat's `x^(p−2)`). Variable time.
pub(crate) fn invert(x: &Fe) -> Fe {
    match invert_in_rounds(x) {
        Some((inv, _)) => inv,
        // Unreachable by the divstep bound (tests check the rounds); stay correct
        // rather than loop or guess.
        None => x.invert_fermat(),
    }
}

/// The inverse and the number of 30-divstep rounds it took; `None` past `MAX_ROUNDS`.
pub(crate) fn invert_in_rounds(x: &Fe) -> Option<(Fe, usize)> {
    let mut d = [0i32; 9];
    let mut e = [0i32; 9];
    e[0] = 1;
    let mut f = P;
    let mut g = to_signed30(x);
    let mut len = 9;
    let mut eta = -1;
    for round in 1..=MAX_ROUNDS {
        let (next, t) = divsteps_30(eta, f[0] as u32, g[0] as u32);
        eta = next;
        update_de(&mut d, &mut e, &t);
        update_fg(len, &mut f, &mut g, &t);
        if g[..len].iter().all(|&l| l == 0) {
            // f = ±gcd(p, x) = ±1 (x ≠ 0), and d·x ≡ f.
            normalize(&mut d, f[len - 1]);
            return Some((from_signed30(&d), round));
        }
        // Shorten when the top limbs of f and g are both 0 or −1.
        let (fn_, gn) = (f[len - 1], g[len - 1]);
        if len > 1 && (fn_ ^ (fn_ >> 31)) | (gn ^ (gn >> 31)) == 0 {
            f[len - 2] |= ((fn_ as u32) << 30) as i32;
            g[len - 2] |= ((gn as u32) << 30) as i32;
            len -= 1;
        }
    }
    None
}
