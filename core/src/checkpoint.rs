//! Signed checkpoints of a ledger chain, in the style of C2SP `tlog-checkpoint`
//! signed notes: a chain's origin, its size and its head hash, signed with Ed25519
//! by the ledger key. Kept outside ClickHouse, a checkpoint lets anyone detect that
//! the stored chain was cut (fewer rows than a checkpoint saw), or that rows were
//! deleted or altered (the row at the checkpoint's size no longer has its hash),
//! which walking the chain alone cannot show for a truncated tail.
//!
//! A note is:
//!
//! ```text
//! gw-ledger/<chain_id>
//! <size>
//! <head hash, base64>
//!
//! — <key name> <base64(key id ‖ signature)>
//! ```
//!
//! where the key id is the first 4 bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public
//! key), as C2SP signed notes define it for Ed25519.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::ledger::{walk, Breaks, ChainError, LedgerRow, Walker};

/// The origin line's prefix; the chain id follows.
pub const ORIGIN_PREFIX: &str = "gw-ledger/";
/// The em dash that starts a signature line.
const SIG_LINE: &str = "\u{2014} ";

/// A chain's state at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// `gw-ledger/<chain_id>`.
    pub origin: String,
    /// Rows in the chain.
    pub size: u64,
    /// The hash of row `size` (the head).
    pub head: [u8; 32],
}

/// Why a checkpoint does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The note is not a checkpoint.
    #[error("not a checkpoint note: {0}")]
    Malformed(String),
    /// No signature by the expected key verifies.
    #[error("no valid signature by `{0}`")]
    Signature(String),
    /// The stored chain is shorter than the checkpoint says it was.
    #[error("the chain was cut: {have} rows stored, the checkpoint saw {want}")]
    Truncated {
        /// Rows stored.
        have: u64,
        /// Rows the checkpoint saw.
        want: u64,
    },
    /// The row at the checkpoint's size has another hash: rows were altered or
    /// replaced.
    #[error("row {0} differs from the checkpoint: the chain was rewritten")]
    Rewritten(u64),
    /// The stored chain does not verify.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// The key id of `name`'s Ed25519 key `vk` (C2SP signed note).
pub fn key_id(name: &str, vk: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0x0a, 0x01]);
    h.update(vk.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

impl Checkpoint {
    /// The checkpoint of chain `chain_id` with `size` rows and head `head`.
    pub fn for_chain(chain_id: &str, size: u64, head: [u8; 32]) -> Checkpoint {
        Checkpoint {
            origin: format!("{ORIGIN_PREFIX}{chain_id}"),
            size,
            head,
        }
    }

    /// The chain id of a ledger checkpoint.
    pub fn chain_id(&self) -> Option<&str> {
        self.origin.strip_prefix(ORIGIN_PREFIX)
    }

    /// The signed text: origin, size, head (each line ends with a newline).
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.head)
        )
    }

    /// The signed note, by `key_name`'s key `sk`.
    pub fn sign(&self, key_name: &str, sk: &SigningKey) -> String {
        let body = self.body();
        let sig = sk.sign(body.as_bytes());
        let mut blob = key_id(key_name, &sk.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n{SIG_LINE}{key_name} {}\n", B64.encode(blob))
    }

    /// Parses `note` and checks that `key_name`'s key `vk` signed it.
    pub fn open(
        note: &str,
        key_name: &str,
        vk: &VerifyingKey,
    ) -> Result<Checkpoint, CheckpointError> {
        let bad = |m: &str| CheckpointError::Malformed(m.to_owned());
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line before the signatures"))?;
        let body = format!("{body}\n");
        let mut lines = body.lines();
        let origin = lines.next().ok_or_else(|| bad("no origin"))?.to_owned();
        let size: u64 = lines
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| bad("no size"))?;
        let head: [u8; 32] = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("no 32-byte head hash"))?;
        if origin.is_empty() {
            return Err(bad("empty origin"));
        }
        let want_id = key_id(key_name, vk);
        for line in sigs.lines() {
            let Some(rest) = line.strip_prefix(SIG_LINE) else {
                continue;
            };
            let Some((name, blob)) = rest.split_once(' ') else {
                continue;
            };
            let Ok(blob) = B64.decode(blob) else { continue };
            if name != key_name || blob.len() != 68 || blob[..4] != want_id {
                continue;
            }
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&blob[4..]) else {
                continue;
            };
            if vk.verify(body.as_bytes(), &sig).is_ok() {
                return Ok(Checkpoint { origin, size, head });
            }
        }
        Err(CheckpointError::Signature(key_name.to_owned()))
    }

    /// Whether a walk of `walked` positions, whose row at this checkpoint's size
    /// hashed to `at` (`None`: no row there was walked to), holds it.
    pub fn judge(&self, walked: u64, at: Option<[u8; 32]>) -> Result<u64, CheckpointError> {
        if walked < self.size {
            return Err(CheckpointError::Truncated {
                have: walked,
                want: self.size,
            });
        }
        if self.size > 0 && at != Some(self.head) {
            return Err(CheckpointError::Rewritten(self.size));
        }
        Ok(walked)
    }

    /// Checks one chain's stored rows (sorted by `seq`) against this checkpoint:
    /// the chain verifies, holds at least `size` rows, and row `size` has `head`.
    /// Returns the rows verified.
    pub fn check(&self, rows: &[LedgerRow]) -> Result<u64, CheckpointError> {
        let (n, _) = walk(rows)?;
        if n < self.size {
            return Err(CheckpointError::Truncated {
                have: n,
                want: self.size,
            });
        }
        if self.size == 0 {
            return Ok(n);
        }
        let at = rows
            .iter()
            .find(|r| r.seq == self.size)
            .ok_or(CheckpointError::Truncated {
                have: n,
                want: self.size,
            })?;
        if at.row_hash != hex::encode(self.head) {
            return Err(CheckpointError::Rewritten(self.size));
        }
        Ok(n)
    }
}

/// How many leading bytes of an append-only file of notes are whole notes: up to
/// the end of its last signature line. Anything after it is a note whose append
/// was cut short (a crash, a full or failing disk) and carries no signature, not
/// even a complete one: the writer cuts it off before appending again, and a
/// reader ignores it (a signed note can only be a prefix's last line, so nothing
/// a key signed is ever in that tail).
pub fn whole_len(file: &[u8]) -> usize {
    let sig = SIG_LINE.as_bytes();
    let (mut whole, mut start) = (0, 0);
    while let Some(nl) = file[start..].iter().position(|&b| b == b'\n') {
        let end = start + nl + 1;
        if file[start..end].starts_with(sig) {
            whole = end;
        }
        start = end;
    }
    whole
}

/// Every note of an append-only file of notes, opened with `key_name`'s key `vk`.
pub fn open_all(
    text: &str,
    key_name: &str,
    vk: &VerifyingKey,
) -> Vec<Result<Checkpoint, CheckpointError>> {
    notes(text)
        .iter()
        .map(|n| Checkpoint::open(n, key_name, vk))
        .collect()
}

/// Splits an append-only file of notes into notes (each ends after its signature
/// lines).
pub fn notes(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_sigs = false;
    for line in text.lines() {
        if in_sigs && !line.starts_with(SIG_LINE) {
            out.push(std::mem::take(&mut cur));
            in_sigs = false;
        }
        if line.is_empty() && !in_sigs && !cur.is_empty() {
            in_sigs = true;
        }
        if line.is_empty() && cur.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// One chain walked row by row, in `seq` order, as [`Walker::push_on`] walks
/// (on after every break), and held to a checkpoint when it has one — whatever
/// else is wrong with the rows (their breaks are the walk's to report): as long
/// as it, and the same row at its size. It keeps no row: a chain of any length
/// is walked in constant memory.
#[derive(Debug, Default)]
pub struct HeldWalk {
    walker: Walker,
    anchor: Option<Checkpoint>,
    /// The hash of the row at the anchor's size, once walked to.
    at_anchor: Option<[u8; 32]>,
    /// Older checkpoints of the chain (size → head): the row at each size is
    /// the one it signed, or the walk breaks there
    /// ([`ChainError::NotCheckpointed`]).
    earlier: std::collections::BTreeMap<u64, [u8; 32]>,
}

impl HeldWalk {
    /// A walk from the chain's start, held to `anchor` (if any).
    pub fn new(anchor: Option<Checkpoint>) -> HeldWalk {
        HeldWalk {
            walker: Walker::new(),
            anchor,
            at_anchor: None,
            earlier: Default::default(),
        }
    }

    /// A walk held to the newest of `checkpoints` as [`Self::new`], and to
    /// every older one at its size: a row rewritten under an older checkpoint
    /// (with the chain rebuilt on top of it, so that the newest one, signed
    /// later over the rebuilt chain, holds) is a break.
    pub fn with_all(checkpoints: Vec<Checkpoint>) -> HeldWalk {
        let mut earlier: std::collections::BTreeMap<u64, [u8; 32]> = checkpoints
            .iter()
            .filter(|c| c.size > 0)
            .map(|c| (c.size, c.head))
            .collect();
        let newest = checkpoints.into_iter().max_by_key(|c| c.size);
        if let Some(n) = &newest {
            earlier.remove(&n.size);
        }
        HeldWalk {
            earlier,
            ..HeldWalk::new(newest)
        }
    }

    /// The next row: its breaks ([`Walker::push_on`]).
    pub fn push(&mut self, r: &LedgerRow) -> Vec<ChainError> {
        // The row after the checkpoint's, linking to the head it signed, meets
        // it when the row at its size is not stored (a chain continued after
        // the checkpoint by a node whose store had lost rows: the gap is the
        // walk's to report, not a rewrite).
        if let Some(a) = &self.anchor {
            if self.at_anchor.is_none()
                && a.size > 0
                && r.seq == a.size.saturating_add(1)
                && hex::decode(&r.prev_hash).ok().as_deref() == Some(a.head.as_slice())
            {
                self.at_anchor = Some(a.head);
            }
        }
        let before = self.walker.head().0;
        let breaks = self.walker.push_on(r);
        // The row at the checkpoint's size, as walked (or followed to).
        let (n, head) = self.walker.head();
        if n != before && self.anchor.as_ref().is_some_and(|a| a.size == n) {
            self.at_anchor = Some(head);
        }
        let mut breaks = breaks;
        if n != before && self.earlier.get(&n).is_some_and(|signed| *signed != head) {
            breaks.push(ChainError::NotCheckpointed(n));
        }
        breaks
    }

    /// Positions walked ([`Walker::head`]).
    pub fn walked(&self) -> u64 {
        self.walker.head().0
    }

    /// Whether the walk so far holds its checkpoint (`None`: it has none).
    pub fn held(&self) -> Option<Result<u64, CheckpointError>> {
        self.anchor
            .as_ref()
            .map(|a| a.judge(self.walked(), self.at_anchor))
    }
}

/// One chain's walk in [`ChainsWalk`]: held to its checkpoint, with the breaks
/// found.
#[derive(Debug)]
pub struct ChainWalk {
    /// The chain.
    pub chain_id: String,
    walk: HeldWalk,
    /// Its breaks, as a verification reports them.
    pub breaks: Breaks,
    /// Rows read, copies of a row included.
    pub read: u64,
    /// The last `seq` read.
    last_seq: u64,
}

impl ChainWalk {
    fn new(chain_id: &str, held: Vec<Checkpoint>) -> ChainWalk {
        ChainWalk {
            chain_id: chain_id.to_owned(),
            walk: HeldWalk::with_all(held),
            breaks: Breaks::default(),
            read: 0,
            last_seq: 0,
        }
    }

    /// Positions walked ([`HeldWalk::walked`]): the chain's rows, each once.
    pub fn walked(&self) -> u64 {
        self.walk.walked()
    }

    /// Whether the walk holds its checkpoint (`None`: it has none).
    pub fn held(&self) -> Option<Result<u64, CheckpointError>> {
        self.walk.held()
    }

    /// The size of the checkpoint the chain is held to.
    pub fn checkpoint_size(&self) -> Option<u64> {
        self.walk.anchor.as_ref().map(|a| a.size)
    }
}

/// The answer a walk was given is not ordered by chain, then `seq`: walked as it
/// came, a chain would verify wrongly — in two runs each would be walked from its
/// start, or a row sent back in time would pass as a copy or a gap. Nothing after
/// it can be believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// Chain `0` came after the rows of a chain ordered after it (again, in a
    /// second run, or out of order).
    #[error("the store sent chain {0} after a chain ordered after it: its answer is not ordered by chain")]
    ChainTwice(String),
    /// Row `seq` of `chain` came after row `after`.
    #[error(
        "the store sent chain {chain}'s seq {seq} after {after}: its answer is not ordered by seq"
    )]
    SeqBack {
        /// The chain.
        chain: String,
        /// The row that came late.
        seq: u64,
        /// The row before it in the answer.
        after: u64,
    },
}

/// The walk of every chain of a store, as its rows stream in ordered by chain and
/// then `seq` (`ORDER BY chain_id, seq`, chain ids compared byte by byte as
/// ClickHouse orders strings): one chain's state at a time, so neither the
/// store's size nor its number of chains matters. Each chain is held to its newest checkpoint
/// among `anchors`. `gwctl ledger verify` and the sidecar's verification both
/// walk with it.
#[derive(Debug, Default)]
pub struct ChainsWalk {
    anchors: std::collections::BTreeMap<String, Vec<Checkpoint>>,
    /// The chain being walked; every chain before it in the answer has an id
    /// ordered before its (so a chain in two runs is refused, with no set of the
    /// ids seen).
    current: Option<ChainWalk>,
}

impl ChainsWalk {
    /// A walk holding each chain to its checkpoint in `anchors`.
    pub fn new(anchors: std::collections::BTreeMap<String, Checkpoint>) -> ChainsWalk {
        ChainsWalk::with_all(anchors.into_iter().map(|(k, c)| (k, vec![c])).collect())
    }

    /// A walk holding each chain to every checkpoint of it in `anchors`
    /// ([`HeldWalk::with_all`]).
    pub fn with_all(anchors: std::collections::BTreeMap<String, Vec<Checkpoint>>) -> ChainsWalk {
        ChainsWalk {
            anchors,
            ..ChainsWalk::default()
        }
    }

    /// The next row of the answer: the chain walked to its end, when `r` begins
    /// another.
    pub fn push(&mut self, r: &LedgerRow) -> Result<Option<ChainWalk>, OrderError> {
        let (ended, w) = match self.current.take() {
            Some(w) if w.chain_id == r.chain_id => (None, self.current.insert(w)),
            before => {
                if before.as_ref().is_some_and(|b| r.chain_id < b.chain_id) {
                    self.current = before;
                    return Err(OrderError::ChainTwice(r.chain_id.clone()));
                }
                let held = self.anchors.remove(&r.chain_id).unwrap_or_default();
                let w = ChainWalk::new(&r.chain_id, held);
                (before, self.current.insert(w))
            }
        };
        if r.seq < w.last_seq {
            return Err(OrderError::SeqBack {
                chain: w.chain_id.clone(),
                seq: r.seq,
                after: w.last_seq,
            });
        }
        w.last_seq = r.seq;
        w.read += 1;
        for e in w.walk.push(r) {
            w.breaks.note(e.to_string());
        }
        Ok(ended)
    }

    /// The end of the answer: the chain being walked, then each chain with a
    /// checkpoint and no row in the store (in the order of their ids).
    pub fn finish(mut self) -> Vec<ChainWalk> {
        let mut last: Vec<ChainWalk> = self.current.take().into_iter().collect();
        last.extend(
            std::mem::take(&mut self.anchors)
                .into_iter()
                .map(|(id, held)| ChainWalk::new(&id, held)),
        );
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Chain;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    fn rows(n: u64) -> Vec<LedgerRow> {
        let mut c = Chain::new("node-1");
        (1..=n)
            .map(|i| {
                c.seal(LedgerRow {
                    chain_id: String::new(),
                    seq: 0,
                    ts_ms: i,
                    stage: "sidecar".into(),
                    decision: "accepted".into(),
                    code: String::new(),
                    request_id: format!("r{i}"),
                    issuer: "ops".into(),
                    module: "mev".into(),
                    action: "stop".into(),
                    pubkey_id: "k".into(),
                    sig_alg: "ed25519-v1".into(),
                    nonce: i,
                    args_json: "{}".into(),
                    raw_hex: String::new(),
                    requester: "alice".into(),
                    requester_roles: "admin".into(),
                    token_issuer: "idp".into(),
                    route: String::new(),
                    prev_hash: String::new(),
                    row_hash: String::new(),
                })
            })
            .collect()
    }

    fn checkpoint(r: &[LedgerRow]) -> Checkpoint {
        let head: [u8; 32] = hex::decode(&r.last().unwrap().row_hash)
            .unwrap()
            .try_into()
            .unwrap();
        Checkpoint::for_chain("node-1", r.len() as u64, head)
    }

    #[test]
    fn a_signed_note_round_trips_and_only_its_key_opens_it() {
        let r = rows(5);
        let cp = checkpoint(&r);
        let note = cp.sign("gw-ledger", &key());
        assert!(note.starts_with("gw-ledger/node-1\n5\n"), "{note}");
        let opened = Checkpoint::open(&note, "gw-ledger", &key().verifying_key()).unwrap();
        assert_eq!(opened, cp);
        assert_eq!(opened.chain_id(), Some("node-1"));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(matches!(
            Checkpoint::open(&note, "gw-ledger", &other),
            Err(CheckpointError::Signature(_))
        ));
        let tampered = note.replacen("\n5\n", "\n4\n", 1);
        assert!(Checkpoint::open(&tampered, "gw-ledger", &key().verifying_key()).is_err());
    }

    #[test]
    fn truncation_deletion_and_rewriting_are_caught() {
        let r = rows(6);
        let cp = checkpoint(&r[..5]);
        assert_eq!(cp.check(&r), Ok(6), "rows after the checkpoint are fine");
        assert_eq!(
            cp.check(&r[..3]),
            Err(CheckpointError::Truncated { have: 3, want: 5 }),
            "a cut tail still verifies as a chain, but not against the checkpoint"
        );
        let mut deleted = r.clone();
        deleted.remove(2);
        assert!(matches!(cp.check(&deleted), Err(CheckpointError::Chain(_))));
        // A whole chain rewritten (re-sealed after a change) verifies as a chain but
        // not against the checkpoint.
        let rewritten = resealed_with_row_2_forged(&r);
        assert_eq!(cp.check(&rewritten), Err(CheckpointError::Rewritten(5)));
    }

    /// `r` with row 2 changed and every row sealed again: a chain of valid
    /// hashes, as anyone who can write the store can make one.
    fn resealed_with_row_2_forged(r: &[LedgerRow]) -> Vec<LedgerRow> {
        let mut c = Chain::new("node-1");
        r.iter()
            .map(|row| {
                let mut x = row.clone();
                if x.seq == 2 {
                    x.code = "forged".into();
                }
                c.seal(x)
            })
            .collect()
    }

    /// A chain rewritten under an older checkpoint and rebuilt on top, with a
    /// newer checkpoint signed over the rebuilt chain (a writer that took
    /// ClickHouse's head as its own): the newest holds, the older one breaks
    /// the walk at its size. Held to the newest alone, the walk found nothing.
    #[test]
    fn a_walk_is_held_to_every_checkpoint_not_only_the_newest() {
        let r = rows(8);
        let old = checkpoint(&r[..3]);
        let rebuilt = resealed_with_row_2_forged(&r);
        let newer = checkpoint(&rebuilt[..6]);
        let walk = |held: Vec<Checkpoint>| {
            let mut w = HeldWalk::with_all(held);
            let breaks: Vec<ChainError> = rebuilt.iter().flat_map(|row| w.push(row)).collect();
            (breaks, w.held())
        };
        assert_eq!(walk(vec![newer.clone()]), (vec![], Some(Ok(8))));
        let (breaks, held) = walk(vec![old.clone(), newer.clone()]);
        assert_eq!(breaks, vec![ChainError::NotCheckpointed(3)]);
        assert_eq!(held, Some(Ok(8)), "the newest still holds");
        // In any order; the original chain holds both.
        let mut w = HeldWalk::with_all(vec![checkpoint(&r[..6]), old]);
        assert!(r.iter().all(|row| w.push(row).is_empty()));
        assert_eq!(w.held(), Some(Ok(8)));
    }

    /// A store that lost the checkpoint's row, the chain continued after the
    /// checkpoint (row 6 links to the head it signed): the gap is the walk's
    /// break, the checkpoint holds (it was reported rewritten).
    #[test]
    fn a_row_linking_to_the_checkpoints_head_meets_it_when_its_row_is_gone() {
        let r = rows(8);
        let cp = checkpoint(&r[..5]);
        let mut w = HeldWalk::new(Some(cp.clone()));
        let breaks: Vec<ChainError> = r
            .iter()
            .filter(|row| row.seq != 5)
            .flat_map(|row| w.push(row))
            .collect();
        assert!(
            matches!(breaks.as_slice(), [ChainError::Gap { expected: 5, .. }]),
            "{breaks:?}"
        );
        assert_eq!(w.held(), Some(Ok(8)));
        // Linking elsewhere, it does not.
        let mut forged = r[5].clone();
        forged.prev_hash = hex::encode([1u8; 32]);
        let mut w = HeldWalk::new(Some(cp));
        for row in r[..4].iter().chain([&forged]).chain(&r[6..]) {
            let _ = w.push(row);
        }
        assert_eq!(w.held(), Some(Err(CheckpointError::Rewritten(5))));
    }

    /// Two signed notes, of one row and of three.
    fn two_notes() -> (String, String) {
        let r = rows(3);
        (
            checkpoint(&r[..1]).sign("gw-ledger", &key()),
            checkpoint(&r).sign("gw-ledger", &key()),
        )
    }

    #[test]
    fn a_note_cut_short_anywhere_is_outside_the_whole_length() {
        let (a, b) = two_notes();
        let file = format!("{a}{b}");
        assert_eq!(whole_len(file.as_bytes()), file.len());
        assert_eq!(whole_len(b""), 0);
        // Every cut inside the second note (the em dash's bytes included) keeps
        // exactly the first, which still opens.
        for cut in a.len()..file.len() {
            let torn = &file.as_bytes()[..cut];
            assert_eq!(whole_len(torn), a.len(), "cut at {cut}");
            let kept = std::str::from_utf8(&torn[..whole_len(torn)]).unwrap();
            assert_eq!(notes(kept), vec![a.clone()]);
        }
        for cut in 0..a.len() {
            assert_eq!(whole_len(&file.as_bytes()[..cut]), 0, "cut at {cut}");
        }
    }

    #[test]
    fn a_file_of_notes_splits_into_notes() {
        let (a, b) = two_notes();
        let file = format!("{a}{b}");
        let n = notes(&file);
        assert_eq!(n, vec![a, b]);
    }
}
