//! The node's TOML configuration. Every setting but the org id has a documented default;
//! relative paths are resolved against the directory holding the configuration file.
//!
//! ```toml
//! org_id = "shelter-my"                 # required: this node's org id
//! data_dir = "."                        # SQLite database and runtime state
//! directory = "directory.toml"          # federation directory file; its governance
//!                                       # signatures are in directory.toml.sig
//!
//! [governance]                          # required: who signs the directory
//! keys = ["<base64 Ed25519 public key>", ...]
//! threshold = 2                         # signatures of distinct keys a directory needs
//!
//! [federation]                          # listener for other nodes (mutual TLS)
//! listen = "0.0.0.0:7443"
//! ca_cert = "ca.pem"                    # federation CA (PEM)
//! cert = "tls.pem"                      # this org's certificate chain (PEM)
//! key = "tls.key"                       # its private key (PEM, mode 0600)
//! handshake_timeout_ms = 5000            # 100 to 600000
//! max_message_bytes = 300000            # larger messages are refused
//! max_connections = 1024               # members' connections (handshakes not counted), at most
//!                                       # 16 of one member
//! refused_envelopes_burst = 600         # envelopes of one member refused (and audited) in
//! refused_envelopes_per_minute = 60     # a burst, and after it; beyond, its envelopes are
//!                                       # turned away unexamined until the budget refills
//!
//! [local]                               # caseworker API (bearer tokens)
//! listen = "127.0.0.1:7080"             # loopback only: tokens travel without TLS
//!
//! [keys]
//! signing_key = "signing.key"           # Ed25519 seed, base64 (mode 0600)
//! sealing_key = "sealing.key"           # X25519 private key, base64 (mode 0600)
//! previous_sealing_keys = []            # keys rotated out, kept to open what was sealed
//!                                       # to them before the directory changed
//! data_key = "data.key"                 # key-encryption key for data at rest, 32 bytes
//!                                       # base64 (mode 0600); losing it loses the data
//!
//! [audit]
//! checkpoint_interval_ms = 1000         # sign a new checkpoint at most this often
//! witnesses = []                        # org ids asked to cosign our checkpoints
//! cosignature_refresh_s = 600           # ask them again this often while the log
//!                                       # does not grow (1 to 86400), so auditors
//!                                       # can tell a quiet log from a stuck one
//! witness_for = []                      # org ids whose checkpoints we cosign
//!
//! [retention]                           # how long received referrals are kept
//! default_days = 180
//! check_interval_s = 60
//! [retention.purposes]                  # per-purpose overrides, in days
//! # return-assistance = 90
//!
//! [delivery]
//! initial_backoff_ms = 500
//! max_backoff_ms = 60000
//! envelope_ttl_hours = 72
//! request_timeout_ms = 10000             # 100 to 3600000
//! max_in_flight = 128                  # attempts at once; more wait in the outbox
//!
//! [log]
//! filter = "info"                       # tracing filter; RUST_LOG overrides it
//! format = "text"                       # "text" or "json"
//!
//! [metrics]                             # Prometheus metrics, GET /metrics (OpenMetrics)
//! # listen = "127.0.0.1:9464"           # off unless set; counts and times only, no
//!                                       # personal data, but activity levels: expose
//!                                       # it to the monitoring network only
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use corridor::OrgId;
use serde::Deserialize;

/// Most deliveries in flight at once that a configuration may ask for.
const MAX_IN_FLIGHT: usize = 10_000;
/// Most concurrent federation connections that a configuration may allow.
const MAX_CONNECTIONS: usize = 100_000;
/// Largest federation message a configuration may allow: 64 MiB.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub org_id: OrgId,
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "defaults::directory")]
    pub directory: PathBuf,
    pub governance: GovernanceConfig,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The file this configuration was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

/// The federation's governance keys: the node accepts a directory only with `threshold`
/// signatures of distinct ones among them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GovernanceConfig {
    /// Base64 Ed25519 public keys.
    pub keys: Vec<String>,
    pub threshold: usize,
}

impl GovernanceConfig {
    pub fn governance(&self) -> Result<corridor::directory::Governance, String> {
        let keys = self
            .keys
            .iter()
            .map(|k| corridor::VerifyingKey::from_base64(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("governance.keys: {e}"))?;
        corridor::directory::Governance::new(keys, self.threshold).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub checkpoint_interval_ms: u64,
    pub witnesses: Vec<OrgId>,
    pub cosignature_refresh_s: u64,
    pub witness_for: Vec<OrgId>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval_ms: 1000,
            witnesses: Vec::new(),
            cosignature_refresh_s: 600,
            witness_for: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub default_days: u32,
    pub check_interval_s: u64,
    pub purposes: std::collections::BTreeMap<String, u32>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            default_days: 180,
            check_interval_s: 60,
            purposes: Default::default(),
        }
    }
}

impl RetentionConfig {
    /// How long a referral received for `purpose` is kept, in milliseconds.
    pub fn retention_ms(&self, purpose: corridor::Purpose) -> i64 {
        let days = self
            .purposes
            .get(purpose.as_str())
            .copied()
            .unwrap_or(self.default_days);
        i64::from(days) * 86_400_000
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    pub listen: SocketAddr,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub handshake_timeout_ms: u64,
    pub max_message_bytes: usize,
    /// Members' connections open at once. A connection counts once its handshake proved
    /// a member; handshakes in progress have their own bounds (see `tls`).
    pub max_connections: usize,
    /// Refusals of one member's envelopes this node examines, and records in its audit
    /// log, at once (see [`crate::refusals`]); 1 to 1 000 000.
    pub refused_envelopes_burst: u32,
    /// How fast that budget refills; 1 to 1 000 000.
    pub refused_envelopes_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub listen: SocketAddr,
}

/// Prometheus metrics (`crate::metrics`): off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    pub signing_key: PathBuf,
    pub sealing_key: PathBuf,
    /// Sealing keys rotated out: envelopes sealed to them before the directory listed
    /// the new one (queued at their senders, say) still open.
    pub previous_sealing_keys: Vec<PathBuf>,
    pub data_key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub envelope_ttl_hours: u64,
    pub request_timeout_ms: u64,
    /// Delivery attempts running at once. A referral queued while all are busy is read
    /// back from the outbox when one ends, three reads instead of none: below the load a
    /// node carries, this costs more CPU per referral than the attempts it bounds.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub filter: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

mod defaults {
    use std::path::PathBuf;
    pub fn data_dir() -> PathBuf {
        PathBuf::from(".")
    }
    pub fn directory() -> PathBuf {
        PathBuf::from("directory.toml")
    }
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            ca_cert: "ca.pem".into(),
            cert: "tls.pem".into(),
            key: "tls.key".into(),
            handshake_timeout_ms: 5000,
            max_message_bytes: 300_000,
            max_connections: 1024,
            refused_envelopes_burst: 600,
            refused_envelopes_per_minute: 60,
        }
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            signing_key: "signing.key".into(),
            sealing_key: "sealing.key".into(),
            previous_sealing_keys: Vec::new(),
            data_key: "data.key".into(),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            envelope_ttl_hours: 72,
            request_timeout_ms: 10_000,
            max_in_flight: 128,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses and validates a configuration file, resolving relative paths
    /// against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.path = path.to_owned();
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.directory,
            &mut self.federation.ca_cert,
            &mut self.federation.cert,
            &mut self.federation.key,
            &mut self.keys.signing_key,
            &mut self.keys.sealing_key,
            &mut self.keys.data_key,
        ]
        .into_iter()
        .chain(&mut self.keys.previous_sealing_keys)
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        self.governance.governance()?;
        let d = &self.delivery;
        if d.initial_backoff_ms == 0 || d.max_backoff_ms < d.initial_backoff_ms {
            return Err("delivery: need 0 < initial_backoff_ms <= max_backoff_ms".into());
        }
        if d.envelope_ttl_hours == 0 || d.envelope_ttl_hours > 24 * 30 {
            return Err("delivery.envelope_ttl_hours must be between 1 and 720".into());
        }
        // Upper bounds too: each is a semaphore's size, and a semaphore of more permits
        // than tokio allows panics in the task that creates it.
        if d.max_in_flight == 0 || d.max_in_flight > MAX_IN_FLIGHT {
            return Err(format!(
                "delivery.max_in_flight must be between 1 and {MAX_IN_FLIGHT}"
            ));
        }
        let f = &self.federation;
        if f.max_message_bytes < 4096 || f.max_message_bytes > MAX_MESSAGE_BYTES {
            return Err(format!(
                "federation.max_message_bytes must be between 4096 and {MAX_MESSAGE_BYTES}"
            ));
        }
        for (purpose, days) in &self.retention.purposes {
            corridor::Purpose::parse(purpose).map_err(|e| format!("retention.purposes: {e}"))?;
            if *days == 0 {
                return Err(format!(
                    "retention.purposes.{purpose} must be at least 1 day"
                ));
            }
        }
        if self.audit.checkpoint_interval_ms < 10 {
            return Err("audit.checkpoint_interval_ms must be at least 10".into());
        }
        if self.audit.witnesses.contains(&self.org_id)
            || self.audit.witness_for.contains(&self.org_id)
        {
            return Err("a node cannot witness its own log".into());
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter).map_err(|e| {
            format!(
                "log.filter {:?} is not a tracing filter: {e}",
                self.log.filter
            )
        })?;
        if self.retention.default_days == 0 || self.retention.check_interval_s == 0 {
            return Err("retention.default_days and check_interval_s must be at least 1".into());
        }
        if f.max_connections == 0 || f.max_connections > MAX_CONNECTIONS {
            return Err(format!(
                "federation.max_connections must be between 1 and {MAX_CONNECTIONS}"
            ));
        }
        for (name, value) in [
            ("refused_envelopes_burst", f.refused_envelopes_burst),
            (
                "refused_envelopes_per_minute",
                f.refused_envelopes_per_minute,
            ),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(format!("federation.{name} must be between 1 and 1000000"));
            }
        }
        // Zero would time every handshake or request out at once; a day of checkpoints
        // apart would leave the log unwitnessed for as long.
        if !(100..=600_000).contains(&f.handshake_timeout_ms) {
            return Err("federation.handshake_timeout_ms must be between 100 and 600000".into());
        }
        if !(100..=3_600_000).contains(&d.request_timeout_ms) {
            return Err("delivery.request_timeout_ms must be between 100 and 3600000".into());
        }
        if self.audit.checkpoint_interval_ms > 86_400_000 {
            return Err("audit.checkpoint_interval_ms must be at most 86400000 (a day)".into());
        }
        // Auditors judge a log by how recently its witnesses vouched for it: more than a
        // day apart would make every quiet log look stuck to them.
        if !(1..=86_400).contains(&self.audit.cosignature_refresh_s) {
            return Err("audit.cosignature_refresh_s must be between 1 and 86400 (a day)".into());
        }
        // The local API carries bearer tokens without TLS: it stays on this machine.
        if !self.local.listen.ip().is_loopback() {
            return Err(format!(
                "local.listen {} must be a loopback address: the local API carries bearer tokens without TLS",
                self.local.listen
            ));
        }
        let mut listeners = vec![
            ("federation.listen", f.listen),
            ("local.listen", self.local.listen),
        ];
        listeners.extend(self.metrics.listen.map(|addr| ("metrics.listen", addr)));
        for (i, (name, addr)) in listeners.iter().enumerate() {
            for (other_name, other) in &listeners[i + 1..] {
                if addr.port() == other.port()
                    && (addr.ip() == other.ip()
                        || addr.ip().is_unspecified()
                        || other.ip().is_unspecified())
                {
                    return Err(format!(
                        "{name} {addr} and {other_name} {other} would take the same port"
                    ));
                }
            }
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            return Err(format!(
                "data_dir {} exists and is not a directory",
                self.data_dir.display()
            ));
        }
        Ok(())
    }

    /// The SQLite database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("corridor.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A governance section of one key, which every configuration needs.
    fn governance() -> String {
        let key = corridor::SigningKey::from_seed(&[1; 32]).unwrap();
        format!(
            "[governance]\nkeys = [\"{}\"]\nthreshold = 1\n",
            key.verifying_key().to_base64()
        )
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let dir = std::env::temp_dir().join(format!("corridor-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(&path, format!("org_id = \"shelter-my\"\n{}", governance())).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.org_id.as_str(), "shelter-my");
        assert_eq!(c.local.listen.to_string(), "127.0.0.1:7080");
        assert_eq!(c.keys.signing_key, dir.join("signing.key"));
        assert_eq!(c.delivery.max_backoff_ms, 60_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_configs_are_named() {
        let dir = std::env::temp_dir().join(format!("corridor-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        for (text, word) in [
            ("org_id = \"Bad Org\"\n", "org id"),
            ("org_id = \"a\"\nunknown = 1\n", "unknown"),
            (
                "org_id = \"a\"\n[delivery]\ninitial_backoff_ms = 0\n",
                "backoff",
            ),
            (
                "org_id = \"a\"\n[delivery]\nmax_in_flight = 100000000\n",
                "max_in_flight",
            ),
            (
                "org_id = \"a\"\n[federation]\nmax_connections = 0\n",
                "max_connections",
            ),
            (
                "org_id = \"a\"\n[federation]\nrefused_envelopes_burst = 0\n",
                "refused_envelopes_burst",
            ),
            (
                "org_id = \"a\"\n[federation]\nrefused_envelopes_per_minute = 2000000\n",
                "refused_envelopes_per_minute",
            ),
            (
                "org_id = \"a\"\n[federation]\nmax_connections = 1000000000000\n",
                "max_connections",
            ),
            (
                "org_id = \"a\"\n[federation]\nmax_message_bytes = 1000000000000\n",
                "max_message_bytes",
            ),
            (
                "org_id = \"a\"\n[federation]\nhandshake_timeout_ms = 0\n",
                "handshake_timeout_ms",
            ),
            (
                "org_id = \"a\"\n[delivery]\nrequest_timeout_ms = 0\n",
                "request_timeout_ms",
            ),
            (
                "org_id = \"a\"\n[audit]\ncheckpoint_interval_ms = 18446744073709551615\n",
                "checkpoint_interval_ms",
            ),
            (
                "org_id = \"a\"\n[audit]\ncosignature_refresh_s = 0\n",
                "cosignature_refresh_s",
            ),
            (
                "org_id = \"a\"\n[audit]\ncosignature_refresh_s = 86401\n",
                "cosignature_refresh_s",
            ),
            (
                "org_id = \"a\"\n[local]\nlisten = \"0.0.0.0:7080\"\n",
                "must be a loopback address",
            ),
            (
                "org_id = \"a\"\n[local]\nlisten = \"127.0.0.1:7443\"\n",
                "would take the same port",
            ),
            (
                "org_id = \"a\"\n[metrics]\nlisten = \"127.0.0.1:7080\"\n",
                "local.listen 127.0.0.1:7080 and metrics.listen 127.0.0.1:7080 would take the same port",
            ),
            (
                "org_id = \"a\"\n[metrics]\nlisten = \"127.0.0.1:7443\"\n",
                "federation.listen 0.0.0.0:7443 and metrics.listen",
            ),
        ] {
            // The governance section goes after the top-level keys, before the rest.
            let (first, rest) = text.split_once('\n').unwrap();
            std::fs::write(&path, format!("{first}\n{}{rest}", governance())).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(word), "{err} should mention {word}");
        }
        for (text, word) in [
            ("org_id = \"a\"\n".to_string(), "governance"),
            (
                format!("org_id = \"a\"\n{}", governance().replace("= 1", "= 0")),
                "threshold",
            ),
            (
                "org_id = \"a\"\n[governance]\nkeys = [\"x\"]\nthreshold = 1\n".to_string(),
                "governance.keys",
            ),
            (
                format!("org_id = \"a\"\ndata_dir = \"node.toml\"\n{}", governance()),
                "is not a directory",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(word), "{err} should mention {word}");
        }
        assert!(Config::load(&dir.join("missing.toml")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
