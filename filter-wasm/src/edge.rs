//! The filter's decisions, as plain functions of the request and the clock, so they
//! are tested natively; `glue.rs` only moves bytes between the host and these.

use std::cell::RefCell;

use gw_core::contract::{self, headers, Requester, Verified};
use gw_core::jwt::VerifiedJwt;
use gw_core::jwt_cache::JwtCache;
use gw_core::names::parse_module_spec;
use gw_core::{roles, Action, Code, Module, Reject};

use crate::config::Settings;
use gw_core::replay::ShardOutcome;

use crate::replay_cas::{accept_nonce, NonceUse, SharedStore};

/// What the filter needs from the request head.
#[derive(Debug, Clone, Default)]
pub struct RequestHead<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    /// `content-type`.
    pub content_type: Option<&'a str>,
    /// `authorization`.
    pub authorization: Option<&'a str>,
    /// `content-length`.
    pub content_length: Option<&'a str>,
    /// `upgrade` (Envoy presents HTTP/2's and HTTP/3's extended CONNECT as an
    /// HTTP/1.1 upgrade too).
    pub upgrade: Option<&'a str>,
    /// `sec-websocket-protocol`: a browser's WebSocket cannot send
    /// `Authorization`, so it offers its token as the subprotocol `bearer.<jwt>`.
    pub websocket_protocols: Option<&'a str>,
    /// The request has no body.
    pub end_of_stream: bool,
}

/// A signed command waiting for its body.
#[derive(Debug, Clone)]
pub struct PendingCommand {
    jwt: VerifiedJwt,
    route: Option<(Module, Action)>,
    /// Its method (the seal binds it).
    method: String,
    /// The path the sidecar serves it at ([`Edge::upstream_path`]).
    path: String,
}

impl PendingCommand {
    /// Who sent it, as the JWT says (for the ledger, should the body be refused).
    pub fn requester(&self) -> Requester {
        Requester {
            sub: self.jwt.sub.clone().unwrap_or_default(),
            roles: self.jwt.roles.join(","),
            token_issuer: self.jwt.iss.clone().unwrap_or_default(),
        }
    }
}

/// The decision on the request head.
#[derive(Debug)]
pub enum HeadDecision {
    /// No authentication needed: forward as is.
    Public,
    /// JWT verified: forward with these headers.
    Forward(Vec<(String, String)>),
    /// Buffer the body, then call [`Edge::on_request_body`].
    AwaitBody(PendingCommand),
    /// Answer with this rejection (and who sent the request, when the JWT verified
    /// before the refusal).
    Reject(Reject, Option<Requester>),
}

/// What the head allows once the token verified.
enum WithToken {
    /// Forward with the token's headers.
    Forward,
    /// Buffer the signed command bound to this route.
    AwaitBody(Option<(Module, Action)>),
}

fn requester_of(v: &VerifiedJwt) -> Requester {
    Requester {
        sub: v.sub.clone().unwrap_or_default(),
        roles: v.roles.join(","),
        token_issuer: v.iss.clone().unwrap_or_default(),
    }
}

/// The header a WebSocket's subprotocols travel in.
pub const WS_PROTOCOL_HEADER: &str = "sec-websocket-protocol";

/// Headers to add upstream.
pub type UpstreamHeaders = Vec<(String, String)>;

/// A signed command the edge let through.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Headers to add upstream.
    pub headers: UpstreamHeaders,
    /// The same bytes were let through before: a resend, which the sidecar answers
    /// (it knows whether the first was applied).
    pub resend: bool,
}

pub use gw_core::contract::header_safe;

/// The sidecar's own control paths, which Envoy rewrites a configured
/// `command_path` and `module_route_prefix` to.
fn is_fixed_control_path(path: &str) -> bool {
    path == contract::COMMAND_PATH || path.starts_with(contract::MODULE_ROUTE_PREFIX)
}

/// The path without query or fragment.
fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// Refuses paths that could mean something else after normalisation upstream.
fn path_is_canonical(p: &str) -> bool {
    let escaped = |code: &str| {
        p.match_indices('%').any(|(i, _)| {
            p.get(i + 1..i + 3)
                .is_some_and(|h| h.eq_ignore_ascii_case(code))
        })
    };
    !(p.contains("//")
        || p.contains('\\')
        || escaped("2f")
        || escaped("5c")
        || escaped("2e")
        || p.split('/').any(|seg| seg == ".." || seg == "."))
}

/// The subprotocol that carries a WebSocket's token: `bearer.<jwt>`.
pub const WS_BEARER_PREFIX: &str = "bearer.";

/// A WebSocket's token from its offered subprotocols. `None` when the request is
/// not a WebSocket upgrade (`GET` with `upgrade: websocket`, as Envoy presents all
/// three HTTP versions' upgrades) or offers no token. The control routes take
/// `POST` only, so a token offered this way never reaches them.
fn websocket_bearer<'a>(head: &RequestHead<'a>) -> Option<Result<&'a str, Reject>> {
    if head.method != "GET" || !head.upgrade?.trim().eq_ignore_ascii_case("websocket") {
        return None;
    }
    let offered = head.websocket_protocols?;
    let mut tokens = offered
        .split(',')
        .map(str::trim)
        .filter_map(|p| p.strip_prefix(WS_BEARER_PREFIX));
    let token = tokens.next()?;
    if tokens.next().is_some() {
        return Some(Err(Reject::new(
            Code::Malformed,
            "more than one `bearer.` subprotocol",
        )));
    }
    if token.is_empty() || without_bearer_offers(offered).is_none_or(|rest| rest.is_empty()) {
        return Some(Err(Reject::new(
            Code::JwtMissing,
            "a WebSocket token goes in `bearer.<jwt>` beside the stream's own subprotocol",
        )));
    }
    Some(Ok(token))
}

/// `sec-websocket-protocol` without its `bearer.` offers (what the upstream may
/// see, possibly empty); `None` when it offers no token. The verify stage rewrites
/// the header with this on every request, whatever the decision, so a token
/// offered this way never travels further than the edge.
pub fn without_bearer_offers(offered: &str) -> Option<String> {
    let all: Vec<&str> = offered
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let rest: Vec<&str> = all
        .iter()
        .copied()
        .filter(|p| !p.starts_with(WS_BEARER_PREFIX))
        .collect();
    (rest.len() < all.len()).then(|| rest.join(", "))
}

fn bearer(auth: Option<&str>) -> Result<&str, Reject> {
    let a = auth.ok_or_else(|| Reject::new(Code::JwtMissing, "no Authorization header"))?;
    let (scheme, token) = a
        .trim()
        .split_once(' ')
        .ok_or_else(|| Reject::new(Code::JwtMissing, "Authorization is not `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Reject::new(
            Code::JwtMissing,
            "Authorization is not `Bearer <token>`",
        ));
    }
    Ok(token.trim())
}

/// The edge filter's state in one worker: settings and the JWT cache.
#[derive(Debug)]
pub struct Edge {
    /// The validated configuration.
    pub settings: Settings,
    cache: RefCell<JwtCache>,
    /// The nonces of this VM's seals.
    pub nonces: gw_core::edge_stamp::Nonces,
}

impl Edge {
    /// Builds the filter state from validated settings; its seals' nonces start
    /// from `origin` (random per VM).
    pub fn new(settings: Settings, origin: u64) -> Edge {
        let cache = RefCell::new(JwtCache::new(settings.jwt_cache_entries));
        Edge {
            settings,
            cache,
            nonces: gw_core::edge_stamp::Nonces::new(origin),
        }
    }

    /// The verified token: `Authorization`, or on a WebSocket upgrade without it
    /// the `bearer.` subprotocol.
    fn token(&self, head: &RequestHead<'_>, now: u64) -> Result<VerifiedJwt, Reject> {
        let token = match (head.authorization, websocket_bearer(head)) {
            (None, Some(ws)) => ws?,
            (auth, _) => bearer(auth)?,
        };
        self.verify_token(token, now)
    }

    fn verify_token(&self, token: &str, now: u64) -> Result<VerifiedJwt, Reject> {
        // No time from the host (0): `exp` cannot be checked, so nothing passes.
        if now == 0 {
            return Err(Reject::with(
                Code::Unavailable,
                "the host gave no time: tokens cannot be checked".to_owned(),
            ));
        }
        let s = &self.settings;
        match self.cache.try_borrow_mut() {
            Ok(mut c) => c.verify(token, &s.jwks, &s.jwt_policy, now),
            // Re-entrancy cannot happen in a single-threaded VM; verify uncached if it did.
            Err(_) => gw_core::jwt::verify_jwt(token, &s.jwks, &s.jwt_policy, now),
        }
    }

    fn role(v: &VerifiedJwt, need: &str) -> Result<(), Reject> {
        if roles::satisfies(&v.roles, need) {
            Ok(())
        } else {
            Err(Reject::with(
                Code::ForbiddenRole,
                format!("this route needs role `{need}`"),
            ))
        }
    }

    fn jwt_headers(v: &VerifiedJwt, verified: Verified) -> UpstreamHeaders {
        let mut out = Vec::with_capacity(6);
        if let Some(sub) = &v.sub {
            out.push((headers::SUB.into(), header_safe(sub).into_owned()));
        }
        out.push((
            headers::ROLES.into(),
            header_safe(&v.roles.join(",")).into_owned(),
        ));
        if let Some(iss) = &v.iss {
            out.push((headers::TOKEN_ISSUER.into(), header_safe(iss).into_owned()));
        }
        if let Some(exp) = v.exp {
            out.push((headers::TOKEN_EXP.into(), exp.to_string()));
        }
        out.push((headers::VERIFIED.into(), verified.as_str().into()));
        out
    }

    /// The path the sidecar serves a request to `path` at, without the query:
    /// Envoy rewrites the filter's `command_path` and `module_route_prefix` to the
    /// sidecar's fixed ones.
    fn upstream_path(&self, path: &str) -> String {
        let s = &self.settings;
        let path = path_only(path);
        if path == s.command_path {
            return contract::COMMAND_PATH.to_owned();
        }
        match path.strip_prefix(s.module_route_prefix.as_str()) {
            Some(spec) => format!("{}{spec}", contract::MODULE_ROUTE_PREFIX),
            None => path.to_owned(),
        }
    }

    /// `stamped` with the edge's seal over them, for a `method` request to the
    /// sidecar's `path`, at `now`, with a new nonce ([`headers::STAMP`]).
    fn sealed(
        &self,
        mut stamped: UpstreamHeaders,
        method: &str,
        path: &str,
        now: u64,
    ) -> UpstreamHeaders {
        let target = gw_core::edge_stamp::Target { method, path };
        let nonce = self.nonces.next();
        let seal = self.settings.edge_key.seal(now, &nonce, target, |name| {
            stamped
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        });
        stamped.push((headers::STAMP.into(), seal));
        stamped
    }

    /// Too large to buffer?
    pub fn body_too_large(&self, size: usize) -> Option<Reject> {
        let max = self.settings.control.max_body;
        (size > max).then(|| Reject::with(Code::TooLarge, format!("body is over {max} bytes")))
    }

    /// Decides on the request head.
    pub fn on_request_headers(&self, head: &RequestHead<'_>, now: u64) -> HeadDecision {
        match self.decide_head(head, now) {
            Ok(d) => d,
            Err((r, who)) => HeadDecision::Reject(r, who),
        }
    }

    fn decide_head(
        &self,
        head: &RequestHead<'_>,
        now: u64,
    ) -> Result<HeadDecision, (Reject, Option<Requester>)> {
        let v = match self.decide_before_token(head)? {
            Some(done) => return Ok(done),
            None => self.token(head, now).map_err(|r| (r, None))?,
        };
        match self.decide_with_token(head, &v) {
            Ok(WithToken::Forward) => Ok(HeadDecision::Forward(self.sealed(
                Self::jwt_headers(&v, Verified::Jwt),
                head.method,
                &self.upstream_path(head.path),
                now,
            ))),
            Ok(WithToken::AwaitBody(route)) => Ok(HeadDecision::AwaitBody(PendingCommand {
                jwt: v,
                route,
                method: head.method.to_owned(),
                path: self.upstream_path(head.path),
            })),
            Err(r) => Err((r, Some(requester_of(&v)))),
        }
    }

    /// What can be decided before the token: the path, the method, the route;
    /// `None` when the token is needed next.
    fn decide_before_token(
        &self,
        head: &RequestHead<'_>,
    ) -> Result<Option<HeadDecision>, (Reject, Option<Requester>)> {
        let s = &self.settings;
        let path = path_only(head.path);
        if !path_is_canonical(path) {
            return Err((
                Reject::new(Code::Malformed, "path is not in canonical form"),
                None,
            ));
        }
        let is_control = path == s.command_path || path.starts_with(&s.module_route_prefix);
        if !is_control && is_fixed_control_path(path) {
            // Configured elsewhere: the sidecar still serves its fixed paths, and a
            // request there would reach them as a plain API call, past the checks
            // the edge makes on its control routes (the replay window, the
            // command's role, the signed body).
            return Err((
                Reject::new(
                    Code::NotFound,
                    "the control routes are at the configured command_path and module_route_prefix",
                ),
                None,
            ));
        }
        if !is_control {
            let rule = s.rule_for(path).ok_or((
                Reject::new(Code::ForbiddenRole, "no access rule covers this path"),
                None,
            ))?;
            if rule.role.is_none() {
                return Ok(Some(HeadDecision::Public));
            }
            return Ok(None);
        }
        if head.method != "POST" {
            return Err((
                Reject::new(Code::MethodNotAllowed, "control endpoints accept POST only"),
                None,
            ));
        }
        Ok(None)
    }

    /// What the verified token allows.
    fn decide_with_token(
        &self,
        head: &RequestHead<'_>,
        v: &VerifiedJwt,
    ) -> Result<WithToken, Reject> {
        let s = &self.settings;
        let path = path_only(head.path);
        let is_command = path == s.command_path;
        let is_module = path.starts_with(&s.module_route_prefix);
        if !is_command && !is_module {
            // A rule with a role (decide_before_token found it).
            let role = s
                .rule_for(path)
                .and_then(|r| r.role.as_deref())
                .unwrap_or(&s.command_role);
            Self::role(v, role)?;
            return Ok(WithToken::Forward);
        }
        Self::role(v, &s.command_role)?;
        let route = if is_module {
            let spec = path
                .strip_prefix(s.module_route_prefix.as_str())
                .unwrap_or("");
            Some(parse_module_spec(spec).ok_or_else(|| {
                Reject::new(Code::Malformed, "route names an unknown module or action")
            })?)
        } else {
            None
        };
        let signed = contract::is_command_media_type(head.content_type);
        if is_module && !signed {
            // The JSON control route: the sidecar builds and signs the command.
            return Ok(WithToken::Forward);
        }
        if !signed {
            return Err(Reject::new(
                Code::UnsupportedMediaType,
                "a signed command is application/x-protobuf (or application/octet-stream)",
            ));
        }
        if let Some(cl) = head.content_length {
            let n: usize = cl
                .trim()
                .parse()
                .map_err(|_| Reject::new(Code::Malformed, "content-length is not a number"))?;
            if let Some(r) = self.body_too_large(n) {
                return Err(r);
            }
        }
        if head.end_of_stream {
            return Err(Reject::new(
                Code::Malformed,
                "a signed command needs a body",
            ));
        }
        Ok(WithToken::AwaitBody(route))
    }

    /// Verifies a buffered signed command and records its nonce in the edge replay
    /// copy; returns the headers to add upstream.
    pub fn on_request_body(
        &self,
        pending: &PendingCommand,
        body: &[u8],
        now: u64,
        store: &impl SharedStore,
    ) -> Result<Checked, Reject> {
        // No time from the host (0): freshness cannot be checked — a command
        // signed at `ts <= max_skew` would pass — so nothing passes.
        if now == 0 {
            return Err(Reject::with(
                Code::Unavailable,
                "the host gave no time: commands cannot be checked".to_owned(),
            ));
        }
        let s = &self.settings;
        // The token was checked at the headers; the body may come up to the
        // route's timeout later, and a token that expired meanwhile carries
        // nothing.
        let jwt = &pending.jwt;
        gw_core::jwt::check_times(jwt.exp, jwt.nbf, jwt.iat, &s.jwt_policy, now)?;
        let v = s.control.check(body, now, pending.route)?;
        let c = &v.command;
        let digest = gw_core::replay::digest(body);
        let outcome = accept_nonce(
            store,
            &s.replay_key_prefix,
            &NonceUse {
                issuer: &c.issuer,
                nonce: c.nonce,
                expires: gw_core::replay::expiry(c.ts, s.control.max_skew),
                digest: &digest,
            },
            now,
            s.replay_limits,
        )?;
        let mut out = Self::jwt_headers(&pending.jwt, Verified::Edge);
        out.push((
            headers::PUBKEY_ID.into(),
            header_safe(&c.pubkey_id).into_owned(),
        ));
        out.push((headers::ISSUER.into(), header_safe(&c.issuer).into_owned()));
        out.push((headers::NONCE.into(), c.nonce.to_string()));
        Ok(Checked {
            headers: self.sealed(out, &pending.method, &pending.path, now),
            resend: outcome == ShardOutcome::Resend,
        })
    }
}
