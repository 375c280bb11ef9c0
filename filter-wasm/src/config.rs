//! Plugin configuration: JSON, parsed and validated once in the root context. An
//! invalid configuration fails plugin start with a clear message.

use gw_core::jwk::{JwkJson, JwkSet};
use gw_core::jwt::JwtPolicy;
use gw_core::keyring::{KeyRing, KeyRingConfig};
use gw_core::replay::{Limits, DEFAULT_MAX_ISSUERS, DEFAULT_MAX_PER_ISSUER};
use gw_core::roles::RouteTable;
use gw_core::ControlPolicy;
use serde::Deserialize;

/// Largest body the filter will buffer.
pub const MAX_BODY_LIMIT: usize = 1024 * 1024;

/// JWKS document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksDoc {
    /// The keys.
    pub keys: Vec<JwkJson>,
}

/// The `jwt` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// Keys that may sign tokens.
    pub jwks: JwksDoc,
    /// Claims policy.
    #[serde(default)]
    pub policy: JwtPolicy,
    /// Verified tokens kept per worker.
    #[serde(default = "default_cache")]
    pub cache_entries: usize,
}

fn default_cache() -> usize {
    1024
}

/// The most verified tokens a worker keeps (each up to the policy's
/// `max_token_bytes`).
const MAX_JWT_CACHE: usize = 16_384;
/// The most bytes of tokens a worker's cache keeps (`cache_entries` ×
/// `max_token_bytes`).
const MAX_JWT_CACHE_BYTES: usize = 64 << 20;

pub use gw_core::roles::RouteRule;

/// The `headers` section: the names of the headers the filter stamps. They are the
/// contract's ([`gw_core::contract::headers`]), which the sidecar reads; the section
/// is accepted for older configurations, and any other name is refused at start (a
/// rename would reach the filter but not the sidecar).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    /// JWT `sub`.
    pub sub: String,
    /// Roles, comma-separated.
    pub roles: String,
    /// The JWT's issuer.
    pub token_issuer: String,
    /// Signing key id.
    pub pubkey_id: String,
    /// Command issuer.
    pub issuer: String,
    /// Command nonce.
    pub nonce: String,
    /// What was verified: `edge` (signed command) or `jwt`.
    pub verified: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        use gw_core::contract::headers as h;
        HeaderNames {
            sub: h::SUB.into(),
            roles: h::ROLES.into(),
            token_issuer: h::TOKEN_ISSUER.into(),
            pubkey_id: h::PUBKEY_ID.into(),
            issuer: h::ISSUER.into(),
            nonce: h::NONCE.into(),
            verified: h::VERIFIED.into(),
        }
    }
}

impl HeaderNames {
    /// Refuses any name other than the contract's.
    fn check(&self) -> Result<(), ConfigError> {
        let want = HeaderNames::default();
        for (field, got, want) in [
            ("sub", &self.sub, &want.sub),
            ("roles", &self.roles, &want.roles),
            ("token_issuer", &self.token_issuer, &want.token_issuer),
            ("pubkey_id", &self.pubkey_id, &want.pubkey_id),
            ("issuer", &self.issuer, &want.issuer),
            ("nonce", &self.nonce, &want.nonce),
            ("verified", &self.verified, &want.verified),
        ] {
            if got != want {
                return Err(invalid(format!(
                    "headers.{field}: header name `{got}` is refused: the sidecar reads `{want}` \
                     (the edge-sidecar contract), so renaming is not supported"
                )));
            }
        }
        Ok(())
    }
}

/// The plugin configuration as written (the verify stage).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// `verify` (default) or `stamp` (see [`crate::stamp`]).
    #[serde(default)]
    pub stage: Option<String>,
    /// Prefix of the shared-data keys handing verified headers to the stamp stage.
    #[serde(default = "default_stamp_prefix")]
    pub stamp_key_prefix: String,
    /// The key the stamped headers are sealed with ([`gw_core::edge_stamp`]), 64
    /// hex digits: the sidecar's `GW_EDGE_KEY_HEX` (read straight into the key,
    /// which never prints).
    #[serde(deserialize_with = "edge_key")]
    pub edge_key_hex: gw_core::edge_stamp::EdgeKey,
    /// Ed25519 command keys.
    pub command_keys: KeyRingConfig,
    /// JWT verification.
    pub jwt: JwtSection,
    /// Access rules (longest matching prefix wins).
    pub routes: Vec<RouteRule>,
    /// Path of the signed-command endpoint.
    #[serde(default = "default_command_path")]
    pub command_path: String,
    /// Prefix of `/api/control/module/{name}:{action}`.
    #[serde(default = "default_module_prefix")]
    pub module_route_prefix: String,
    /// Role needed on the command endpoints.
    #[serde(default = "default_command_role")]
    pub command_role: String,
    /// Largest command body buffered.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Allowed clock skew for commands, seconds.
    #[serde(default = "default_skew")]
    pub max_skew_secs: u64,
    /// Live nonces remembered per issuer (a multiple of 64).
    #[serde(default = "default_max_per_issuer")]
    pub replay_max_per_issuer: usize,
    /// Issuers with live nonces remembered.
    #[serde(default = "default_max_issuers")]
    pub replay_max_issuers: usize,
    /// Prefix of the shared-data keys holding the edge replay state.
    #[serde(default = "default_replay_prefix")]
    pub replay_key_prefix: String,
    /// The stamped headers' names (only the contract's are accepted).
    #[serde(default)]
    pub headers: HeaderNames,
    /// Where rejected control requests are reported for the audit ledger (optional).
    #[serde(default)]
    pub report: Option<crate::report::ReportConfig>,
}

/// Reads `edge_key_hex` into the key; the error names the field, never the value.
/// (The text stays in the host's copy of the plugin configuration anyway.)
fn edge_key<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<gw_core::edge_stamp::EdgeKey, D::Error> {
    let hex = String::deserialize(d)?;
    gw_core::edge_stamp::EdgeKey::from_hex(&hex)
        .map_err(|e| serde::de::Error::custom(format!("edge_key_hex: {e}")))
}

fn default_command_path() -> String {
    gw_core::contract::COMMAND_PATH.into()
}
fn default_module_prefix() -> String {
    gw_core::contract::MODULE_ROUTE_PREFIX.into()
}
fn default_command_role() -> String {
    "admin".into()
}
fn default_max_body() -> usize {
    gw_core::command::DEFAULT_MAX_COMMAND_BYTES
}
fn default_skew() -> u64 {
    gw_core::freshness::DEFAULT_MAX_SKEW_SECS
}
fn default_max_per_issuer() -> usize {
    DEFAULT_MAX_PER_ISSUER
}
fn default_max_issuers() -> usize {
    DEFAULT_MAX_ISSUERS
}
fn default_replay_prefix() -> String {
    "gw.replay.v1.".into()
}
fn default_stamp_prefix() -> String {
    "gw.stamp.v1.".into()
}

/// Configuration of the stamp stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StampConfig {
    /// Always `stamp`.
    pub stage: String,
    /// Must equal the verify stage's `stamp_key_prefix`.
    #[serde(default = "default_stamp_prefix")]
    pub stamp_key_prefix: String,
}

/// Which stage a plugin instance runs.
#[derive(Debug)]
pub enum Stage {
    /// Verify JWTs and commands; hand command headers over by ticket.
    Verify(Box<Settings>),
    /// Swap tickets for the verified headers.
    Stamp(StampConfig),
}

#[derive(Deserialize)]
struct StageProbe {
    #[serde(default)]
    stage: Option<String>,
}

impl Stage {
    /// Parses a plugin configuration of either stage.
    pub fn parse(bytes: &[u8]) -> Result<Stage, ConfigError> {
        let probe: StageProbe = serde_json::from_slice(bytes)?;
        match probe.stage.as_deref() {
            None | Some("verify") => Ok(Stage::Verify(Box::new(Settings::parse(bytes)?))),
            Some("stamp") => Ok(Stage::Stamp(serde_json::from_slice(bytes)?)),
            Some(other) => Err(invalid(format!(
                "stage must be `verify` or `stamp`, got `{other}`"
            ))),
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON of the expected shape.
    #[error("configuration JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Key ring problem.
    #[error("command_keys: {0}")]
    Keys(#[from] gw_core::keyring::KeyRingError),
    /// JWKS problem.
    #[error("jwt.jwks: {0}")]
    Jwks(#[from] gw_core::jwk::KeyError),
    /// Any other invalid value.
    #[error("{0}")]
    Invalid(String),
}

/// The validated configuration.
#[derive(Debug)]
pub struct Settings {
    /// Command verification rules.
    pub control: ControlPolicy,
    /// JWT keys.
    pub jwks: JwkSet,
    /// JWT policy.
    pub jwt_policy: JwtPolicy,
    /// JWT cache size.
    pub jwt_cache_entries: usize,
    /// Rules, longest prefix first.
    pub routes: RouteTable,
    /// Signed-command endpoint.
    pub command_path: String,
    /// Module route prefix.
    pub module_route_prefix: String,
    /// Role for command endpoints.
    pub command_role: String,
    /// How much the edge replay copy may remember.
    pub replay_limits: Limits,
    /// Shared-data key prefix.
    pub replay_key_prefix: String,
    /// Shared-data key prefix for the stamp hand-over.
    pub stamp_key_prefix: String,
    /// Edge-decision reporting, when configured.
    pub report: Option<crate::report::ReportConfig>,
    /// The key the stamped headers are sealed with.
    pub edge_key: gw_core::edge_stamp::EdgeKey,
}

fn invalid(s: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(s.into())
}

impl Settings {
    /// Parses and validates the plugin configuration.
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let c: FilterConfig = serde_json::from_slice(bytes)?;
        let mut keyring = KeyRing::from_config(&c.command_keys)?;
        // Fixed-base tables per key (see gw_core::edverify), paid once here per VM.
        keyring.precompute_tables()?;
        if keyring.is_empty() {
            return Err(invalid(
                "command_keys.keys is empty: no command could ever verify",
            ));
        }
        let jwks = JwkSet::from_json(&c.jwt.jwks.keys)?;
        if jwks.keys.is_empty() {
            return Err(invalid(
                "jwt.jwks.keys is empty: no token could ever verify",
            ));
        }
        c.jwt.policy.validate().map_err(invalid)?;
        c.jwt.policy.validate_keys(&jwks).map_err(invalid)?;
        if c.jwt.cache_entries > MAX_JWT_CACHE {
            return Err(invalid(format!(
                "jwt.cache_entries must be 0..={MAX_JWT_CACHE}"
            )));
        }
        // Each entry keeps its token whole: the cache's bytes are bounded too,
        // per worker VM.
        if c.jwt
            .cache_entries
            .saturating_mul(c.jwt.policy.max_token_bytes)
            > MAX_JWT_CACHE_BYTES
        {
            return Err(invalid(format!(
                "jwt.cache_entries × jwt.policy.max_token_bytes must be at most {MAX_JWT_CACHE_BYTES} bytes"
            )));
        }
        if !gw_core::roles::valid_role_name(&c.command_role) {
            return Err(invalid(
                "command_role must be one role name (no comma, space or control character), as the sidecar's",
            ));
        }
        // Shared-data key spaces: a key of one must never be a key of the other.
        let (r, st) = (&c.replay_key_prefix, &c.stamp_key_prefix);
        if r.is_empty() || st.is_empty() || r.starts_with(st.as_str()) || st.starts_with(r.as_str())
        {
            return Err(invalid(
                "replay_key_prefix and stamp_key_prefix must be non-empty and neither a prefix of the other",
            ));
        }
        if c.max_body_bytes == 0 || c.max_body_bytes > MAX_BODY_LIMIT {
            return Err(invalid(format!(
                "max_body_bytes must be 1..={MAX_BODY_LIMIT}"
            )));
        }
        gw_core::freshness::validate_max_skew(c.max_skew_secs).map_err(invalid)?;
        let replay_limits = Limits {
            max_per_issuer: c.replay_max_per_issuer,
            max_issuers: c.replay_max_issuers,
        };
        replay_limits.validate().map_err(invalid)?;
        let routes = RouteTable::new(c.routes).map_err(invalid)?;
        c.headers.check()?;
        if !c.command_path.starts_with('/') || !c.module_route_prefix.starts_with('/') {
            return Err(invalid(
                "command_path and module_route_prefix must start with '/'",
            ));
        }
        if let Some(r) = &c.report {
            r.validate().map_err(invalid)?;
        }
        Ok(Settings {
            control: ControlPolicy {
                keyring,
                max_skew: c.max_skew_secs,
                max_body: c.max_body_bytes,
            },
            jwks,
            jwt_policy: c.jwt.policy,
            jwt_cache_entries: c.jwt.cache_entries,
            routes,
            command_path: c.command_path,
            module_route_prefix: c.module_route_prefix,
            command_role: c.command_role,
            replay_limits,
            replay_key_prefix: c.replay_key_prefix,
            stamp_key_prefix: c.stamp_key_prefix,
            report: c.report,
            edge_key: c.edge_key_hex,
        })
    }

    /// The rule for `path` (longest prefix), if any.
    pub fn rule_for(&self, path: &str) -> Option<&RouteRule> {
        self.routes.rule_for(path)
    }
}
