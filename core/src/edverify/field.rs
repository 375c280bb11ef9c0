//! Arithmetic modulo p = 2^255 - 19 in radix 2^25.5: ten signed limbs, alternately
//! 26 and 25 bits wide (limb i holds bits from ceil(25.5 i)), products in `i64`.
//! This is the representation of the ref10 reference implementation; it suits
//! wasm32, which multiplies 64-bit integers natively but has no 64×64→128 multiply.
//!
//! Bounds. A *reduced* element (output of `mul`, `square`, `from_bytes`, `reduce`)
//! has |limb| ≤ 2^25 for even limbs and ≤ 2^24 + 2^16 for odd limbs. `add`, `sub` and
//! `neg` do not carry: a sum or difference of n reduced elements has limbs at most
//! n times those bounds. `mul` and `square` accept inputs up to 4× the reduced
//! bounds: the largest column sum is then 124.5 · (4 · 2^25)² · ... < 2^63 (see
//! `mul`). No formula in `point.rs` feeds more than 4× into a multiplication
//! (the worst is doubling's 2Z² − (Y² − X²)).

/// A field element; see the module documentation for the representation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fe(pub(crate) [i32; 10]);

/// Bit offset of each limb.
const POS: [u32; 10] = [0, 26, 51, 77, 102, 128, 153, 179, 204, 230];
/// Width of each limb.
const WIDTH: [u32; 10] = [26, 25, 26, 25, 26, 25, 26, 25, 26, 25];

impl Fe {
    pub(crate) const ZERO: Fe = Fe([0; 10]);
    pub(crate) const ONE: Fe = Fe([1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

    /// The low 255 bits of `bytes` (little-endian) as a field element; bit 255 is
    /// ignored and values ≥ p are accepted (callers that need a canonical
    /// encoding compare `to_bytes` with the input).
    pub(crate) fn from_bytes(bytes: &[u8; 32]) -> Fe {
        let mut words = [0u64; 4];
        for (i, w) in words.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            *w = u64::from_le_bytes(b);
        }
        let bits = |pos: u32, width: u32| -> i64 {
            let (w, off) = ((pos / 64) as usize, pos % 64);
            let mut v = words[w] >> off;
            if off + width > 64 {
                v |= words[w + 1] << (64 - off);
            }
            (v & ((1u64 << width) - 1)) as i64
        };
        let mut limbs = [0i64; 10];
        for (i, l) in limbs.iter_mut().enumerate() {
            *l = bits(POS[i], WIDTH[i]);
        }
        carry(limbs)
    }

    /// The same value with reduced limbs.
    pub(crate) fn reduce(&self) -> Fe {
        carry(self.0.map(i64::from))
    }

    /// The canonical little-endian encoding (fully reduced below p).
    pub(crate) fn to_bytes(self) -> [u8; 32] {
        // First carry, so every limb is within the reduced bounds.
        let mut h = self.reduce().0.map(i64::from);
        // q = floor(h / p) ∈ {-1, 0, 1} (ref10's argument: with reduced limbs,
        // h + 19·2^-25·h9 + 1/2 over 2^255 has the same floor).
        let mut q = (19 * h[9] + (1 << 24)) >> 25;
        for i in 0..10 {
            q = (h[i] + q) >> WIDTH[i];
        }
        // h - q·p = h + 19q - q·2^255; the 2^255 multiple falls off the top carry.
        h[0] += 19 * q;
        for i in 0..9 {
            let c = h[i] >> WIDTH[i];
            h[i + 1] += c;
            h[i] -= c << WIDTH[i];
        }
        let c = h[9] >> WIDTH[9];
        h[9] -= c << WIDTH[9];
        // Every limb is now in [0, 2^width): pack.
        let mut out = [0u8; 32];
        let mut acc: u128 = 0;
        let mut acc_bits = 0u32;
        let mut o = 0;
        for i in 0..10 {
            acc |= (h[i] as u128) << acc_bits;
            acc_bits += WIDTH[i];
            while acc_bits >= 8 {
                out[o] = acc as u8;
                o += 1;
                acc >>= 8;
                acc_bits -= 8;
            }
        }
        // 255 bits: one last partial byte (7 bits).
        out[o] = acc as u8;
        out
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.to_bytes() == [0u8; 32]
    }

    /// The "sign" of Ed25519 encodings: the low bit of the canonical value.
    pub(crate) fn is_negative(&self) -> bool {
        self.to_bytes()[0] & 1 == 1
    }

    #[inline(always)]
    pub(crate) fn add(&self, g: &Fe) -> Fe {
        Fe(std::array::from_fn(|i| self.0[i] + g.0[i]))
    }

    #[inline(always)]
    pub(crate) fn sub(&self, g: &Fe) -> Fe {
        Fe(std::array::from_fn(|i| self.0[i] - g.0[i]))
    }

    #[inline(always)]
    pub(crate) fn neg(&self) -> Fe {
        Fe(self.0.map(|l| -l))
    }

    /// Product, reduced. Inputs may be up to 4× the reduced bounds: then each
    /// product term is at most 19·(4·2^25)·(4·2^25) or 2·19·(4·2^25)·(4·2^24.01),
    /// and the largest column (h0) sums to < 124.5 · 2^54 < 2^61.
    #[inline(never)]
    pub(crate) fn mul(&self, g: &Fe) -> Fe {
        let [f0, f1, f2, f3, f4, f5, f6, f7, f8, f9] = self.0.map(i64::from);
        let [g0, g1, g2, g3, g4, g5, g6, g7, g8, g9] = g.0.map(i64::from);
        let (g1_19, g2_19, g3_19, g4_19, g5_19) = (19 * g1, 19 * g2, 19 * g3, 19 * g4, 19 * g5);
        let (g6_19, g7_19, g8_19, g9_19) = (19 * g6, 19 * g7, 19 * g8, 19 * g9);
        let (f1_2, f3_2, f5_2, f7_2, f9_2) = (2 * f1, 2 * f3, 2 * f5, 2 * f7, 2 * f9);
        // Column k: f_i·g_j with i + j ≡ k (mod 10); ×19 when i + j ≥ 10 (2^255 ≡ 19),
        // ×2 when i and j are both odd (two 25-bit offsets round down twice).
        let h0 = f0 * g0
            + f1_2 * g9_19
            + f2 * g8_19
            + f3_2 * g7_19
            + f4 * g6_19
            + f5_2 * g5_19
            + f6 * g4_19
            + f7_2 * g3_19
            + f8 * g2_19
            + f9_2 * g1_19;
        let h1 = f0 * g1
            + f1 * g0
            + f2 * g9_19
            + f3 * g8_19
            + f4 * g7_19
            + f5 * g6_19
            + f6 * g5_19
            + f7 * g4_19
            + f8 * g3_19
            + f9 * g2_19;
        let h2 = f0 * g2
            + f1_2 * g1
            + f2 * g0
            + f3_2 * g9_19
            + f4 * g8_19
            + f5_2 * g7_19
            + f6 * g6_19
            + f7_2 * g5_19
            + f8 * g4_19
            + f9_2 * g3_19;
        let h3 = f0 * g3
            + f1 * g2
            + f2 * g1
            + f3 * g0
            + f4 * g9_19
            + f5 * g8_19
            + f6 * g7_19
            + f7 * g6_19
            + f8 * g5_19
            + f9 * g4_19;
        let h4 = f0 * g4
            + f1_2 * g3
            + f2 * g2
            + f3_2 * g1
            + f4 * g0
            + f5_2 * g9_19
            + f6 * g8_19
            + f7_2 * g7_19
            + f8 * g6_19
            + f9_2 * g5_19;
        let h5 = f0 * g5
            + f1 * g4
            + f2 * g3
            + f3 * g2
            + f4 * g1
            + f5 * g0
            + f6 * g9_19
            + f7 * g8_19
            + f8 * g7_19
            + f9 * g6_19;
        let h6 = f0 * g6
            + f1_2 * g5
            + f2 * g4
            + f3_2 * g3
            + f4 * g2
            + f5_2 * g1
            + f6 * g0
            + f7_2 * g9_19
            + f8 * g8_19
            + f9_2 * g7_19;
        let h7 = f0 * g7
            + f1 * g6
            + f2 * g5
            + f3 * g4
            + f4 * g3
            + f5 * g2
            + f6 * g1
            + f7 * g0
            + f8 * g9_19
            + f9 * g8_19;
        let h8 = f0 * g8
            + f1_2 * g7
            + f2 * g6
            + f3_2 * g5
            + f4 * g4
            + f5_2 * g3
            + f6 * g2
            + f7_2 * g1
            + f8 * g0
            + f9_2 * g9_19;
        let h9 = f0 * g9
            + f1 * g8
            + f2 * g7
            + f3 * g6
            + f4 * g5
            + f5 * g4
            + f6 * g3
            + f7 * g2
            + f8 * g1
            + f9 * g0;
        carry([h0, h1, h2, h3, h4, h5, h6, h7, h8, h9])
    }

    /// Square, reduced; same input bounds as `mul` (the 55 distinct products of `mul`).
    #[inline(never)]
    pub(crate) fn square(&self) -> Fe {
        let [f0, f1, f2, f3, f4, f5, f6, f7, f8, f9] = self.0.map(i64::from);
        let (f0_2, f1_2, f2_2, f3_2, f4_2) = (2 * f0, 2 * f1, 2 * f2, 2 * f3, 2 * f4);
        let (f5_2, f6_2, f7_2, f8_2, f9_2) = (2 * f5, 2 * f6, 2 * f7, 2 * f8, 2 * f9);
        let (f1_4, f3_4, f5_4, f7_4) = (4 * f1, 4 * f3, 4 * f5, 4 * f7);
        let (f5_19, f6_19, f7_19, f8_19, f9_19) = (19 * f5, 19 * f6, 19 * f7, 19 * f8, 19 * f9);
        let h0 = f0 * f0 + f1_4 * f9_19 + f2_2 * f8_19 + f3_4 * f7_19 + f4_2 * f6_19 + f5_2 * f5_19;
        let h1 = f0_2 * f1 + f2_2 * f9_19 + f3_2 * f8_19 + f4_2 * f7_19 + f5_2 * f6_19;
        let h2 = f0_2 * f2 + f1_2 * f1 + f3_4 * f9_19 + f4_2 * f8_19 + f5_4 * f7_19 + f6 * f6_19;
        let h3 = f0_2 * f3 + f1_2 * f2 + f4_2 * f9_19 + f5_2 * f8_19 + f6_2 * f7_19;
        let h4 = f0_2 * f4 + f1_4 * f3 + f2 * f2 + f5_4 * f9_19 + f6_2 * f8_19 + f7_2 * f7_19;
        let h5 = f0_2 * f5 + f1_2 * f4 + f2_2 * f3 + f6_2 * f9_19 + f7_2 * f8_19;
        let h6 = f0_2 * f6 + f1_4 * f5 + f2_2 * f4 + f3_2 * f3 + f7_4 * f9_19 + f8 * f8_19;
        let h7 = f0_2 * f7 + f1_2 * f6 + f2_2 * f5 + f3_2 * f4 + f8_2 * f9_19;
        let h8 = f0_2 * f8 + f1_4 * f7 + f2_2 * f6 + f3_4 * f5 + f4 * f4 + f9_2 * f9_19;
        let h9 = f0_2 * f9 + f1_2 * f8 + f2_2 * f7 + f3_2 * f6 + f4_2 * f5;
        carry([h0, h1, h2, h3, h4, h5, h6, h7, h8, h9])
    }

    /// `self^(2^n)`.
    fn square_n(&self, n: u32) -> Fe {
        let mut t = *self;
        for _ in 0..n {
            t = t.square();
        }
        t
    }

    /// (z^(2^250 - 1), z^11): the common prefix of the inversion and square-root
    /// exponents (ref10's addition chain).
    fn pow_2_250_1(&self) -> (Fe, Fe) {
        let z = self;
        let z2 = z.square();
        let z9 = z2.square_n(2).mul(z);
        let z11 = z9.mul(&z2);
        let z_5_0 = z11.square().mul(&z9); // 2^5 - 1
        let z_10_0 = z_5_0.square_n(5).mul(&z_5_0);
        let z_20_0 = z_10_0.square_n(10).mul(&z_10_0);
        let z_40_0 = z_20_0.square_n(20).mul(&z_20_0);
        let z_50_0 = z_40_0.square_n(10).mul(&z_10_0);
        let z_100_0 = z_50_0.square_n(50).mul(&z_50_0);
        let z_200_0 = z_100_0.square_n(100).mul(&z_100_0);
        let z_250_0 = z_200_0.square_n(50).mul(&z_50_0);
        (z_250_0, z11)
    }

    /// `1/self` (zero maps to zero), by safegcd divsteps: see `inverse.rs`.
    pub(crate) fn invert(&self) -> Fe {
        super::inverse::invert(self)
    }

    /// `1/self` as `self^(p - 2)`; zero maps to zero. The reference for
    /// [`Fe::invert`] and its fallback.
    pub(crate) fn invert_fermat(&self) -> Fe {
        let (z_250_0, z11) = self.pow_2_250_1();
        z_250_0.square_n(5).mul(&z11) // 2^255 - 32 + 11 = p - 2
    }

    /// `self^((p - 5) / 8)` = `self^(2^252 - 3)`, for square roots.
    pub(crate) fn pow_p58(&self) -> Fe {
        let (z_250_0, _) = self.pow_2_250_1();
        z_250_0.square_n(2).mul(self)
    }

    /// Equality of the represented values (variable time: public data only).
    pub(crate) fn same_value(&self, other: &Fe) -> bool {
        self.to_bytes() == other.to_bytes()
    }
}

/// Carries ten 64-bit column sums (|h_i| < 2^62) into a reduced element (ref10's
/// interleaved carry order keeps every intermediate far from overflow).
#[inline(always)]
fn carry(mut h: [i64; 10]) -> Fe {
    #[inline(always)]
    fn step(h: &mut [i64; 10], i: usize) {
        let w = WIDTH[i];
        let c = (h[i] + (1 << (w - 1))) >> w;
        h[i] -= c << w;
        if i == 9 {
            h[0] += 19 * c;
        } else {
            h[i + 1] += c;
        }
    }
    for i in [0, 4, 1, 5, 2, 6, 3, 7, 4, 8, 9, 0] {
        step(&mut h, i);
    }
    Fe(h.map(|l| l as i32))
}
