//! Sidecar configuration: a JSON file (see `sidecar/config.example.json`), then the
//! original API's environment variables on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use gw_core::jwk::ed25519_from_hex;
use gw_core::keyring::{CommandKey, KeyRing, KeyRingConfig};
use serde::Deserialize;

/// The configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Listen address (HTTP/1.1 and h2c, behind Envoy).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Mutual TLS with the edge: the sidecar's certificate, the CA client
    /// certificates must chain to, and the edge's identities. Required unless
    /// `insecure_plaintext`.
    #[serde(default)]
    pub tls: Option<crate::serve::TlsConfig>,
    /// Plain HTTP without TLS, every caller trusted as the edge: development only,
    /// and only on a loopback `listen` address (logged loudly at start).
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Where `/healthz` and `/metrics` are served (loopback by default; `null`
    /// turns it off). The main listener serves `/healthz` too. Plain HTTP on a
    /// loopback address only; elsewhere `ops_tls` must be set.
    #[serde(default = "default_ops_listen")]
    pub ops_listen: Option<SocketAddr>,
    /// Serve `ops_listen` with the sidecar's mutual TLS (`tls`): its certificate,
    /// and only clients with a certificate from `tls.client_ca` (a scraper's, not
    /// only the edge's). Required for an `ops_listen` beyond loopback.
    #[serde(default)]
    pub ops_tls: bool,
    /// This gateway node's id: its ledger rows form chain `node_id` (also
    /// `GW_NODE_ID`). Letters, digits, `.`, `_`, `-`; at most 64.
    #[serde(default = "default_node_id")]
    pub node_id: String,
    /// Command keys (same format as the filter's `command_keys`).
    #[serde(default)]
    pub command_keys: KeyRingConfig,
    /// Allowed clock skew, seconds.
    #[serde(default = "default_skew")]
    pub max_skew_secs: u64,
    /// Largest command body.
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Fresh nonces the replay guard remembers per issuer (a multiple of 64); beyond
    /// it, fresh commands are refused with `replay_capacity` (429).
    #[serde(default = "default_max_per_issuer")]
    pub replay_max_per_issuer: usize,
    /// Issuers the replay guard remembers nonces of.
    #[serde(default = "default_max_issuers")]
    pub replay_max_issuers: usize,
    /// How long agents remember applied nonces beyond their commands' freshness,
    /// seconds: a redelivery within it is dropped, never applied twice.
    #[serde(default = "default_dedup")]
    pub agent_dedup_secs: u64,
    /// Where durable state lives (the journal, agent state, the ledger spool).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Issuer written into commands the JSON route signs.
    #[serde(default = "default_issuer")]
    pub json_issuer: String,
    /// The role the JSON control route needs in the token the edge verified (the
    /// filter's `command_role`): the sidecar signs those commands itself, so it
    /// checks the role too.
    #[serde(default = "default_command_role")]
    pub command_role: String,
    /// The roles the other API routes need of the token the edge verified: the
    /// filter's `routes`, in the same shape (longest prefix wins). The edge checks
    /// them first; the sidecar checks them again, so that a route table loosened
    /// at the edge, or a request the edge forwarded with no token, reaches no
    /// data plane, model or ledger query. The control routes keep their own
    /// checks (`command_role`, signatures). Default: the shipped table —
    /// `/api/ledger/` and `/api/realtime` for `viewer`, `/api/` for `operator`.
    #[serde(default = "gw_core::roles::default_routes")]
    pub routes: Vec<gw_core::roles::RouteRule>,
    /// Where the edge takes signed commands (the filter's `command_path`): the
    /// console posts them there. The sidecar itself serves them at
    /// `/api/control/commands` (Envoy rewrites the path).
    #[serde(default = "default_command_path")]
    pub command_path: String,
    /// The scheduling slice each of the sidecar's threads asks Linux for, in µs
    /// (100..=100000; 0 asks nothing). Unset: 100 on a node without a `sender`,
    /// nothing with one. Short slices run a woken thread sooner (a command hands
    /// itself between threads five times) but cut longer bursts of work into more
    /// turns: the control path's tail shrinks, the data plane gained nothing
    /// (docs/benchmarks.md). Linux 6.12 or later; older kernels keep theirs.
    #[serde(default)]
    pub sched_slice_us: Option<u64>,
    /// ClickHouse HTTP URL for the audit ledger (e.g. `http://127.0.0.1:8123`);
    /// without it decisions are not audited (development only).
    #[serde(default)]
    pub clickhouse_url: Option<String>,
    /// The ClickHouse user the sidecar writes as (`GW_CLICKHOUSE_USER`); its password
    /// comes from `GW_CLICKHOUSE_PASSWORD` or the file `GW_CLICKHOUSE_PASSWORD_FILE`,
    /// never from this file. A user granted only `SELECT, INSERT` on the ledger's
    /// tables is enough (`gw-sidecar --setup-clickhouse` creates them as an admin).
    #[serde(default)]
    pub clickhouse_user: Option<String>,
    /// The OS priority (nice, 0..=19) ClickHouse runs the ledger's inserts at
    /// (ClickHouse's `os_thread_priority`, applied by a server with `CAP_SYS_NICE`):
    /// they are background work, and a ClickHouse on the gateway's host should
    /// yield to it. 0 leaves the setting out; a server that refuses it gets the
    /// inserts without it (logged).
    #[serde(default = "default_clickhouse_nice")]
    pub clickhouse_nice: u8,
    /// TLS to ClickHouse (its `https_port`; `clickhouse_url` is then `https://`):
    /// the CA its certificate chains to, its name checked against the URL's host,
    /// and the node's client certificate when ClickHouse requires one. Unset: the
    /// password and the ledger's rows travel in plain text (a warning at start
    /// unless the URL's host is a loopback address).
    #[serde(default)]
    pub clickhouse_tls: Option<crate::tls::ClientTls>,
    /// Kafka for the command bus; without it the embedded in-process bus is used.
    #[serde(default)]
    pub kafka: Option<crate::control::bus::KafkaConfig>,
    /// How long a command request waits for its module's agent to apply it.
    #[serde(default = "default_apply_wait")]
    pub apply_wait_ms: u64,
    /// Tree models (`lib{mev,arb}_latest.so` in `dir`); none served without it.
    #[serde(default)]
    pub models: Option<ModelsConfig>,
    /// The transaction sender (TPU and relay routes, hot path, JSON-RPC); off without it.
    #[serde(default)]
    pub sender: Option<crate::sender::SenderConfig>,
    /// The least time between two inserts of ledger rows into ClickHouse while
    /// fewer than 1 000 wait (each insert is a part ClickHouse writes and merges).
    #[serde(default = "default_ledger_ship_every")]
    pub ledger_ship_every_ms: u64,
    /// Rows of the ledger, and of the send audit, kept in memory while they wait
    /// for ClickHouse; beyond it they wait in the journal on disk only and are read
    /// back in order as the rows before them are shipped.
    #[serde(default = "default_audit_memory_rows")]
    pub audit_memory_rows: usize,
    /// Bytes of ledger rows kept in memory while they wait for ClickHouse (a
    /// refusal's row may hold 128 KiB, a command's twice its body): beyond it they
    /// wait on disk only, as beyond `audit_memory_rows`.
    #[serde(default = "default_audit_memory_bytes")]
    pub audit_memory_bytes: usize,
    /// A journal segment is closed and a new one started beyond this size; whole
    /// segments are what the journal deletes, and what its horizon cuts at.
    #[serde(default = "default_journal_segment_bytes")]
    pub journal_segment_bytes: u64,
    /// Rows between two signed ledger checkpoints.
    #[serde(default = "default_checkpoint_rows")]
    pub checkpoint_every_rows: u64,
    /// Seconds between two checkpoints when rows were added.
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_every_secs: u64,
    /// `text` (default) or `json` log lines (also `GW_LOG_FORMAT`).
    #[serde(default)]
    pub log_format: crate::telemetry::LogFormat,
    /// The `/api/realtime` stream's bounds.
    #[serde(default)]
    pub realtime: crate::console::realtime::RealtimeConfig,
}

/// `models` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Directory of the libraries and their `*_latest.so` links.
    pub dir: PathBuf,
    /// Features per row the host feeds every module unless `features` says
    /// otherwise (a library with another count is refused).
    #[serde(default = "default_model_features")]
    pub n_features: u32,
    /// Per-module feature counts, e.g. `{"arbitrage": 12}`.
    #[serde(default)]
    pub features: ModuleFeatures,
    /// How often the links are checked, milliseconds.
    #[serde(default = "default_model_poll")]
    pub poll_ms: u64,
    /// Serve libraries that carry no golden vectors (ABI v1 builds) after the
    /// finite-output self-test only. Off: such a library is refused
    /// (`golden_missing`).
    #[serde(default)]
    pub allow_unverified: bool,
    /// How long opening and checking a library may take, milliseconds (beyond:
    /// refused, `timeout`).
    #[serde(default = "default_model_load_timeout")]
    pub load_timeout_ms: u64,
    /// When set, the SHA-256 digests (hex) of the only libraries that may be
    /// loaded: any other is refused before its code runs (`not_allowed`).
    #[serde(default)]
    pub allowed_sha256: Option<Vec<String>>,
    /// How long a call may stay inside a library's `predict`, milliseconds:
    /// beyond, the library is listed as one the sidecar died inside and the
    /// process ends (it cannot take the call back), and the next start refuses
    /// it (`crashed`).
    #[serde(default = "default_model_predict_timeout")]
    pub predict_timeout_ms: u64,
    /// Modules (`mev`, `arbitrage`) scored by their model alone from the start:
    /// while none serves (its link not placed yet, the directory empty or not
    /// mounted after a restart) their opportunities are not sent. Without it a
    /// module whose link was never seen since start is scored by the
    /// opportunity's own `ev`.
    #[serde(default)]
    pub required: Vec<String>,
}

fn default_model_load_timeout() -> u64 {
    10_000
}

fn default_model_predict_timeout() -> u64 {
    5_000
}

/// `models.features`: a module's feature count where it differs from
/// `models.n_features`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleFeatures {
    /// `mev`.
    pub mev: Option<u32>,
    /// `arbitrage`.
    pub arbitrage: Option<u32>,
}

impl ModelsConfig {
    /// A configuration for `dir` with every default.
    pub fn with_dir(dir: PathBuf) -> ModelsConfig {
        ModelsConfig {
            dir,
            n_features: default_model_features(),
            features: ModuleFeatures::default(),
            poll_ms: default_model_poll(),
            allow_unverified: false,
            load_timeout_ms: default_model_load_timeout(),
            predict_timeout_ms: default_model_predict_timeout(),
            allowed_sha256: None,
            required: Vec::new(),
        }
    }

    /// Features per row of `module`.
    pub fn features_of(&self, module: &str) -> u32 {
        let own = match module {
            "mev" => self.features.mev,
            "arbitrage" => self.features.arbitrage,
            _ => None,
        };
        own.unwrap_or(self.n_features)
    }

    /// What the host checks before a library serves.
    pub fn policy(&self) -> crate::models::LoadPolicy {
        crate::models::LoadPolicy {
            allow_unverified: self.allow_unverified,
            allowed_sha256: self
                .allowed_sha256
                .as_ref()
                .map(|l| std::sync::Arc::new(l.iter().map(|d| d.to_ascii_lowercase()).collect())),
        }
    }
}

fn default_model_features() -> u32 {
    8
}
fn default_model_poll() -> u64 {
    500
}

fn default_checkpoint_rows() -> u64 {
    1000
}
fn default_clickhouse_nice() -> u8 {
    19
}
fn default_ledger_ship_every() -> u64 {
    200
}
fn default_audit_memory_rows() -> usize {
    crate::ledger::ship::MEMORY_ROWS
}
fn default_audit_memory_bytes() -> usize {
    crate::ledger::ship::MEMORY_BYTES
}
fn default_journal_segment_bytes() -> u64 {
    crate::journal::Options::default().segment_bytes
}
fn default_checkpoint_secs() -> u64 {
    60
}
fn default_ops_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
}
fn default_node_id() -> String {
    "node-1".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_skew() -> u64 {
    gw_core::freshness::DEFAULT_MAX_SKEW_SECS
}
fn default_body() -> usize {
    gw_core::command::DEFAULT_MAX_COMMAND_BYTES
}
fn default_max_per_issuer() -> usize {
    gw_core::replay::DEFAULT_MAX_PER_ISSUER
}
fn default_max_issuers() -> usize {
    gw_core::replay::DEFAULT_MAX_ISSUERS
}
/// The longest `agent_dedup_secs` (30 days): an agent remembers each applied nonce
/// that long beyond its command's freshness.
const MAX_DEDUP_SECS: u64 = 30 * 86_400;

fn default_dedup() -> u64 {
    600
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(".run/sidecar")
}
fn default_apply_wait() -> u64 {
    2000
}
fn default_issuer() -> String {
    "dashboard".into()
}

fn default_command_role() -> String {
    "admin".into()
}

fn default_command_path() -> String {
    gw_core::contract::COMMAND_PATH.into()
}

impl FileConfig {
    /// The replay guard's bounds.
    pub fn replay_limits(&self) -> gw_core::replay::Limits {
        gw_core::replay::Limits {
            max_per_issuer: self.replay_max_per_issuer,
            max_issuers: self.replay_max_issuers,
        }
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// Whether `id` may name a node: 1..=64 letters, digits, '.', '_' or '-'.
pub fn node_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The validated configuration.
pub struct Config {
    /// File values.
    pub file: FileConfig,
    /// Verification keys (file keys plus `CTRL_PUBKEY_HEX`).
    pub keyring: KeyRing,
    /// The JSON route's signing key and its id (`CTRL_SIGN_SK_HEX`, `CTRL_PUBKEY_ID`).
    pub signer: Option<(SigningKey, String)>,
    /// The TPU client identity (`GW_TPU_IDENTITY_HEX`, `sender.identity_hex`, or fresh).
    pub tpu_identity: Option<SigningKey>,
    /// The key that signs ledger checkpoints (`GW_LEDGER_SK_HEX`).
    pub ledger_key: Option<SigningKey>,
    /// The key that signs this node's module state records in Kafka
    /// (`GW_STATE_SK_HEX`; unset: [`Config::state_signer`] keeps one in
    /// `state_dir`).
    pub state_key: Option<SigningKey>,
    /// The key the edge seals its stamp with (`GW_EDGE_KEY_HEX`, the filter's
    /// `edge_key_hex`); never logged.
    pub edge_key: gw_core::edge_stamp::EdgeKey,
    /// The edge key before a change, still believed while Envoy's filters move to
    /// the new one (`GW_EDGE_KEY_PREV_HEX`); never logged.
    pub edge_key_prev: Option<gw_core::edge_stamp::EdgeKey>,
    /// The ClickHouse password (`GW_CLICKHOUSE_PASSWORD[_FILE]`); never logged.
    pub clickhouse_password: Option<String>,
    /// What the sidecar says once its log is set up (and `--check` prints): files
    /// of secrets others than their owner may read.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("file", &self.file)
            .field("keys", &self.keyring.len())
            .field("signer", &self.signer.as_ref().map(|(_, id)| id))
            .field(
                "clickhouse_password",
                &self.clickhouse_password.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

/// A configuration value outside what the sidecar accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct OutOfBounds {
    /// The key, as written in the configuration (`sender.tpu.max_streams`).
    pub key: &'static str,
    /// What it must be.
    pub reason: String,
}

impl OutOfBounds {
    /// `key` is out of bounds: `reason`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> OutOfBounds {
        OutOfBounds {
            key,
            reason: reason.into(),
        }
    }
}

/// Why the configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("config file {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not a configuration.
    #[error("config file {0}: {1}")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// Bad key ring.
    #[error("command_keys: {0}")]
    Keys(#[from] gw_core::keyring::KeyRingError),
    /// Bad environment value (never echoes secrets).
    #[error("environment variable {0}: {1}")]
    Env(&'static str, String),
    /// A value out of bounds.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    /// Nothing could ever verify.
    #[error("no command keys: give command_keys in the config file or CTRL_PUBKEY_HEX")]
    NoKeys,
    /// No key to check the edge's seal with: no stamp could be believed.
    #[error(
        "no edge key: set GW_EDGE_KEY_HEX (or GW_EDGE_KEY_FILE, a file holding it) to \
         the edge filter's edge_key_hex (the key its stamp is sealed with)"
    )]
    NoEdgeKey,
}

/// The configuration file at `path`, or the defaults.
fn read_file(path: Option<&std::path::Path>) -> Result<FileConfig, ConfigError> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.into(), e))?;
            serde_json::from_str(&text).map_err(|e| ConfigError::Parse(p.into(), e))?
        }
        None => FileConfig::default(),
    })
}

/// Applies `GW_CLICKHOUSE_URL` and `GW_CLICKHOUSE_USER` to `file`; returns the
/// password (`GW_CLICKHOUSE_PASSWORD`, or the file `GW_CLICKHOUSE_PASSWORD_FILE`;
/// both set is refused, as for every other secret: a variable left exported in a
/// shell must not win over the file a deployment gives).
fn clickhouse_env(
    file: &mut FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    if let Some(u) = env("GW_CLICKHOUSE_URL") {
        file.clickhouse_url = Some(u);
    }
    if let Some(u) = env("GW_CLICKHOUSE_USER").filter(|u| !u.trim().is_empty()) {
        file.clickhouse_user = Some(u);
    }
    not_both(env, "GW_CLICKHOUSE_PASSWORD", "GW_CLICKHOUSE_PASSWORD_FILE")?;
    let password = match (
        env("GW_CLICKHOUSE_PASSWORD"),
        env("GW_CLICKHOUSE_PASSWORD_FILE"),
    ) {
        (Some(p), _) => Some(p),
        (None, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .map_err(|e| ConfigError::Read(f.clone().into(), e))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    check_clickhouse(file)?;
    Ok(password)
}

/// `clickhouse_url` and `clickhouse_tls` agree: an `https://` URL has the CA to
/// check the server with, TLS files are not given for a plain `http://` URL, and
/// the files are there and hold what they should.
fn check_clickhouse(file: &FileConfig) -> Result<(), ConfigError> {
    let Some(url) = &file.clickhouse_url else {
        return match file.clickhouse_tls {
            Some(_) => Err(OutOfBounds::new("clickhouse_tls", "needs clickhouse_url").into()),
            None => Ok(()),
        };
    };
    let parsed = reqwest::Url::parse(url)
        .ok()
        .filter(|u| u.host_str().is_some())
        .ok_or_else(|| OutOfBounds::new("clickhouse_url", "not a URL (http://host:port)"))?;
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        // A user or password in it would be shown by `--check` and the logs (and
        // the client drops query parameters anyway).
        return Err(OutOfBounds::new(
            "clickhouse_url",
            "is scheme://host:port only: give the user and password as GW_CLICKHOUSE_USER and GW_CLICKHOUSE_PASSWORD(_FILE)",
        )
        .into());
    }
    match (parsed.scheme(), &file.clickhouse_tls) {
        ("https", Some(t)) => {
            t.check("clickhouse_tls")?;
            t.client_config()
                .map_err(|e| OutOfBounds::new("clickhouse_tls", e.to_string()))?;
            Ok(())
        }
        ("https", None) => Err(OutOfBounds::new(
            "clickhouse_tls",
            "an https:// clickhouse_url needs clickhouse_tls.ca (the CA ClickHouse's certificate chains to)",
        )
        .into()),
        ("http", Some(_)) => Err(OutOfBounds::new(
            "clickhouse_url",
            "is http:// but clickhouse_tls is set: use https:// (ClickHouse's https_port)",
        )
        .into()),
        ("http", None) => Ok(()),
        _ => Err(OutOfBounds::new("clickhouse_url", "must be http:// or https://").into()),
    }
}

/// `Err` when a secret is given both as the variable `name` and as the file
/// `file_var` names: which one was meant cannot be told (a variable left
/// exported in a shell must not win over a deployment's file). Never echoes
/// either.
fn not_both(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    file_var: &'static str,
) -> Result<(), ConfigError> {
    if env(name).is_some() && env(file_var).is_some() {
        return Err(ConfigError::Env(
            file_var,
            format!("set {name} or {file_var}, not both"),
        ));
    }
    Ok(())
}

/// The edge key: `GW_EDGE_KEY_HEX`, or the file `GW_EDGE_KEY_FILE` names (one
/// of them). Errors never echo the key.
fn edge_key(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<gw_core::edge_stamp::EdgeKey, ConfigError> {
    not_both(env, "GW_EDGE_KEY_HEX", "GW_EDGE_KEY_FILE")?;
    let (name, hex) = match (env("GW_EDGE_KEY_HEX"), env("GW_EDGE_KEY_FILE")) {
        (Some(hex), _) => ("GW_EDGE_KEY_HEX", zeroize::Zeroizing::new(hex)),
        (None, Some(path)) => (
            "GW_EDGE_KEY_FILE",
            zeroize::Zeroizing::new(
                std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::Env("GW_EDGE_KEY_FILE", format!("{path}: {e}")))?,
            ),
        ),
        (None, None) => return Err(ConfigError::NoEdgeKey),
    };
    edge_key_from(name, &hex)
}

/// The edge key in `hex`, read from `name`; errors never echo it.
fn edge_key_from(
    name: &'static str,
    hex: &str,
) -> Result<gw_core::edge_stamp::EdgeKey, ConfigError> {
    gw_core::edge_stamp::EdgeKey::from_hex(hex).map_err(|e| ConfigError::Env(name, e.to_string()))
}

/// The largest `max_body_bytes`: the filter's bound on a command body.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Secrets an environment variable gives, or the file another names (`_FILE`:
/// Docker's and systemd's secrets are files, and a variable is shown by
/// `docker inspect` and inherited by every child process).
const SECRET_FILES: [(&str, &str); 6] = [
    ("CTRL_SIGN_SK_HEX", "CTRL_SIGN_SK_HEX_FILE"),
    ("GW_LEDGER_SK_HEX", "GW_LEDGER_SK_HEX_FILE"),
    ("GW_TPU_IDENTITY_HEX", "GW_TPU_IDENTITY_HEX_FILE"),
    ("GW_RELAY_AUTH", "GW_RELAY_AUTH_FILE"),
    ("GW_STATE_SK_HEX", "GW_STATE_SK_HEX_FILE"),
    ("GW_EDGE_KEY_PREV_HEX", "GW_EDGE_KEY_PREV_FILE"),
];

/// The secrets of [`SECRET_FILES`] read from their files (trailing whitespace
/// cut), and a warning for each file others than its owner may read. Both a
/// variable and its file set is refused; errors never echo a secret.
#[allow(clippy::type_complexity)]
fn secrets_from_files(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<(&'static str, zeroize::Zeroizing<String>)>, Vec<String>), ConfigError> {
    let (mut read, mut warnings) = (Vec::new(), Vec::new());
    for (name, file_var) in SECRET_FILES {
        not_both(env, name, file_var)?;
        let Some(path) = env(file_var) else { continue };
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::Env(file_var, format!("{path}: {e}")))?,
        );
        warnings.extend(readable_by_others(file_var, Path::new(&path)));
        read.push((name, zeroize::Zeroizing::new(text.trim_end().to_owned())));
    }
    Ok((read, warnings))
}

/// A warning when the secret file at `path` (given as `what`) may be read by
/// others than its owner.
/// A file with an access ACL (`setfacl`) shows its ACL's mask in the group
/// bits: who may read it is the ACL's to say (`compose-init.sh` gives a secret
/// to its owner and one container's user that way), so only its bits for
/// everyone count then.
pub fn readable_by_others(what: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    let acl = has_access_acl(path);
    let others = if acl { 0o007 } else { 0o077 };
    (mode & others != 0).then(|| {
        format!(
            "{what}: {} may be read by others than its owner (mode {:o}{}): chmod 600",
            path.display(),
            mode & 0o777,
            if acl { " and an ACL" } else { "" }
        )
    })
}

/// Whether the file at `path` has an access ACL (`system.posix_acl_access`).
#[allow(unsafe_code)]
fn has_access_acl(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated and outlive the call; a null
    // buffer of size 0 asks only for the attribute's size, writing nothing.
    unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        ) >= 0
    }
}

/// The Ed25519 key (32-byte seed, hex) in environment variable `name`, if set
/// (its value is never echoed).
fn secret_key(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<SigningKey>, ConfigError> {
    env(name)
        .map(|h| {
            gw_core::jwk::ed25519_secret_from_hex(&h)
                .map_err(|e| ConfigError::Env(name, e.to_string()))
        })
        .transpose()
}

/// Whether a request to `url` crosses a network in plain text: `http://` to a
/// host that is not a loopback address (`localhost` counts as loopback).
pub fn in_clear(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    gw_core::transport::plain_beyond_loopback(u.scheme(), u.host_str().unwrap_or_default())
}

/// A ClickHouse client for `file`'s URL, user and TLS.
fn client(
    file: &FileConfig,
    password: Option<&str>,
) -> Result<Option<clickhouse::Client>, crate::tls::TlsError> {
    let Some(url) = &file.clickhouse_url else {
        return Ok(None);
    };
    let mut c = match &file.clickhouse_tls {
        // Idle connections are kept 2 s (ClickHouse closes them after 3 s), as
        // the crate's own client does.
        Some(t) => clickhouse::Client::with_http_client(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(std::time::Duration::from_secs(2))
                .build(https_connector(t)?),
        ),
        None => clickhouse::Client::default(),
    }
    .with_url(url.clone());
    if let Some(u) = &file.clickhouse_user {
        c = c.with_user(u.clone());
    }
    if let Some(p) = password {
        c = c.with_password(p.to_owned());
    }
    Ok(Some(c))
}

/// The connector under a ClickHouse client over TLS: HTTPS only (a server that
/// answers in plain text is refused), HTTP/1.1.
fn https_connector(
    tls: &crate::tls::ClientTls,
) -> Result<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    crate::tls::TlsError,
> {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.set_keepalive(Some(std::time::Duration::from_secs(60)));
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.client_config()?)
        .https_only()
        .enable_http1()
        .wrap_connector(tcp))
}

impl Config {
    /// Kafka bus: what signs this node's module state records and verifies every
    /// node's (the key of `GW_STATE_SK_HEX`, or the one kept in
    /// `{state_dir}/state.sk.hex`, created when missing). `None` without Kafka.
    pub fn state_signer(
        &self,
    ) -> Result<Option<crate::control::state_sign::StateSigner>, anyhow::Error> {
        let Some(k) = &self.file.kafka else {
            return Ok(None);
        };
        let key = match &self.state_key {
            Some(key) => key.clone(),
            None => crate::control::state_sign::node_key(&self.file.state_dir)?,
        };
        Ok(Some(crate::control::state_sign::StateSigner::new(
            &self.file.node_id,
            key,
            &k.state_keys,
            k.state_recovery,
        )?))
    }

    /// The scheduling slice to ask for, µs (0: the kernel's): `sched_slice_us`, or
    /// unset, [`crate::sched::DEFAULT_US`] on a node without a sender (what is
    /// measured to help the control path) and the kernel's with one (what is
    /// measured to keep the data plane's paced tail).
    pub fn sched_slice_us(&self) -> u64 {
        self.file
            .sched_slice_us
            .unwrap_or(if self.file.sender.is_some() {
                0
            } else {
                crate::sched::DEFAULT_US
            })
    }

    /// The ClickHouse client of the ledger and the send audit, with the configured
    /// user and password; `None` without `clickhouse_url`.
    pub fn clickhouse(&self) -> Result<Option<clickhouse::Client>, crate::tls::TlsError> {
        client(&self.file, self.clickhouse_password.as_deref())
    }

    /// How the sidecar reaches ClickHouse, for a person: `plain text`, `TLS` or
    /// `mutual TLS`.
    pub fn clickhouse_transport(&self) -> &'static str {
        crate::tls::ClientTls::transport(self.file.clickhouse_tls.as_ref())
    }

    /// Whether the sidecar's ClickHouse password and ledger rows would cross a
    /// network in plain text: an `http://` URL whose host is not a loopback
    /// address (`localhost` counts as loopback).
    pub fn clickhouse_in_clear(&self) -> bool {
        self.file.clickhouse_url.as_deref().is_some_and(in_clear)
    }

    /// Only the ClickHouse client of `path` and `env` (what `--setup-clickhouse`
    /// needs: no keys, no listener), and whether it talks in plain text beyond
    /// loopback ([`in_clear`]).
    pub fn clickhouse_only(
        path: Option<&std::path::Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<(clickhouse::Client, bool)>, ConfigError> {
        let mut file = read_file(path)?;
        let password = clickhouse_env(&mut file, env)?;
        let clear = file.clickhouse_url.as_deref().is_some_and(in_clear);
        Ok(client(&file, password.as_deref())
            .map_err(|e| OutOfBounds::new("clickhouse_tls", e.to_string()))?
            .map(|c| (c, clear)))
    }

    /// Loads `path` (if any), then applies `env` (the original API's variables:
    /// `CTRL_SIGN_SK_HEX`, `CTRL_PUBKEY_HEX`, `CTRL_PUBKEY_ID`; and `GW_SIDECAR_LISTEN`).
    pub fn load(
        path: Option<&std::path::Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Self::resolve(read_file(path)?, env)
    }

    /// Parses the configuration file's text `json` (named `origin` in errors), then
    /// applies `env`, as [`Config::load`] does.
    pub fn from_json(
        json: &str,
        origin: &std::path::Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = serde_json::from_str(json).map_err(|e| ConfigError::Parse(origin.into(), e))?;
        Self::resolve(file, env)
    }

    fn resolve(
        mut file: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (from_files, mut warnings) = secrets_from_files(env)?;
        let with_files = |k: &str| {
            env(k).or_else(|| {
                from_files
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.as_str().to_owned())
            })
        };
        let env: &dyn Fn(&str) -> Option<String> = &with_files;
        let clickhouse_password = clickhouse_env(&mut file, env)?;
        if let Some(b) = env("GW_KAFKA_BROKERS").filter(|b| !b.trim().is_empty()) {
            match &mut file.kafka {
                Some(k) => k.brokers = b,
                None => file.kafka = Some(crate::control::bus::KafkaConfig::with_brokers(&b)),
            }
        }
        if let Some(d) = env("GW_MODELS_DIR").filter(|d| !d.trim().is_empty()) {
            match &mut file.models {
                Some(m) => m.dir = PathBuf::from(d),
                None => file.models = Some(ModelsConfig::with_dir(PathBuf::from(d))),
            }
        }
        if let Some(f) = env("GW_LOG_FORMAT").filter(|f| !f.trim().is_empty()) {
            file.log_format = f
                .trim()
                .parse()
                .map_err(|e| ConfigError::Env("GW_LOG_FORMAT", e))?;
        }
        if let Some(n) = env("GW_NODE_ID").filter(|n| !n.trim().is_empty()) {
            file.node_id = n.trim().to_owned();
        }
        if !node_id_ok(&file.node_id) {
            return Err(OutOfBounds::new(
                "node_id",
                "must be 1..=64 letters, digits, '.', '_' or '-'",
            )
            .into());
        }
        if !gw_core::roles::valid_role_name(&file.command_role) {
            return Err(OutOfBounds::new("command_role", "must be one role name").into());
        }
        if let Err(e) = gw_core::roles::RouteTable::new(file.routes.clone()) {
            return Err(OutOfBounds::new("routes", e).into());
        }
        // Not `//…`: the page fetches it, and a browser reads `//host/x` as
        // another host (the edge refuses such a path anyway).
        let path_ok = |p: &str| {
            p.starts_with('/')
                && !p.contains("//")
                && p.len() <= 256
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.~:".contains(&b))
        };
        if !path_ok(&file.command_path) {
            return Err(OutOfBounds::new(
                "command_path",
                "must start with '/', hold no '//' and only letters, digits and / - _ . ~ : (at most 256)",
            )
            .into());
        }
        if file
            .sched_slice_us
            .is_some_and(|us| us != 0 && !crate::sched::RANGE_US.contains(&us))
        {
            return Err(OutOfBounds::new("sched_slice_us", "must be 0 or 100..=100000").into());
        }
        gw_core::freshness::validate_max_skew(file.max_skew_secs)
            .map_err(|e| OutOfBounds::new("max_skew_secs", e))?;
        if file.agent_dedup_secs > MAX_DEDUP_SECS {
            return Err(
                OutOfBounds::new("agent_dedup_secs", "must be 0..=2592000 (30 days)").into(),
            );
        }
        if !(1..=MAX_BODY_BYTES).contains(&file.max_body_bytes) {
            return Err(OutOfBounds::new("max_body_bytes", "must be 1..=1048576 (1 MiB)").into());
        }
        if file.kafka.is_some() && file.max_body_bytes > crate::control::bus::MAX_COMMAND_BYTES {
            return Err(OutOfBounds::new(
                "max_body_bytes",
                "must be at most 917504 (896 KiB) on the Kafka bus: a command, its headers and the record's framing must fit the producer's message.max.bytes (1000000)",
            )
            .into());
        }
        if file.clickhouse_nice > 19 {
            return Err(OutOfBounds::new("clickhouse_nice", "must be 0..=19").into());
        }
        if file.ledger_ship_every_ms > 10_000 {
            return Err(OutOfBounds::new("ledger_ship_every_ms", "must be 0..=10000").into());
        }
        if !(100..=10_000_000).contains(&file.audit_memory_rows) {
            return Err(OutOfBounds::new("audit_memory_rows", "must be 100..=10000000").into());
        }
        if !((1 << 20)..=(1 << 40)).contains(&file.audit_memory_bytes) {
            return Err(
                OutOfBounds::new("audit_memory_bytes", "must be 1048576..=1099511627776").into(),
            );
        }
        if !((64 << 10)..=(1 << 30)).contains(&file.journal_segment_bytes) {
            return Err(
                OutOfBounds::new("journal_segment_bytes", "must be 65536..=1073741824").into(),
            );
        }
        if let Some(m) = &file.models {
            // An opportunity carries at most MAX_FEATURES: a model wider than
            // that would load and answer /predict, and never score one.
            let most = crate::sender::http::MAX_FEATURES;
            for (key, n) in [
                ("models.n_features", Some(m.n_features)),
                ("models.features.mev", m.features.mev),
                ("models.features.arbitrage", m.features.arbitrage),
            ] {
                if n.is_some_and(|n| n == 0 || n as usize > most) {
                    return Err(OutOfBounds::new(
                        key,
                        format!("must be 1..={most} (the most features an opportunity carries)"),
                    )
                    .into());
                }
            }
            if let Some(m) = m.required.iter().find(|m| {
                !gw_core::Module::ALL
                    .iter()
                    .any(|x| x.as_str() == m.as_str())
            }) {
                return Err(OutOfBounds::new(
                    "models.required",
                    format!("`{}` is no module (mev, arbitrage)", m.escape_debug()),
                )
                .into());
            }
            if !(100..=600_000).contains(&m.load_timeout_ms) {
                return Err(
                    OutOfBounds::new("models.load_timeout_ms", "must be 100..=600000").into(),
                );
            }
            if !(100..=600_000).contains(&m.predict_timeout_ms) {
                return Err(
                    OutOfBounds::new("models.predict_timeout_ms", "must be 100..=600000").into(),
                );
            }
            let digest = |d: &String| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit());
            if m.allowed_sha256
                .as_ref()
                .is_some_and(|l| !l.iter().all(digest))
            {
                return Err(OutOfBounds::new(
                    "models.allowed_sha256",
                    "must be SHA-256 digests, 64 hex digits each",
                )
                .into());
            }
        }
        if let Some(l) = env("GW_SIDECAR_LISTEN") {
            file.listen = l
                .parse()
                .map_err(|e| ConfigError::Env("GW_SIDECAR_LISTEN", format!("{e}")))?;
        }
        if let Some(l) = env("GW_OPS_LISTEN") {
            file.ops_listen = match l.trim() {
                "" | "off" => None,
                a => Some(
                    a.parse()
                        .map_err(|e| ConfigError::Env("GW_OPS_LISTEN", format!("{e}")))?,
                ),
            };
        }
        let tls_env = (
            env("GW_SIDECAR_TLS_CERT"),
            env("GW_SIDECAR_TLS_KEY"),
            env("GW_SIDECAR_CLIENT_CA"),
        );
        if matches!(
            tls_env,
            (Some(_), None, _) | (None, Some(_), _) | (_, Some(_), None) | (_, None, Some(_))
        ) {
            // One of them alone was silently ignored: the file's (or no) TLS
            // stood, and the operator believed otherwise.
            return Err(ConfigError::Env(
                "GW_SIDECAR_TLS_CERT",
                "set GW_SIDECAR_TLS_CERT, GW_SIDECAR_TLS_KEY and GW_SIDECAR_CLIENT_CA together, or none".into(),
            ));
        }
        if let (Some(cert), Some(key), Some(ca)) = tls_env {
            let edge = file
                .tls
                .as_ref()
                .map_or_else(|| vec!["envoy.local".into()], |t| t.edge_identities.clone());
            file.tls = Some(crate::serve::TlsConfig {
                cert: cert.into(),
                key: key.into(),
                client_ca: ca.into(),
                edge_identities: edge,
            });
        }
        if let (Some(t), Some(ids)) = (&mut file.tls, env("GW_EDGE_IDENTITIES")) {
            t.edge_identities = ids
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        // A flag set in the environment: `1` or `true`.
        let set = |v: &str| v == "1" || v == "true";
        if env("GW_SIDECAR_INSECURE_PLAINTEXT").is_some_and(|v| set(&v)) {
            file.insecure_plaintext = true;
        }
        if let Some(v) = env("GW_OPS_TLS") {
            file.ops_tls = set(&v);
        }

        file.replay_limits()
            .validate()
            .map_err(|reason| OutOfBounds::new("replay_max_per_issuer", reason))?;
        file.realtime.validate()?;
        let key_id = env("CTRL_PUBKEY_ID").unwrap_or_else(|| "op-admin-1".into());
        let from_env = match env("CTRL_PUBKEY_HEX") {
            Some(pk) => Some(
                ed25519_from_hex(&pk)
                    .map_err(|e| ConfigError::Env("CTRL_PUBKEY_HEX", e.to_string()))?,
            ),
            None => None,
        };
        // The environment wins over the file's key of the same id (scope kept),
        // before the file's keys are read: the example's is a placeholder that
        // is refused (it was a key made from a known seed, which anyone could sign
        // with, and trusted by whoever kept it).
        let mut keys = file.command_keys.clone();
        let replaced = from_env.and_then(|vk| {
            let k = keys.keys.iter_mut().find(|k| k.id == key_id)?;
            k.public_key_hex = Some(hex::encode(vk.as_bytes()));
            k.jwk = None;
            Some(())
        });
        let mut keyring = KeyRing::from_config(&keys)?;
        if let (Some(vk), None) = (from_env, replaced) {
            keyring.insert(CommandKey::unrestricted(key_id.clone(), vk))?;
        }
        let signer = match env("CTRL_SIGN_SK_HEX") {
            Some(sk) => {
                let sk = gw_core::jwk::ed25519_secret_from_hex(&sk)
                    .map_err(|e| ConfigError::Env("CTRL_SIGN_SK_HEX", e.to_string()))?;
                // The sidecar must be able to verify what it signs: a key of that
                // id that is another key, or may sign none of the JSON route's
                // commands, would refuse every one of them as the caller's fault.
                match keyring.get(&key_id) {
                    None => keyring
                        .insert(CommandKey::unrestricted(key_id.clone(), sk.verifying_key()))?,
                    Some(k) if *k.key() != sk.verifying_key() => {
                        return Err(ConfigError::Env(
                            "CTRL_SIGN_SK_HEX",
                            format!("its public key is not command key `{key_id}`'s (CTRL_PUBKEY_ID): every command the JSON route signs would fail verification; give the signer its own CTRL_PUBKEY_ID, or the key's own secret"),
                        ));
                    }
                    Some(k) => {
                        let signs_any = gw_core::Module::ALL.iter().any(|m| {
                            gw_core::Action::ALL
                                .iter()
                                .any(|a| k.check_scope(&file.json_issuer, *m, *a).is_ok())
                        });
                        if !signs_any {
                            return Err(ConfigError::Env(
                                "CTRL_SIGN_SK_HEX",
                                format!("command key `{key_id}` (CTRL_PUBKEY_ID) may sign no command for json_issuer `{}`: every command the JSON route signs would be refused key_scope", file.json_issuer),
                            ));
                        }
                    }
                }
                Some((sk, key_id))
            }
            None => None,
        };
        if keyring.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        let tpu_identity = match &mut file.sender {
            Some(s) => {
                if let (Some(r), Some(auth)) = (&mut s.relay, env("GW_RELAY_AUTH")) {
                    r.auth = Some(auth);
                }
                s.validate()?;
                Some(
                    crate::sender::plane::identity(s, env)
                        .map_err(|e| ConfigError::Env("GW_TPU_IDENTITY_HEX", e.to_string()))?,
                )
            }
            None => None,
        };
        match (&file.tls, file.insecure_plaintext) {
            (Some(_), true) => {
                return Err(OutOfBounds::new(
                    "insecure_plaintext",
                    "cannot be set together with tls",
                )
                .into())
            }
            (None, false) => {
                return Err(OutOfBounds::new(
                    "tls",
                    "configure mutual TLS with the edge (tls.cert, tls.key, tls.client_ca), \
                     or insecure_plaintext for a loopback development bind",
                )
                .into())
            }
            (None, true) if !file.listen.ip().is_loopback() => {
                return Err(OutOfBounds::new(
                    "insecure_plaintext",
                    format!(
                        "plain HTTP is allowed on a loopback address only, not {}",
                        file.listen
                    ),
                )
                .into())
            }
            _ => {}
        }
        // Metrics say what the node trades and refuses: nobody reads them for
        // reaching a port beyond this host.
        match (file.ops_listen, file.ops_tls, &file.tls) {
            (None, true, _) => {
                return Err(OutOfBounds::new(
                    "ops_tls",
                    "set without ops_listen: there is no ops listener to serve with TLS",
                )
                .into())
            }
            (Some(_), true, None) => {
                return Err(OutOfBounds::new(
                    "ops_tls",
                    "needs the sidecar's mutual TLS (tls.cert, tls.key, tls.client_ca)",
                )
                .into())
            }
            (Some(a), false, _) if !a.ip().is_loopback() => {
                return Err(OutOfBounds::new(
                    "ops_listen",
                    format!(
                        "plain HTTP is allowed on a loopback address only, not {a}: \
                         set ops_tls (mutual TLS, clients from tls.client_ca) to serve it there"
                    ),
                )
                .into())
            }
            _ => {}
        }
        let ledger_key = secret_key(env, "GW_LEDGER_SK_HEX")?;
        let state_key = secret_key(env, "GW_STATE_SK_HEX")?;
        let edge_key = edge_key(env)?;
        let edge_key_prev = env("GW_EDGE_KEY_PREV_HEX")
            .map(|hex| edge_key_from("GW_EDGE_KEY_PREV_HEX", &zeroize::Zeroizing::new(hex)))
            .transpose()?;
        if let Some(k) = &file.kafka {
            crate::control::state_sign::parse_keys(&k.state_keys)?;
            if k.max_outbox_commands == 0 {
                return Err(
                    OutOfBounds::new("kafka.max_outbox_commands", "must be at least 1").into(),
                );
            }
            if k.max_outbox_bytes < 1 << 20 {
                return Err(OutOfBounds::new(
                    "kafka.max_outbox_bytes",
                    "must be at least 1048576 (1 MiB)",
                )
                .into());
            }
            if let Some(t) = &k.tls {
                t.check("kafka.tls")?;
            }
        }
        for (what, path) in [
            (
                "GW_EDGE_KEY_FILE",
                env("GW_EDGE_KEY_FILE").map(PathBuf::from),
            ),
            (
                "GW_CLICKHOUSE_PASSWORD_FILE",
                env("GW_CLICKHOUSE_PASSWORD_FILE").map(PathBuf::from),
            ),
            ("tls.key", file.tls.as_ref().map(|t| t.key.clone())),
            (
                "kafka.tls.key",
                file.kafka
                    .as_ref()
                    .and_then(|k| k.tls.as_ref())
                    .and_then(|t| t.key.clone()),
            ),
            (
                "clickhouse_tls.key",
                file.clickhouse_tls.as_ref().and_then(|t| t.key.clone()),
            ),
        ] {
            warnings.extend(path.and_then(|p| readable_by_others(what, &p)));
        }
        Ok(Config {
            file,
            keyring,
            signer,
            tpu_identity,
            ledger_key,
            state_key,
            edge_key,
            edge_key_prev,
            clickhouse_password,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(json: &str) -> Result<Config, ConfigError> {
        let pk = hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes());
        let env = move |k: &str| match k {
            "CTRL_PUBKEY_HEX" => Some(pk.clone()),
            "CTRL_PUBKEY_ID" => Some("op-admin-1".to_owned()),
            "GW_SIDECAR_INSECURE_PLAINTEXT" => Some("1".to_owned()),
            "GW_EDGE_KEY_HEX" => Some(testkit::fixtures::EDGE_KEY_HEX.to_owned()),
            _ => None,
        };
        Config::from_json(json, std::path::Path::new("test.json"), &env)
    }

    /// `/metrics` beyond loopback only over mutual TLS: refused at start
    /// otherwise, as is `ops_tls` without the TLS it would use.
    #[test]
    fn the_ops_listener_is_plain_on_loopback_only() {
        let err = |json: &str| match with(json) {
            Err(ConfigError::OutOfBounds(e)) => e.to_string(),
            r => panic!("{json}: {:?}", r.map(|_| ())),
        };
        assert!(with(r#"{"ops_listen": "127.0.0.1:9464"}"#).is_ok());
        assert!(with(r#"{"ops_listen": "[::1]:9464"}"#).is_ok());
        assert!(with(r#"{"ops_listen": null}"#).is_ok());
        for a in ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"] {
            let e = err(&format!(r#"{{"ops_listen": "{a}"}}"#));
            assert!(e.contains("ops_listen") && e.contains("ops_tls"), "{e}");
        }
        let e = err(r#"{"ops_listen": "0.0.0.0:9464", "ops_tls": true}"#);
        assert!(e.contains("ops_tls") && e.contains("tls.client_ca"), "{e}");
    }

    /// `max_body_bytes` within the filter's bound (1 MiB), and on the Kafka bus
    /// within what a record takes (`bus::MAX_COMMAND_BYTES`): a command the
    /// producer refused for its size was retried for ever at the head of the
    /// outbox, every later command (a kill too) behind it, across restarts.
    #[test]
    fn the_command_body_bound_fits_the_filter_and_a_kafka_record() {
        let bound = |json: &str| match with(json) {
            Ok(_) => Ok(()),
            Err(ConfigError::OutOfBounds(e)) => Err(e.to_string()),
            Err(e) => panic!("{json}: {e}"),
        };
        assert_eq!(bound(r#"{"max_body_bytes": 1048576}"#), Ok(()));
        for n in [0, 1_048_577] {
            let e = bound(&format!(r#"{{"max_body_bytes": {n}}}"#)).unwrap_err();
            assert!(e.contains("max_body_bytes"), "{e}");
        }
        let kafka = |n: usize| {
            format!(r#"{{"max_body_bytes": {n}, "kafka": {{"brokers": "127.0.0.1:9092"}}}}"#)
        };
        assert_eq!(
            bound(&kafka(crate::control::bus::MAX_COMMAND_BYTES)),
            Ok(())
        );
        let e = bound(&kafka(crate::control::bus::MAX_COMMAND_BYTES + 1)).unwrap_err();
        assert!(e.contains("max_body_bytes") && e.contains("Kafka"), "{e}");
    }

    /// The ClickHouse password from its variable or its file, never both: a
    /// stale `GW_CLICKHOUSE_PASSWORD` in an operator's shell used to win over the
    /// file the deployment named. The error does not echo the password.
    #[test]
    fn the_clickhouse_password_comes_from_its_variable_or_its_file_not_both() {
        let dir = testkit::TempDir::new("config-ch-pw");
        let file = dir.path().join("ch.pw");
        std::fs::write(&file, "from-the-file\n").expect("write");
        let file = file.to_string_lossy().into_owned();
        let pk = hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes());
        let load = |var: Option<&str>, path: Option<&str>| {
            let (var, path) = (var.map(str::to_owned), path.map(str::to_owned));
            let pk = pk.clone();
            let env = move |k: &str| match k {
                "CTRL_PUBKEY_HEX" => Some(pk.clone()),
                "GW_SIDECAR_INSECURE_PLAINTEXT" => Some("1".to_owned()),
                "GW_EDGE_KEY_HEX" => Some(testkit::fixtures::EDGE_KEY_HEX.to_owned()),
                "GW_CLICKHOUSE_PASSWORD" => var.clone(),
                "GW_CLICKHOUSE_PASSWORD_FILE" => path.clone(),
                _ => None,
            };
            Config::from_json("{}", std::path::Path::new("test.json"), &env)
        };
        let pw = |c: Config| c.clickhouse_password.clone();
        assert_eq!(
            pw(load(None, Some(&file)).expect("file")).as_deref(),
            Some("from-the-file")
        );
        assert_eq!(
            pw(load(Some("from-the-var"), None).expect("var")).as_deref(),
            Some("from-the-var")
        );
        match load(Some("from-the-var"), Some(&file)) {
            Err(ConfigError::Env("GW_CLICKHOUSE_PASSWORD_FILE", e)) => {
                assert!(e.contains("not both") && !e.contains("from-the"), "{e}");
            }
            r => panic!("{:?}", r.map(|_| ())),
        }
    }

    #[test]
    fn the_scheduling_slice_is_short_without_a_sender_and_the_kernels_with_one() {
        let slice = |json: &str| with(json).expect("config").sched_slice_us();
        assert_eq!(slice("{}"), crate::sched::DEFAULT_US);
        assert_eq!(slice(r#"{"sched_slice_us": 0}"#), 0);
        assert_eq!(slice(r#"{"sched_slice_us": 300}"#), 300);
        let sender = r#""sender": {"tpu": {}, "leaders": {"static": [{"tpu_quic": "127.0.0.1:8009",
            "identity": "11111111111111111111111111111111"}]}}"#;
        assert_eq!(slice(&format!("{{{sender}}}")), 0);
        assert_eq!(
            slice(&format!(r#"{{{sender}, "sched_slice_us": 100}}"#)),
            100
        );
    }

    /// The JSON route's signer must be the key of its id, and that key must be
    /// allowed to sign for `json_issuer`: otherwise every command the route signs
    /// is refused as if the caller were at fault. Refused at start instead.
    #[test]
    fn the_json_signer_is_its_ids_key_and_may_sign_for_its_issuer() {
        let load = |signer: &[u8; 32], json: &str| {
            let sk = hex::encode(signer);
            let pk = hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes());
            let env = move |k: &str| match k {
                "CTRL_PUBKEY_HEX" => Some(pk.clone()),
                "CTRL_SIGN_SK_HEX" => Some(sk.clone()),
                "GW_SIDECAR_INSECURE_PLAINTEXT" => Some("1".to_owned()),
                "GW_EDGE_KEY_HEX" => Some(testkit::fixtures::EDGE_KEY_HEX.to_owned()),
                _ => None,
            };
            Config::from_json(json, std::path::Path::new("test.json"), &env)
        };
        let own = testkit::fixtures::command_key().to_bytes();
        assert!(load(&own, "{}").is_ok());
        let other = match load(&[7; 32], "{}") {
            Err(ConfigError::Env("CTRL_SIGN_SK_HEX", e)) => e,
            r => panic!("{:?}", r.err()),
        };
        assert!(
            other.contains("is not command key `op-admin-1`'s"),
            "{other}"
        );
        let pk = hex::encode(testkit::fixtures::command_key().verifying_key().as_bytes());
        let scoped = |issuers: &str| {
            format!(
                r#"{{"command_keys": {{"keys": [{{"id": "op-admin-1", "public_key_hex": "{pk}", "issuers": {issuers}}}]}}}}"#
            )
        };
        assert!(load(&own, &scoped(r#"["dashboard"]"#)).is_ok());
        let scope = match load(&own, &scoped(r#"["ops"]"#)) {
            Err(ConfigError::Env("CTRL_SIGN_SK_HEX", e)) => e,
            r => panic!("{:?}", r.err()),
        };
        assert!(
            scope.contains("may sign no command for json_issuer `dashboard`"),
            "{scope}"
        );
    }

    #[test]
    fn kafka_tls_needs_its_files_and_a_key_with_its_certificate() {
        let tls = |t: &str| {
            with(&format!(
                r#"{{"kafka": {{"brokers": "127.0.0.1:9", "tls": {t}}}}}"#
            ))
        };
        match tls(r#"{"ca": "/dev/null", "cert": "/dev/null"}"#) {
            Err(ConfigError::OutOfBounds(e)) => assert_eq!(e.key, "kafka.tls"),
            other => panic!("{:?}", other.err()),
        }
        match tls(r#"{"ca": "/no/such/ca.pem"}"#) {
            Err(ConfigError::Read(p, _)) => assert_eq!(p, PathBuf::from("/no/such/ca.pem")),
            other => panic!("{:?}", other.err()),
        }
        let ok = tls(r#"{"ca": "/dev/null", "cert": "/dev/null", "key": "/dev/null"}"#);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn clickhouse_tls_and_the_urls_scheme_agree() {
        let d = std::env::temp_dir().join(format!("gw-config-ch-tls-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let ca = d.join("ca.pem");
        let made = rcgen::generate_simple_self_signed(vec!["clickhouse".into()]).unwrap();
        std::fs::write(&ca, made.cert.pem()).unwrap();
        let ch = |url: Option<&str>, ca: Option<&std::path::Path>| {
            let mut json = serde_json::json!({});
            if let Some(u) = url {
                json["clickhouse_url"] = u.into();
            }
            if let Some(ca) = ca {
                json["clickhouse_tls"] = serde_json::json!({ "ca": ca });
            }
            with(&json.to_string())
        };
        let refused = |r: Result<Config, ConfigError>| match r {
            Err(ConfigError::OutOfBounds(e)) => e.key,
            other => panic!("{:?}", other.map(|_| ())),
        };
        for (url, tls, key) in [
            (Some("https://clickhouse:8443"), None, "clickhouse_tls"),
            (
                Some("http://clickhouse:8123"),
                Some(ca.as_path()),
                "clickhouse_url",
            ),
            (None, Some(ca.as_path()), "clickhouse_tls"),
            (Some("ftp://clickhouse:8123"), None, "clickhouse_url"),
            (Some("clickhouse:8123"), None, "clickhouse_url"),
            (
                Some("http://gw:secret@clickhouse:8123"),
                None,
                "clickhouse_url",
            ),
            (
                Some("http://clickhouse:8123/?password=secret"),
                None,
                "clickhouse_url",
            ),
            // A CA file without a certificate.
            (
                Some("https://clickhouse:8443"),
                Some(std::path::Path::new("/dev/null")),
                "clickhouse_tls",
            ),
        ] {
            assert_eq!(refused(ch(url, tls)), key, "{url:?} {tls:?}");
        }
        let ok = ch(Some("https://clickhouse:8443"), Some(&ca)).unwrap();
        assert_eq!(ok.clickhouse_transport(), "TLS");
        assert!(!ok.clickhouse_in_clear());
        assert!(ok.clickhouse().unwrap().is_some());
        for (url, clear) in [
            ("http://127.0.0.1:8123", false),
            ("http://127.0.0.7:8123", false),
            ("http://LOCALHOST:8123", false),
            ("http://[::1]:8123", false),
            ("http://clickhouse:8123", true),
            ("http://10.0.0.5:8123", true),
            ("http://[fd00::5]:8123", true),
        ] {
            let c = ch(Some(url), None).unwrap();
            assert_eq!(
                (c.clickhouse_in_clear(), c.clickhouse_transport()),
                (clear, "plain text"),
                "{url}"
            );
        }
        assert!(!ch(None, None).unwrap().clickhouse_in_clear());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn values_out_of_bounds_are_refused_by_their_key() {
        for (json, key) in [
            (r#"{"ledger_ship_every_ms": 10001}"#, "ledger_ship_every_ms"),
            (r#"{"clickhouse_nice": 20}"#, "clickhouse_nice"),
            (r#"{"agent_dedup_secs": 2592001}"#, "agent_dedup_secs"),
            (r#"{"max_skew_secs": 601}"#, "max_skew_secs"),
            (r#"{"max_skew_secs": 0}"#, "max_skew_secs"),
            (r#"{"audit_memory_rows": 99}"#, "audit_memory_rows"),
            (r#"{"audit_memory_bytes": 1048575}"#, "audit_memory_bytes"),
            (
                r#"{"kafka": {"brokers": "k:9092", "max_outbox_commands": 0}}"#,
                "kafka.max_outbox_commands",
            ),
            (
                r#"{"kafka": {"brokers": "k:9092", "max_outbox_bytes": 1048575}}"#,
                "kafka.max_outbox_bytes",
            ),
            (
                r#"{"journal_segment_bytes": 1024}"#,
                "journal_segment_bytes",
            ),
            (r#"{"node_id": "a b"}"#, "node_id"),
            (r#"{"command_role": ""}"#, "command_role"),
            (r#"{"command_role": "admin,viewer"}"#, "command_role"),
            (r#"{"command_role": "ad min"}"#, "command_role"),
            (r#"{"routes": []}"#, "routes"),
            (r#"{"command_path": "api/x"}"#, "command_path"),
            (r#"{"command_path": "/x\"><script>"}"#, "command_path"),
            (r#"{"command_path": "//evil.example/x"}"#, "command_path"),
            (r#"{"routes": [{"prefix": "/api/"}]}"#, "routes"),
            (r#"{"sched_slice_us": 50}"#, "sched_slice_us"),
            (r#"{"sched_slice_us": 100001}"#, "sched_slice_us"),
            (
                r#"{"models": {"dir": "/m", "allowed_sha256": ["abc"]}}"#,
                "models.allowed_sha256",
            ),
            (
                r#"{"models": {"dir": "/m", "allowed_sha256": ["zz"]}}"#,
                "models.allowed_sha256",
            ),
            (
                r#"{"models": {"dir": "/m", "predict_timeout_ms": 50}}"#,
                "models.predict_timeout_ms",
            ),
            (
                r#"{"models": {"dir": "/m", "required": ["hft"]}}"#,
                "models.required",
            ),
            (
                r#"{"models": {"dir": "/m", "n_features": 257}}"#,
                "models.n_features",
            ),
            (
                r#"{"models": {"dir": "/m", "n_features": 0}}"#,
                "models.n_features",
            ),
            (
                r#"{"models": {"dir": "/m", "features": {"arbitrage": 300}}}"#,
                "models.features.arbitrage",
            ),
        ] {
            match with(json) {
                Err(ConfigError::OutOfBounds(e)) => assert_eq!(e.key, key, "{json}"),
                other => panic!("{json}: {:?}", other.err()),
            }
        }
        let c = with(r#"{"ledger_ship_every_ms": 0, "clickhouse_nice": 0}"#).unwrap();
        assert_eq!(
            (c.file.ledger_ship_every_ms, c.file.clickhouse_nice),
            (0, 0)
        );
        let c = with("{}").unwrap();
        assert_eq!(
            (c.file.ledger_ship_every_ms, c.file.clickhouse_nice),
            (200, 19)
        );
        // Digests are compared in lowercase, as the host writes them.
        let d = "AB".repeat(32);
        let c = with(&format!(
            r#"{{"models": {{"dir": "/m", "allowed_sha256": ["{d}"]}}}}"#
        ))
        .unwrap();
        let policy = c.file.models.as_ref().unwrap().policy();
        let allowed = policy.allowed_sha256.unwrap();
        assert!(allowed.contains(&"ab".repeat(32)) && allowed.len() == 1);
        assert!(with(r#"{"models": {"dir": "/m"}}"#)
            .unwrap()
            .file
            .models
            .unwrap()
            .policy()
            .allowed_sha256
            .is_none());
    }
}
