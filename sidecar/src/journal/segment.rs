//! Segment files: framing, recovery, appending, rolling and deleting.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::{JournalStats, Lsn, Options, MAX_BATCH_JOBS, MAX_RECORD_BYTES};

/// Bytes of a frame's header: length, CRC, LSN.
const HEADER: usize = 16;

/// The length word's top bit: the frame is the last of its batch (the records one
/// write and one `fdatasync` made durable together). Lengths stay below 2^24
/// ([`MAX_RECORD_BYTES`]). A start tells by it whether whole records after a torn
/// one are of the same batch — never acknowledged, cut with it — or of a later
/// batch, which makes the torn-looking record damage to an acknowledged one.
/// Frames written before the mark existed have none: for them a start cuts as it
/// did (at most one batch's worth of bytes). Not covered by the checksum: a mark
/// set by damage refuses a start, one cleared by damage falls back to that.
/// [`BATCH_START`] marks the first.
const BATCH_END: u32 = 1 << 31;

/// The length word's next bit: the frame is the first of its batch. A record of
/// the last batch is followed by records of that batch only: a whole record that
/// starts a batch, after one that does not check, says the latter was durable
/// before — also when the hole took that batch's own end mark.
const BATCH_START: u32 = 1 << 30;

/// The unit a disk writes whole (or not at all) after a crash: a torn write leaves
/// each sector of it either written or as it was — zeros, over the zeros written
/// ahead of the records or a file's new end.
const SECTOR: usize = 512;

/// Zeros written ahead of the records, at least (see [`Writer::write_batch`]).
const PREALLOCATE: u64 = 64 << 10;

#[derive(Debug)]
pub(super) enum SegmentError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn crc(lsn: Lsn, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one frame to `out`; `first`, `last`: the first, the last of its batch
/// ([`BATCH_START`], [`BATCH_END`]).
fn frame(out: &mut Vec<u8>, lsn: Lsn, payload: &[u8], first: bool, last: bool) {
    let marks = if first { BATCH_START } else { 0 } | if last { BATCH_END } else { 0 };
    let len = u32::try_from(payload.len()).map_or(u32::MAX, |l| l | marks);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc(lsn, payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

/// What reading one segment found.
struct Scan {
    records: Vec<(Lsn, Vec<u8>)>,
    /// Bytes of whole, valid frames from the start.
    good_len: u64,
    /// Whether bytes other than zeros followed the last valid frame.
    torn: bool,
    /// The file's size.
    len: u64,
}

/// A frame header's length (without the batch marks), checksum and LSN.
fn decode_header(head: &[u8; HEADER]) -> (usize, u32, Lsn) {
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let mut l = [0u8; 8];
    l.copy_from_slice(&head[8..16]);
    (
        (word(0) & !(BATCH_END | BATCH_START)) as usize,
        word(4),
        u64::from_le_bytes(l),
    )
}

/// Whether the frame at `pos` carries `mark` ([`BATCH_START`], [`BATCH_END`]) in
/// its length word.
fn marked(bytes: &[u8], pos: usize, mark: u32) -> bool {
    bytes
        .get(pos..pos + 4)
        .and_then(|w| <[u8; 4]>::try_from(w).ok())
        .is_some_and(|w| u32::from_le_bytes(w) & mark != 0)
}

/// The frame at `pos`: its length, checksum and LSN, when its header is there.
fn header(bytes: &[u8], pos: usize) -> Option<(usize, u32, Lsn)> {
    let head = bytes.get(pos..pos.checked_add(HEADER)?)?;
    Some(decode_header(head.try_into().ok()?))
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// The payload of a whole, valid frame at `pos` with LSN `lsn`.
fn valid_at(bytes: &[u8], pos: usize) -> Option<(Lsn, &[u8])> {
    let (len, sum, lsn) = header(bytes, pos)?;
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let payload = bytes.get(pos + HEADER..pos + HEADER + len)?;
    (crc(lsn, payload) == sum).then_some((lsn, payload))
}

/// Whether some sector's share of `bytes[from..to]` is all zeros: a part of a write
/// that had not reached the disk when it stopped.
fn unwritten_part(bytes: &[u8], from: usize, to: usize) -> bool {
    let to = to.min(bytes.len());
    let mut at = from;
    while at < to {
        let end = ((at / SECTOR + 1) * SECTOR).min(to);
        if bytes.get(at..end).is_some_and(all_zero) {
            return true;
        }
        at = end;
    }
    false
}

/// The first whole, valid frame after `from` and before `end` whose LSN is past
/// `expect` (at most one per header's worth of bytes further on).
fn next_valid(bytes: &[u8], from: usize, end: usize, expect: Lsn) -> Option<(usize, Lsn)> {
    let most = expect.saturating_add((end.saturating_sub(from) / HEADER) as u64 + 1);
    (from..end.saturating_sub(HEADER)).find_map(|q| {
        let (_, _, lsn) = header(bytes, q)?;
        if lsn <= expect || lsn > most {
            return None;
        }
        valid_at(bytes, q).map(|(lsn, _)| (q, lsn))
    })
}

/// Whether the frame at `pos`, the first that does not check (record `expect`),
/// is the start of a torn last batch (`Ok`), or damage (`Err`, what). Non-zero
/// bytes end at `dirty_end`. A crash tears only a write that had not finished, so
/// some sector of the torn record was not written: a part of it reads as zeros,
/// or the file ends inside it. A record whose every part was written, or one
/// after which another whole record follows with nothing unwritten in between,
/// was damaged after it was written — maybe after it was acknowledged.
fn torn_or_damaged(bytes: &[u8], pos: usize, dirty_end: usize, expect: Lsn) -> Result<(), String> {
    let next = next_valid(bytes, pos + 1, dirty_end, expect);
    let head = header(bytes, pos);
    // The record ends before the next whole one, else where its length says.
    let claimed_end =
        head.and_then(|(len, _, _)| (len <= MAX_RECORD_BYTES).then_some(pos + HEADER + len));
    let end = next.map(|(q, _)| q).or(claimed_end).unwrap_or(pos + HEADER);
    // When the record's first sector holds only the start of its header, its share
    // there may be zeros of the length field's own; that share is judged below.
    let lead = match SECTOR - pos % SECTOR {
        n if n < HEADER => n,
        _ => 0,
    };
    let lead_zero = lead > 0 && bytes.get(pos..pos + lead).is_some_and(all_zero);
    // Whole records of a later batch after it: that batch was written after this
    // record's was made durable, so this one was whole once (acknowledged, maybe),
    // whatever zeros it reads as now.
    if let Some((q, _)) = next {
        if let Some(later) = later_batch(bytes, pos, q, dirty_end) {
            return Err(format!(
                "record {expect} does not check, and a batch written after it (through record {later}) does"
            ));
        }
    }
    // The last record, written whole (its payload checks as far as it is there),
    // but for its length: damage to the length field, which would otherwise reach
    // into the zeros after the records and read as a torn write.
    if let (None, Some((len, sum, lsn)), false) = (next, head, lead_zero) {
        if let Some(whole) = checked_len(bytes, pos, dirty_end, lsn, sum) {
            if whole != len {
                return Err(format!(
                    "record {expect}'s length field says {len}, its checksum {whole} bytes"
                ));
            }
        }
    }
    if unwritten_part(bytes, pos + lead, end) {
        return Ok(());
    }
    let Some((len, sum, lsn)) = head else {
        return Ok(()); // the file ends inside the header
    };
    // The payload as written: up to the next whole record, else up to the zeros.
    let written = bytes
        .get(pos + HEADER..next.map_or(dirty_end, |(q, _)| q))
        .unwrap_or_default();
    let checks = !written.is_empty() && crc(lsn, written) == sum;
    if lead_zero {
        // Unwritten, or zeros of the length field (a low byte of a length that is a
        // multiple of 256). With the checksum and LSN written, the payload says
        // which: whole, only the first sector was missed (torn).
        return if lead <= 4 && !checks {
            Err(format!(
                "record {expect} does not check and every part of it but its length's first bytes was written"
            ))
        } else {
            Ok(())
        };
    }
    if let Some((q, lsn)) = next {
        return Err(format!(
            "record {expect} does not check, and record {lsn} at {q} after it does"
        ));
    }
    if len > MAX_RECORD_BYTES {
        return Err(format!("record {expect} has an impossible length ({len})"));
    }
    if checks && written.len() != len {
        return Err(format!(
            "record {expect}'s length field says {len}, its checksum {} bytes",
            written.len()
        ));
    }
    if pos + HEADER + len > bytes.len() {
        return Ok(()); // the file ends inside it
    }
    Err(format!(
        "record {expect} does not check and every part of it was written"
    ))
}

/// A record of a batch later than the one the record at `pos` (which does not
/// check) was written in, among the whole records from `q` (the first whole one
/// after it): one that starts a batch, or one that ends a batch with more written
/// after it — or the record at `pos` itself marked as its batch's last. Its LSN;
/// `None`: every whole record from `q` on may be of the batch the record at
/// `pos` was torn in.
fn later_batch(bytes: &[u8], pos: usize, q: usize, dirty_end: usize) -> Option<Lsn> {
    if marked(bytes, pos, BATCH_END) {
        return header(bytes, pos).map(|(_, _, lsn)| lsn);
    }
    let mut at = q;
    while at < dirty_end {
        let Some((lsn, payload)) = valid_at(bytes, at) else {
            break;
        };
        let end = at + HEADER + payload.len();
        if marked(bytes, at, BATCH_START) || (marked(bytes, at, BATCH_END) && end < dirty_end) {
            return Some(lsn);
        }
        at = end;
        // A further torn record is the same batch's (or damage found below).
        if at < dirty_end && valid_at(bytes, at).is_none() {
            at = next_valid(bytes, at + 1, dirty_end, lsn)?.0;
        }
    }
    None
}

/// The length at which the payload of the record at `pos` checks against `sum`,
/// its bytes being those up to `dirty_end` and then zeros (up to a sector more:
/// a payload may end in zero bytes of its own). `None`: no such length.
fn checked_len(bytes: &[u8], pos: usize, dirty_end: usize, lsn: Lsn, sum: u32) -> Option<usize> {
    let written = bytes.get(pos + HEADER..dirty_end)?;
    if written.is_empty() {
        return None;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(written);
    let mut len = written.len();
    while len <= MAX_RECORD_BYTES && len <= written.len() + SECTOR {
        if h.clone().finalize() == sum {
            return Some(len);
        }
        h.update(&[0]);
        len += 1;
    }
    None
}

fn scan(path: &Path, first: Lsn, max_torn: usize) -> Result<Scan, SegmentError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(path))?;
    scan_bytes(&bytes, first, max_torn).map_err(|(offset, detail)| SegmentError::Corrupt {
        path: path.to_path_buf(),
        offset,
        detail,
    })
}

/// [`scan`] of a segment's bytes, its first record `first`: `Err((offset, what))`
/// for damage.
fn scan_bytes(bytes: &[u8], first: Lsn, max_torn: usize) -> Result<Scan, (u64, String)> {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut expect = first;
    while pos < bytes.len() {
        let Some((lsn, payload)) = valid_at(bytes, pos) else {
            break;
        };
        if lsn != expect {
            return Err((pos as u64, format!("record {lsn} where {expect} was due")));
        }
        records.push((lsn, payload.to_vec()));
        expect += 1;
        pos += HEADER + payload.len();
    }
    // After the last valid frame: the zeros written ahead of the records (an
    // all-zero frame never checks: its CRC would be that of LSN 0), and at most the
    // last, unacknowledged batch torn by a crash. Bytes other than zeros further on
    // are damage, not a crash.
    let rest = bytes.get(pos..).unwrap_or_default();
    let dirty = rest.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if dirty > max_torn {
        return Err((pos as u64, format!("{dirty} bytes after a damaged record")));
    }
    if dirty > 0 {
        torn_or_damaged(bytes, pos, pos + dirty, expect).map_err(|detail| (pos as u64, detail))?;
    }
    Ok(Scan {
        records,
        good_len: pos as u64,
        torn: dirty > 0,
        len: bytes.len() as u64,
    })
}

/// For fuzzing ([`super::fuzz_scan`]): the records a start would keep of `bytes`
/// as a segment starting at record 1 (`None`: damage), checked against what they
/// must be — consecutive from 1, whole frames up to the cut, and the same again
/// when only the kept bytes are read.
pub(super) fn fuzz_scan(bytes: &[u8], max_torn: usize) -> Option<usize> {
    let s = scan_bytes(bytes, 1, max_torn).ok()?;
    let framed: u64 = s
        .records
        .iter()
        .map(|(_, p)| (HEADER + p.len()) as u64)
        .sum();
    assert_eq!(
        framed, s.good_len,
        "the kept records are the bytes before the cut"
    );
    assert!(s.good_len <= s.len);
    assert!(s.records.iter().zip(1..).all(|((lsn, _), n)| *lsn == n));
    let kept = bytes.get(..s.good_len as usize).unwrap_or_default();
    let again = scan_bytes(kept, 1, max_torn).expect("the kept bytes read back");
    assert_eq!(again.records, s.records);
    assert!(!again.torn);
    Some(s.records.len())
}

/// Cuts `file` back to `len` bytes and makes the cut durable.
fn cut_durably(file: &File, len: u64) -> std::io::Result<()> {
    file.set_len(len)?;
    file.sync_data()
}

fn segment_name(first: Lsn) -> String {
    format!("{first:020}.log")
}

fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Told of each record found at start, in order: LSN and payload.
pub(super) type Visit<'a> = &'a mut dyn FnMut(Lsn, &[u8]) -> Result<(), SegmentError>;

/// The journal's files, owned by the writer thread.
pub(super) struct Writer {
    dir: PathBuf,
    opts: Options,
    /// Closed segments: first LSN, path, size.
    closed: Vec<(Lsn, PathBuf, u64)>,
    /// The open segment.
    current: (Lsn, PathBuf, File),
    /// Its durable size: its records' end.
    good_len: u64,
    /// Its file's size: zeros from `good_len` on.
    allocated: u64,
    /// A refused batch's bytes may still be on the disk after `good_len`: its cut
    /// back was not made durable. Nothing is written until it is
    /// ([`Writer::settle`]).
    unsettled: bool,
    /// A segment was deleted and the directory's sync after it failed: nothing
    /// more is deleted until a sync succeeds ([`Writer::drop_below`]).
    unlink_unsynced: bool,
    next_lsn: Lsn,
    buf: Vec<u8>,
    /// The directory's lock, held as long as the writer lives.
    _lock: File,
}

impl Writer {
    /// Opens the journal in `dir` (which exists), whose segments are `found`
    /// ([`segments`]): every segment is read, one at a time, and its records
    /// handed to `visit` in order; a torn tail of the last is cut off. The writer
    /// holds `lock` (the directory's) until it is dropped.
    pub(super) fn open(
        dir: &Path,
        found: Vec<(Lsn, PathBuf)>,
        opts: Options,
        lock: File,
        visit: Visit<'_>,
    ) -> Result<Writer, SegmentError> {
        let mut closed = Vec::new();
        // An empty file before the newest segment is one a roll created and could
        // neither sync into the directory nor remove (`roll`): records went on in
        // the segment before it, and none was ever written to it. (The newest
        // segment may be empty: just rolled; or such a leftover, told apart below.)
        // Removed once the journal has opened.
        let n = found.len();
        let mut stale = Vec::new();
        let mut found: Vec<(Lsn, PathBuf)> = found
            .into_iter()
            .enumerate()
            .filter_map(|(i, seg)| {
                if i + 1 < n && empty(&seg.1) {
                    stale.push(seg.1);
                    return None;
                }
                Some(seg)
            })
            .collect();
        let mut next_lsn: Lsn = found.first().map_or(1, |(f, _)| *f);
        let mut i = 0;
        while i < found.len() {
            let (first, path) = found[i].clone();
            i += 1;
            if first != next_lsn {
                return Err(SegmentError::Corrupt {
                    path,
                    offset: 0,
                    detail: format!("segment starts at {first}, {next_lsn} was due"),
                });
            }
            // A batch is written in parts of `batch_bytes` of payloads (and the
            // one that crossed it), each record with its header.
            let max_torn = opts.batch_bytes + MAX_RECORD_BYTES + HEADER * (MAX_BATCH_JOBS + 1);
            let s = scan(&path, first, max_torn)?;
            next_lsn = first + s.records.len() as u64;
            // The newest is a leftover too when it is not named for the record
            // after this segment's last, or when this one ends torn (a roll
            // follows only a batch made durable whole).
            if i + 1 == found.len() && (found[i].0 != next_lsn || s.torn) && empty(&found[i].1) {
                if let Some((_, p)) = found.pop() {
                    stale.push(p);
                }
            }
            let last = i == found.len();
            if s.torn && !last {
                return Err(SegmentError::Corrupt {
                    path,
                    offset: s.good_len,
                    detail: "a damaged record before the last segment".into(),
                });
            }
            for (lsn, payload) in &s.records {
                visit(*lsn, payload)?;
            }
            if last {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                let mut allocated = s.len;
                if s.torn {
                    tracing::warn!(segment = %path.display(), at = s.good_len, "journal: a torn last record (never acknowledged) was cut off");
                    f.set_len(s.good_len).map_err(io(&path))?;
                    allocated = s.good_len;
                }
                // Records a process killed before its sync wrote may be in the page
                // cache only: durable before anything is told of them (a client's
                // retry answered "already accepted", rows shipped), as a record is
                // before it is acknowledged.
                f.sync_all().map_err(io(&path))?;
                // And its name: a process killed between creating the segment
                // and syncing the directory left an entry a power cut can take,
                // with every record written to it after this start.
                sync_dir(dir)?;
                let w = Writer {
                    dir: dir.to_path_buf(),
                    opts,
                    closed,
                    current: (first, path, f),
                    good_len: s.good_len,
                    allocated,
                    unsettled: false,
                    unlink_unsynced: false,
                    next_lsn,
                    buf: Vec::new(),
                    _lock: lock,
                };
                remove_stale(dir, &stale);
                return Ok(w);
            }
            closed.push((first, path, s.good_len));
        }
        // No segment yet.
        let path = dir.join(segment_name(next_lsn));
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io(&path))?;
        sync_dir(dir)?;
        let w = Writer {
            dir: dir.to_path_buf(),
            opts,
            closed,
            current: (next_lsn, path, f),
            good_len: 0,
            allocated: 0,
            unsettled: false,
            unlink_unsynced: false,
            next_lsn,
            buf: Vec::new(),
            _lock: lock,
        };
        remove_stale(dir, &stale);
        Ok(w)
    }

    /// The first LSN of the segment that holds `lsn` (of the segment being written
    /// when `lsn` is in it or beyond).
    pub(super) fn segment_floor(&self, lsn: Lsn) -> Lsn {
        if lsn >= self.current.0 {
            return self.current.0;
        }
        self.closed
            .iter()
            .rev()
            .map(|s| s.0)
            .find(|first| *first <= lsn)
            .unwrap_or(lsn)
    }

    /// The LSN the next record gets.
    pub(super) fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    pub(super) fn horizon_lag(&self) -> std::time::Duration {
        self.opts.horizon_lag
    }

    pub(super) fn batch_bytes(&self) -> usize {
        self.opts.batch_bytes
    }

    /// Writes `payloads` as consecutive records and syncs: the first one's LSN. On
    /// an error the segment is cut back to its durable size.
    ///
    /// Records are written over zeros written ahead of them (at least
    /// [`PREALLOCATE`] bytes at a time, synced with the batch that writes them), as
    /// Postgres and etcd preallocate their logs: a batch that does not grow the
    /// file leaves its `fdatasync` only the data to flush, no new size to write to
    /// the inode (nor, on a journaling file system, a journal commit): ≈ 30 % less
    /// time per sync on the project's ext4 VM, `bench/fsync_probe.py`.
    pub(super) fn write_batch(&mut self, payloads: &[&[u8]]) -> Result<Lsn, SegmentError> {
        self.settle()?;
        let first = self.next_lsn;
        self.buf.clear();
        for (i, p) in payloads.iter().enumerate() {
            frame(
                &mut self.buf,
                first + i as u64,
                p,
                i == 0,
                i + 1 == payloads.len(),
            );
        }
        let (_, path, file) = &mut self.current;
        let end = self.good_len + self.buf.len() as u64;
        let mut written = file.write_all_at(&self.buf, self.good_len);
        if written.is_ok() && end > self.allocated {
            // The batch is written first, so that a full disk refuses it only when
            // it does not fit itself; without room for the zeros after it, it
            // goes alone, growing the file as an append does.
            let to = end + PREALLOCATE;
            self.allocated = match zeros(file, end, to) {
                Ok(()) => to,
                Err(e) => {
                    tracing::debug!(error = %e, "journal: no room for zeros ahead of the records");
                    end
                }
            };
        }
        written = written.and_then(|()| file.sync_data());
        if let Err(source) = written {
            // The callers are told the batch was not written. Cut it off, and make
            // the cut durable: bytes of it may have reached the disk although the
            // sync failed (written back before the device failed). A cut that is
            // not durable leaves the batch's fate to the disk — what it kept may
            // come back at the next start, which is why a refusal says a resend
            // of the same bytes tells — and nothing is written over it until the
            // cut is durable ([`Writer::settle`]): a later batch written over part
            // of it could leave a mix of the two.
            self.allocated = self.good_len;
            if let Err(e) = cut_durably(file, self.good_len) {
                tracing::error!(path = %path.display(), error = %e, "journal: a refused batch could not be cut off durably; it may come back at the next start, and nothing is written until the cut is durable");
                self.unsettled = true;
            }
            return Err(SegmentError::Io {
                path: path.clone(),
                source,
            });
        }
        self.good_len += self.buf.len() as u64;
        self.next_lsn += payloads.len() as u64;
        // The batch is durable: a segment not rolled now is rolled after a later
        // batch (refusing this one would refuse records that are on disk).
        if self.good_len >= self.opts.segment_bytes {
            if let Err(e) = self.roll() {
                tracing::warn!(error = ?e, "journal: the next segment is not started yet; retried after the next batch");
            }
        }
        Ok(first)
    }

    /// Makes the cut back of a refused batch durable, when it is not yet
    /// ([`Writer::unsettled`]): until then every batch is refused unwritten.
    fn settle(&mut self) -> Result<(), SegmentError> {
        if !self.unsettled {
            return Ok(());
        }
        let (_, path, file) = &self.current;
        cut_durably(file, self.good_len).map_err(io(path))?;
        tracing::info!(path = %path.display(), "journal: the refused batch's cut is durable; writing again");
        self.unsettled = false;
        Ok(())
    }

    fn roll(&mut self) -> Result<(), SegmentError> {
        let path = self.dir.join(segment_name(self.next_lsn));
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io(&path))?;
        if let Err(e) = sync_dir(&self.dir) {
            // Not started: records go on into the current segment, and a segment
            // file named for this LSN must not stay behind them.
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let (first, old_path, old) = std::mem::replace(&mut self.current, (self.next_lsn, path, f));
        // A closed segment keeps its records only. Not synced: a zero tail left by a
        // crash reads as the segment's end too.
        if let Err(e) = old.set_len(self.good_len) {
            tracing::warn!(segment = %old_path.display(), error = %e, "journal: the zeros after a closed segment's records were not cut off (harmless)");
        }
        self.closed.push((first, old_path, self.good_len));
        self.good_len = 0;
        self.allocated = 0;
        Ok(())
    }

    /// Deletes the closed segments whose records are all below `low`.
    pub(super) fn drop_below(&mut self, low: Lsn) -> Result<(), SegmentError> {
        // An earlier deletion not yet durable: made so before any other.
        if self.unlink_unsynced {
            sync_dir(&self.dir)?;
            self.unlink_unsynced = false;
        }
        let mut failed = Ok(());
        while let Some((_, path, _)) = self.closed.first() {
            let next_first = self.closed.get(1).map_or(self.current.0, |s| s.0);
            if next_first > low {
                break;
            }
            // Forgotten only once deleted: a segment that could not be deleted
            // stays the oldest, and is tried again before any later one (a later
            // one deleted before it would leave a gap no start accepts). One gone
            // already (removed by hand) is as good as deleted.
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    failed = Err(io(path)(e));
                    break;
                }
                _ => {}
            }
            self.closed.remove(0);
            // Each deletion durable before the next: a filesystem that made later
            // unlinks durable first could otherwise leave, after a power cut, an
            // older segment without the one after it (a gap no start accepts).
            self.unlink_unsynced = true;
            sync_dir(&self.dir)?;
            self.unlink_unsynced = false;
        }
        failed
    }

    pub(super) fn publish_stats(&self, stats: &JournalStats) {
        stats
            .segments
            .store(self.closed.len() as u64 + 1, Ordering::Relaxed);
        let bytes: u64 = self.closed.iter().map(|s| s.2).sum::<u64>() + self.good_len;
        stats.bytes.store(bytes, Ordering::Relaxed);
        stats.segment_first.store(self.current.0, Ordering::Relaxed);
    }
}

/// Whether the segment file at `path` is empty (0 bytes).
fn empty(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == 0)
}

/// Removes the empty segments a failed roll left ([`Writer::open`]), once the
/// journal has opened (best effort: one left behind is found again next time).
fn remove_stale(dir: &Path, stale: &[PathBuf]) {
    for path in stale {
        match fs::remove_file(path) {
            Ok(()) => {
                tracing::warn!(segment = %path.display(), "journal: an empty segment left by a failed roll was removed");
            }
            Err(e) => {
                tracing::warn!(segment = %path.display(), error = %e, "journal: an empty segment left by a failed roll could not be removed");
            }
        }
    }
    if !stale.is_empty() {
        if let Err(e) = sync_dir(dir) {
            tracing::warn!(error = ?e, "journal: the directory was not synced after removing empty segments");
        }
    }
}

/// Writes zeros to `file` over `from..to`.
fn zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static PIECE: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(PIECE.len(), |n| n.min(PIECE.len()));
        file.write_all_at(&PIECE[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The segments in `dir`, by first LSN (listed once at start: for the horizon's
/// check and for [`Writer::open`]).
pub(super) fn segments(dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, SegmentError> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        if let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<Lsn>().ok())
        {
            found.push((first, e.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Reads the records `from..=upto` of the journal in `dir` back from disk, in
/// order, handing each payload to `f` until it returns `false`. Only for records
/// already durable (a sink has heard of them) and kept by a hold: the writer may
/// be appending after them meanwhile. Memory: one record at a time.
pub(super) fn read_range(
    dir: &Path,
    from: Lsn,
    upto: Lsn,
    f: &mut dyn FnMut(Lsn, &[u8]) -> bool,
) -> Result<(), SegmentError> {
    if from > upto {
        return Ok(());
    }
    // An empty file holds no durable record: it is the newest segment, just
    // rolled, or one a failed roll left that could not be removed (its name would
    // hide the segment that holds its records).
    let all: Vec<_> = segments(dir)?
        .into_iter()
        .filter(|(_, p)| !empty(p))
        .collect();
    // The segment holding `from`: the last one that starts at or before it.
    let start = all.iter().rposition(|(first, _)| *first <= from);
    let Some(start) = start else {
        return Err(SegmentError::Corrupt {
            path: dir.to_path_buf(),
            offset: 0,
            detail: format!("record {from} is no longer in the journal"),
        });
    };
    let mut expect = all[start].0;
    for (first, path) in &all[start..] {
        if *first > upto {
            break;
        }
        if *first != expect {
            return Err(SegmentError::Corrupt {
                path: path.clone(),
                offset: 0,
                detail: format!("segment starts at {first}, {expect} was due"),
            });
        }
        let file = File::open(path).map_err(io(path))?;
        let mut r = std::io::BufReader::with_capacity(64 << 10, file);
        let mut offset = 0u64;
        let mut payload = Vec::new();
        loop {
            let mut head = [0u8; HEADER];
            match r.read_exact(&mut head) {
                Ok(()) => {}
                // The end of this segment: the next one goes on.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io(path)(e)),
            }
            let (len, sum, lsn) = decode_header(&head);
            if all_zero(&head) {
                // The zeros after a segment's records (written ahead of them, or
                // left by a crash before a closed segment was cut back).
                break;
            }
            let bad = |detail: String| SegmentError::Corrupt {
                path: path.clone(),
                offset,
                detail,
            };
            if lsn != expect || len > MAX_RECORD_BYTES {
                return Err(bad(format!(
                    "record {lsn} ({len} bytes) where {expect} was due"
                )));
            }
            if lsn > upto {
                return Ok(());
            }
            if lsn < from {
                // Before the range: skipped unread (its checksum was checked at
                // start or when it was read before).
                let skip = i64::try_from(len).unwrap_or(i64::MAX);
                r.seek_relative(skip).map_err(io(path))?;
                expect += 1;
                offset += (HEADER + len) as u64;
                continue;
            }
            payload.resize(len, 0);
            r.read_exact(&mut payload).map_err(io(path))?;
            if crc(lsn, &payload) != sum {
                return Err(bad(format!("record {lsn}: checksum mismatch")));
            }
            if !f(lsn, &payload) {
                return Ok(());
            }
            if lsn == upto {
                return Ok(());
            }
            expect += 1;
            offset += (HEADER + len) as u64;
        }
    }
    Err(SegmentError::Corrupt {
        path: dir.to_path_buf(),
        offset: 0,
        detail: format!(
            "the journal ends before record {upto} (read through {})",
            expect.saturating_sub(1)
        ),
    })
}
