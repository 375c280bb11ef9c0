//! The contract between the edge filter and the sidecar, written once: the control
//! routes, which bodies are signed commands, the headers the edge stamps, and the
//! edge-decision report. The filter's defaults and the sidecar read these constants;
//! nothing here is configured on one side only.

use serde::{Deserialize, Serialize};

use crate::code::{Code, Reject};

/// The signed-command endpoint.
pub const COMMAND_PATH: &str = "/api/control/commands";
/// Prefix of `/api/control/module/{name}:{action}` (the path's module/action must
/// match the signed command; a JSON body is the original API's route).
pub const MODULE_ROUTE_PREFIX: &str = "/api/control/module/";
/// Where the filter reports edge decisions (not routed by Envoy).
pub const EDGE_DECISIONS_PATH: &str = "/internal/edge-decisions";

/// Media types of a signed command body.
pub const COMMAND_MEDIA_TYPES: [&str; 3] = [
    "application/x-protobuf",
    "application/protobuf",
    "application/octet-stream",
];

/// Whether a `content-type` announces a signed command (protobuf bytes); parameters
/// after `;` and letter case are ignored.
pub fn is_command_media_type(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return false };
    let media = ct.split(';').next().unwrap_or("").trim();
    COMMAND_MEDIA_TYPES
        .iter()
        .any(|m| m.eq_ignore_ascii_case(media))
}

/// The headers the edge sets for the upstream. Clients never send them: the edge
/// strips every header starting with [`headers::RESERVED_PREFIX`] first.
pub mod headers {
    /// Every header with this prefix is the edge's; client copies are removed.
    pub const RESERVED_PREFIX: &str = "x-gw-";
    /// The JWT `sub` the edge verified.
    pub const SUB: &str = "x-gw-sub";
    /// The JWT roles, comma-separated.
    pub const ROLES: &str = "x-gw-roles";
    /// The signing key id of a verified command.
    pub const PUBKEY_ID: &str = "x-gw-pubkey-id";
    /// The issuer of a verified command.
    pub const ISSUER: &str = "x-gw-issuer";
    /// The nonce of a verified command.
    pub const NONCE: &str = "x-gw-nonce";
    /// What the edge verified: see [`super::Verified`].
    pub const VERIFIED: &str = "x-gw-verified";
    /// The JWT's issuer (`iss`) the edge verified.
    pub const TOKEN_ISSUER: &str = "x-gw-token-issuer";
    /// The JWT's expiry (`exp`, unix seconds) the edge verified: a stream opened
    /// with the token ends then.
    pub const TOKEN_EXP: &str = "x-gw-token-exp";
    /// The hand-over ticket between the filter's two stages (never reaches the upstream).
    pub const TICKET: &str = "x-gw-ticket";
    /// The edge's seal over the stamped headers ([`crate::edge_stamp`]): the
    /// sidecar believes them only under a seal that verifies.
    pub const STAMP: &str = "x-gw-stamp";

    /// The headers the edge stamps (not the ticket).
    pub const STAMPED: [&str; 8] = [
        SUB,
        ROLES,
        TOKEN_ISSUER,
        TOKEN_EXP,
        PUBKEY_ID,
        ISSUER,
        NONCE,
        VERIFIED,
    ];

    /// Whether `name` is reserved for the edge (case-insensitive).
    pub fn is_reserved(name: &str) -> bool {
        name.get(..RESERVED_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_PREFIX))
    }
}

/// What the edge verified about a request it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The JWT and its role, and the signed command in the body.
    Edge,
    /// The JWT and its role only (every other route, and the JSON control route).
    Jwt,
}

impl Verified {
    /// The header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verified::Edge => "edge",
            Verified::Jwt => "jwt",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Verified> {
        match s {
            "edge" => Some(Verified::Edge),
            "jwt" => Some(Verified::Jwt),
            _ => None,
        }
    }
}

/// Who sent a request, as the edge verified it from the JWT (empty when unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Requester {
    /// The JWT `sub`.
    pub sub: String,
    /// The JWT roles, comma-separated.
    pub roles: String,
    /// The JWT's issuer (`iss`).
    pub token_issuer: String,
}

impl Requester {
    /// Who holds the token, as limits per holder count it: its issuer and its
    /// subject (a `sub` names someone only within its issuer).
    pub fn holder(&self) -> (String, String) {
        (self.token_issuer.clone(), self.sub.clone())
    }
}

/// A `u64` written in plain decimal digits, as the gateway writes numbers into
/// headers and cursors: `str::parse` alone would also take a leading `+`. At
/// most 20 digits are read.
pub fn decimal_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// How the edge writes a claim into a stamped header: percent-encodes anything
/// that is not printable ASCII, and `%`, so a claim can never inject a header
/// line, and a leading or trailing space (which a hop may trim, and the sealed
/// value would then differ from the one the sidecar reads).
pub fn header_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let last = s.len().saturating_sub(1);
    let kept = |i: usize, b: u8| {
        (0x20..0x7f).contains(&b) && b != b'%' && !(b == b' ' && (i == 0 || i == last))
    };
    if s.bytes().enumerate().all(|(i, b)| kept(i, b)) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for (i, b) in s.bytes().enumerate() {
        if kept(i, b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The signed command the edge verified, as it stamped it ([`headers::PUBKEY_ID`],
/// [`headers::ISSUER`], [`headers::NONCE`]; empty when it verified a token alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StampedCommand {
    /// The signing key's id, as [`header_safe`] writes it.
    pub pubkey_id: String,
    /// The command's issuer, as [`header_safe`] writes it.
    pub issuer: String,
    /// The command's nonce, in decimal.
    pub nonce: String,
}

/// What the edge says about a request it forwards: read from the stamped headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeIdentity {
    /// What the edge verified.
    pub verified: Verified,
    /// Who sent it.
    pub requester: Requester,
    /// When the token expires (unix seconds), when the edge said.
    pub token_exp: Option<u64>,
    /// The signed command it verified (with [`Verified::Edge`]).
    pub command: StampedCommand,
}

impl EdgeIdentity {
    /// Reads the stamped headers through `get` (a header lookup by lowercase name);
    /// `None` when the edge stamped nothing (no `x-gw-verified`, or an unknown value).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<EdgeIdentity> {
        let verified = Verified::parse(get(headers::VERIFIED)?)?;
        let field = |h| get(h).unwrap_or_default().to_owned();
        Some(EdgeIdentity {
            verified,
            requester: Requester {
                sub: field(headers::SUB),
                roles: field(headers::ROLES),
                token_issuer: field(headers::TOKEN_ISSUER),
            },
            token_exp: get(headers::TOKEN_EXP).and_then(|v| v.parse().ok()),
            command: StampedCommand {
                pubkey_id: field(headers::PUBKEY_ID),
                issuer: field(headers::ISSUER),
                nonce: field(headers::NONCE),
            },
        })
    }

    /// Whether what the edge stamped of the signed command it verified (its key,
    /// issuer and nonce) is `c`'s: a stamp of one command is no stamp of another.
    pub fn names(&self, c: &crate::Command) -> bool {
        let s = &self.command;
        s.pubkey_id == header_safe(&c.pubkey_id)
            && s.issuer == header_safe(&c.issuer)
            && s.nonce == c.nonce.to_string()
    }
}

/// Longest request path an edge report carries, in bytes (longer paths are cut at a
/// character boundary by the filter).
pub const MAX_REPORT_PATH_BYTES: usize = 256;
/// The route a report and a ledger row name for a request's `path`: the path
/// without its fragment, and its query (a query may carry a secret — an RPC
/// provider's `?api-key=`, pasted into a client pointed at the gateway — and a
/// ledger row is kept for good) only as a digest, `?sha256=<16 hex digits>` of
/// the query's bytes: rows of one query can still be told from others and
/// matched against a query one knows. The path is cut at a character boundary so
/// that the whole is at most [`MAX_REPORT_PATH_BYTES`]. A route already of this
/// form (a report's, made so by the filter) is kept as it is.
pub fn report_route(path: &str) -> String {
    const DIGEST: &str = "?sha256=";
    let path = path.split('#').next().unwrap_or(path);
    let Some((route, query)) = path.split_once('?') else {
        return truncate_utf8(path, MAX_REPORT_PATH_BYTES).to_owned();
    };
    let made = query.strip_prefix("sha256=").is_some_and(|d| {
        d.len() == 16
            && d.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    let digest = if made {
        query["sha256=".len()..].to_owned()
    } else {
        use sha2::Digest as _;
        hex::encode(&sha2::Sha256::digest(query.as_bytes())[..8])
    };
    let route = truncate_utf8(route, MAX_REPORT_PATH_BYTES - DIGEST.len() - 16);
    format!("{route}{DIGEST}{digest}")
}

/// Most reports in one batch.
pub const MAX_REPORTS_PER_BATCH: usize = 1024;
/// Largest batch body the filter sends (the sidecar accepts up to twice that).
pub const MAX_REPORT_BATCH_BYTES: usize = 512 * 1024;

/// One edge decision as the filter reports it and the sidecar records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeReport {
    /// Always `rejected` (the sidecar records the requests the edge forwards).
    pub decision: String,
    /// The rejection code ([`Code::as_str`]).
    pub code: String,
    /// The request's [`report_route`] (the sidecar records a report's path that
    /// way too, whatever the filter sent), at most [`MAX_REPORT_PATH_BYTES`].
    pub path: String,
    /// The command body as received, hex (empty when rejected before the body).
    pub raw_hex: String,
    /// Host time, unix milliseconds.
    pub ts_ms: u64,
    /// Who sent it, when the edge had verified the JWT before refusing.
    #[serde(default)]
    pub requester: String,
    /// The requester's roles, comma-separated.
    #[serde(default)]
    pub requester_roles: String,
    /// The JWT's issuer.
    #[serde(default)]
    pub token_issuer: String,
    /// The body's length when `raw_hex` holds only its first
    /// [`MAX_REPORT_RAW_BYTES`] (absent otherwise). A sidecar before 2026-12-06
    /// refuses a batch holding it (unknown field): upgrade sidecars first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_len: Option<u64>,
    /// The report's own identity, unique per filter VM (its random origin and a
    /// sequence number, [`MAX_REPORT_ID_BYTES`] at most, `[0-9a-z-]`): a batch the
    /// filter sends again after a failure is recorded once. Empty from a filter
    /// before 2026-12-06 (such a report is recorded on every delivery). A sidecar
    /// before 2026-12-06 refuses a batch holding it: upgrade sidecars first.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// This report stands for `n` refusals of its code the filter's VM could
    /// not report one by one (its queue was full, or a report did not fit a
    /// batch): nothing else of them is known, so its path, body and requester
    /// are empty. The sidecar sums them in a row (`{"unrecorded": n}`). A
    /// sidecar before 2026-12-10 refuses a batch holding it (unknown field):
    /// upgrade sidecars first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded: Option<u64>,
}

/// The most refusals one report may stand for ([`EdgeReport::unrecorded`]).
pub const MAX_REPORT_UNRECORDED: u64 = 1 << 32;

/// Longest report identity, in bytes.
pub const MAX_REPORT_ID_BYTES: usize = 64;

/// An edge report the sidecar accepted: its code and the raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedReport {
    /// The rejection code.
    pub code: Code,
    /// The request path.
    pub path: String,
    /// The command body as received (its first bytes when `raw_len` is given).
    pub raw: Vec<u8>,
    /// The body's whole length, when `raw` is only its start.
    pub raw_len: Option<u64>,
    /// Host time, unix milliseconds.
    pub ts_ms: u64,
    /// Who sent it (empty when the edge refused before the JWT).
    pub requester: Requester,
    /// The report's identity (empty: none given).
    pub id: String,
    /// `n` refusals of `code` the edge could not report one by one
    /// ([`EdgeReport::unrecorded`]).
    pub unrecorded: Option<u64>,
}

/// Longest requester field a report carries, in bytes.
pub const MAX_REPORT_REQUESTER_BYTES: usize = 512;

/// Most body bytes a report carries (the first ones; a report must fit a batch,
/// [`MAX_REPORT_BATCH_BYTES`], as hex with room to spare: a larger refused
/// command used to be dropped whole, with no row).
pub const MAX_REPORT_RAW_BYTES: usize = 64 * 1024;

impl EdgeReport {
    /// A rejection report; `path` is its [`report_route`], `raw` cut to
    /// [`MAX_REPORT_RAW_BYTES`].
    pub fn rejected(
        code: Code,
        path: &str,
        raw: &[u8],
        ts_ms: u64,
        requester: Option<&Requester>,
    ) -> EdgeReport {
        let r = requester.cloned().unwrap_or_default();
        let cut = |s: &str| truncate_utf8(s, MAX_REPORT_REQUESTER_BYTES).to_owned();
        EdgeReport {
            decision: "rejected".into(),
            code: code.as_str().into(),
            path: report_route(path),
            raw_hex: hex::encode(raw.get(..MAX_REPORT_RAW_BYTES).unwrap_or(raw)),
            raw_len: (raw.len() > MAX_REPORT_RAW_BYTES).then_some(raw.len() as u64),
            ts_ms,
            requester: cut(&r.sub),
            requester_roles: cut(&r.roles),
            token_issuer: cut(&r.token_issuer),
            id: String::new(),
            unrecorded: None,
        }
    }

    /// A report standing for `n` refusals of `code` (a code's name,
    /// [`Code::as_str`]) the filter could not report one by one.
    pub fn sum(code: &str, n: u64, ts_ms: u64) -> EdgeReport {
        EdgeReport {
            decision: "rejected".into(),
            code: code.to_owned(),
            path: String::new(),
            raw_hex: String::new(),
            raw_len: None,
            ts_ms,
            requester: String::new(),
            requester_roles: String::new(),
            token_issuer: String::new(),
            id: String::new(),
            unrecorded: Some(n),
        }
    }

    /// Checks a received report against the contract.
    pub fn check(&self) -> Result<CheckedReport, Reject> {
        let code = Code::parse(&self.code).ok_or_else(|| {
            Reject::with(
                Code::Malformed,
                format!("unknown code `{}`", self.code.escape_debug()),
            )
        })?;
        if self.decision != "rejected" {
            return Err(Reject::new(
                Code::Malformed,
                "an edge report's decision is `rejected`",
            ));
        }
        if self.path.len() > MAX_REPORT_PATH_BYTES {
            return Err(Reject::with(
                Code::Malformed,
                format!("an edge report's path is at most {MAX_REPORT_PATH_BYTES} bytes"),
            ));
        }
        if self.ts_ms == 0 {
            return Err(Reject::new(Code::Malformed, "an edge report needs a time"));
        }
        let raw = hex::decode(&self.raw_hex)
            .map_err(|_| Reject::new(Code::Malformed, "raw_hex is not hex"))?;
        if [&self.requester, &self.requester_roles, &self.token_issuer]
            .iter()
            .any(|f| f.len() > MAX_REPORT_REQUESTER_BYTES)
        {
            return Err(Reject::with(
                Code::Malformed,
                format!("an edge report's requester fields are at most {MAX_REPORT_REQUESTER_BYTES} bytes"),
            ));
        }
        if self.id.len() > MAX_REPORT_ID_BYTES
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
        {
            return Err(Reject::with(
                Code::Malformed,
                format!("an edge report's id is at most {MAX_REPORT_ID_BYTES} bytes of [0-9a-z-]"),
            ));
        }
        if let Some(n) = self.unrecorded {
            let bare = raw.is_empty()
                && self.raw_len.is_none()
                && self.path.is_empty()
                && [&self.requester, &self.requester_roles, &self.token_issuer]
                    .iter()
                    .all(|f| f.is_empty());
            if n == 0 || n > MAX_REPORT_UNRECORDED || !bare {
                return Err(Reject::new(
                    Code::Malformed,
                    "an edge report standing for unrecorded refusals counts 1..=2^32 and carries no path, body or requester",
                ));
            }
        }
        let raw_len = self.raw_len.filter(|n| *n > raw.len() as u64);
        Ok(CheckedReport {
            code,
            path: self.path.clone(),
            raw,
            raw_len,
            ts_ms: self.ts_ms,
            requester: Requester {
                sub: self.requester.clone(),
                roles: self.requester_roles.clone(),
                token_issuer: self.token_issuer.clone(),
            },
            id: self.id.clone(),
            unrecorded: self.unrecorded,
        })
    }
}

/// Parses and checks a batch of reports (a JSON array); the whole batch or nothing.
pub fn parse_report_batch(body: &[u8]) -> Result<Vec<CheckedReport>, Reject> {
    let reports: Vec<EdgeReport> = serde_json::from_slice(body)
        .map_err(|e| Reject::with(Code::Malformed, format!("edge reports: {e}")))?;
    if reports.len() > MAX_REPORTS_PER_BATCH {
        return Err(Reject::with(
            Code::TooLarge,
            format!("{} reports; at most {MAX_REPORTS_PER_BATCH}", reports.len()),
        ));
    }
    reports.iter().map(EdgeReport::check).collect()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_u64_reads_plain_digits_only() {
        assert_eq!(decimal_u64("0"), Some(0));
        assert_eq!(decimal_u64("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1.0",
            "0x1",
            "18446744073709551616",
        ] {
            assert_eq!(decimal_u64(bad), None, "{bad:?}");
        }
        assert_eq!(decimal_u64(&"0".repeat(21)), None);
    }

    #[test]
    fn command_media_types() {
        for ct in [
            "application/x-protobuf",
            "Application/X-Protobuf; charset=binary",
            " application/octet-stream ",
            "application/protobuf",
        ] {
            assert!(is_command_media_type(Some(ct)), "{ct}");
        }
        for ct in [None, Some(""), Some("application/json"), Some("text/plain")] {
            assert!(!is_command_media_type(ct), "{ct:?}");
        }
    }

    #[test]
    fn reserved_headers() {
        assert!(headers::is_reserved("X-GW-Anything"));
        for h in headers::STAMPED {
            assert!(headers::is_reserved(h), "{h}");
        }
        assert!(headers::is_reserved(headers::TICKET));
        assert!(!headers::is_reserved("x-g"));
        assert!(!headers::is_reserved("authorization"));
    }

    #[test]
    fn identity_from_headers() {
        let h = [
            (headers::VERIFIED, "edge"),
            (headers::SUB, "alice"),
            (headers::ROLES, "admin, viewer,"),
        ];
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let id = EdgeIdentity::from_headers(get).unwrap();
        assert_eq!(id.verified, Verified::Edge);
        assert_eq!(id.requester.sub, "alice");
        assert_eq!(id.requester.roles, "admin, viewer,");
        assert_eq!(id.requester.token_issuer, "");
        assert_eq!(id.token_exp, None);
        let with_exp = |v: &'static str| {
            EdgeIdentity::from_headers(|k| match k {
                headers::VERIFIED => Some("jwt"),
                headers::TOKEN_EXP => Some(v),
                _ => None,
            })
            .unwrap()
            .token_exp
        };
        assert_eq!(with_exp("1767225600"), Some(1_767_225_600));
        assert_eq!(with_exp("soon"), None);
        assert_eq!(EdgeIdentity::from_headers(|_| None), None);
        assert_eq!(EdgeIdentity::from_headers(|_| Some("forged")), None);
    }

    /// A report standing for refusals the edge could not report one by one:
    /// its count, and nothing else (no path, body or requester); an ordinary
    /// report does not carry the member (a sidecar before it refuses it).
    #[test]
    fn a_summing_report_counts_and_carries_nothing_else() {
        let sum = EdgeReport::sum("jwt_missing", 7, 9);
        let checked = sum.check().unwrap();
        assert_eq!(
            (checked.code, checked.unrecorded),
            (Code::JwtMissing, Some(7))
        );
        let ordinary = EdgeReport::rejected(Code::Replay, "/p", b"", 7, None);
        assert_eq!(ordinary.check().unwrap().unrecorded, None);
        assert!(!serde_json::to_string(&ordinary)
            .unwrap()
            .contains("unrecorded"));
        let who = Requester {
            sub: "alice".into(),
            ..Requester::default()
        };
        for bad in [
            EdgeReport {
                unrecorded: Some(0),
                ..sum.clone()
            },
            EdgeReport {
                unrecorded: Some(MAX_REPORT_UNRECORDED + 1),
                ..sum.clone()
            },
            EdgeReport {
                path: "/p".into(),
                ..sum.clone()
            },
            EdgeReport {
                raw_hex: "00".into(),
                ..sum.clone()
            },
            EdgeReport {
                raw_len: Some(9),
                ..sum.clone()
            },
            EdgeReport {
                requester: who.sub.clone(),
                ..sum.clone()
            },
        ] {
            assert_eq!(bad.check().unwrap_err().code, Code::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn report_round_trip_and_limits() {
        let long = "é".repeat(200); // 400 bytes
        let who = Requester {
            sub: "alice".into(),
            roles: "admin".into(),
            token_issuer: "defi-dashboard".into(),
        };
        let r = EdgeReport::rejected(Code::Replay, &long, b"\x01\x02", 7, Some(&who));
        assert!(r.path.len() <= MAX_REPORT_PATH_BYTES && long.starts_with(&r.path));
        let body = serde_json::to_vec(std::slice::from_ref(&r)).unwrap();
        let checked = parse_report_batch(&body).unwrap();
        assert_eq!(checked[0].code, Code::Replay);
        assert_eq!(checked[0].raw, vec![1, 2]);
        assert_eq!(checked[0].requester, who);
        assert_eq!(checked[0].id, "", "no id given");
        assert!(
            !String::from_utf8(body).unwrap().contains("\"id\""),
            "an empty id is not sent (a sidecar before it refuses the field)"
        );
        let mut with_id = r.clone();
        with_id.id = "00000000deadbeef-1f".into();
        assert_eq!(with_id.check().unwrap().id, "00000000deadbeef-1f");
        for id in ["Upper", "a_b", "é", &"a".repeat(MAX_REPORT_ID_BYTES + 1)] {
            with_id.id = id.into();
            assert_eq!(with_id.check().unwrap_err().code, Code::Malformed, "{id}");
        }

        let mut bad = r.clone();
        bad.path = "x".repeat(MAX_REPORT_PATH_BYTES + 1);
        assert_eq!(bad.check().unwrap_err().code, Code::Malformed);
        let mut bad = r.clone();
        bad.code = "nope".into();
        assert_eq!(bad.check().unwrap_err().code, Code::Malformed);
        let mut bad = r.clone();
        bad.decision = "accepted".into();
        assert_eq!(bad.check().unwrap_err().code, Code::Malformed);
        let mut bad = r.clone();
        bad.ts_ms = 0;
        assert_eq!(bad.check().unwrap_err().code, Code::Malformed);
        let mut bad = r;
        bad.raw_hex = "zz".into();
        assert_eq!(bad.check().unwrap_err().code, Code::Malformed);
        assert_eq!(
            parse_report_batch(br#"[{"decision":"rejected","code":"replay","path":"/","raw_hex":"","ts_ms":1,"x":1}]"#)
                .unwrap_err()
                .code,
            Code::Malformed,
            "unknown fields are refused"
        );
        let many =
            vec![EdgeReport::rejected(Code::Replay, "/", b"", 1, None); MAX_REPORTS_PER_BATCH + 1];
        assert_eq!(
            parse_report_batch(&serde_json::to_vec(&many).unwrap())
                .unwrap_err()
                .code,
            Code::TooLarge
        );
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate_utf8("abc", 2), "ab");
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("aé", 3), "aé");
    }
}
