//! Fixed-base tables. For a point P and a window of w bits, row i holds
//! j·2^(w·i)·P for j = 1..=2^(w−1), in affine Niels form. A scalar below 2^253,
//! written in signed radix 2^w, then costs one mixed addition per non-zero digit
//! and no doubling at all — against ~253 doublings for a double-base
//! multiplication that has to work for any point.

use super::point::{Consts, Ext, Niels};

/// A fixed-base table; see the module documentation.
pub(crate) struct Table {
    w: u32,
    half: usize,
    entries: Box<[Niels]>,
}

/// Rows needed for scalars below 2^253 with a window of `w` bits: w·rows ≥ 254,
/// so the top digit never carries out (see [`digits`]).
pub(crate) const fn rows(w: u32) -> usize {
    254_usize.div_ceil(w as usize)
}

/// Rows of the smallest window we support (2 bits): a digit buffer this long fits any.
pub(crate) const MAX_ROWS: usize = rows(2);

impl Table {
    /// Builds the table of `p`: rows × 2^(w−1) points, one batched inversion.
    /// `w` is one of our constants, 2..=10 ([`digits`] reads up to 17 bits).
    pub(crate) fn new(p: &Ext, w: u32, c: &Consts) -> Table {
        let half = 1usize << (w - 1);
        let mut points = Vec::with_capacity(rows(w) * half);
        let mut base = *p;
        for _ in 0..rows(w) {
            let cached = base.to_cached(c);
            let mut cur = base;
            points.push(cur);
            for _ in 1..half {
                cur = cur.add_cached(&cached).to_ext();
                points.push(cur);
            }
            // cur = 2^(w−1)·base, so one doubling gives the next row's base 2^w·base.
            base = cur.double().to_ext();
        }
        Table {
            w,
            half,
            entries: Ext::batch_to_niels(&points, c).into_boxed_slice(),
        }
    }

    pub(crate) fn window(&self) -> u32 {
        self.w
    }

    /// The entry for digit `d` of row `i` (its magnitude; the caller applies the
    /// sign); `None` for a zero or out-of-range digit.
    #[inline(always)]
    fn entry(&self, i: usize, d: i16) -> Option<&Niels> {
        if d == 0 {
            return None;
        }
        self.entries
            .get(i * self.half + usize::from(d.unsigned_abs()) - 1)
    }

    /// Reads one word of every cache line of the entries `digits` will use, so
    /// their cache misses overlap instead of stalling one addition each (a
    /// verify is often the first touch of the tables in a while). Returns a value
    /// derived from the reads so they are not optimised away.
    pub(crate) fn touch(&self, digits: &[i16]) -> i32 {
        let mut x = 0i32;
        for (i, &d) in digits.iter().enumerate() {
            if let Some(q) = self.entry(i, d) {
                x ^= q.y_plus_x.0[0] ^ q.y_minus_x.0[6] ^ q.xy2d.0[9];
            }
        }
        x
    }

    /// `acc + Σ d_i·2^(w·i)·P` for the digits of [`digits`]; `None` only if a digit
    /// is out of range (which `digits` never produces).
    #[inline(always)]
    pub(crate) fn add_digits(&self, mut acc: Ext, digits: &[i16]) -> Option<Ext> {
        for (i, &d) in digits.iter().enumerate() {
            if d == 0 {
                continue;
            }
            let q = self.entry(i, d)?;
            acc = if d > 0 {
                acc.add_niels(q)
            } else {
                acc.sub_niels(q)
            }
            .to_ext();
        }
        Some(acc)
    }
}

/// Signed radix-2^w digits of a little-endian scalar below 2^253:
/// Σ d_i·2^(w·i) = s with −2^(w−1) < d_i ≤ 2^(w−1). Writes `rows(w)` digits to
/// `out` (which must be that long) and returns them.
pub(crate) fn digits<'a>(s: &[u8; 32], w: u32, out: &'a mut [i16]) -> &'a [i16] {
    let n = rows(w).min(out.len());
    let half = 1i32 << (w - 1);
    let mut carry = 0i32;
    for (i, d) in out.iter_mut().take(n).enumerate() {
        let pos = w as usize * i;
        // w bits from bit `pos` (bits past 255 read as 0).
        let mut window = 0u32;
        for b in 0..3 {
            if let Some(&byte) = s.get(pos / 8 + b) {
                window |= u32::from(byte) << (8 * b);
            }
        }
        let raw = ((window >> (pos % 8)) & ((1 << w) - 1)) as i32 + carry;
        if raw > half {
            *d = (raw - (1 << w)) as i16;
            carry = 1;
        } else {
            *d = raw as i16;
            carry = 0;
        }
    }
    &out[..n]
}
