//! Points of edwards25519 (−x² + y² = 1 + d·x²·y²) in the coordinate systems of
//! Hisil–Wong–Carter–Dawson, as ref10 names them:
//! - [`Ext`]: extended (X : Y : Z : T), x = X/Z, y = Y/Z, x·y = T/Z;
//! - [`Completed`]: ((X : Z), (Y : T)), the output of an addition or doubling;
//! - [`Niels`]: affine (y + x, y − x, 2d·x·y), the form table entries are stored in;
//! - [`Cached`]: projective (Y + X, Y − X, Z, 2d·T), for adding a point not in affine form.
//!
//! The addition law is complete on edwards25519 (a = −1 is a square, d is not), so
//! the formulas hold for every pair of points, the identity and torsion included.
//! Everything here is variable time: it only ever handles public values
//! (public keys, signatures, messages).

use super::field::Fe;

/// d = −121665/121666, little-endian.
const D_BYTES: [u8; 32] = [
    0xa3, 0x78, 0x59, 0x13, 0xca, 0x4d, 0xeb, 0x75, 0xab, 0xd8, 0x41, 0x41, 0x4d, 0x0a, 0x70, 0x00,
    0x98, 0xe8, 0x79, 0x77, 0x79, 0x40, 0xc7, 0x8c, 0x73, 0xfe, 0x6f, 0x2b, 0xee, 0x6c, 0x03, 0x52,
];
/// A square root of −1 (2^((p−1)/4)), little-endian.
const SQRT_M1_BYTES: [u8; 32] = [
    0xb0, 0xa0, 0x0e, 0x4a, 0x27, 0x1b, 0xee, 0xc4, 0x78, 0xe4, 0x2f, 0xad, 0x06, 0x18, 0x43, 0x2f,
    0xa7, 0xd7, 0xfb, 0x3d, 0x99, 0x00, 0x4d, 0x2b, 0x0b, 0xdf, 0xc1, 0x4f, 0x80, 0x24, 0x83, 0x2b,
];

pub(crate) fn d() -> Fe {
    Fe::from_bytes(&D_BYTES)
}

pub(crate) fn sqrt_m1() -> Fe {
    Fe::from_bytes(&SQRT_M1_BYTES)
}

/// The constants the point formulas need, converted once per table build or verify.
#[derive(Clone, Copy)]
pub(crate) struct Consts {
    pub(crate) d: Fe,
    pub(crate) d2: Fe,
}

impl Consts {
    pub(crate) fn new() -> Consts {
        let d = d();
        Consts {
            d,
            d2: d.add(&d).reduce(),
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Ext {
    pub(crate) x: Fe,
    pub(crate) y: Fe,
    pub(crate) z: Fe,
    pub(crate) t: Fe,
}

pub(crate) struct Completed {
    x: Fe,
    y: Fe,
    z: Fe,
    t: Fe,
}

#[derive(Clone, Copy)]
pub(crate) struct Niels {
    pub(crate) y_plus_x: Fe,
    pub(crate) y_minus_x: Fe,
    pub(crate) xy2d: Fe,
}

pub(crate) struct Cached {
    y_plus_x: Fe,
    y_minus_x: Fe,
    z: Fe,
    t2d: Fe,
}

impl Completed {
    /// 4 multiplications.
    #[inline(always)]
    pub(crate) fn to_ext(&self) -> Ext {
        Ext {
            x: self.x.mul(&self.t),
            y: self.y.mul(&self.z),
            z: self.z.mul(&self.t),
            t: self.x.mul(&self.y),
        }
    }
}

impl Ext {
    pub(crate) const IDENTITY: Ext = Ext {
        x: Fe::ZERO,
        y: Fe::ONE,
        z: Fe::ONE,
        t: Fe::ZERO,
    };

    /// Decodes a point (RFC 8032 §5.1.3). Only canonical encodings are accepted:
    /// y < p, and no "negative zero" (x = 0 with the sign bit set).
    pub(crate) fn decompress(bytes: &[u8; 32], c: &Consts) -> Option<Ext> {
        let y = Fe::from_bytes(bytes);
        if y.to_bytes()[..31] != bytes[..31] || y.to_bytes()[31] != bytes[31] & 0x7f {
            return None;
        }
        let sign = bytes[31] >> 7 == 1;
        let yy = y.square();
        let u = yy.sub(&Fe::ONE); // y² − 1
        let v = yy.mul(&c.d).add(&Fe::ONE); // d·y² + 1
                                            // x = u·v³·(u·v⁷)^((p−5)/8), then fix up by √−1 if needed.
        let v3 = v.square().mul(&v);
        let uv7 = v3.square().mul(&v).mul(&u);
        let mut x = uv7.pow_p58().mul(&v3).mul(&u);
        let vxx = x.square().mul(&v);
        if !vxx.same_value(&u) {
            if !vxx.same_value(&u.neg()) {
                return None; // u/v is not a square: not a point
            }
            x = x.mul(&sqrt_m1());
        }
        if x.is_zero() && sign {
            return None;
        }
        if x.is_negative() != sign {
            x = x.neg();
        }
        Some(Ext {
            x,
            y,
            z: Fe::ONE,
            t: x.mul(&y),
        })
    }

    /// The canonical encoding (one inversion).
    pub(crate) fn compress(&self) -> [u8; 32] {
        let zinv = self.z.invert();
        let x = self.x.mul(&zinv);
        let y = self.y.mul(&zinv);
        let mut out = y.to_bytes();
        out[31] |= u8::from(x.is_negative()) << 7;
        out
    }

    pub(crate) fn neg(&self) -> Ext {
        Ext {
            x: self.x.neg(),
            y: self.y,
            z: self.z,
            t: self.t.neg(),
        }
    }

    pub(crate) fn to_cached(self, c: &Consts) -> Cached {
        Cached {
            y_plus_x: self.y.add(&self.x),
            y_minus_x: self.y.sub(&self.x),
            z: self.z,
            t2d: self.t.mul(&c.d2),
        }
    }

    /// `self + q` (ref10 `ge_madd`): 3 multiplications.
    #[inline(always)]
    pub(crate) fn add_niels(&self, q: &Niels) -> Completed {
        let a = self.y.add(&self.x).mul(&q.y_plus_x);
        let b = self.y.sub(&self.x).mul(&q.y_minus_x);
        let c = q.xy2d.mul(&self.t);
        let d = self.z.add(&self.z);
        Completed {
            x: a.sub(&b),
            y: a.add(&b),
            z: d.add(&c),
            t: d.sub(&c),
        }
    }

    /// `self − q` (ref10 `ge_msub`): −q swaps y + x and y − x and negates 2d·x·y.
    #[inline(always)]
    pub(crate) fn sub_niels(&self, q: &Niels) -> Completed {
        let a = self.y.add(&self.x).mul(&q.y_minus_x);
        let b = self.y.sub(&self.x).mul(&q.y_plus_x);
        let c = q.xy2d.mul(&self.t);
        let d = self.z.add(&self.z);
        Completed {
            x: a.sub(&b),
            y: a.add(&b),
            z: d.sub(&c),
            t: d.add(&c),
        }
    }

    /// `self + q` (ref10 `ge_add`): 4 multiplications.
    pub(crate) fn add_cached(&self, q: &Cached) -> Completed {
        let a = self.y.add(&self.x).mul(&q.y_plus_x);
        let b = self.y.sub(&self.x).mul(&q.y_minus_x);
        let c = q.t2d.mul(&self.t);
        let zz = self.z.mul(&q.z);
        let d = zz.add(&zz);
        Completed {
            x: a.sub(&b),
            y: a.add(&b),
            z: d.add(&c),
            t: d.sub(&c),
        }
    }

    /// `2·self` (ref10 `ge_p2_dbl`; T is not read): 4 squarings.
    pub(crate) fn double(&self) -> Completed {
        let xx = self.x.square();
        let yy = self.y.square();
        let zz2 = self.z.square();
        let zz2 = zz2.add(&zz2);
        let xy2 = self.x.add(&self.y).square();
        let y = yy.add(&xx);
        let z = yy.sub(&xx);
        Completed {
            x: xy2.sub(&y),
            y,
            z,
            t: zz2.sub(&z),
        }
    }

    /// Whether `8·self` is the identity (X = 0 and Y = Z).
    pub(crate) fn is_small_order(&self) -> bool {
        let p8 = self.double().to_ext().double().to_ext().double().to_ext();
        p8.x.is_zero() && p8.y.same_value(&p8.z)
    }

    /// Affine Niels forms of many points with one inversion (Montgomery's trick).
    pub(crate) fn batch_to_niels(points: &[Ext], c: &Consts) -> Vec<Niels> {
        let mut prefix = Vec::with_capacity(points.len());
        let mut acc = Fe::ONE;
        for p in points {
            prefix.push(acc);
            acc = acc.mul(&p.z);
        }
        let mut inv = acc.invert(); // inverse of the product of every z
        let mut out = vec![
            Niels {
                y_plus_x: Fe::ZERO,
                y_minus_x: Fe::ZERO,
                xy2d: Fe::ZERO,
            };
            points.len()
        ];
        for i in (0..points.len()).rev() {
            let zinv = inv.mul(&prefix[i]);
            inv = inv.mul(&points[i].z);
            let x = points[i].x.mul(&zinv);
            let y = points[i].y.mul(&zinv);
            out[i] = Niels {
                y_plus_x: y.add(&x),
                y_minus_x: y.sub(&x),
                xy2d: x.mul(&y).mul(&c.d2),
            };
        }
        out
    }
}
