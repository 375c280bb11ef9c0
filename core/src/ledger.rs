//! The audit ledger's hash chain. Every decision row carries `prev_hash` and
//! `row_hash = SHA-256(prev_hash ‖ canonical(row))`, with rows numbered `seq` from 1
//! without gaps, so a removed, reordered or altered row is detected by re-walking the
//! chain. Pure: the sidecar appends, `gwctl ledger verify` walks what the store returns.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The stage that made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// The edge filter in Envoy.
    Edge,
    /// The sidecar's admission.
    Sidecar,
    /// A module's agent (applies commands).
    Agent,
    /// The model host: a library swapped in to serve a module, or refused.
    Models,
}

/// What a stage decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Decision {
    /// Let through (edge) or admitted and published (sidecar).
    Accepted,
    /// Refused, with a code.
    Rejected,
    /// Applied to the module's state (agent).
    Applied,
    /// Already applied: a redelivery, skipped (agent).
    Duplicate,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 4] = [Stage::Edge, Stage::Sidecar, Stage::Agent, Stage::Models];

    /// The name stored in the ledger.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Edge => "edge",
            Stage::Sidecar => "sidecar",
            Stage::Agent => "agent",
            Stage::Models => "models",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl Decision {
    /// Every decision.
    pub const ALL: [Decision; 4] = [
        Decision::Accepted,
        Decision::Rejected,
        Decision::Applied,
        Decision::Duplicate,
    ];

    /// The name stored in the ledger.
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Accepted => "accepted",
            Decision::Rejected => "rejected",
            Decision::Applied => "applied",
            Decision::Duplicate => "duplicate",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Decision> {
        Decision::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// One ledger row: a decision about a command at one stage, in one chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerRow {
    /// The chain (the gateway node that wrote it).
    #[serde(default)]
    pub chain_id: String,
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When the decision was made, unix milliseconds.
    pub ts_ms: u64,
    /// [`Stage::as_str`].
    pub stage: String,
    /// [`Decision::as_str`].
    pub decision: String,
    /// Rejection code (`""` when accepted).
    pub code: String,
    /// Command `request_id`.
    pub request_id: String,
    /// Command issuer.
    pub issuer: String,
    /// Module name.
    pub module: String,
    /// Action name.
    pub action: String,
    /// Signing key id.
    pub pubkey_id: String,
    /// Signature algorithm.
    pub sig_alg: String,
    /// Command nonce.
    pub nonce: u64,
    /// Command args as JSON.
    pub args_json: String,
    /// The exact signed message as received (hex), so the row can be re-verified later.
    pub raw_hex: String,
    /// Who sent the request: the JWT `sub` the edge verified (`""` when unknown).
    #[serde(default)]
    pub requester: String,
    /// The requester's roles, comma-separated.
    #[serde(default)]
    pub requester_roles: String,
    /// The JWT's issuer (`iss`).
    #[serde(default)]
    pub token_issuer: String,
    /// The route the request came in on (empty for the agent's rows).
    #[serde(default)]
    pub route: String,
    /// Hash of the previous row (hex).
    pub prev_hash: String,
    /// Hash of this row (hex).
    pub row_hash: String,
}

fn put(h: &mut Sha256, field: &[u8]) {
    // Length-prefixed: no two different rows encode alike.
    h.update((field.len() as u64).to_be_bytes());
    h.update(field);
}

impl LedgerRow {
    /// Bytes the row's texts hold (the memory a row waiting to be stored takes
    /// beyond its own size): every field, so that a field added is counted.
    pub fn text_bytes(&self) -> usize {
        let LedgerRow {
            chain_id,
            seq: _,
            ts_ms: _,
            stage,
            decision,
            code,
            request_id,
            issuer,
            module,
            action,
            pubkey_id,
            sig_alg,
            nonce: _,
            args_json,
            raw_hex,
            requester,
            requester_roles,
            token_issuer,
            route,
            prev_hash,
            row_hash,
        } = self;
        [
            chain_id,
            stage,
            decision,
            code,
            request_id,
            issuer,
            module,
            action,
            pubkey_id,
            sig_alg,
            args_json,
            raw_hex,
            requester,
            requester_roles,
            token_issuer,
            route,
            prev_hash,
            row_hash,
        ]
        .iter()
        .map(|t| t.len())
        .sum()
    }

    /// The hash of this row's content chained to `prev`.
    pub fn compute_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"gw-ledger-v2");
        h.update(prev);
        put(&mut h, self.chain_id.as_bytes());
        h.update(self.seq.to_be_bytes());
        h.update(self.ts_ms.to_be_bytes());
        for f in [
            &self.stage,
            &self.decision,
            &self.code,
            &self.request_id,
            &self.issuer,
            &self.module,
            &self.action,
            &self.pubkey_id,
            &self.sig_alg,
        ] {
            put(&mut h, f.as_bytes());
        }
        h.update(self.nonce.to_be_bytes());
        put(&mut h, self.args_json.as_bytes());
        put(&mut h, self.raw_hex.as_bytes());
        for f in [&self.requester, &self.requester_roles, &self.token_issuer] {
            put(&mut h, f.as_bytes());
        }
        // Added later: hashed only when set, so rows written before it keep their
        // hash (an empty trailing field and an absent one are the same row).
        if !self.route.is_empty() {
            put(&mut h, self.route.as_bytes());
        }
        h.finalize().into()
    }
}

/// Appends rows to one chain.
/// How far behind its chain's previous row a row's time is raised to it
/// ([`Chain::seal`]).
pub const MAX_TS_RAISE_MS: u64 = 60_000;

#[derive(Debug, Clone)]
pub struct Chain {
    chain_id: String,
    next_seq: u64,
    last: [u8; 32],
    /// The last row's `ts_ms` (0: not known).
    last_ts_ms: u64,
}

impl Chain {
    /// A new chain `chain_id`.
    pub fn new(chain_id: &str) -> Chain {
        Chain {
            chain_id: chain_id.to_owned(),
            next_seq: 1,
            last: GENESIS,
            last_ts_ms: 0,
        }
    }

    /// Continues chain `chain_id` after its last row `last` (a new chain for `None`).
    pub fn resume(chain_id: &str, last: Option<&LedgerRow>) -> Result<Chain, ChainError> {
        match last {
            None => Ok(Chain::new(chain_id)),
            Some(r) => Ok(Chain {
                chain_id: chain_id.to_owned(),
                next_seq: r.seq.checked_add(1).ok_or(ChainError::Full(r.seq))?,
                last: parse_hash(&r.row_hash).ok_or(ChainError::BadHash(r.seq))?,
                last_ts_ms: r.ts_ms,
            }),
        }
    }

    /// Chain `chain_id` continuing at `next_seq` after a row whose hash is `head`
    /// (a chain taken up from what the store holds).
    pub fn at(chain_id: &str, next_seq: u64, head: [u8; 32]) -> Chain {
        Chain {
            chain_id: chain_id.to_owned(),
            next_seq,
            last: head,
            last_ts_ms: 0,
        }
    }

    /// The chain's id.
    pub fn id(&self) -> &str {
        &self.chain_id
    }

    /// The `seq` the next row gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash of the last row (the head), [`GENESIS`] for an empty chain.
    pub fn head(&self) -> [u8; 32] {
        self.last
    }

    /// Numbers and hashes `row` (its `chain_id`, `seq`, `prev_hash`, `row_hash` are
    /// overwritten). Its `ts_ms` is raised to the previous row's when below it
    /// by at most [`MAX_TS_RAISE_MS`]: a chain's times do not go back as its
    /// `seq` goes up. Rows are made before they are sealed, in the order they
    /// are committed: two writers (or a clock stepped back a little) gave seq 11
    /// a time before seq 10's, and a reader paging by (time, chain, seq) never
    /// saw one of them. Further behind (a clock that had jumped ahead, then was
    /// set right), a row keeps its own time: every later row pinned to a time
    /// hours ahead would be worse than one step back in the order.
    pub fn seal(&mut self, mut row: LedgerRow) -> LedgerRow {
        if row.ts_ms < self.last_ts_ms && self.last_ts_ms - row.ts_ms <= MAX_TS_RAISE_MS {
            row.ts_ms = self.last_ts_ms;
        }
        self.last_ts_ms = row.ts_ms;
        row.chain_id.clone_from(&self.chain_id);
        row.seq = self.next_seq;
        row.prev_hash = hex::encode(self.last);
        let h = row.compute_hash(&self.last);
        row.row_hash = hex::encode(h);
        self.last = h;
        self.next_seq += 1;
        row
    }
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A row is missing (or the rows are out of order).
    #[error("row {expected} is missing (found row {found} there)")]
    Gap {
        /// The seq that should come next.
        expected: u64,
        /// The seq found instead.
        found: u64,
    },
    /// A row does not link to the previous one.
    #[error("row {0} does not link to the row before it")]
    BrokenLink(u64),
    /// A row's content does not match its hash (altered).
    #[error("row {0} was altered: its content does not match its hash")]
    Altered(u64),
    /// A hash is not 32 bytes of hex (or, as a walk reads rows, the row holds
    /// text that is not UTF-8: [`walk_select_list`]).
    #[error("row {0} has a malformed hash, or text that is not UTF-8")]
    BadHash(u64),
    /// A row claims the last seq there is: nothing can follow it.
    #[error("row {0} has the highest seq a chain can number")]
    Full(u64),
    /// Two different rows claim one position.
    #[error("row {0} appears twice with different content")]
    Conflict(u64),
    /// A row of another chain was given.
    #[error("row {seq} belongs to chain `{found}`, not `{expected}`")]
    OtherChain {
        /// The seq.
        seq: u64,
        /// The chain walked.
        expected: String,
        /// The row's chain.
        found: String,
    },
    /// The stored row at a checkpoint's position is not the row it signed.
    #[error("row {0} is not the row a signed checkpoint of {0} rows holds: the chain was rewritten under the checkpoint")]
    NotCheckpointed(u64),
    /// The store holds no row at a checkpoint's position, and rows after it.
    #[error("row {0}, which a signed checkpoint of {0} rows holds, is missing while rows after it are stored: what follows it cannot be held to the checkpoint")]
    CheckpointedRowMissing(u64),
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// Walks one chain's rows (in `seq` order, from the first; an exact duplicate of a
/// row is skipped): how many verified, and the head.
pub fn verify_chain<'a>(rows: impl IntoIterator<Item = &'a LedgerRow>) -> Result<u64, ChainError> {
    walk(rows).map(|(n, _)| n)
}

/// [`verify_chain`], also returning the hash of the last row.
pub fn walk<'a>(
    rows: impl IntoIterator<Item = &'a LedgerRow>,
) -> Result<(u64, [u8; 32]), ChainError> {
    let mut w = Walker::new();
    for r in rows {
        w.push(r)?;
    }
    Ok(w.head())
}

/// Breaks of one chain a verification lists at most; those after are counted.
pub const MAX_BREAKS: usize = 16;

/// The breaks of one chain as a verification reports them: the first
/// [`MAX_BREAKS`] as found, and how many more (the walk goes on after each, so
/// that one row planted or lost hides nothing after it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breaks {
    /// The first ones, in order.
    pub listed: Vec<String>,
    /// How many came after those.
    pub more: u64,
}

impl Breaks {
    /// Notes one more break.
    pub fn note(&mut self, what: String) {
        if self.listed.len() < MAX_BREAKS {
            self.listed.push(what);
        } else {
            self.more += 1;
        }
    }

    /// Whether there was none.
    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }
}

/// A walk of one chain a row at a time ([`walk`]), holding no row: rows streamed
/// from a store of any size are checked in constant memory.
#[derive(Debug, Clone)]
pub struct Walker {
    prev: [u8; 32],
    expected: u64,
    chain: Option<String>,
    /// The last row's `prev_hash` and `row_hash` as stored: a row at the same
    /// position with both the same and that checks is the same row (the hash
    /// covers every field), stored twice.
    last: Option<(String, String)>,
}

impl Default for Walker {
    fn default() -> Self {
        Walker::new()
    }
}

impl Walker {
    /// A walk from the chain's first row.
    pub fn new() -> Walker {
        Walker {
            prev: GENESIS,
            expected: 1,
            chain: None,
            last: None,
        }
    }

    /// The next row (in `seq` order): `Err` at the first that does not continue
    /// the chain; an exact duplicate of the last row is skipped.
    pub fn push(&mut self, r: &LedgerRow) -> Result<(), ChainError> {
        if let Some((prev_hash, row_hash)) = &self.last {
            if Some(r.seq) == self.expected.checked_sub(1) {
                let before = parse_hash(prev_hash).ok_or(ChainError::BadHash(r.seq))?;
                if r.prev_hash == *prev_hash
                    && r.row_hash == *row_hash
                    && Some(r.compute_hash(&before)) == parse_hash(&r.row_hash)
                {
                    return Ok(());
                }
                return Err(ChainError::Conflict(r.seq));
            }
        }
        match &self.chain {
            None => self.chain = Some(r.chain_id.clone()),
            Some(c) if *c != r.chain_id => {
                return Err(ChainError::OtherChain {
                    seq: r.seq,
                    expected: c.clone(),
                    found: r.chain_id.clone(),
                })
            }
            Some(_) => {}
        }
        if r.seq != self.expected {
            return Err(ChainError::Gap {
                expected: self.expected,
                found: r.seq,
            });
        }
        let stored_prev = parse_hash(&r.prev_hash).ok_or(ChainError::BadHash(r.seq))?;
        if stored_prev != self.prev {
            return Err(ChainError::BrokenLink(r.seq));
        }
        let stored = parse_hash(&r.row_hash).ok_or(ChainError::BadHash(r.seq))?;
        if r.compute_hash(&self.prev) != stored {
            return Err(ChainError::Altered(r.seq));
        }
        // A row at the last position there is (reached by following a row
        // planted after a gap) has no successor: the walk stops there.
        let next = self
            .expected
            .checked_add(1)
            .ok_or(ChainError::Full(r.seq))?;
        self.prev = stored;
        self.expected = next;
        self.last = Some((r.prev_hash.clone(), r.row_hash.clone()));
        Ok(())
    }

    /// Rows walked (duplicates not counted) and the last one's hash.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.expected - 1, self.prev)
    }

    /// [`Self::push`], going on whatever the row was: its breaks are returned
    /// (none, one, or two: a row followed after a gap or a broken link whose
    /// content does not match its own hash is `Altered` too), and the walk goes
    /// on after them, so that one row planted, lost or changed does not hide
    /// what comes after it. A row that does not follow the one before it (a gap,
    /// a broken link, content that does not match its hash) becomes the row the
    /// next is held to; a second row at a position walked, a row of another
    /// chain or one with a malformed hash is passed over. After a break
    /// [`Self::head`] counts positions, not rows that verified.
    pub fn push_on(&mut self, r: &LedgerRow) -> Vec<ChainError> {
        let e = match self.push(r) {
            Ok(()) => return Vec::new(),
            Err(e) => e,
        };
        let follow = matches!(
            e,
            ChainError::Gap { found, .. } if found > self.expected
        ) || matches!(e, ChainError::BrokenLink(_) | ChainError::Altered(_));
        let mut breaks = vec![e];
        if !follow {
            return breaks;
        }
        let (Some(hash), Some(next)) = (parse_hash(&r.row_hash), r.seq.checked_add(1)) else {
            breaks.push(ChainError::BadHash(r.seq));
            return breaks;
        };
        // Followed after a gap or a broken link, the row's own content is
        // checked too (an `Altered` one was).
        if !matches!(breaks[0], ChainError::Altered(_)) {
            let whole = parse_hash(&r.prev_hash).is_some_and(|p| r.compute_hash(&p) == hash);
            if !whole {
                breaks.push(ChainError::Altered(r.seq));
            }
        }
        self.prev = hash;
        self.expected = next;
        self.last = Some((r.prev_hash.clone(), r.row_hash.clone()));
        breaks
    }
}

/// Splits rows (in any order) by chain, each sorted by `seq`.
pub fn by_chain(rows: Vec<LedgerRow>) -> std::collections::BTreeMap<String, Vec<LedgerRow>> {
    let mut out: std::collections::BTreeMap<String, Vec<LedgerRow>> = Default::default();
    for r in rows {
        out.entry(r.chain_id.clone()).or_default().push(r);
    }
    for v in out.values_mut() {
        v.sort_by_key(|r| r.seq);
    }
    out
}

/// The stored columns of a row, in [`LedgerRow`]'s order (the table's and the
/// sidecar's row type's).
pub const COLUMNS: [&str; 21] = [
    "chain_id",
    "seq",
    "ts_ms",
    "stage",
    "decision",
    "code",
    "request_id",
    "issuer",
    "module",
    "action",
    "pubkey_id",
    "sig_alg",
    "nonce",
    "args_json",
    "raw_hex",
    "requester",
    "requester_roles",
    "token_issuer",
    "route",
    "prev_hash",
    "row_hash",
];

/// The columns of [`COLUMNS`] that are numbers; the others are text.
const NUMBER_COLUMNS: [&str; 3] = ["seq", "ts_ms", "nonce"];

/// `column` as ClickHouse should send it to a reader that decodes text as
/// UTF-8: a text column with any byte sequence that is not UTF-8 replaced
/// (`toValidUTF8`, under its own name). The ledger writes only UTF-8, but the
/// table takes whatever anyone who can INSERT stores: one such row must not stop
/// every read of the table.
pub fn read_as_utf8(column: &str) -> String {
    if NUMBER_COLUMNS.contains(&column) {
        column.to_owned()
    } else {
        format!("toValidUTF8({column}) AS {column}")
    }
}

/// The rows a walk of the chains reads: those whose chain id is UTF-8. Rows
/// under any other chain id are not the ledger's (it writes only UTF-8); read as
/// UTF-8 they would not come in the order the walk holds the answer to (a
/// replaced id sorts elsewhere than its bytes), so they are counted apart
/// ([`not_walked_sql`]) and make the ledger not verified.
pub const WALKED: &str = "isValidUTF8(chain_id)";

/// Counts the rows of `table` a walk does not read ([`WALKED`]), and their
/// chain ids: columns `rows` and `chains`.
pub fn not_walked_sql(table: &str) -> String {
    format!("SELECT count() AS rows, uniqExact(chain_id) AS chains FROM {table} WHERE NOT {WALKED}")
}

/// The query a walk of every chain reads `table` with (ClickHouse SQL; a
/// reader may add settings after it, then a format): the rows [`WALKED`]
/// keeps, ordered by chain, then `seq`, as [`walk_select_list`] says. Limits
/// that would cut the answer short throw instead (a cut chain would verify), and
/// names in `WHERE`, `ORDER BY` and the checks mean the stored columns, not the
/// columns read as UTF-8.
pub fn walk_sql(table: &str) -> String {
    walk_sql_of(table, &COLUMNS)
}

/// [`walk_sql`] of a table that holds only the columns `stored`: a text column
/// it lacks (a table made before the column was added, kept as it was) is read
/// as empty, as the row's decoding takes it ([`LedgerRow`]'s defaults).
pub fn walk_sql_of(table: &str, stored: &[&str]) -> String {
    format!(
        "SELECT {} FROM {table} WHERE {WALKED} ORDER BY chain_id, seq \
         SETTINGS prefer_column_name_to_alias = 1, result_overflow_mode = 'throw', \
         read_overflow_mode = 'throw', timeout_overflow_mode = 'throw'",
        select_list(stored)
    )
}

/// The columns of [`COLUMNS`] added to the table after it was first made: a
/// walk reads them as empty from a table that lacks them ([`walk_sql_of`]); it
/// cannot do without the others.
pub const OPTIONAL_COLUMNS: [&str; 4] = ["requester", "requester_roles", "token_issuer", "route"];

/// What a walk of the chains selects, in [`COLUMNS`]' order, from the rows
/// [`WALKED`] keeps (`chain_id` as stored: the walk's order is ClickHouse's
/// order of its bytes): the other text read as UTF-8 ([`read_as_utf8`]), and
/// the `row_hash` of a row with any text that is not UTF-8 made malformed, so
/// that the row never verifies (its hash could have been made over the replaced
/// text) and is a break ([`ChainError::BadHash`]) the walk goes on after. The
/// checks name the stored columns: [`walk_sql`] has ClickHouse prefer column
/// names to the aliases of the same name.
pub fn walk_select_list() -> String {
    select_list(&COLUMNS)
}

fn select_list(stored: &[&str]) -> String {
    let texts: Vec<String> = COLUMNS
        .iter()
        .filter(|c| !NUMBER_COLUMNS.contains(c) && **c != "chain_id" && stored.contains(c))
        .map(|c| format!("isValidUTF8({c})"))
        .collect();
    COLUMNS
        .iter()
        .map(|c| match *c {
            c if !stored.contains(&c) && OPTIONAL_COLUMNS.contains(&c) => format!("'' AS {c}"),
            "chain_id" => "chain_id".to_owned(),
            "row_hash" => format!(
                "if({}, row_hash, concat('not UTF-8: ', toValidUTF8(row_hash))) AS row_hash",
                texts.join(" AND ")
            ),
            c => read_as_utf8(c),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
