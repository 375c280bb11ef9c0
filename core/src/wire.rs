//! A strict scanner for protobuf wire records. Verification works on the records of
//! the received body, never on a decode/re-encode (which would lose unknown fields
//! and reorder maps). Every malformation is an error, never a panic.

use std::ops::Range;

/// Largest field number protobuf allows (2^29 - 1).
pub const MAX_FIELD_NUMBER: u32 = (1 << 29) - 1;

/// Wire types we accept. Groups (3, 4) are deprecated and rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    /// Base-128 varint.
    Varint,
    /// Fixed 8 bytes.
    I64,
    /// Length-delimited.
    Len,
    /// Fixed 4 bytes.
    I32,
}

/// One top-level record: its field number, wire type and byte ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Field number (1..=2^29-1).
    pub field: u32,
    /// Wire type.
    pub wire_type: WireType,
    /// The whole record, tag included.
    pub span: Range<usize>,
    /// The value: the varint/fixed bytes, or the payload of a length-delimited record.
    pub value: Range<usize>,
}

/// What is wrong with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends inside a record.
    #[error("truncated record at byte {0}")]
    Truncated(usize),
    /// A varint is longer than 10 bytes or overflows 64 bits.
    #[error("invalid varint at byte {0}")]
    BadVarint(usize),
    /// Field number 0 or above 2^29-1.
    #[error("invalid field number at byte {0}")]
    BadFieldNumber(usize),
    /// Wire type 3, 4, 6 or 7.
    #[error("unsupported wire type {1} at byte {0}")]
    BadWireType(usize, u8),
    /// A length prefix runs past the end of the buffer.
    #[error("length {1} at byte {0} runs past the end")]
    BadLength(usize, u64),
}

/// Reads a varint at `*pos`, advancing it.
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let start = *pos;
    let mut value: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(WireError::Truncated(start));
        };
        *pos += 1;
        // The tenth byte may only carry the top bit of a u64.
        if i == 9 && b > 1 {
            return Err(WireError::BadVarint(start));
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::BadVarint(start))
}

/// Reads one record at `*pos`, advancing it past the record.
pub fn read_record(buf: &[u8], pos: &mut usize) -> Result<Record, WireError> {
    let start = *pos;
    let tag = read_varint(buf, pos)?;
    let field = tag >> 3;
    if field == 0 || field > u64::from(MAX_FIELD_NUMBER) {
        return Err(WireError::BadFieldNumber(start));
    }
    // Lossless: checked against MAX_FIELD_NUMBER above.
    let field = field as u32;
    let (wire_type, value) = match (tag & 7) as u8 {
        0 => {
            let v0 = *pos;
            read_varint(buf, pos)?;
            (WireType::Varint, v0..*pos)
        }
        1 => (WireType::I64, fixed(buf, pos, 8, start)?),
        2 => {
            let len_at = *pos;
            let len = read_varint(buf, pos)?;
            let remaining = (buf.len() - *pos) as u64;
            if len > remaining {
                return Err(WireError::BadLength(len_at, len));
            }
            let v0 = *pos;
            // Lossless: len <= remaining <= usize::MAX.
            *pos += len as usize;
            (WireType::Len, v0..*pos)
        }
        5 => (WireType::I32, fixed(buf, pos, 4, start)?),
        other => return Err(WireError::BadWireType(start, other)),
    };
    Ok(Record {
        field,
        wire_type,
        span: start..*pos,
        value,
    })
}

fn fixed(buf: &[u8], pos: &mut usize, n: usize, start: usize) -> Result<Range<usize>, WireError> {
    if buf.len() - *pos < n {
        return Err(WireError::Truncated(start));
    }
    let v0 = *pos;
    *pos += n;
    Ok(v0..*pos)
}

/// Splits a whole message into its top-level records.
pub fn records(buf: &[u8]) -> Result<Vec<Record>, WireError> {
    let mut out = Vec::with_capacity(16);
    let mut pos = 0;
    while pos < buf.len() {
        out.push(read_record(buf, &mut pos)?);
    }
    Ok(out)
}

/// Appends a varint.
pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_round_trip_edges() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            write_varint(&mut b, v);
            let mut p = 0;
            assert_eq!(read_varint(&b, &mut p), Ok(v));
            assert_eq!(p, b.len());
        }
    }

    #[test]
    fn overlong_varint_is_rejected() {
        let b = [0xffu8; 11];
        assert_eq!(read_varint(&b, &mut 0), Err(WireError::BadVarint(0)));
        // 10 bytes whose last carries more than one bit overflows u64.
        let mut b = vec![0xffu8; 9];
        b.push(0x02);
        assert_eq!(read_varint(&b, &mut 0), Err(WireError::BadVarint(0)));
    }

    #[test]
    fn truncations_are_errors() {
        assert_eq!(read_varint(&[0x80], &mut 0), Err(WireError::Truncated(0)));
        // field 1, LEN, length 5, only 2 bytes.
        assert_eq!(
            records(&[0x0a, 0x05, 1, 2]),
            Err(WireError::BadLength(1, 5))
        );
        // field 1, I64 with 3 bytes.
        assert_eq!(records(&[0x09, 1, 2, 3]), Err(WireError::Truncated(0)));
        // field 1, I32 with 1 byte.
        assert_eq!(records(&[0x0d, 1]), Err(WireError::Truncated(0)));
    }

    #[test]
    fn bad_tags_are_errors() {
        assert_eq!(records(&[0x00, 0x01]), Err(WireError::BadFieldNumber(0)));
        // Field 1, wire type 3 (start group).
        assert_eq!(records(&[0x0b]), Err(WireError::BadWireType(0, 3)));
        // Field 1, wire type 7.
        assert_eq!(records(&[0x0f]), Err(WireError::BadWireType(0, 7)));
        // Field number 2^29 does not exist.
        let mut b = Vec::new();
        write_varint(&mut b, (1u64 << 29) << 3);
        assert_eq!(records(&b), Err(WireError::BadFieldNumber(0)));
    }

    #[test]
    fn records_cover_the_buffer() {
        // ts=1 (varint 150), request_id=5 "ab", fixed64 field 12, fixed32 field 13.
        let b = [
            0x08, 0x96, 0x01, 0x2a, 0x02, b'a', b'b', 0x61, 1, 2, 3, 4, 5, 6, 7, 8, 0x6d, 1, 2, 3,
            4,
        ];
        let r = records(&b).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].field, 1);
        assert_eq!(r[0].value, 1..3);
        assert_eq!(r[1].field, 5);
        assert_eq!(&b[r[1].value.clone()], b"ab");
        assert_eq!(r[2].wire_type, WireType::I64);
        assert_eq!(r[3].wire_type, WireType::I32);
        assert_eq!(r[3].span.end, b.len());
    }

    proptest! {
        #[test]
        fn scanner_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(rs) = records(&bytes) {
                // Records tile the buffer exactly.
                let mut pos = 0;
                for r in &rs {
                    prop_assert_eq!(r.span.start, pos);
                    prop_assert!(r.value.end == r.span.end);
                    pos = r.span.end;
                }
                prop_assert_eq!(pos, bytes.len());
            }
        }
    }
}
